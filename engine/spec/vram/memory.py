"""Bytes of each thing that lives in GPU memory or RAM: weights, LoRA, optimiser states, activations.

Pure Python. Every function takes a `Workload` (what the run does) and returns bytes. Constants come from
engine/spec/vram/constants.py, parameter counts from engine/spec/vram/params.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.spec.vram import params as P
from engine.spec.vram.constants import value as K

BF16, FP32, FP8 = 2, 4, 1


@dataclass(frozen=True)
class Fp8Layout:
    """Which block Linears fp8 stores in 1 byte and how they are scaled. The engine's layout is
    engine/models/fp8.py's (every block Linear, modulation included; one bf16 scale per 64 inputs with
    --fp8_scaled). The seed's VRAM table was measured with an older musubi-tuner layout (SEED_TABLE_FP8), so the
    estimate is compared with it under that layout, not under ours (docs/vram-constants.md)."""
    modulation_fp8: bool = True           # img_mod / txt_mod quantised too
    scale_block: int | None = 64          # inputs per scale with --fp8_scaled; None: one scale per tensor


ENGINE_FP8 = Fp8Layout()
# musubi-tuner when its Qwen-Image VRAM table was written: modulation layers excluded from fp8 ("_mod" in its
# exclude keys), one per-tensor scale (block-wise scaling came later).
SEED_TABLE_FP8 = Fp8Layout(modulation_fp8=False, scale_block=None)


@dataclass(frozen=True)
class Workload:
    """What a run does: its options, under their own names and defaults (an EstimateVramConfig), and what the
    estimate resolves from them (engine/spec/vram/estimate.py: workload_from_config)."""
    opts: Any                     # EstimateVramConfig
    command: str                  # train_network | train | generate_image
    width: int
    height: int
    batch: int
    controls: int                 # control images per sample (edit models)
    vl_tokens_per_control: int    # vision tokens each control adds to the text sequence
    fp8: bool                     # the DiT's block weights in fp8: --fp8_base (training), --fp8 (generation)
    base_precision: str = "no_change"   # train_network's --base_model_precision: nf4-bnb | int8-bnb
    fp8_layout: Fp8Layout = field(default=ENGINE_FP8)
    num_gpus: int = 1             # processes a full finetune is sharded over (FSDP); 1 = one whole copy

    @property
    def training(self) -> bool:
        return self.command in ("train_network", "train")

    @property
    def full(self) -> bool:
        return self.command == "train"

    @property
    def image_tokens(self) -> int:
        return (self.height // 16) * (self.width // 16)

    @property
    def text_tokens(self) -> int:
        return int(K("prompt_tokens")) + self.controls * self.vl_tokens_per_control

    @property
    def dit_tokens(self) -> int:
        """Tokens one DiT forward sees for the whole batch: target + control images + text."""
        return self.batch * (self.image_tokens * (1 + self.controls) + self.text_tokens)


DIM = P.DIT_CONFIG["num_attention_heads"] * P.DIT_CONFIG["attention_head_dim"]
LAYERS = P.DIT_CONFIG["num_layers"]
BLOCK_LINEARS = P.dit_block_linears()
BLOCK_WEIGHTS = sum(l.n_in * l.n_out for l in BLOCK_LINEARS)
BLOCK_BIASES = sum(l.n_out for l in BLOCK_LINEARS)
BLOCK_NORMS = P.dit_block_norm_params()
LARGEST_LINEAR = max(l.n_in * l.n_out for l in BLOCK_LINEARS)
MODULATION_WEIGHTS = sum(l.n_in * l.n_out for l in BLOCK_LINEARS if "_mod" in l.name)


# ------------------------------------------------------------------ DiT weights

def dit_param_bytes(w: Workload) -> int:
    """Bytes per parameter the DiT is stored in (before fp8)."""
    if w.full:
        return BF16 if w.opts.full_bf16 else FP32  # musubi's finetuner keeps fp32 weights unless --full_bf16
    return BF16  # LoRA training and inference compute in bf16


def uses_fp8(w: Workload) -> bool:
    return w.fp8 and not w.full  # the finetuner refuses fp8 (musubi forces it off)


def bnb_weight_bytes(mode: str) -> float:
    """Bytes of the block Linear weights stored by bitsandbytes (engine/models/bnb_quant.py). nf4: half a byte
    per weight, one uint8 absmax per 64 weights, one fp32 absmax per 256 of those (double quantisation). int8: one
    byte per weight and one fp32 scale per output row."""
    if mode == "nf4-bnb":
        blocks = BLOCK_WEIGHTS / K("nf4_block")
        return BLOCK_WEIGHTS / 2 + blocks + blocks / K("nf4_double_quant_block") * FP32
    return BLOCK_WEIGHTS + BLOCK_BIASES * FP32


def fp8_linears(w: Workload) -> list:
    """The block Linears stored in fp8 under the run's layout (none without fp8)."""
    if not uses_fp8(w):
        return []
    return [l for l in BLOCK_LINEARS if w.fp8_layout.modulation_fp8 or "_mod" not in l.name]


def block_bytes(w: Workload) -> tuple[int, int]:
    """(bytes of one block, of which the part block swap moves: the Linear weights; biases, norms and fp8
    scales stay on the GPU, in musubi and in engine/models/block_swap.py alike)."""
    pb = dit_param_bytes(w)
    if w.base_precision != "no_change" and not w.full:     # block swap is refused with it: nothing moves
        return int(bnb_weight_bytes(w.base_precision)) + (BLOCK_BIASES + BLOCK_NORMS) * BF16, 0
    if not uses_fp8(w):
        return (BLOCK_WEIGHTS + BLOCK_BIASES + BLOCK_NORMS) * pb, BLOCK_WEIGHTS * pb
    quant = sum(l.n_in * l.n_out for l in fp8_linears(w))
    moved = quant * FP8 + (BLOCK_WEIGHTS - quant) * pb      # plain --fp8_base: the same targets, no scales
    scales = 0
    if w.opts.fp8_scaled:
        block = w.fp8_layout.scale_block
        scales = (quant // block if block else len(fp8_linears(w))) * BF16
    return moved + scales + (BLOCK_BIASES + BLOCK_NORMS) * pb, moved


def outer_bytes(w: Workload) -> int:
    """The layers outside the blocks: never quantised (engine/models/fp8.py), in the DiT's dtype."""
    return P.dit_outer_params() * dit_param_bytes(w)


def dit_bytes(w: Workload) -> int:
    return outer_bytes(w) + LAYERS * block_bytes(w)[0]


def dit_resident_bytes(w: Workload) -> int:
    """DiT bytes on the GPU: swapped blocks leave their biases, norms and fp8 scales behind."""
    full, moved = block_bytes(w)
    return outer_bytes(w) + LAYERS * full - w.opts.blocks_to_swap * moved


def swapped_bytes(w: Workload) -> int:
    return w.opts.blocks_to_swap * block_bytes(w)[1]


def swap_staging_bytes(w: Workload) -> int:
    """One spare pinned host block the exchange copies into (engine/models/block_swap.py; the GPU side is
    swapped in place, so it needs no extra device buffer)."""
    return block_bytes(w)[1] if w.opts.blocks_to_swap else 0


# ------------------------------------------------------------------ trainable parameters and optimiser

def trainable_shapes(w: Workload) -> list[tuple[int, ...]]:
    """Shapes of the trained tensors: LoRA down/up pairs (and alpha) or the whole DiT."""
    if not w.full:
        r = w.opts.network_rank()
        return [s for l in BLOCK_LINEARS for s in ((r, l.n_in), (l.n_out, r), ())] * LAYERS
    shapes = []
    for l in BLOCK_LINEARS:
        shapes += [(l.n_out, l.n_in), (l.n_out,)]
    shapes = shapes * LAYERS + [(P.DIT_CONFIG["attention_head_dim"],)] * 4 * LAYERS
    for l in P.dit_outer_linears():
        shapes += [(l.n_out, l.n_in), (l.n_out,)]
    return shapes + [(P.DIT_CONFIG["joint_attention_dim"],)]


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def trainable_params(w: Workload) -> int:
    return sum(numel(s) for s in trainable_shapes(w))


def trainable_param_bytes(w: Workload) -> int:
    """LoRA weights are fp32 (musubi's network dtype under bf16 mixed precision)."""
    return FP32 if not w.full else dit_param_bytes(w)


def ema_bytes(w: Workload) -> tuple[int, int]:
    """(VRAM, RAM) of --use_ema: a float32 copy of every trained tensor, on the device (--ema_device
    accelerator) or in host RAM (cpu, the default)."""
    if not (w.training and w.opts.use_ema):
        return 0, 0
    size = trainable_params(w) * FP32
    return (size, 0) if w.opts.ema_device == "accelerator" else (0, size)


def optimizer_state_bytes(w: Workload) -> int:
    opt = w.opts.optimizer_type.lower()
    pb = trainable_param_bytes(w)
    total = 0
    for shape in trainable_shapes(w):
        n = numel(shape)
        if "8bit" in opt:  # bitsandbytes: two uint8 states + one fp32 absmax per block; small tensors stay 32-bit
            total += 2 * (n + 4 * -(-n // int(K("bnb_block")))) if n >= K("bnb_min_8bit_size") else 2 * FP32 * n
        elif "adafactor" in opt:  # factored second moment in fp32 (row + column) for matrices, no momentum
            total += FP32 * (shape[0] + shape[1]) if len(shape) == 2 else FP32 * n
        elif opt in ("sgd", "torch.optim.sgd"):
            total += 0
        else:  # AdamW and unknown classes: exp_avg and exp_avg_sq in the parameter's dtype
            total += 2 * pb * n
    return total


def gradient_bytes(w: Workload) -> int:
    if w.full and w.opts.fused_backward_pass:
        # the fused step frees each gradient as soon as it is applied: about one block's worth is alive
        return (BLOCK_WEIGHTS + BLOCK_BIASES) * dit_param_bytes(w)
    return trainable_params(w) * trainable_param_bytes(w)


def autocast_cache_bytes(w: Workload) -> int:
    """torch.autocast keeps a bf16 copy of each fp32 trainable leaf until the forward leaves autocast; the
    backward (outside autocast) holds only the copies of the block it recomputes."""
    if w.opts.mixed_precision in ("bf16", "fp16") and trainable_param_bytes(w) == FP32:
        return trainable_params(w) * BF16
    return 0


# ------------------------------------------------------------------ activations

def act_bytes(w: Workload) -> int:
    if w.full and w.opts.mixed_precision == "no" and not w.opts.full_bf16:
        return FP32
    return BF16


def width_unit(w: Workload) -> int:
    """One (tokens × model width) tensor of the whole batch in the activation dtype."""
    return w.dit_tokens * DIM * act_bytes(w)


def training_activation_bytes(w: Workload) -> tuple[int, int, int]:
    """(kept, block, RAM) bytes of a training step's activations. `kept`: what the forward leaves on the GPU for
    the backward (all blocks' saved tensors, or only their inputs with checkpointing); it is freed block by block
    as the backward goes down. `block`: the extra live memory while one block runs its backward (with
    checkpointing its recompute too). `RAM`: block inputs parked in host memory by checkpointing's CPU offload."""
    unit = width_unit(w)
    lora_saved = 0 if w.full else len(BLOCK_LINEARS) * w.opts.network_rank() * w.dit_tokens * act_bytes(w)
    if not w.opts.gradient_checkpointing:
        # every block keeps its tensors, fp8's dequantised bf16 weights included (the input gradient needs W)
        kept = LAYERS * (K("act_saved_units") * unit + lora_saved + fp8_block_copy_bytes(w))
        return int(kept), int(K("act_backward_units") * unit), 0
    kept = LAYERS * K("ckpt_saved_units") * unit
    block = K("ckpt_backward_units") * unit + lora_saved + fp8_block_copy_bytes(w)   # the recompute saves them again
    if w.opts.gradient_checkpointing_cpu_offload:  # block inputs wait in RAM; one block's worth is on the GPU at a time
        return int(2 * K("ckpt_saved_units") * unit), int(block), int(kept)
    return int(kept), int(block), 0


def fp8_block_copy_bytes(w: Workload) -> int:
    """The bf16 copies one block's fp8 Linears make per call, kept by autograd for the backward."""
    return sum(l.n_in * l.n_out for l in fp8_linears(w)) * BF16


def fp8_dequant_bytes(w: Workload) -> int:
    """One Linear's dequantisation in flight: `.to(bf16)`, then × scale (both bf16, the largest fp8 Linear).
    bitsandbytes nf4/int8 layers likewise keep only the quantised weight for backward and dequantise per call."""
    if w.base_precision != "no_change" and not w.full:
        return 2 * LARGEST_LINEAR * BF16
    linears = fp8_linears(w)
    return 2 * max(l.n_in * l.n_out for l in linears) * BF16 if linears else 0


def optimizer_step_bytes(w: Workload) -> int:
    """Transient fp32 copies the optimiser makes of one parameter (update, grad, param in fp32)."""
    return 3 * LARGEST_LINEAR * FP32 if w.full else 0


def inference_activation_bytes(w: Workload) -> int:
    unit = width_unit(w)
    return int((K("infer_forward_units") + 1) * unit)  # + the block's inputs (the measurement counts above them)


# ------------------------------------------------------------------ text encoder and VAE

def text_encoder_bytes(fp8_vl: bool) -> int:
    n = P.text_encoder_params()
    if not fp8_vl:
        return n * BF16
    embed = P.TEXT_CONFIG["vocab_size"] * P.TEXT_CONFIG["hidden_size"]
    return n * FP8 + embed  # --fp8_vl keeps the embedding in bf16


def text_encoder_activation_bytes(w: Workload) -> int:
    """Per encoded prompt: all hidden states (output_hidden_states), one layer's MLP, and the logits."""
    t, v = P.TEXT_CONFIG, P.VISION_CONFIG
    per_token = ((t["num_hidden_layers"] + 1 + 4) * t["hidden_size"] + 3 * t["intermediate_size"]
                 + t["vocab_size"]) * BF16
    vision_patches = w.controls * w.vl_tokens_per_control * v["spatial_merge_size"] ** 2
    per_patch = (6 * v["hidden_size"] + 3 * v["intermediate_size"]) * BF16
    return w.batch * w.text_tokens * per_token + w.batch * vision_patches * per_patch


def vae_bytes() -> int:
    return P.vae_params() * BF16


def vae_activation_bytes(w: Workload, decode: bool) -> int:
    pixels = w.width * w.height
    if decode and w.opts.vae_enable_tiling:  # diffusers tiles of 256 px: one tile's activations + the full output image
        return int(K("vae_decode_units") * 256 * 256 * P.VAE_CONFIG["base_dim"] * BF16 + 3 * pixels * FP32)
    units = K("vae_decode_units") if decode else K("vae_encode_units")
    return int(units * pixels * P.VAE_CONFIG["base_dim"] * BF16 * (1 if decode else w.batch))


# ------------------------------------------------------------------ caption_images (generation with the text encoder)

CAPTION_PROMPT_TOKENS = 120     # system turn + instruction of the built-in prompts, with the template's tokens


def caption_tokens(w: Workload) -> int:
    """Sequence length at the end of one caption: every image's vision tokens, the prompt, the new tokens."""
    return (1 + w.controls) * w.vl_tokens_per_control + CAPTION_PROMPT_TOKENS + w.opts.max_new_tokens


def caption_activation_bytes(w: Workload) -> int:
    """One item: the KV cache of the whole sequence, one decoder layer's prefill activations (no hidden states kept),
    the vision tower's activations over all images' patches (memory-efficient attention: linear in patches), and
    with --fp8_vl the bf16 copy of the largest Linear being used."""
    t, v = P.TEXT_CONFIG, P.VISION_CONFIG
    tokens = caption_tokens(w)
    head_dim = t["hidden_size"] // t["num_attention_heads"]
    kv_cache = t["num_hidden_layers"] * 2 * t["num_key_value_heads"] * head_dim * tokens * BF16
    prefill = tokens * (6 * t["hidden_size"] + 3 * t["intermediate_size"]) * BF16
    patches = (1 + w.controls) * w.vl_tokens_per_control * v["spatial_merge_size"] ** 2
    vision = patches * (6 * v["hidden_size"] + 3 * v["intermediate_size"]) * BF16
    dequant = t["hidden_size"] * t["intermediate_size"] * BF16 if w.opts.fp8_vl else 0
    return kv_cache + max(prefill, vision) + dequant

