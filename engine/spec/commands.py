"""The command registry: name → (config class, implementation, one-line summary).

Implementations are imported only when their command runs, so `--help` stays fast and the GUI can read
the registry without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.spec import config as C


@dataclass(frozen=True)
class Command:
    name: str
    config: type
    target: str  # "module:function", called as function(cfg, events) -> list of output paths
    summary: str
    # The command prints its result (one JSON document) on stdout; its events then go to stderr.
    result_on_stdout: bool = False

    def prints_result(self, cfg) -> bool:
        """True when stdout carries only the command's result: always for estimate_vram, with --json for the
        commands that have it (inspect_model, check_dataset), so `... --json | jq .` works."""
        return self.result_on_stdout or bool(getattr(cfg, "json", False))


COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("inspect_model", C.InspectModelConfig, "engine.models.inspect:run",
            "Identify model files: component, variant, dtype, parameter count, problems."),
    Command("make_demo", C.MakeDemoConfig, "engine.demo:run",
            "Build the tiny random demo model set and sample dataset (seconds, CPU)."),
    Command("check_dataset", C.CheckDatasetConfig, "engine.spec.dataset.check:run",
            "Check a dataset config without loading a model: problems with fixes, bucket histogram."),
    Command("cache_latents", C.CacheLatentsConfig, "engine.data.cache_latents:run",
            "VAE-encode the dataset's target and control images into latent cache files."),
    Command("cache_text_encoder_outputs", C.CacheTextEncoderConfig, "engine.data.cache_text:run",
            "Encode the dataset's captions (with control images for edit models) into cache files."),
    Command("estimate_vram", C.EstimateVramConfig, "engine.spec.vram:run",
            "Estimate peak VRAM and RAM of train_network / train / generate_image from their options (JSON).",
            result_on_stdout=True),
    Command("train_network", C.TrainNetworkConfig, "engine.train.run:train_network",
            "Train a LoRA on the cached dataset (accelerate; resumable; samples, checkpoints, TensorBoard)."),
    Command("train", C.TrainConfig, "engine.train.run:train",
            "Full finetune of the DiT (--full_bf16, --fused_backward_pass with Adafactor, --mem_eff_save)."),
    Command("generate_image", C.GenerateImageConfig, "engine.infer.generate:run",
            "Generate images: text-to-image, edit (one or more control images), inpaint mask, RCM."),
    Command("caption_images", C.CaptionImagesConfig, "engine.caption.run:run",
            "Write captions (edit instructions for control -> target pairs) with the Qwen2.5-VL text encoder."),
    Command("inspect_lora", C.InspectLoraConfig, "engine.tools.inspect_lora:run",
            "Describe LoRA files: format, rank/alpha, targets, model version, dtype, training metadata."),
    Command("convert_lora", C.ConvertLoraConfig, "engine.tools.convert_lora:run",
            "Convert a LoRA between the kohya/musubi, diffusers (PEFT) and ComfyUI layouts, exactly."),
    Command("merge_lora", C.MergeLoraConfig, "engine.tools.merge_lora:run",
            "Bake LoRAs into the DiT, streamed into a new single-file DiT (bf16/fp16/fp32/fp8)."),
    Command("extract_lora", C.ExtractLoraConfig, "engine.tools.extract_lora:run",
            "Extract a LoRA from a finetuned DiT and its base (SVD per Linear, streamed)."),
    Command("resize_lora", C.ResizeLoraConfig, "engine.tools.resize_lora:run",
            "Lower a LoRA's rank by SVD (fixed rank or kept-energy threshold), reporting the error."),
)}


def register(cmd: Command) -> None:
    COMMANDS[cmd.name] = cmd
