"""caption_images on a tiny Qwen2.5-VL with the real Qwen2 vocabulary: random weights (the text is noise), real
mechanics: the chat template and tokenizer, image tokens reaching the vision tower, resume, consent and backups."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration

from engine.__main__ import main
from engine.caption import prompts
from engine.demo import save_text_encoder_comfy
from engine.models.inspect import inspect_path
from engine.models.safetensors_io import load_file, save_file_atomic
from engine.models.text_encoder import check_can_generate
from engine.spec.config import CaptionImagesConfig
from engine.spec.dataset import captions as C
from engine.spec.errors import ModelFileError
from engine.spec.safetensors_header import read_header
from engine.spec.vram import estimate_config
from engine.spec.vram import params as P

AREA = 56 * 84          # small images for the vision tower: 6 tokens at 56×84


def _image(path: Path, w: int, h: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def dataset(tmp_path) -> Path:
    """datasets[0]: three text-to-image targets, `t1` already captioned. datasets[1]: two edit pairs, `e0` with two
    controls, `e1` with one; no captions."""
    _image(tmp_path / "t2i" / "t0.png", 64, 64, 1)
    _image(tmp_path / "t2i" / "t1.png", 48, 80, 2)
    _image(tmp_path / "t2i" / "t2.png", 300, 200, 3)
    (tmp_path / "t2i" / "t1.txt").write_text("my own caption\n", encoding="utf-8")
    _image(tmp_path / "edit" / "e0.png", 64, 64, 4)
    _image(tmp_path / "edit" / "e1.png", 64, 32, 5)
    _image(tmp_path / "ctl" / "e0_0.png", 64, 64, 6)
    _image(tmp_path / "ctl" / "e0_1.png", 40, 72, 7)
    _image(tmp_path / "ctl" / "e1.png", 64, 32, 8)
    cfg = tmp_path / "dataset.toml"
    cfg.write_text(f'[general]\nresolution = [64, 64]\n'
                   f'[[datasets]]\nimage_directory = "{tmp_path / "t2i"}"\ncache_directory = "{tmp_path / "c0"}"\n'
                   f'[[datasets]]\nimage_directory = "{tmp_path / "edit"}"\ncontrol_directory = "{tmp_path / "ctl"}"\n'
                   f'cache_directory = "{tmp_path / "c1"}"\n', encoding="utf-8")
    return cfg


@pytest.fixture
def spy(monkeypatch):
    """Records every generate call: the prompt ids, the image grids, the vision tower's output rows, the new tokens."""
    calls: list[dict] = []
    original = Qwen2_5_VLForConditionalGeneration.generate

    def generate(self, **kwargs):
        rows: list[int] = []
        hook = self.model.visual.merger.register_forward_hook(lambda m, a, out: rows.append(out.shape[0]))
        try:
            out = original(self, **kwargs)
        finally:
            hook.remove()
        prompt = kwargs["input_ids"].shape[1]
        calls.append(dict(ids=kwargs["input_ids"][0].tolist(), grids=kwargs["image_grid_thw"].tolist(),
                          vision_rows=rows, new=out.shape[1] - prompt, kwargs=kwargs,
                          head_dtype=self.lm_head.weight.dtype))
        return out

    monkeypatch.setattr(Qwen2_5_VLForConditionalGeneration, "generate", generate)
    return calls


def run(tmp: Path, te, tok, *argv: str) -> tuple[int, list[dict]]:
    events = tmp / f"events_{len(list(tmp.glob('events_*')))}.jsonl"
    rc = main(["caption_images", "--text_encoder", str(te), "--tokenizer", str(tok), "--device", "cpu",
               "--caption_image_area", str(AREA), "--max_new_tokens", "6", "--events_file", str(events), *argv])
    return rc, [json.loads(x) for x in events.read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "events_" not in p.name}


def expected_tokens(paths) -> int:
    return sum(C.vl_tokens(C.vl_size(Image.open(p).size, AREA)) for p in paths)


def test_one_caption_per_item_through_the_chat_template(dataset, spy, real_tokenizer, real_tokenizer_dir,
                                                        tiny_te_for_real_tokenizer_file, tmp_path):
    rc, events = run(tmp_path, tiny_te_for_real_tokenizer_file, real_tokenizer_dir, "--dataset_config", str(dataset))
    assert rc == 0, [e for e in events if e["type"] == "error"]
    # the four items without a caption, in listing order; t1's own caption untouched
    assert [e["stem"] for e in events if e["type"] == "progress"] == ["t0", "t2", "e0", "e1"]
    assert (tmp_path / "t2i" / "t1.txt").read_text(encoding="utf-8") == "my own caption\n"
    assert not (tmp_path / "t2i" / ".caption_backups").exists()
    for path in (tmp_path / "t2i" / "t0.txt", tmp_path / "t2i" / "t2.txt", tmp_path / "edit" / "e0.txt",
                 tmp_path / "edit" / "e1.txt"):
        text = path.read_text(encoding="utf-8")
        assert text.endswith("\n") and text.count("\n") == 1 and text.strip()
    assert len(spy) == 4

    image_id = real_tokenizer.convert_tokens_to_ids("<|image_pad|>")
    sources = [[tmp_path / "t2i" / "t0.png"], [tmp_path / "t2i" / "t2.png"],
               [tmp_path / "ctl" / "e0_0.png", tmp_path / "ctl" / "e0_1.png", tmp_path / "edit" / "e0.png"],
               [tmp_path / "ctl" / "e1.png", tmp_path / "edit" / "e1.png"]]
    for call, paths in zip(spy, sources):
        text = real_tokenizer.decode(call["ids"])
        # Qwen2.5-VL-Instruct's conversation, one image slot per image, the assistant turn opened
        assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                               "<|vision_start|><|image_pad|>")
        assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert text.count("<|vision_start|>") == len(paths)
        # every image reaches the vision tower as W·H/784 tokens, and the prompt holds exactly that many slots
        assert call["vision_rows"] == [expected_tokens(paths)]
        assert call["ids"].count(image_id) == expected_tokens(paths)
        assert 1 <= call["new"] <= 6
        assert call["kwargs"]["eos_token_id"] == real_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert C.vl_size((300, 200), AREA) == (84, 56)            # scaled down, multiples of 28
    assert "input of an image edit" in real_tokenizer.decode(spy[2]["ids"])
    assert "one-sentence caption" in real_tokenizer.decode(spy[0]["ids"])


def test_review_mode_writes_nothing_then_accept_keeps_a_backup(dataset, spy, real_tokenizer_dir,
                                                              tiny_te_for_real_tokenizer_file, tmp_path):
    review = tmp_path / "run" / C.REVIEW_FILE
    before = snapshot(tmp_path)
    rc, _ = run(tmp_path, tiny_te_for_real_tokenizer_file, real_tokenizer_dir, "--dataset_config", str(dataset),
                "--review_file", str(review), "--overwrite", "--trigger_word", "zqx style")
    assert rc == 0
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("run/")} == before   # nothing of the user's changed
    proposals = C.read_review(review)
    assert [p.stem for p in proposals] == ["t0", "t1", "t2", "e0", "e1"]
    assert [p.kind for p in proposals] == ["caption"] * 3 + ["edit"] * 2
    assert all(p.caption.startswith("zqx style, ") and p.status == C.PENDING for p in proposals)
    assert proposals[1].previous == "my own caption"

    changed = C.accept(review, {(0, "t1"): "  an edited caption ", (0, "t0"): None,
                                (1, "e1"): proposals[4].caption})
    assert {p.stem: p.status for p in changed} == {"t0": C.REJECTED, "t1": C.ACCEPTED, "e1": C.ACCEPTED}
    assert (tmp_path / "t2i" / "t1.txt").read_text(encoding="utf-8") == "an edited caption\n"
    backups = list((tmp_path / "t2i" / C.BACKUP_FOLDER).glob("t1.txt.*.bak"))
    assert len(backups) == 1 and backups[0].read_text(encoding="utf-8") == "my own caption\n"
    assert not (tmp_path / "t2i" / "t0.txt").exists()                       # rejected: not written
    assert (tmp_path / "edit" / "e1.txt").read_text(encoding="utf-8") == proposals[4].caption + "\n"
    status = {p.stem: p.status for p in C.read_review(review)}
    assert status == {"t0": C.REJECTED, "t1": C.ACCEPTED, "t2": C.PENDING, "e0": C.PENDING, "e1": C.ACCEPTED}
    assert C.accept(review, {(0, "t1"): "again"}) == []                        # a decision is made once


def test_resume_skips_done_items(dataset, spy, monkeypatch, real_tokenizer_dir, tiny_te_for_real_tokenizer_file,
                                 tmp_path):
    review = tmp_path / "run" / C.REVIEW_FILE
    original = Qwen2_5_VLForConditionalGeneration.generate

    def stop_on_third(self, **kwargs):
        if len(spy) == 2:
            raise KeyboardInterrupt
        return original(self, **kwargs)

    monkeypatch.setattr(Qwen2_5_VLForConditionalGeneration, "generate", stop_on_third)
    rc, _ = run(tmp_path, tiny_te_for_real_tokenizer_file, real_tokenizer_dir, "--dataset_config", str(dataset),
                "--review_file", str(review))
    assert rc == 130
    first = C.read_review(review)
    assert [p.stem for p in first] == ["t0", "t2"]                            # the file is whole after a stop

    monkeypatch.setattr(Qwen2_5_VLForConditionalGeneration, "generate", original)
    spy.clear()
    rc, events = run(tmp_path, tiny_te_for_real_tokenizer_file, real_tokenizer_dir, "--dataset_config",
                     str(dataset), "--review_file", str(review))
    assert rc == 0
    assert [e["stem"] for e in events if e["type"] == "progress"] == ["e0", "e1"]
    final = C.read_review(review)
    assert [p.stem for p in final] == ["t0", "t2", "e0", "e1"] and final[:2] == first

    # written captions count as done too: the CLI run writes the missing ones, a second run loads no model
    rc, _ = run(tmp_path, tiny_te_for_real_tokenizer_file, real_tokenizer_dir, "--dataset_config", str(dataset))
    assert rc == 0
    calls = len(spy)
    rc, events = run(tmp_path, tiny_te_for_real_tokenizer_file, real_tokenizer_dir, "--dataset_config", str(dataset))
    assert rc == 0 and len(spy) == calls
    assert not [e for e in events if e["type"] == "phase" and e["name"] == "loading"]


def test_overwrite_backs_up_and_seed_repeats(dataset, spy, real_tokenizer_dir, tiny_te_for_real_tokenizer_file,
                                            tmp_path):
    texts = []
    for _ in range(2):
        rc, _ = run(tmp_path, tiny_te_for_real_tokenizer_file, real_tokenizer_dir, "--dataset_config", str(dataset),
                    "--overwrite", "--do_sample", "--seed", "7", "--temperature", "1.5")
        assert rc == 0
        texts.append((tmp_path / "t2i" / "t1.txt").read_text(encoding="utf-8"))
    assert texts[0] == texts[1] != "my own caption\n"                          # sampled, same seed, same words
    backups = sorted((tmp_path / "t2i" / C.BACKUP_FOLDER).glob("t1.txt.*.bak"))
    assert [b.read_text(encoding="utf-8") for b in backups] == ["my own caption\n"]   # second run: nothing replaced
    assert spy[0]["kwargs"]["do_sample"] is True and spy[0]["kwargs"]["top_p"] == 0.9


def test_jsonl_dataset_caption_written_into_its_line(tmp_path, spy, real_tokenizer_dir,
                                                     tiny_te_for_real_tokenizer_file):
    _image(tmp_path / "a.png", 64, 64, 1)
    _image(tmp_path / "b.png", 64, 64, 2)
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text(json.dumps({"image_path": str(tmp_path / "a.png")}) + "\n"
                     + json.dumps({"image_path": str(tmp_path / "b.png"), "caption": "kept"}) + "\n", encoding="utf-8")
    cfg = tmp_path / "d.toml"
    cfg.write_text(f'[[datasets]]\nimage_jsonl_file = "{jsonl}"\ncache_directory = "{tmp_path / "c"}"\n',
                   encoding="utf-8")
    rc, _ = run(tmp_path, tiny_te_for_real_tokenizer_file, real_tokenizer_dir, "--dataset_config", str(cfg))
    assert rc == 0 and len(spy) == 1
    lines = [json.loads(x) for x in jsonl.read_text(encoding="utf-8").splitlines()]
    assert lines[0]["caption"].strip() and lines[1] == {"image_path": str(tmp_path / "b.png"), "caption": "kept"}
    backup = next((tmp_path / C.BACKUP_FOLDER).glob("items.jsonl.*.bak"))
    assert "caption" not in json.loads(backup.read_text(encoding="utf-8").splitlines()[0])


def test_missing_lm_head_is_refused_before_loading(dataset, tiny_te_for_real_tokenizer, real_tokenizer_dir,
                                                   tmp_path, spy):
    path = save_text_encoder_comfy(tiny_te_for_real_tokenizer, tmp_path / "no_head.safetensors")
    tensors = {k: v for k, v in load_file(path).items() if k != "lm_head.weight"}
    save_file_atomic(tensors, path, metadata=read_header(path).metadata)
    rc, events = run(tmp_path, path, real_tokenizer_dir, "--dataset_config", str(dataset))
    assert rc == 2 and not spy
    error = next(e for e in events if e["type"] == "error")
    assert error["kind"] == "model_file" and "no_head.safetensors" in error["message"]
    assert "lm_head" in error["message"] and "qwen_2.5_vl_7b.safetensors" in error["hint"]
    assert not [e for e in events if e["type"] == "phase" and e["name"] == "loading"]
    assert inspect_path(path)["can_caption"] is False
    assert not list((tmp_path / "t2i").glob("*.txt"))[1:]                   # only t1's own caption is there

    # a config that ties the head to the embedding can generate without the tensor (small Qwen2.5-VL models)
    meta = read_header(path).metadata
    config = json.loads(meta["config"])
    config["tie_word_embeddings"] = True
    tied = tmp_path / "tied.safetensors"
    save_file_atomic(tensors, tied, metadata={**meta, "config": json.dumps(config)})
    check_can_generate(tied)
    assert inspect_path(tied)["can_caption"] is True


def test_can_caption_from_headers(tiny_te_for_real_tokenizer_file, demo_manifest):
    assert inspect_path(tiny_te_for_real_tokenizer_file)["can_caption"] is True
    assert inspect_path(demo_manifest["vae"])["can_caption"] is None
    with pytest.raises(ModelFileError, match="not the Qwen2.5-VL text encoder"):
        check_can_generate(demo_manifest["vae"])


def test_prompts():
    assert C.instruction("edit", "short", 2, None).startswith("The first 2 image(s)")
    assert C.instruction("caption", "tags", 0, "Tag it, {n_controls}") == "Tag it, 0"
    assert prompts.finish('  "a red\n square" ', "sks") == "sks, a red square"
    assert prompts.finish("sks, a cat", "sks") == "sks, a cat"
    assert C.vl_size((10, 10), 10_000) == (56, 56) and C.vl_tokens((56, 84)) == 6


def test_estimate_caption_images():
    bf16 = estimate_config(CaptionImagesConfig())
    fp8 = estimate_config(CaptionImagesConfig(fp8_vl=True))
    pair = estimate_config(CaptionImagesConfig(), num_control_images=2)
    assert bf16["command"] == "caption_images" and bf16["peak_phase"] == "captioning"
    # the whole Qwen2.5-VL-7B with its lm_head, exactly: bf16 2 bytes each; fp8 1 byte + the bf16 embedding
    assert bf16["phases"]["captioning"]["parts"]["weights"] == round(P.text_encoder_params() * 2 / 2**30, 3)
    embed = P.TEXT_CONFIG["vocab_size"] * P.TEXT_CONFIG["hidden_size"]
    assert fp8["parts"]["weights"] == round((P.text_encoder_params() + embed) / 2**30, 3)
    assert 15 < bf16["vram_gib"] < 18 and 8 < fp8["vram_gib"] < 10.5
    assert bf16["inputs"]["vision_tokens_per_image"] == 768 * 768 // 784
    assert pair["inputs"]["sequence_tokens"] > bf16["inputs"]["sequence_tokens"] + 2 * 700
    assert pair["parts"]["activations"] > bf16["parts"]["activations"]


def test_decisions_and_a_running_job_do_not_overwrite_each_other(tmp_path):
    """The app accepts while the engine still adds proposals: each re-reads the file before writing it."""
    review = tmp_path / C.REVIEW_FILE
    caption = tmp_path / "a.txt"
    caption.write_text("old\n", encoding="utf-8")

    def proposal(stem):
        return C.Proposal(0, stem, "caption", str(tmp_path / f"{stem}.png"), [], str(tmp_path / f"{stem}.txt"),
                          False, None, f"new {stem}")

    C.add_proposal(review, proposal("a"))
    C.accept(review, {(0, "a"): "new a"})
    C.add_proposal(review, proposal("b"))                        # the engine's next write
    assert [(p.stem, p.status) for p in C.read_review(review)] == [("a", C.ACCEPTED), ("b", C.PENDING)]
    assert caption.read_text(encoding="utf-8") == "new a\n"
    assert next((tmp_path / C.BACKUP_FOLDER).glob("a.txt.*.bak")).read_text(encoding="utf-8") == "old\n"
    review.write_text("not json\n", encoding="utf-8")
    with pytest.raises(Exception, match="not a caption proposal"):
        C.read_review(review)


def test_transformers_folder_captions_too(tmp_path, dataset, spy, tiny_te_for_real_tokenizer, real_tokenizer_dir):
    """A transformers folder (config.json + model.safetensors, current key layout) works as the ComfyUI file does."""
    folder = tmp_path / "text_encoder"
    tiny_te_for_real_tokenizer.save_pretrained(str(folder))
    assert inspect_path(folder)["can_caption"] is True
    check_can_generate(folder)
    rc, events = run(tmp_path, folder, real_tokenizer_dir, "--dataset_config", str(dataset), "--fp8_vl")
    assert rc == 0, [e for e in events if e["type"] == "error"]
    assert len(spy) == 4 and (tmp_path / "edit" / "e0.txt").read_text(encoding="utf-8").strip()
    assert spy[0]["kwargs"]["pixel_values"].dtype == torch.float32   # CPU computes in float32; fp8 weights upcast
    assert spy[0]["head_dtype"] == torch.float8_e4m3fn                # --fp8_vl: the lm_head is stored in fp8 too
