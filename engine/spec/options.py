"""Option groups and command configs: every engine option declared once, as a typed dataclass field.

Commands compose the groups by inheritance. `engine.spec.config` re-exports everything here and holds the machinery
that turns these classes into argparse parsers, TOML files and GUI forms. Importable without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from engine.spec.errors import ConfigError  # noqa: F401  (re-exported with the option classes)

MODEL_VERSIONS = ("original", "edit", "edit-2509", "edit-2511")
DEFAULT_NETWORK_DIM = 4       # musubi's LoRA rank when --network_dim is not given
DEFAULT_NETWORK_ALPHA = 1.0
EDIT_VERSIONS = ("edit", "edit-2509", "edit-2511")


def opt(default: Any = None, help: str = "", *, group: str = "General", choices: tuple | None = None,
        positional: bool = False, path: bool = False, gui: bool = True, advanced: bool = False,
        aliases: tuple[str, ...] = (), metavar: str | None = None, min: float | None = None,
        max: float | None = None, multiple_of: int | None = None, plain_name: bool = False):
    """Declare one option. `path` marks file/folder options (the GUI shows a path box). `min`, `max` and
    `multiple_of` are its range, for each item of a list: engine.spec.config.validate checks them wherever a
    config is made (command line, run TOML, preset, GUI form) and argparse's --help states them. `plain_name`:
    a file name without folders (the files it names go in a folder given by another option)."""
    meta = dict(help=help, group=group, choices=choices, positional=positional, path=path, gui=gui,
                advanced=advanced, aliases=aliases, metavar=metavar, min=min, max=max, multiple_of=multiple_of,
                plain_name=plain_name)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------------
# Option groups. Commands compose them by inheritance; a field is declared exactly once.
# --------------------------------------------------------------------------------------------------

@dataclass
class CommonOptions:
    device: str = opt("auto", "Compute device. On CPU the engine computes in float32 unless told otherwise.",
                      group="Runtime", choices=("auto", "cuda", "cpu"))
    events_file: Optional[str] = opt(None, "Also write the JSON-lines event stream to this file.",
                                     group="Runtime", path=True, gui=False)
    config_file: Optional[str] = opt(None, "Load options from a run TOML; options on the command line win.",
                                     group="Runtime", path=True, gui=False)


@dataclass
class ModelVersionOptions:
    model_version: Optional[str] = opt(None, "Model variant. Default: original (or what --edit/--edit_plus say).",
                                       group="Model", choices=MODEL_VERSIONS)
    edit: bool = opt(False, "Same as --model_version edit (Qwen-Image-Edit).", group="Model", gui=False)
    edit_plus: bool = opt(False, "Same as --model_version edit-2509 (Qwen-Image-Edit-2509).", group="Model",
                          gui=False)

    def resolved_version(self) -> str:
        """musubi's precedence: --model_version > --edit_plus > --edit > original."""
        if self.model_version:
            return self.model_version
        if self.edit_plus:
            return "edit-2509"
        if self.edit:
            return "edit"
        return "original"

    @property
    def is_edit(self) -> bool:
        return self.resolved_version() in EDIT_VERSIONS


@dataclass
class DitOption:
    dit: Optional[str] = opt(None, "DiT weights: ComfyUI single file, diffusers transformer/ folder, or the "
                                   "first shard of a -0000N-of-0000M set.", group="Model", path=True)


@dataclass
class VaeOption:
    vae: Optional[str] = opt(None, "VAE weights (diffusers AutoencoderKLQwenImage file/folder, or ComfyUI "
                                   "qwen_image_vae.safetensors).", group="Model", path=True)


@dataclass
class TextEncoderOptions:
    text_encoder: Optional[str] = opt(None, "Qwen2.5-VL text encoder: ComfyUI qwen_2.5_vl_7b.safetensors or a "
                                            "transformers folder.", group="Model", path=True)
    tokenizer: Optional[str] = opt(None, "Folder (or hub id) with the Qwen2 tokenizer files. Default: the "
                                         "'tokenizer' folder of Qwen/Qwen-Image, downloaded once and cached.",
                                   group="Model", path=True)


@dataclass
class DatasetOption:
    dataset_config: Optional[str] = opt(None, "Dataset config (musubi-tuner TOML schema).", group="Dataset",
                                        path=True)


@dataclass
class CachingOptions:
    batch_size: Optional[int] = opt(None, "Batch size for encoding (default: the dataset's batch size).",
                                    group="Caching")
    num_workers: Optional[int] = opt(None, "Image loading workers (default: cores - 1).", group="Caching",
                                     advanced=True)
    skip_existing: bool = opt(False, "Skip entries whose cache file exists and is up to date.", group="Caching")
    keep_cache: bool = opt(False, "Keep cache files that no longer belong to the dataset (default: remove).",
                           group="Caching")


@dataclass
class Fp8VlOption:
    fp8_vl: bool = opt(False, "Run the text encoder (Qwen2.5-VL) in fp8 to save VRAM (< 16 GB GPUs).",
                       group="Memory")


@dataclass
class TrainAttentionOptions:
    sdpa: bool = opt(False, "Use PyTorch scaled dot product attention (default).", group="Attention")
    xformers: bool = opt(False, "Use xformers attention (needs the package and a GPU).", group="Attention")
    flash_attn: bool = opt(False, "Use FlashAttention 2 (needs the package and a GPU).", group="Attention")
    sage_attn: bool = opt(False, "SageAttention (inference only; refused for training).", group="Attention",
                          advanced=True)
    split_attn: bool = opt(False, "Run attention per sample (needed for padded batches with non-SDPA kernels).",
                           group="Attention", advanced=True)

    def attn_mode(self) -> str:
        for name, mode in (("flash_attn", "flash"), ("xformers", "xformers"), ("sage_attn", "sageattn")):
            if getattr(self, name):
                return mode
        return "sdpa"


@dataclass
class TrainingOptions:
    mixed_precision: str = opt("no", "Mixed precision (bf16 recommended on GPU).", group="Precision",
                               choices=("no", "fp16", "bf16"))
    timestep_sampling: str = opt("sigma", "Timestep sampling method.", group="Timesteps",
                                 choices=("sigma", "uniform", "sigmoid", "shift", "qwen_shift", "logsnr",
                                          "qinglong_qwen"))
    discrete_flow_shift: float = opt(1.0, "Shift for --timestep_sampling shift.", group="Timesteps")
    sigmoid_scale: float = opt(1.0, "Scale for sigmoid/shift sampling.", group="Timesteps", advanced=True)
    weighting_scheme: str = opt("none", "Timestep density / loss weighting scheme.", group="Timesteps",
                                choices=("none", "logit_normal", "mode", "sigma_sqrt", "cosmap"))
    logit_mean: float = opt(0.0, "Mean for logit_normal and logsnr.", group="Timesteps", advanced=True)
    logit_std: float = opt(1.0, "Std for logit_normal and logsnr.", group="Timesteps", advanced=True)
    mode_scale: float = opt(1.29, "Scale for the 'mode' weighting scheme.", group="Timesteps", advanced=True)
    min_timestep: Optional[int] = opt(None, "Minimum timestep (0-1000).", group="Timesteps", advanced=True)
    max_timestep: Optional[int] = opt(None, "Maximum timestep (0-1000).", group="Timesteps", advanced=True)

    optimizer_type: str = opt("AdamW", "AdamW, AdamW8bit, Adafactor, or any module.Class.", group="Optimizer")
    optimizer_args: list[str] = opt([], "Optimizer keyword arguments as key=value.", group="Optimizer",
                                    advanced=True)
    learning_rate: float = opt(2e-6, "Learning rate.", group="Optimizer")
    lr_scheduler: str = opt("constant", "Learning rate schedule.", group="Optimizer",
                            choices=("constant", "constant_with_warmup", "linear", "cosine",
                                     "cosine_with_restarts", "polynomial", "inverse_sqrt",
                                     "cosine_with_min_lr", "warmup_stable_decay", "adafactor"))
    lr_warmup_steps: float = opt(0, "Warmup steps (or a fraction of the total when < 1).", group="Optimizer")
    lr_decay_steps: float = opt(0, "Decay steps for warmup_stable_decay (or a fraction).", group="Optimizer",
                                advanced=True)
    lr_scheduler_num_cycles: int = opt(1, "Cycles for cosine_with_restarts.", group="Optimizer", advanced=True)
    lr_scheduler_power: float = opt(1.0, "Power for polynomial.", group="Optimizer", advanced=True)
    lr_scheduler_min_lr_ratio: Optional[float] = opt(None, "Minimum lr ratio for cosine_with_min_lr / wsd.",
                                                     group="Optimizer", advanced=True)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 disables).", group="Optimizer")
    gradient_accumulation_steps: int = opt(1, "Gradient accumulation steps.", group="Optimizer", min=1)

    gradient_checkpointing: bool = opt(False, "Recompute block activations in backward (saves VRAM).",
                                       group="Memory")
    gradient_checkpointing_cpu_offload: bool = opt(False, "Keep checkpointed activations in CPU RAM.",
                                                   group="Memory")
    blocks_to_swap: int = opt(0, "Keep this many of the 60 blocks in CPU RAM and stream them in (max 59).",
                              group="Memory", min=0)
    fp8_base: bool = opt(False, "Store the DiT in fp8.", group="Memory")
    fp8_scaled: bool = opt(False, "Block-wise scaled fp8 weights (with --fp8_base; better quality).",
                           group="Memory")

    max_train_epochs: Optional[int] = opt(None, "Train this many epochs (overrides --max_train_steps).",
                                          group="Schedule")
    max_train_steps: int = opt(1600, "Train this many steps.", group="Schedule")
    seed: Optional[int] = opt(None, "Random seed.", group="Schedule")
    max_data_loader_n_workers: int = opt(8, "Data loader workers.", group="Schedule", advanced=True)
    persistent_data_loader_workers: bool = opt(False, "Keep data loader workers alive between epochs.",
                                               group="Schedule", advanced=True)

    output_dir: Optional[str] = opt(None, "Folder for checkpoints, samples and the run config.", group="Saving",
                                    path=True)
    output_name: Optional[str] = opt(None, "Base name of the saved files.", group="Saving", plain_name=True)
    save_every_n_epochs: Optional[int] = opt(None, "Save every N epochs.", group="Saving", min=1)
    save_every_n_steps: Optional[int] = opt(None, "Save every N steps.", group="Saving", min=1)
    save_last_n_epochs: Optional[int] = opt(None, "Keep only the last N epoch saves.", group="Saving",
                                            advanced=True)
    save_last_n_steps: Optional[int] = opt(None, "Keep only the saves of the last N steps.", group="Saving",
                                           advanced=True)
    save_state: bool = opt(False, "Also save the training state (optimizer, RNG, data order) for --resume.",
                           group="Saving")
    save_state_on_train_end: bool = opt(False, "Save the state once at the end.", group="Saving",
                                        advanced=True)
    resume: Optional[str] = opt(None, "Resume from a saved state folder.", group="Saving", path=True)
    save_precision: Optional[str] = opt(None, "dtype of saved weights (default: fp32 for LoRA, bf16 for DiT).",
                                        group="Saving", choices=("float", "fp32", "fp16", "bf16"),
                                        advanced=True)
    no_metadata: bool = opt(False, "Write only the minimal metadata.", group="Saving", advanced=True)

    sample_prompts: Optional[str] = opt(None, "Prompt file for samples during training (.txt lines with "
                                              "--w --h --d --s --l --fs --n --ci options).", group="Samples",
                                        path=True)
    sample_every_n_steps: Optional[int] = opt(None, "Sample every N steps.", group="Samples", min=1)
    sample_every_n_epochs: Optional[int] = opt(None, "Sample every N epochs.", group="Samples", min=1)
    sample_at_first: bool = opt(False, "Sample before training starts.", group="Samples")

    logging_dir: Optional[str] = opt(None, "TensorBoard log folder.", group="Logging", path=True)
    log_with: Optional[str] = opt(None, "Tracker to log to.", group="Logging",
                                  choices=("tensorboard", "wandb", "all"))
    log_prefix: Optional[str] = opt(None, "Prefix of the log run folder.", group="Logging", advanced=True)


@dataclass
class NetworkOptions:
    network_module: str = opt("networks.lora_qwen_image", "LoRA module (musubi's name is accepted). "
                                                          "lycoris.kohya: LoKr/LoHa/... from the lycoris-lora "
                                                          "package, chosen with --network_args algo=lokr (or loha) "
                                                          "factor=8.",
                              group="Network", choices=("networks.lora_qwen_image", "networks.lora",
                                                        "lycoris.kohya"))
    network_dim: Optional[int] = opt(None, f"LoRA rank (default {DEFAULT_NETWORK_DIM}).", group="Network")
    network_alpha: float = opt(DEFAULT_NETWORK_ALPHA, "LoRA alpha; scale = alpha / rank.", group="Network")
    network_args: list[str] = opt([], "key=value: include_patterns, exclude_patterns, rank_dropout, "
                                      "module_dropout, loraplus_lr_ratio, verbose.", group="Network",
                                  advanced=True)
    network_weights: Optional[str] = opt(None, "Start from these LoRA weights.", group="Network", path=True)
    network_dropout: Optional[float] = opt(None, "Dropout on the LoRA down output.", group="Network",
                                           advanced=True)
    save_format: str = opt("kohya", "kohya: lora_unet_* keys (ComfyUI and diffusers load it). diffusers: also "
                                    "write <name>_diffusers.safetensors in the diffusers layout.",
                           group="Network", choices=("kohya", "diffusers"))

    def network_rank(self) -> int:
        """The LoRA rank this run trains: --network_dim, or musubi's default."""
        return self.network_dim or DEFAULT_NETWORK_DIM


@dataclass
class FinetuneOptions:
    full_bf16: bool = opt(False, "Keep the weights in bf16 (saves ~20 GB; use with stochastic rounding).",
                          group="Finetune")
    fused_backward_pass: bool = opt(False, "Adafactor step per parameter during backward (saves VRAM).",
                                    group="Finetune")
    mem_eff_save: bool = opt(False, "Stream the checkpoint to disk tensor by tensor (saves RAM).",
                             group="Finetune")


@dataclass
class EmaOptions:
    use_ema: bool = opt(False, "Keep an exponential moving average (EMA) of the trained weights (LoRA or DiT) and save "
                               "it beside each checkpoint as <name>-ema.safetensors. It smooths the step-to-step noise "
                               "of the weights; often the better file for small learning-rate-sensitive datasets.",
                        group="EMA")
    ema_decay: float = opt(0.999, "EMA decay per update: ema = decay * ema + (1 - decay) * weights. 0 keeps the raw "
                                  "weights; 0.999 averages over about the last 1000 updates.", group="EMA", min=0,
                           max=1)
    ema_device: str = opt("cpu", "Where the EMA copy lives: cpu (host RAM, no VRAM; each update copies the trained "
                                 "weights to the host) or accelerator (the GPU: faster updates, costs 4 bytes per "
                                 "trained parameter of VRAM).", group="EMA", choices=("cpu", "accelerator"))
    ema_update_interval: int = opt(1, "Update the EMA every N optimizer steps (the decay applies per update).",
                                   group="EMA", min=1, advanced=True)
    ema_start_step: int = opt(0, "Until this step the EMA simply copies the weights (skips the noisy first steps).",
                              group="EMA", min=0, advanced=True)
    ema_validation: str = opt("none", "What samples and the validation loss use: none (the raw weights), ema_only "
                                      "(the EMA weights), comparison (both; EMA samples are named <name>-ema_..., the "
                                      "EMA validation loss is charted as its own line).", group="EMA",
                              choices=("none", "ema_only", "comparison"))


@dataclass
class ValidationOptions:
    validation_dataset_config: Optional[str] = opt(
        None, "Held-out dataset (a dataset TOML like --dataset_config, cached with the same commands). Its loss "
              "at fixed timesteps with fixed noise is computed every --validation_every_n_steps and before "
              "training: the same weights always give the same number, so the curve shows real progress "
              "(the training loss draws new noise and timesteps every step).", group="Validation", path=True)
    validation_every_n_steps: Optional[int] = opt(None, "Compute the validation loss every N steps (and at the end).",
                                                  group="Validation", min=1)
    validation_timesteps: list[int] = opt([100, 300, 500, 700, 900], "The fixed timesteps (1-999) the validation "
                                          "loss is averaged over, each with its own fixed noise per item.",
                                          group="Validation", min=1, max=999, advanced=True)
    validation_images: bool = opt(False, "At each validation point also render every validation item from its caption "
                                         "(and control images, for edit models) and show it beside them and its "
                                         "target (<output_dir>/validation/). Needs --vae and --text_encoder.",
                                  group="Validation")


@dataclass
class BaseModelPrecisionOption:
    base_model_precision: str = opt(
        "no_change", "Store the frozen DiT's block weights with bitsandbytes while loading, for LoRA training "
                     "(QLoRA style): nf4-bnb (4-bit NormalFloat, ~11 GB for the 20B DiT) or int8-bnb (8-bit, "
                     "~20 GB). SimpleTuner's option name. Not with --fp8_base or --blocks_to_swap; the LoRA file is "
                     "the same as without it.", group="Memory", choices=("no_change", "nf4-bnb", "int8-bnb"))


@dataclass
class GenerationOptions:
    prompt: Optional[str] = opt(None, "Prompt.", group="Prompt")
    negative_prompt: Optional[str] = opt(None, "Negative prompt (true CFG).", group="Prompt")
    image_size: list[int] = opt([256, 256], "Output height and width (multiples of 16).", group="Image",
                                metavar="H W", min=16, multiple_of=16)
    infer_steps: int = opt(25, "Denoising steps.", group="Image", min=1)
    guidance_scale: float = opt(4.0, "True CFG scale (1 disables CFG).", group="Image")
    embedded_cfg_scale: float = opt(2.5, "Accepted for musubi compatibility; Qwen-Image has no guidance "
                                         "embedding.", group="Image", gui=False)
    flow_shift: Optional[float] = opt(None, "Fixed flow shift (default: dynamic shift from the image size).",
                                      group="Image")
    seed: Optional[int] = opt(None, "Seed (random when omitted).", group="Image")
    save_path: Optional[str] = opt(None, "Output folder.", group="Output", path=True)
    output_type: str = opt("images", "What to save.", group="Output",
                           choices=("images", "latent", "latent_images"))
    no_metadata: bool = opt(False, "Do not write generation parameters into the PNG.", group="Output",
                            advanced=True)
    latent_path: list[str] = opt([], "Decode these saved latents instead of generating.", group="Output",
                                 path=True, advanced=True)
    append_original_name: bool = opt(False, "Append the control image's name to the output file name.",
                                     group="Output")
    preview_every: Optional[int] = opt(None, "Live preview: every N steps, decode the model's current estimate of "
                                             "the final image (x0 = x_t - sigma*v, no extra DiT call) to a small "
                                             "PNG in <save_path>/previews/ (not after the last step: that is the "
                                             "output). Each costs one VAE decode while the DiT is loaded, so the "
                                             "VRAM estimate adds the decode's memory (--vae_enable_tiling keeps it "
                                             "small). Off when omitted.", group="Output", metavar="N", min=1)
    attn_mode: str = opt("sdpa", "Attention kernel.", group="Attention",
                         choices=("sdpa", "torch", "flash", "xformers", "sageattn"))
    fp8: bool = opt(False, "Store the DiT in fp8.", group="Memory")
    fp8_scaled: bool = opt(False, "Block-wise scaled fp8 DiT weights.", group="Memory")
    text_encoder_cpu: bool = opt(False, "Run the text encoder on the CPU.", group="Memory")
    blocks_to_swap: int = opt(0, "Keep this many blocks in CPU RAM and stream them in.", group="Memory", min=0)
    vae_enable_tiling: bool = opt(False, "Decode in tiles (less VRAM at large sizes).", group="Memory",
                                  advanced=True)
    lora_weight: list[str] = opt([], "LoRA files to apply (any of the supported formats).", group="LoRA",
                                 path=True)
    lora_multiplier: list[float] = opt([], "One multiplier per LoRA (default 1.0).", group="LoRA")
    control_image_path: list[str] = opt([], "Control (reference) images for edit models.", group="Edit",
                                        path=True)
    resize_control_to_image_size: bool = opt(False, "Resize control images to the output size.", group="Edit")
    resize_control_to_official_size: bool = opt(False, "Resize control images as the official pipelines do.",
                                                group="Edit")
    mask_path: Optional[str] = opt(None, "Inpaint mask (white = change, black = keep).", group="Edit",
                                   path=True)
    rcm_threshold: Optional[float] = opt(None, "Enable the Reference Consistency Mask with this threshold.",
                                         group="RCM", min=0)
    rcm_relative_threshold: bool = opt(False, "Treat --rcm_threshold as a fraction of the step's max difference.",
                                       group="RCM")
    rcm_kernel_size: int = opt(3, "Gaussian blur kernel before the difference.", group="RCM", min=1)
    rcm_dilate_size: int = opt(0, "Dilate the changed region by this many tokens.", group="RCM", min=0)
    rcm_debug_save: bool = opt(False, "Save the RCM mask of every step into --save_path.", group="RCM")
    from_file: Optional[str] = opt(None, "Batch mode: one prompt per line with per-line options.",
                                   group="Prompt", path=True, gui=False)


CAPTION_STYLES = ("short", "detailed", "tags")


@dataclass
class CaptionOptions:
    overwrite: bool = opt(False, "Caption the items that already have a caption too (default: only the missing ones). "
                                 "A replaced caption file is backed up first.", group="Captions")
    review_file: Optional[str] = opt(None, "Write the captions as proposals to this JSONL review file and leave the "
                                           "caption files alone (the Dataset tab's review list reads it). A rerun "
                                           "skips the items it already holds.", group="Captions", path=True,
                                     gui=False)
    backup_dir: Optional[str] = opt(None, "Folder for the copies of replaced caption files (default: "
                                          ".caption_backups/ beside them).", group="Captions", path=True,
                                    advanced=True)
    caption_style: str = opt("short", "Captions of images without control images: one sentence, a detailed "
                                      "paragraph, or comma-separated tags.", group="Captions",
                             choices=CAPTION_STYLES)
    caption_prompt: Optional[str] = opt(None, "The instruction the model gets instead of the built-in one of "
                                              "--caption_style (for edit pairs: of the edit instruction). "
                                              "{n_controls} is replaced by the number of control images.",
                                        group="Captions")
    trigger_word: Optional[str] = opt(None, "Word or prefix put in front of every caption (followed by ', ').",
                                      group="Captions")
    max_new_tokens: int = opt(128, "Longest caption, in tokens.", group="Captions", min=1, max=4096)
    caption_image_area: int = opt(768 * 768, "Pixels of each image the vision encoder sees (larger images are "
                                             "scaled down; 784 pixels make one vision token).", group="Captions",
                                  min=3136, advanced=True)
    do_sample: bool = opt(False, "Sample the words (with --temperature and --top_p) instead of greedy decoding.",
                          group="Decoding")
    temperature: float = opt(0.7, "Sampling temperature (with --do_sample).", group="Decoding", min=0.01, max=5)
    top_p: float = opt(0.9, "Nucleus sampling: keep the smallest set of words with this probability (with "
                            "--do_sample).", group="Decoding", min=0.01, max=1)
    seed: Optional[int] = opt(None, "Seed of the sampling; each item starts from it, so a rerun or a resumed run "
                                    "writes the same text.", group="Decoding")


# --------------------------------------------------------------------------------------------------
# Command configs
# --------------------------------------------------------------------------------------------------

@dataclass
class InspectModelConfig:
    files: list[str] = opt([], "Model files or folders to identify.", positional=True, path=True)
    json: bool = opt(False, "Print one JSON list instead of a table.")


@dataclass
class MakeDemoConfig:
    dir: str = opt("demo", "Folder to build the demo model set and dataset in.", positional=True, path=True)
    force: bool = opt(False, "Rebuild even if the folder already holds a complete demo.")


@dataclass
class CheckDatasetConfig(ModelVersionOptions, DatasetOption):
    json: bool = opt(False, "Print the report as JSON.")


@dataclass
class CacheLatentsConfig(CommonOptions, ModelVersionOptions, VaeOption, DatasetOption, CachingOptions):
    pass


@dataclass
class CacheTextEncoderConfig(CommonOptions, ModelVersionOptions, TextEncoderOptions, DatasetOption,
                             CachingOptions, Fp8VlOption):
    pass


@dataclass
class RunSafetyOptions:
    """How a training run treats earlier work and invalid numbers (engine/spec/run_outputs.py, engine/train/loop.py)."""
    overwrite: bool = opt(False, "Replace the outputs of an earlier run with the same --output_name in --output_dir "
                                 "(without it such a run is refused, so nothing is lost by accident).",
                          group="Saving")
    skip_nan_steps: bool = opt(False, "Skip an optimizer step whose loss is NaN/inf (counted and reported) instead "
                                      "of stopping the run with an error.", group="Optimizer", advanced=True)


@dataclass
class TrainNetworkConfig(RunSafetyOptions, CommonOptions, ModelVersionOptions, DitOption, VaeOption,
                         TextEncoderOptions, DatasetOption, TrainAttentionOptions, TrainingOptions, Fp8VlOption,
                         NetworkOptions, EmaOptions, ValidationOptions, BaseModelPrecisionOption):
    # RunSafetyOptions first: its fields come last
    pass


@dataclass
class TrainConfig(RunSafetyOptions, CommonOptions, ModelVersionOptions, DitOption, VaeOption, TextEncoderOptions,
                  DatasetOption, TrainAttentionOptions, TrainingOptions, Fp8VlOption, FinetuneOptions,
                  EmaOptions, ValidationOptions):
    pass


@dataclass
class GenerateImageConfig(CommonOptions, ModelVersionOptions, DitOption, VaeOption, TextEncoderOptions,
                          GenerationOptions):
    pass


@dataclass
class CaptionImagesConfig(CommonOptions, TextEncoderOptions, DatasetOption, Fp8VlOption, CaptionOptions):
    pass


ESTIMATE_TARGETS = ("train_network", "train", "generate_image", "caption_images")


@dataclass
class EstimateOptions:
    for_command: str = opt("train_network", "The command to estimate; takes that command's own options.",
                           group="Estimate", choices=ESTIMATE_TARGETS, aliases=("--for",))
    resolution: list[int] = opt([1024, 1024], "Training image width and height (the dataset's resolution).",
                                group="Estimate", metavar="W H", min=16, multiple_of=16)
    batch_size: int = opt(1, "Training batch size (the dataset's batch_size).", group="Estimate", min=1)
    num_control_images: Optional[int] = opt(None, "Control images per sample (default: 1 for edit models, 0 "
                                                  "otherwise).", group="Estimate", min=0)
    caches_ready: bool = opt(False, "The latent and text-encoder caches already exist: leave the caching phase "
                                    "out of the training peak.", group="Estimate")
    num_gpus: int = opt(1, "GPUs a full finetune (`train`) is sharded over with FSDP (docs/multi-gpu.md): the "
                           "estimate is per GPU.", group="Estimate", min=1, max=1024)


@dataclass
class EstimateVramConfig(TrainNetworkConfig, TrainConfig, GenerateImageConfig, CaptionImagesConfig, EstimateOptions):
    """The union of the estimated commands' options, so their command lines work with `--for` added."""


# --------------------------------------------------------------------------------------------------
# LoRA tools (engine/tools/): option names follow the scripts people know (musubi-tuner's merge and extract,
# kohya's resize); docs/lora-tools.md describes them.
# --------------------------------------------------------------------------------------------------

LORA_FORMATS = ("kohya", "musubi", "diffusers", "comfyui")
LORA_PRECISIONS = ("fp32", "fp16", "bf16")
MERGED_PRECISIONS = ("bf16", "fp16", "fp32", "fp8", "fp8_e4m3fn")


@dataclass
class InspectLoraConfig:
    files: list[str] = opt([], "LoRA files to describe (headers only).", positional=True, path=True)
    json: bool = opt(False, "Print one JSON list instead of tables.")


@dataclass
class ConvertLoraConfig(CommonOptions):
    input: Optional[str] = opt(None, "LoRA file to convert (never modified).", group="Convert", path=True)
    output: Optional[str] = opt(None, "File to write (not the input; written atomically).", group="Convert",
                                path=True)
    format: str = opt("kohya", "Target layout. kohya and musubi: lora_unet_* keys with alpha (ComfyUI loads it); "
                               "diffusers: transformer.* lora_A/B with the PEFT config in the metadata; comfyui: "
                               "diffusion_model.* lora_A/B with alpha.", group="Convert", choices=LORA_FORMATS)


@dataclass
class MergeLoraOptions:
    lora_weight: list[str] = opt([], "LoRA files to bake into the DiT, in order.", group="Merge", path=True)
    lora_multiplier: list[float] = opt([], "One multiplier per LoRA (default 1.0).", group="Merge")
    save_merged_model: Optional[str] = opt(None, "The merged single-file DiT to write (ComfyUI layout; never the "
                                                 "input).", group="Merge", path=True)
    merged_precision: str = opt("bf16", "dtype of the merged DiT. fp8: block Linear weights in float8_e4m3fn with "
                                        "block-wise scales (half the size; our loader reads it). fp8_e4m3fn: plain "
                                        "cast without scales (the layout ComfyUI's fp8_e4m3fn files use).",
                                group="Merge", choices=MERGED_PRECISIONS)


@dataclass
class MergeLoraConfig(CommonOptions, ModelVersionOptions, DitOption, MergeLoraOptions):
    pass


@dataclass
class ExtractLoraOptions:
    model_org: Optional[str] = opt(None, "The base DiT the finetune started from.", group="Extract", path=True)
    model_tuned: Optional[str] = opt(None, "The finetuned DiT.", group="Extract", path=True)
    save_to: Optional[str] = opt(None, "The LoRA file to write (kohya layout).", group="Extract", path=True)
    dim: int = opt(4, "Rank of the extracted LoRA (per Linear; lower when the layer is smaller).", group="Extract",
                   min=1)
    clamp_quantile: Optional[float] = opt(None, "Clamp the factors' values at this quantile (musubi uses 0.99); "
                                                "off when omitted.", group="Extract", min=0, max=1, advanced=True)
    save_precision: str = opt("fp32", "dtype of the saved LoRA.", group="Extract", choices=LORA_PRECISIONS)


@dataclass
class ExtractLoraConfig(CommonOptions, ModelVersionOptions, ExtractLoraOptions):
    pass


@dataclass
class ResizeLoraOptions:
    model: Optional[str] = opt(None, "The LoRA to resize (never modified).", group="Resize", path=True)
    save_to: Optional[str] = opt(None, "The resized LoRA to write (kohya layout).", group="Resize", path=True)
    new_rank: int = opt(4, "The new rank (the most a module keeps with --dynamic_method).", group="Resize", min=1)
    dynamic_method: Optional[str] = opt(None, "Choose each module's rank from its singular values: sv_fro keeps "
                                              "the smallest rank whose share of the squared singular values (kept "
                                              "energy) reaches --dynamic_param; sv_cumulative the same on their "
                                              "sum; sv_ratio keeps values above largest/--dynamic_param.",
                                        group="Resize", choices=("sv_fro", "sv_cumulative", "sv_ratio"))
    dynamic_param: Optional[float] = opt(None, "Threshold of --dynamic_method (e.g. 0.9 for sv_fro).",
                                         group="Resize", min=0)
    save_precision: str = opt("fp32", "dtype of the saved LoRA.", group="Resize", choices=LORA_PRECISIONS)


@dataclass
class ResizeLoraConfig(CommonOptions, ResizeLoraOptions):
    pass
