"""Every constant of the VRAM/RAM estimator, with its value and where it comes from.

docs/vram-constants.md renders this table; tests check the measured ones against a fresh CPU measurement.
Sources: "derived" (arithmetic from published configs or library behaviour), "measured" (CPU measurement with
benchmarks/measure_activations.py, method in the doc), "assumed" (a typical value that a GPU run should
confirm), "calibrated" (fitted; the doc says on what).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024 ** 3


@dataclass(frozen=True)
class Constant:
    value: float
    unit: str
    source: str
    note: str


CONSTANTS: dict[str, Constant] = {
    # ---- activations of one transformer block, in "width units": one (tokens × 3072) tensor in the
    # activation dtype. Measured on the real diffusers block at widths 256 and 1024 (head_dim 128), bf16.
    "act_saved_units": Constant(
        16.1, "width units / block", "measured",
        "tensors a block keeps for backward without gradient checkpointing (16.11 at width 256, 16.08 at 1024)"),
    "act_backward_units": Constant(
        6.7, "width units", "measured",
        "extra live memory while one block runs backward, above what was saved (6.6-6.7)"),
    "ckpt_saved_units": Constant(
        1.0, "width units / block", "measured",
        "with checkpointing a block keeps only its inputs: the image and text residual streams (exactly 1.00)"),
    "ckpt_backward_units": Constant(
        23.9, "width units", "measured",
        "with checkpointing: recompute of one block plus its backward (22.9-23.9; upper value used)"),
    "infer_forward_units": Constant(
        12.9, "width units", "measured",
        "peak of one block's forward under no_grad, above its inputs (12.0-12.9; upper value used)"),
    "vae_encode_units": Constant(
        10.4, "per pixel per base channel", "measured",
        "VAE encode peak ÷ (H·W·base_dim·bytes), tiny VAE at 64² and 128² (10.38, 10.28)"),
    "vae_decode_units": Constant(
        18.3, "per pixel per base channel", "measured",
        "VAE decode peak ÷ (H·W·base_dim·bytes), tiny VAE at 64² and 128² (18.22, 18.13)"),
    # ---- token counts
    "prompt_tokens": Constant(
        256, "tokens", "assumed",
        "caption length after the template is dropped (an upper value for typical captions)"),
    "vl_patch_area": Constant(
        28 * 28, "pixels / token", "derived",
        "Qwen2.5-VL: 14-px patches merged 2×2, so one vision token per 28×28 pixels"),
    # ---- weights and optimiser
    "fp8_scale_block": Constant(
        64, "inputs / scale", "derived",
        "--fp8_scaled: one bf16 scale per 64 input features of each block Linear (musubi block-wise scaling)"),
    "nf4_block": Constant(
        64, "weights / absmax", "derived",
        "--base_model_precision nf4-bnb: one absmax per 64 weights (QLoRA's block size), stored as uint8"),
    "nf4_double_quant_block": Constant(
        256, "absmax / fp32 scale", "derived",
        "nf4 double quantisation: the uint8 absmax values share one fp32 scale per 256 (bitsandbytes default)"),
    "bnb_block": Constant(
        256, "elements / absmax", "derived",
        "bitsandbytes 8-bit optimiser states: one fp32 absmax per 256 elements; tensors < 4096 stay fp32"),
    "bnb_min_8bit_size": Constant(4096, "elements", "derived", "bitsandbytes min_8bit_size default"),
    # ---- runtime
    "cuda_context_gib": Constant(
        0.5, "GiB", "assumed",
        "CUDA context + kernels of a PyTorch process (CUDA 12 lazy loading); outside torch's allocator"),
    "cublas_workspace_gib": Constant(0.03, "GiB", "derived", "cuBLAS workspace on Hopper (32 MiB)"),
    "allocator_reserve_gib": Constant(
        0.95, "GiB", "calibrated",
        "memory the caching allocator holds reserved but unallocated during a training step (fragmentation "
        "from activation churn); the one fitted constant: the largest value (0.05 GiB steps) that keeps every row "
        "of the seed's LoRA table less than 0.5 GiB over, compared under the table's own fp8 layout; "
        "benchmarks/gpu_check.py measures it (reserved minus allocated)"),
    "process_ram_gib": Constant(
        3.0, "GiB", "assumed",
        "resident RAM of the engine process: Python, torch with its CUDA libraries, diffusers, transformers"),
}


def value(name: str) -> float:
    return CONSTANTS[name].value


def markdown_table() -> str:
    """The constants table of docs/vram-constants.md (a test keeps the doc equal to this)."""
    rows = ["| constant | value | unit | source | how it was obtained |", "|---|---|---|---|---|"]
    rows += [f"| `{name}` | {c.value:g} | {c.unit} | {c.source} | {c.note} |" for name, c in CONSTANTS.items()]
    return "\n".join(rows)
