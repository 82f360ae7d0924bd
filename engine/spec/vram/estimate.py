"""Phases of a run and their GPU/RAM peaks; the estimate is the maximum over phases.

Each phase lists what is alive on the GPU at its peak, by part (weights, LoRA + optimiser states,
gradients, activations, block-swap buffers, workspace), and the process's RAM at that moment.
"""

from __future__ import annotations

from engine.spec import checks
from engine.spec.config import from_dict, option_fields, validate
from engine.spec.errors import OptionError
from engine.spec.options import EDIT_VERSIONS, EstimateVramConfig
from engine.spec.variants import VAE_AREA, get_variant
from engine.spec.vram import memory as M
from engine.spec.vram.constants import GIB
from engine.spec.vram.constants import value as K

PARTS = ("weights", "lora_and_optimizer", "gradients", "activations", "block_swap_buffers", "workspace")
NOT_ESTIMATED = ("config_file", "events_file")     # options of a run that say nothing about its memory


def estimate_options(cfg, command: str | None = None, source: str = "options", **values) -> EstimateVramConfig:
    """The one way to the estimator's input: `cfg`'s options (a train_network / train / generate_image config, or
    an EstimateVramConfig), the command it estimates (default: what `cfg` is), and `values` on top (e.g. a
    training `resolution`, `batch_size`, `caches_ready`)."""
    known = {f.name for f in option_fields(EstimateVramConfig)} - set(NOT_ESTIMATED)
    data = {f.name: getattr(cfg, f.name) for f in option_fields(type(cfg)) if f.name in known}
    data["for_command"] = command or getattr(cfg, "for_command", None) or _command_of(cfg)
    data.update(values)
    return from_dict(EstimateVramConfig, data, source=source)


def workload_from_config(opts: EstimateVramConfig) -> M.Workload:
    """Check the options and resolve what the estimate needs from them."""
    validate(opts)
    command, version = opts.for_command, opts.resolved_version()
    if command == "caption_images":
        return _caption_workload(opts)
    controls = _controls(opts, version)
    if command == "generate_image":
        h, w = opts.image_size
        fp8 = opts.fp8 or opts.fp8_base or opts.fp8_scaled       # estimate_vram takes both spellings
    else:
        w, h = opts.resolution
        fp8 = opts.fp8_base
        if command == "train_network":
            checks.check_fp8_scaled(opts)
            checks.check_base_precision(opts)
    checks.check_blocks_to_swap(opts.blocks_to_swap, M.LAYERS)
    gpus = opts.num_gpus
    if gpus > 1 and command != "train":
        raise OptionError(f"--num_gpus {gpus}: sharding over GPUs (FSDP) is for `train` (full finetune); "
                          f"{command} holds a whole model per GPU.", "Drop --num_gpus, or estimate --for train.")
    if gpus > 1 and opts.blocks_to_swap:
        raise OptionError(f"--num_gpus {gpus} with --blocks_to_swap {opts.blocks_to_swap}: FSDP shards the "
                          "weights instead of swapping them.", "Set --blocks_to_swap 0 with FSDP.")
    return M.Workload(opts=opts, command=command, width=w, height=h, batch=opts.batch_size, controls=controls,
                      vl_tokens_per_control=_vl_tokens(version) if controls else 0, fp8=fp8, num_gpus=gpus,
                      base_precision=opts.base_model_precision if command == "train_network" else "no_change")


def _caption_workload(opts: EstimateVramConfig) -> M.Workload:
    """caption_images: the images of one item (the target and --num_control_images controls) at
    --caption_image_area; no DiT."""
    side = int(opts.caption_image_area ** 0.5)
    tokens = opts.caption_image_area // int(K("vl_patch_area"))
    return M.Workload(opts=opts, command="caption_images", width=side, height=side, batch=1,
                      controls=opts.num_control_images or 0, vl_tokens_per_control=tokens, fp8=False)


def _command_of(cfg) -> str:
    if hasattr(cfg, "caption_style") and not hasattr(cfg, "image_size"):
        return "caption_images"
    if hasattr(cfg, "image_size"):
        return "generate_image"
    return "train" if hasattr(cfg, "full_bf16") else "train_network"


def _controls(opts: EstimateVramConfig, version: str) -> int:
    given = opts.num_control_images
    if given is None:
        given = len(opts.control_image_path) or (1 if version in EDIT_VERSIONS else 0)
    if given and version not in EDIT_VERSIONS:
        raise OptionError(f"--num_control_images {given} needs an edit model; --model_version is {version}.",
                          "Add --model_version edit / edit-2509 / edit-2511, or drop the control images.")
    return given


def _vl_tokens(version: str) -> int:
    """Vision tokens one control image adds to the prompt (14-px patches merged 2×2)."""
    area = get_variant(version).vl_area or VAE_AREA
    return area // int(K("vl_patch_area"))


# ------------------------------------------------------------------ phases

def _phase(ram: float, **parts: float) -> dict:
    gpu = {p: parts.get(p, 0) for p in PARTS}
    return {"vram": sum(gpu.values()), "ram": ram, "parts": gpu}


def _runtime(w: M.Workload, step: bool = False) -> float:
    """CUDA context + cuBLAS workspace, plus the allocator's reserve during a training step."""
    base = (K("cuda_context_gib") + K("cublas_workspace_gib")) * GIB
    return base + (K("allocator_reserve_gib") * GIB if step else 0)


def _process_ram() -> float:
    return K("process_ram_gib") * GIB


def load_phase(w: M.Workload) -> dict:
    # With block swap the DiT is loaded to the CPU first and the resident blocks moved over afterwards.
    staging = M.dit_bytes(w) if w.opts.blocks_to_swap else M.LARGEST_LINEAR * M.BF16
    workspace = _runtime(w) + (2 * M.LARGEST_LINEAR * M.FP32 if M.uses_fp8(w) and w.opts.fp8_scaled else 0)
    return _phase(_process_ram() + staging, weights=_sharded(w, M.dit_resident_bytes(w)), workspace=workspace)


def caching_phases(w: M.Workload) -> dict:
    vae = _phase(_process_ram(), weights=M.vae_bytes(), activations=M.vae_activation_bytes(w, decode=False),
                 workspace=_runtime(w))
    te = _phase(_process_ram(), weights=M.text_encoder_bytes(w.opts.fp8_vl),
                activations=M.text_encoder_activation_bytes(w), workspace=_runtime(w))
    return {"caching_latents": vae, "caching_text": te}


def _sharded(w: M.Workload, nbytes: float) -> float:
    """FSDP (a full finetune over N GPUs) keeps 1/N of the weights, gradients and optimizer states per GPU."""
    return nbytes / w.num_gpus if w.full and w.num_gpus > 1 else nbytes


def step_moments(w: M.Workload) -> dict:
    """What a training step holds beyond the weights and trained parameters, at each moment that can be its peak.
    The moments do not coincide, so the step's peak is their maximum, not their sum:
    - forward_end: every block's kept activations, and autocast's bf16 copies of all fp32 trainables;
    - backward: block i's backward holds the kept activations of blocks 0..i and the gradients of blocks > i, so
      the larger of the two at one end (both when gradient accumulation keeps earlier gradients), plus one block's
      recompute/backward and autocast copies;
    - optimizer: every gradient and the optimizer's temporaries, the activations gone.
    Full finetune on N GPUs (FSDP): gradients are reduce-scattered block by block, so one block's unsharded
    gradients and two blocks' gathered weights (the running one and the prefetched one) come on top."""
    kept, block, _ = M.training_activation_bytes(w)
    grads = _sharded(w, M.gradient_bytes(w))
    fused = w.full and w.opts.fused_backward_pass
    held = grads if w.opts.gradient_accumulation_steps > 1 and not fused else 0   # from earlier micro-batches
    autocast_all = M.autocast_cache_bytes(w)
    autocast_block = autocast_all / M.LAYERS
    gathered = 0
    if w.full and w.num_gpus > 1:
        full_block = M.block_bytes(w)[0]
        gathered = 2 * full_block + full_block // M.dit_param_bytes(w) * M.dit_param_bytes(w)
    in_flight = M.fp8_dequant_bytes(w)
    kept_in_backward = kept if held or kept >= grads else 0
    return {
        "forward_end": {"activations": kept + in_flight, "lora_and_optimizer": autocast_all, "gradients": held,
                        "workspace": gathered},
        "backward": {"activations": kept_in_backward + block + in_flight, "lora_and_optimizer": autocast_block,
                     "gradients": grads if held or not kept_in_backward else 0, "workspace": gathered},
        "optimizer": {"gradients": grads, "workspace": M.optimizer_step_bytes(w)},
    }


def training_phase(w: M.Workload) -> dict:
    _, _, act_ram = M.training_activation_bytes(w)
    # Full finetune with block swap (needs the fused backward): each weight is stepped while its block is on the
    # GPU, so every optimizer state (created next to its weight) and the in-flight block's gradients are on the GPU.
    states = _sharded(w, M.optimizer_state_bytes(w))
    trained = 0 if w.full else M.trainable_params(w) * M.trainable_param_bytes(w)
    ema_gpu, ema_ram = M.ema_bytes(w)
    ram = _process_ram() + M.swapped_bytes(w) + M.swap_staging_bytes(w) + act_ram + ema_ram
    moments = step_moments(w)
    moment = max(moments, key=lambda m: sum(moments[m].values()))
    parts = moments[moment]
    return dict(_phase(ram, weights=_sharded(w, M.dit_resident_bytes(w)),
                       lora_and_optimizer=trained + states + parts.get("lora_and_optimizer", 0) + ema_gpu,
                       gradients=parts.get("gradients", 0), activations=parts.get("activations", 0),
                       workspace=_runtime(w, step=True) + parts.get("workspace", 0)), moment=moment)


def saving_phase(w: M.Workload) -> dict:
    train = training_phase(w)
    trained = 0 if w.full else M.trainable_params(w) * M.trainable_param_bytes(w)
    parts = dict(weights=train["parts"]["weights"], workspace=_runtime(w),
                 lora_and_optimizer=trained + _sharded(w, M.optimizer_state_bytes(w)))
    if w.full:  # the DiT is gathered in RAM in bf16 unless --mem_eff_save streams it tensor by tensor
        saved = M.LARGEST_LINEAR * M.BF16 if w.opts.mem_eff_save else M.dit_bytes(w) // M.dit_param_bytes(w) * 2
        states = M.optimizer_state_bytes(w) if w.opts.save_state else 0
    else:
        saved, states = M.trainable_params(w) * M.FP32, (M.optimizer_state_bytes(w) if w.opts.save_state else 0)
    # --use_ema: the -ema file is written while the average sits in the weights; the raw ones wait in host RAM
    backup = M.trainable_params(w) * M.trainable_param_bytes(w) if w.opts.use_ema else 0
    return _phase(train["ram"] + saved + states + backup, **parts)


def generation_phases(w: M.Workload) -> dict:
    phases = {}
    te_bytes = M.text_encoder_bytes(False) + M.text_encoder_activation_bytes(w)
    if w.opts.text_encoder_cpu:
        phases["text_encoding"] = _phase(_process_ram() + te_bytes, workspace=_runtime(w))
    else:
        phases["text_encoding"] = _phase(_process_ram(), weights=M.text_encoder_bytes(False),
                                         activations=M.text_encoder_activation_bytes(w), workspace=_runtime(w))
    if w.controls:
        phases["control_encoding"] = _phase(_process_ram(), weights=M.vae_bytes(),
                                            activations=w.controls * M.vae_activation_bytes(w, decode=False),
                                            workspace=_runtime(w))
    phases["load"] = load_phase(w)
    phases["denoising"] = _phase(_process_ram() + M.swapped_bytes(w) + M.swap_staging_bytes(w),
                                 weights=M.dit_resident_bytes(w), activations=M.inference_activation_bytes(w),
                                 workspace=_runtime(w) + M.fp8_dequant_bytes(w))
    if w.opts.preview_every is not None:   # a full-size decode between steps, beside the resident DiT
        phases["preview_decode"] = _phase(_process_ram() + M.swapped_bytes(w) + M.swap_staging_bytes(w),
                                          weights=M.dit_resident_bytes(w) + M.vae_bytes(),
                                          activations=M.vae_activation_bytes(w, decode=True), workspace=_runtime(w))
    phases["vae_decode"] = _phase(_process_ram(), weights=M.vae_bytes(),
                                  activations=M.vae_activation_bytes(w, decode=True), workspace=_runtime(w))
    phases["saving"] = _phase(_process_ram() + 3 * w.width * w.height * M.FP32, workspace=_runtime(w))
    return phases


def caption_phases(w: M.Workload) -> dict:
    """Loading reads one tensor at a time (the largest is the token embedding); captioning holds the text encoder
    with lm_head and one item's activations."""
    weights = M.text_encoder_bytes(w.opts.fp8_vl)
    embedding = M.P.TEXT_CONFIG["vocab_size"] * M.P.TEXT_CONFIG["hidden_size"] * M.BF16
    return {"load": _phase(_process_ram() + embedding, weights=weights, workspace=_runtime(w)),
            "captioning": _phase(_process_ram(), weights=weights, activations=M.caption_activation_bytes(w),
                                 workspace=_runtime(w))}


CACHING_COMMANDS = {"caching_latents": "cache_latents", "caching_text": "cache_text_encoder_outputs"}


def phases_for(w: M.Workload) -> dict:
    """The phases of the run itself (the caching commands are separate runs: `commands_for`)."""
    if w.command == "caption_images":
        return caption_phases(w)
    if not w.training:
        return generation_phases(w)
    return {"load": load_phase(w), "training_step": training_phase(w), "saving": saving_phase(w)}


def commands_for(w: M.Workload) -> dict:
    """The caching commands a training run needs first (none with --caches_ready), by command name."""
    if not w.training or w.opts.caches_ready:
        return {}
    return {CACHING_COMMANDS[name]: phase for name, phase in caching_phases(w).items()}


def _gib(b: float) -> float:
    return round(b / GIB, 3)


def _phase_json(p: dict) -> dict:
    out = {"vram_gib": _gib(p["vram"]), "ram_gib": _gib(p["ram"]), "parts": {k: _gib(v) for k, v in p["parts"].items()}}
    return dict(out, moment=p["moment"]) if "moment" in p else out


def estimate(w: M.Workload) -> dict:
    """The JSON-ready estimate: peak VRAM/RAM (GiB) of the run itself, its peak phase, every phase with its
    parts, and (training) each caching command as its own row under `commands`."""
    phases = phases_for(w)
    peak = max(phases, key=lambda n: phases[n]["vram"])
    commands = commands_for(w)
    return {
        "command": w.command,
        "vram_gib": _gib(phases[peak]["vram"]),
        "ram_gib": _gib(max(p["ram"] for p in phases.values())),
        "peak_phase": peak,
        "parts": {k: _gib(v) for k, v in phases[peak]["parts"].items()},
        "phases": {n: _phase_json(p) for n, p in phases.items()},
        "commands": {n: dict(_phase_json(p), fp8_vl=bool(w.opts.fp8_vl) if n == "cache_text_encoder_outputs"
                             else None) for n, p in commands.items()},
        "num_gpus": w.num_gpus,
        "inputs": _inputs(w),
        "notes": _notes(w),
    }


def _inputs(w: M.Workload) -> dict:
    if w.command == "caption_images":
        return {"width": w.width, "height": w.height, "control_images": w.controls,
                "vision_tokens_per_image": w.vl_tokens_per_control, "sequence_tokens": M.caption_tokens(w)}
    return {"width": w.width, "height": w.height, "batch": w.batch, "control_images": w.controls,
            "image_tokens": w.image_tokens, "text_tokens": w.text_tokens, "dit_tokens": w.dit_tokens,
            "blocks_on_gpu": M.LAYERS - w.opts.blocks_to_swap,
            "trainable_params": M.trainable_params(w) if w.training else 0}


def _notes(w: M.Workload) -> list[str]:
    notes = []
    if w.command == "caption_images":
        notes.append("derived from the published shapes (weights exact; activations and KV cache counted, not "
                     "measured on a GPU); per item, controls beside the target: --num_control_images.")
    if w.full and w.fp8:
        notes.append("fp8 is ignored for full finetuning (the finetuner trains bf16/fp32 weights).")
    if w.training and not w.opts.caches_ready:
        notes.append("the caching commands (VAE, text encoder) run first as their own jobs: see `commands`; "
                     "--caches_ready leaves them out.")
    if w.full and w.num_gpus > 1:
        notes.append(f"per GPU with FSDP over {w.num_gpus} GPUs: weights, gradients and optimizer states are "
                     "sharded; two blocks are gathered at a time.")
    if w.training and M.uses_fp8(w) and not w.opts.gradient_checkpointing:
        notes.append("fp8 without --gradient_checkpointing keeps a bf16 copy of every block's weights for backward.")
    ema_gpu, ema_ram = M.ema_bytes(w)
    if ema_gpu or ema_ram:
        notes.append(f"--use_ema keeps a float32 copy of the {M.trainable_params(w) / 1e6:.0f}M trained values "
                     f"({(ema_gpu + ema_ram) / GIB:.1f} GiB) in {'VRAM' if ema_gpu else 'host RAM'}.")
    return notes
