"""`python -m engine caption_images`: captions for text-to-image items, edit instructions for control -> target pairs.

Order: check the options, the dataset listing and (from headers) that the text encoder has an lm_head; then load
the tokenizer and Qwen2.5-VL (lm_head included; --fp8_vl as for caching) and write one caption per selected item
with transformers' `generate`. The prompt goes through the chat template and the vision processor, so every image
becomes W·H/784 vision tokens (engine/spec/dataset/captions.py: vl_size).

Without --review_file each caption is written as soon as it is made (a replaced file is backed up first), so a
stopped run resumes by skipping the items that have a caption. With --review_file nothing of the person's is
written: each caption becomes a proposal in that file, and a rerun skips the items it holds.
"""

from __future__ import annotations

import logging
import time

import torch

from engine.caption import files, prompts
from engine.models.runtime import resolve_device
from engine.models.text_encoder import check_can_generate, load_text_encoder
from engine.models.tokenizer import VisionProcessor, load_tokenizer, resolve_tokenizer_folder
from engine.spec.dataset import captions as C
from engine.spec.dataset.schema import load_dataset_config
from engine.spec.errors import OptionError

log = logging.getLogger(__name__)
IM_END, PAD = "<|im_end|>", "<|endoftext|>"


def run(cfg, events) -> list[str]:
    events.phase("checking")
    _check_options(cfg)
    config = load_dataset_config(cfg.dataset_config)
    targets, problems = C.caption_targets(config)
    files.check_listing(problems, targets, cfg.dataset_config)
    review = C.read_review(cfg.review_file) if cfg.review_file else []
    todo = files.select(targets, cfg.overwrite, {p.key for p in review})
    log.info("%d item(s): %d to caption, %d skipped (already captioned%s)", len(targets), len(todo),
             len(targets) - len(todo), " or in the review file" if cfg.review_file else "")
    if not todo:
        return [cfg.review_file] if cfg.review_file else []
    check_can_generate(cfg.text_encoder)
    device = resolve_device(cfg.device)
    tokenizer_folder = resolve_tokenizer_folder(cfg.tokenizer)

    events.phase("loading")
    tokenizer = load_tokenizer(tokenizer_folder)
    processor = VisionProcessor(tokenizer)
    model = load_text_encoder(cfg.text_encoder, device=device, fp8_vl=cfg.fp8_vl, need_lm_head=True)

    events.phase("captioning", total=len(todo))
    written, started = [], time.time()
    for n, target in enumerate(todo, 1):
        text = C.instruction(target.kind, cfg.caption_style, len(target.control_paths), cfg.caption_prompt)
        raw = generate(model, tokenizer, processor, files.open_images(target, cfg.caption_image_area), text, cfg)
        if not prompts.finish(raw, None):
            log.warning("%s: the model wrote nothing (it ended at once); no caption kept, a rerun tries again",
                        target.stem)
        else:
            caption = prompts.finish(raw, cfg.trigger_word)
            written += _keep(cfg, target, caption)
            log.info("%s (%s): %s", target.stem, target.kind, caption)
        eta = (time.time() - started) / n * (len(todo) - n)
        events.progress(n, len(todo), unit="caption", eta_s=round(eta, 1), stem=target.stem, kind=target.kind)
    return [cfg.review_file] if cfg.review_file else written


def _check_options(cfg) -> None:
    for name in ("dataset_config", "text_encoder"):
        if not getattr(cfg, name):
            raise OptionError(f"caption_images needs --{name}.",
                              "Example: python -m engine caption_images --dataset_config dataset.toml "
                              "--text_encoder qwen_2.5_vl_7b.safetensors")
    if cfg.review_file and not str(cfg.review_file).endswith(".jsonl"):
        raise OptionError(f"--review_file {cfg.review_file}: the review file is JSON lines.",
                          "End its name with .jsonl.")


def _keep(cfg, target: C.CaptionTarget, caption: str) -> list[str]:
    """Write the caption (CLI) or add it to the review file (review mode); each write is atomic."""
    if cfg.review_file:
        proposal = C.Proposal(target.dataset, target.stem, target.kind, str(target.image_path),
                              [str(p) for p in target.control_paths], str(target.write_to), target.in_jsonl,
                              target.current, caption)
        C.add_proposal(cfg.review_file, proposal)
        return []
    backup = C.write_caption(target.write_to, target.image_path, caption, target.in_jsonl, cfg.backup_dir)
    if backup:
        log.info("the previous caption of %s is kept in %s", target.stem, backup)
    return [str(target.write_to)]


@torch.no_grad()
def generate(model, tokenizer, processor, images, text: str, cfg) -> str:
    """One caption: the chat prompt with `images`, through the processor, then transformers' generate; the new
    tokens decoded without the special ones."""
    prompt = prompts.prompt_text(tokenizer, len(images), text)
    inputs = processor([prompt], images)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(model.model.visual.dtype)
    options = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                   eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
                   pad_token_id=tokenizer.convert_tokens_to_ids(PAD))
    if cfg.do_sample:
        options.update(temperature=cfg.temperature, top_p=cfg.top_p)
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)      # per item: a resumed run writes what an uninterrupted one would
    out = model.generate(**inputs, **options)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
