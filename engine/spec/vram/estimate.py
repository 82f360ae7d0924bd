"""Phases of a run and their GPU/RAM peaks; the estimate is the maximum over phases.

Each phase lists what is alive on the GPU at its peak, by part (weights, LoRA + optimiser states,
gradients, activations, block-swap buffers, workspace), and the process's RAM at that moment.
"""

from __future__ import annotations

from engine.spec.config import EDIT_VERSIONS
from engine.spec.errors import OptionError
from engine.spec.variants import VAE_AREA, get_variant
from engine.spec.vram import memory as M
from engine.spec.vram.constants import GIB
from engine.spec.vram.constants import value as K

PARTS = ("weights", "lora_and_optimizer", "gradients", "activations", "block_swap_buffers", "workspace")


def workload_from_config(cfg) -> M.Workload:
    """Resolve a command's options (EstimateVramConfig, or the command's own config) into a Workload."""
    command = getattr(cfg, "for_command", None) or _command_of(cfg)
    version = cfg.resolved_version()
    controls = _controls(cfg, version)
    if command == "generate_image":
        h, w = cfg.image_size
        fp8 = cfg.fp8 or getattr(cfg, "fp8_base", False) or cfg.fp8_scaled
    else:
        w, h = getattr(cfg, "resolution", [1024, 1024])
        fp8 = cfg.fp8_base
        if cfg.fp8_scaled and not cfg.fp8_base and command == "train_network":
            raise OptionError("--fp8_scaled was given without --fp8_base.",
                              "Add --fp8_base (fp8_scaled only changes how the fp8 weights are scaled).")
    _check_sizes(w, h, cfg.blocks_to_swap)
    return M.Workload(
        command=command, width=w, height=h, batch=getattr(cfg, "batch_size", None) or 1, controls=controls,
        vl_tokens_per_control=_vl_tokens(version) if controls else 0,
        network_dim=getattr(cfg, "network_dim", None) or 4, fp8=fp8, fp8_scaled=cfg.fp8_scaled,
        fp8_vl=getattr(cfg, "fp8_vl", False), blocks_to_swap=cfg.blocks_to_swap,
        gradient_checkpointing=getattr(cfg, "gradient_checkpointing", False),
        gc_cpu_offload=getattr(cfg, "gradient_checkpointing_cpu_offload", False),
        optimizer=getattr(cfg, "optimizer_type", "AdamW"), full_bf16=getattr(cfg, "full_bf16", False),
        mixed_precision=getattr(cfg, "mixed_precision", "no"),
        fused_backward_pass=getattr(cfg, "fused_backward_pass", False),
        mem_eff_save=getattr(cfg, "mem_eff_save", False), save_state=getattr(cfg, "save_state", False),
        text_encoder_cpu=getattr(cfg, "text_encoder_cpu", False),
        caches_ready=getattr(cfg, "caches_ready", False), vae_tiling=getattr(cfg, "vae_enable_tiling", False),
        previews=getattr(cfg, "preview_every", None) is not None)


def _command_of(cfg) -> str:
    if hasattr(cfg, "image_size"):
        return "generate_image"
    return "train" if hasattr(cfg, "full_bf16") else "train_network"


def _controls(cfg, version: str) -> int:
    given = getattr(cfg, "num_control_images", None)
    if given is None:
        given = len(getattr(cfg, "control_image_path", []) or []) or (1 if version in EDIT_VERSIONS else 0)
    if given and version not in EDIT_VERSIONS:
        raise OptionError(f"--num_control_images {given} needs an edit model; --model_version is {version}.",
                          "Add --model_version edit / edit-2509 / edit-2511, or drop the control images.")
    return given


def _vl_tokens(version: str) -> int:
    """Vision tokens one control image adds to the prompt (14-px patches merged 2×2)."""
    area = get_variant(version).vl_area or VAE_AREA
    return area // int(K("vl_patch_area"))


def _check_sizes(w: int, h: int, swap: int) -> None:
    if w <= 0 or h <= 0 or w % 16 or h % 16:
        raise OptionError(f"image size {w}x{h} is not a positive multiple of 16.",
                          "Use a width and height divisible by 16 (e.g. 1024 1024).")
    if not 0 <= swap <= M.LAYERS - 1:
        raise OptionError(f"--blocks_to_swap {swap} is out of range.",
                          f"Use 0 to {M.LAYERS - 1}: at least one of the {M.LAYERS} blocks stays on the GPU.")


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
    staging = M.dit_bytes(w) if w.blocks_to_swap else M.LARGEST_LINEAR * M.BF16
    workspace = _runtime(w) + (2 * M.LARGEST_LINEAR * M.FP32 if M.uses_fp8(w) and w.fp8_scaled else 0)
    return _phase(_process_ram() + staging, weights=M.dit_resident_bytes(w), workspace=workspace)


def caching_phases(w: M.Workload) -> dict:
    vae = _phase(_process_ram(), weights=M.vae_bytes(), activations=M.vae_activation_bytes(w, decode=False),
                 workspace=_runtime(w))
    te = _phase(_process_ram(), weights=M.text_encoder_bytes(w.fp8_vl),
                activations=M.text_encoder_activation_bytes(w), workspace=_runtime(w))
    return {"caching_latents": vae, "caching_text": te}


def training_phase(w: M.Workload) -> dict:
    act_gpu, act_ram = M.training_activation_bytes(w)
    # Full finetune with block swap (needs the fused backward): each weight is stepped while its block is on the
    # GPU, so every optimizer state (created next to its weight) and the in-flight block's gradients are on the GPU.
    states = M.optimizer_state_bytes(w)
    trained = 0 if w.full else M.trainable_params(w) * M.trainable_param_bytes(w)
    ram = _process_ram() + M.swapped_bytes(w) + M.swap_staging_bytes(w) + act_ram
    return _phase(ram, weights=M.dit_resident_bytes(w),
                  lora_and_optimizer=trained + states + M.autocast_cache_bytes(w),
                  gradients=M.gradient_bytes(w), activations=act_gpu,
                  workspace=_runtime(w, step=True) + M.fp8_dequant_bytes(w) + M.optimizer_step_bytes(w))


def saving_phase(w: M.Workload) -> dict:
    train = training_phase(w)
    parts = dict(train["parts"], activations=0, workspace=_runtime(w))
    if w.full:  # the DiT is gathered in RAM in bf16 unless --mem_eff_save streams it tensor by tensor
        saved = M.LARGEST_LINEAR * M.BF16 if w.mem_eff_save else M.dit_bytes(w) // M.dit_param_bytes(w) * 2
        states = M.optimizer_state_bytes(w) if w.save_state else 0
    else:
        saved, states = M.trainable_params(w) * M.FP32, (M.optimizer_state_bytes(w) if w.save_state else 0)
    return _phase(train["ram"] + saved + states, **parts)


def generation_phases(w: M.Workload) -> dict:
    phases = {}
    te_bytes = M.text_encoder_bytes(False) + M.text_encoder_activation_bytes(w)
    if w.text_encoder_cpu:
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
    if w.previews:   # a full-size decode between steps, beside the resident DiT (the preview is shrunk after it)
        phases["preview_decode"] = _phase(_process_ram() + M.swapped_bytes(w) + M.swap_staging_bytes(w),
                                          weights=M.dit_resident_bytes(w) + M.vae_bytes(),
                                          activations=M.vae_activation_bytes(w, decode=True), workspace=_runtime(w))
    phases["vae_decode"] = _phase(_process_ram(), weights=M.vae_bytes(),
                                  activations=M.vae_activation_bytes(w, decode=True), workspace=_runtime(w))
    phases["saving"] = _phase(_process_ram() + 3 * w.width * w.height * M.FP32, workspace=_runtime(w))
    return phases


def phases_for(w: M.Workload) -> dict:
    if not w.training:
        return generation_phases(w)
    phases = {} if w.caches_ready else caching_phases(w)
    phases.update(load=load_phase(w), training_step=training_phase(w), saving=saving_phase(w))
    return phases


def estimate(w: M.Workload) -> dict:
    """The JSON-ready estimate: peak VRAM/RAM (GiB), the peak phase, every phase with its parts."""
    phases = phases_for(w)
    peak = max(phases, key=lambda n: phases[n]["vram"])
    gib = lambda b: round(b / GIB, 3)  # noqa: E731
    return {
        "command": w.command,
        "vram_gib": gib(phases[peak]["vram"]),
        "ram_gib": gib(max(p["ram"] for p in phases.values())),
        "peak_phase": peak,
        "parts": {k: gib(v) for k, v in phases[peak]["parts"].items()},
        "phases": {n: {"vram_gib": gib(p["vram"]), "ram_gib": gib(p["ram"]),
                       "parts": {k: gib(v) for k, v in p["parts"].items()}} for n, p in phases.items()},
        "inputs": {"width": w.width, "height": w.height, "batch": w.batch, "control_images": w.controls,
                   "image_tokens": w.image_tokens, "text_tokens": w.text_tokens, "dit_tokens": w.dit_tokens,
                   "blocks_on_gpu": M.LAYERS - w.blocks_to_swap,
                   "trainable_params": M.trainable_params(w) if w.training else 0},
        "notes": _notes(w),
    }


def _notes(w: M.Workload) -> list[str]:
    notes = []
    if w.full and w.fp8:
        notes.append("fp8 is ignored for full finetuning (the finetuner trains bf16/fp32 weights).")
    if w.training and not w.caches_ready:
        notes.append("includes the caching commands (VAE and text encoder); add --caches_ready to leave them out.")
    if w.training and M.uses_fp8(w) and not w.gradient_checkpointing:
        notes.append("fp8 without --gradient_checkpointing keeps a bf16 copy of every block's weights for backward.")
    return notes
