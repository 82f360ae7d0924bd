"""Every check that can run before a model loads (train_network and train): files, option combinations, the
caches, the sample prompt file, the resume folder. Each failure is one error naming the option, the cause and
the fix (engine.spec.errors)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from engine.data.cached import CachedDataset
from engine.models import bnb_quant
from engine.models.runtime import compute_dtype, resolve_device
from engine.spec.checks import check_base_precision, check_fp8_scaled
from engine.spec.errors import OptionError
from engine.spec.run_outputs import check_name_free
from engine.train.checkpoints import read_progress

log = logging.getLogger(__name__)


def check_config(cfg, full: bool) -> None:
    _require(cfg.dit, "--dit", "the Qwen-Image DiT (.safetensors file, shard or transformer/ folder)")
    _require(cfg.dataset_config, "--dataset_config", "the dataset TOML (the Dataset tab writes one)")
    if not cfg.output_dir:
        raise OptionError("--output_dir is missing.", "Give the folder for checkpoints, samples and the run config.")
    if cfg.max_train_steps is not None and cfg.max_train_steps < 1 and not cfg.max_train_epochs:
        raise OptionError(f"--max_train_steps {cfg.max_train_steps}: must be at least 1.", "Give a positive number.")
    _check_attention(cfg)
    _check_memory(cfg, full)
    _check_saving(cfg)
    if cfg.sample_prompts or cfg.sample_every_n_steps or cfg.sample_every_n_epochs or cfg.sample_at_first:
        _check_samples(cfg)
    if cfg.log_with and not cfg.logging_dir:
        raise OptionError(f"--log_with {cfg.log_with} needs --logging_dir.", "Give a folder for the TensorBoard logs.")
    if cfg.log_with in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
        raise OptionError(f"--log_with {cfg.log_with}: the 'wandb' package is not installed.",
                          "pip install wandb, or use --log_with tensorboard.")
    if not full and cfg.network_weights:
        _require(cfg.network_weights, "--network_weights", "a LoRA file to continue from")
    if not full and cfg.network_module == "lycoris.kohya" and cfg.save_format == "diffusers":
        raise OptionError("--save_format diffusers with --network_module lycoris.kohya: diffusers has no layout for "
                          "LoKr/LoHa.", "Use --save_format kohya (ComfyUI loads LyCORIS files in that layout).")
    _check_quality(cfg)


def _check_quality(cfg) -> None:
    if cfg.validation_every_n_steps and not cfg.validation_dataset_config:
        raise OptionError("--validation_every_n_steps needs --validation_dataset_config.",
                          "Give a held-out dataset TOML (cached like the training set), or drop the option.")
    if cfg.validation_dataset_config:
        _require(cfg.validation_dataset_config, "--validation_dataset_config", "a held-out dataset TOML")
        if Path(cfg.validation_dataset_config).resolve() == Path(cfg.dataset_config).resolve():
            log.warning("--validation_dataset_config is the training dataset: its loss shows how well the training "
                        "images are fitted, not how the model does on images it never saw")
    if cfg.validation_images:
        if not cfg.validation_dataset_config:
            raise OptionError("--validation_images needs --validation_dataset_config.",
                              "Give a held-out dataset TOML, or drop --validation_images.")
        _require(cfg.vae, "--vae", "the Qwen-Image VAE (validation images are decoded with it)")
        _require(cfg.text_encoder, "--text_encoder", "Qwen2.5-VL (validation captions are encoded with it)")
    if cfg.ema_validation != "none" and not cfg.use_ema:
        raise OptionError(f"--ema_validation {cfg.ema_validation} needs --use_ema.", "Add --use_ema, or drop it.")


def _check_attention(cfg) -> None:
    if cfg.sage_attn:
        raise OptionError("--sage_attn is for inference only (it has no backward pass).",
                          "Use --sdpa (default), --xformers or --flash_attn for training.")
    chosen = [n for n in ("sdpa", "xformers", "flash_attn") if getattr(cfg, n)]
    if len(chosen) > 1:
        raise OptionError(f"several attention kernels were chosen ({', '.join('--' + c for c in chosen)}).",
                          "Choose one.")
    package = {"xformers": "xformers", "flash_attn": "flash_attn"}.get(chosen[0] if chosen else "")
    if package and importlib.util.find_spec(package) is None:
        raise OptionError(f"--{chosen[0]}: the '{package}' package is not installed.",
                          f"pip install {package}, or use --sdpa.")


def _check_memory(cfg, full: bool) -> None:
    if cfg.gradient_checkpointing_cpu_offload and not cfg.gradient_checkpointing:
        raise OptionError("--gradient_checkpointing_cpu_offload needs --gradient_checkpointing.",
                          "Add --gradient_checkpointing.")
    check_fp8_scaled(cfg)
    if not full:
        _check_base_precision(cfg)
        return
    if cfg.fp8_base or cfg.fp8_scaled:
        raise OptionError("--fp8_base/--fp8_scaled: fp8 weights cannot be finetuned (musubi turns them off).",
                          "Drop them; use --full_bf16 to halve the weights' memory.")
    if cfg.blocks_to_swap and not cfg.fused_backward_pass:
        raise OptionError("--blocks_to_swap with train needs --fused_backward_pass: a swapped block's weights must "
                          "be stepped during backward, while the block is on the GPU (as musubi-tuner does).",
                          "Add --fused_backward_pass --optimizer_type Adafactor, or use --blocks_to_swap 0.")
    if cfg.full_bf16 and cfg.mixed_precision != "bf16":
        raise OptionError("--full_bf16 needs --mixed_precision bf16.", "Add --mixed_precision bf16.")
    if cfg.fused_backward_pass:
        if cfg.optimizer_type.lower() != "adafactor":
            raise OptionError(f"--fused_backward_pass works with --optimizer_type Adafactor only (got "
                              f"{cfg.optimizer_type}).", "Use --optimizer_type Adafactor.")
        if cfg.gradient_accumulation_steps > 1:
            raise OptionError("--fused_backward_pass steps each weight during backward, so it cannot accumulate "
                              "gradients.", "Use --gradient_accumulation_steps 1.")
        if cfg.mixed_precision == "fp16":
            raise OptionError("--fused_backward_pass cannot use fp16's loss scaling (each weight is stepped before "
                              "an overflow could be detected).", "Use --mixed_precision bf16.")


def _check_base_precision(cfg) -> None:
    """nf4/int8 storage of the frozen DiT (engine/models/bnb_quant.py): the option rules of spec/checks.py, then
    kernels that run on this machine, all before the DiT loads."""
    mode = cfg.base_model_precision
    if mode not in bnb_quant.MODES:
        return
    check_base_precision(cfg)
    device = resolve_device(cfg.device)
    bnb_quant.check_runs(mode, device, compute_dtype(device))


def _check_saving(cfg) -> None:
    if cfg.resume:
        read_progress(cfg.resume)
    if cfg.output_dir and Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise OptionError(f"--output_dir {cfg.output_dir} is a file.", "Give a folder.")
    check_name_free(cfg)


def _check_samples(cfg) -> None:
    if not cfg.sample_prompts:
        raise OptionError("--sample_every_n_steps/--sample_every_n_epochs/--sample_at_first need "
                          "--sample_prompts.", "Give a prompt file (one prompt per line) or drop the sample options.")
    _require(cfg.sample_prompts, "--sample_prompts", "a text file with one prompt per line")
    if Path(cfg.sample_prompts).suffix.lower() in (".toml", ".json"):
        raise OptionError(f"--sample_prompts {cfg.sample_prompts}: only the .txt format (one prompt per line with "
                          "--w --h --d --s --l --fs --n --ci options) is supported, not musubi's TOML/JSON lists.",
                          "Write the prompts into a .txt file, one per line.")
    _require(cfg.vae, "--vae", "the Qwen-Image VAE (samples are decoded with it)")
    _require(cfg.text_encoder, "--text_encoder", "Qwen2.5-VL (sample prompts are encoded with it)")


def _require(path, option: str, what: str) -> None:
    if not path:
        raise OptionError(f"{option} is missing.", f"Give {what}.")
    if not Path(path).exists():
        raise OptionError(f"{option} {path}: no such file or folder.", f"Give {what}.")


def open_dataset(cfg, version: str):
    """The cached dataset; missing or stale caches are one error naming the dataset and the commands to run.
    Text caches are checked against --text_encoder only with --tokenizer given (the fingerprint covers both;
    without it the check would download the default tokenizer just for that)."""
    text_encoder = cfg.text_encoder if cfg.tokenizer else None
    return CachedDataset.open(cfg.dataset_config, version, vae=cfg.vae, text_encoder=text_encoder,
                              tokenizer=cfg.tokenizer)


def check_batches(cfg, data) -> None:
    """Texts of one batch are padded to the longest; flash/xformers kernels ignore the padding mask, so batches of
    more than one need --split_attn with them (musubi's advice, enforced here)."""
    mode = cfg.attn_mode()
    if mode != "sdpa" and max(data.batch_sizes.values()) > 1 and not cfg.split_attn:
        option = "--flash_attn" if mode == "flash" else f"--{mode}"
        raise OptionError(f"{option} with batch size {max(data.batch_sizes.values())} in {cfg.dataset_config}: the "
                          "kernel would attend to the padding of shorter captions.",
                          "Add --split_attn, or use --sdpa (default).")
