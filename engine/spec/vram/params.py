"""Exact parameter counts of the published Qwen-Image models, computed from their config dimensions.

Pure arithmetic (no torch): the GUI's live estimate runs this at every keystroke. Each function mirrors
the module tree of the diffusers / transformers class it counts; tests/test_vram.py instantiates the same
configs on the meta device and checks the totals match exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

# Published configs (Qwen/Qwen-Image transformer, vae and text_encoder config.json).
DIT_CONFIG = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=3584)
VAE_CONFIG = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                  temperal_downsample=[False, True, True], input_channels=3)
TEXT_CONFIG = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                   num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)
VISION_CONFIG = dict(depth=32, hidden_size=1280, intermediate_size=3420, patch_size=14, temporal_patch_size=2,
                     in_channels=3, spatial_merge_size=2, out_hidden_size=3584)


def linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def conv(n_in: int, n_out: int, *kernel: int, bias: bool = True) -> int:
    size = 1
    for k in kernel:
        size *= k
    return n_in * n_out * size + (n_out if bias else 0)


# ------------------------------------------------------------------ DiT (QwenImageTransformer2DModel)

@dataclass(frozen=True)
class LinearShape:
    """One Linear of a transformer block: what fp8 quantises, LoRA adapts and block swap moves."""
    name: str
    n_in: int
    n_out: int


def dit_block_linears(cfg: dict = DIT_CONFIG) -> list[LinearShape]:
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    mlp = 4 * d  # FeedForward(dim, mult=4, gelu-approximate)
    out = [LinearShape("img_mod.1", d, 6 * d), LinearShape("txt_mod.1", d, 6 * d)]
    out += [LinearShape(f"attn.{n}", d, d) for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj",
                                                     "add_v_proj", "to_out.0", "to_add_out")]
    for s in ("img_mlp", "txt_mlp"):
        out += [LinearShape(f"{s}.net.0.proj", d, mlp), LinearShape(f"{s}.net.2", mlp, d)]
    return out


def dit_block_norm_params(cfg: dict = DIT_CONFIG) -> int:
    return 4 * cfg["attention_head_dim"]  # norm_q, norm_k, norm_added_q, norm_added_k (RMSNorm per head)


def dit_block_params(cfg: dict = DIT_CONFIG) -> int:
    return sum(linear(l.n_in, l.n_out) for l in dit_block_linears(cfg)) + dit_block_norm_params(cfg)


def dit_outer_linears(cfg: dict = DIT_CONFIG) -> list[LinearShape]:
    """The Linears outside the blocks (never fp8-quantised, never swapped)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    out_ch = cfg["patch_size"] ** 2 * cfg["out_channels"]
    return [LinearShape("img_in", cfg["in_channels"], d), LinearShape("txt_in", cfg["joint_attention_dim"], d),
            LinearShape("time_text_embed.timestep_embedder.linear_1", 256, d),
            LinearShape("time_text_embed.timestep_embedder.linear_2", d, d),
            LinearShape("norm_out.linear", d, 2 * d),  # AdaLayerNormContinuous
            LinearShape("proj_out", d, out_ch)]


def dit_outer_params(cfg: dict = DIT_CONFIG) -> int:
    """Everything outside the blocks: the Linears above plus txt_norm (RMSNorm on the VL features)."""
    return sum(linear(l.n_in, l.n_out) for l in dit_outer_linears(cfg)) + cfg["joint_attention_dim"]


def dit_params(cfg: dict = DIT_CONFIG) -> int:
    return dit_outer_params(cfg) + cfg["num_layers"] * dit_block_params(cfg)


# ------------------------------------------------------------------ VAE (AutoencoderKLQwenImage)

def _vae_res(n_in: int, n_out: int) -> int:
    shortcut = conv(n_in, n_out, 1, 1, 1) if n_in != n_out else 0
    return n_in + conv(n_in, n_out, 3, 3, 3) + n_out + conv(n_out, n_out, 3, 3, 3) + shortcut


def _vae_attn(dim: int) -> int:
    return dim + conv(dim, 3 * dim, 1, 1) + conv(dim, dim, 1, 1)


def _vae_mid(dim: int) -> int:
    return 2 * _vae_res(dim, dim) + _vae_attn(dim)


def _vae_resample(dim: int, mode: str) -> int:
    if mode.startswith("upsample"):
        time = conv(dim, 2 * dim, 3, 1, 1) if mode == "upsample3d" else 0
        return conv(dim, dim // 2, 3, 3) + time
    time = conv(dim, dim, 3, 1, 1) if mode == "downsample3d" else 0
    return conv(dim, dim, 3, 3) + time


def _vae_encoder(cfg: dict) -> int:
    dims = [cfg["base_dim"] * u for u in [1] + cfg["dim_mult"]]
    total = conv(cfg["input_channels"], dims[0], 3, 3, 3)
    last = len(cfg["dim_mult"]) - 1
    for i, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(cfg["num_res_blocks"]):
            total += _vae_res(n_in, n_out)
            n_in = n_out
        if i != last:
            total += _vae_resample(n_out, "downsample3d" if cfg["temperal_downsample"][i] else "downsample2d")
    return total + _vae_mid(dims[-1]) + dims[-1] + conv(dims[-1], 2 * cfg["z_dim"], 3, 3, 3)


def _vae_decoder(cfg: dict) -> int:
    mult = cfg["dim_mult"]
    dims = [cfg["base_dim"] * u for u in [mult[-1]] + mult[::-1]]
    up_temporal = cfg["temperal_downsample"][::-1]
    total = conv(cfg["z_dim"], dims[0], 3, 3, 3) + _vae_mid(dims[0])
    for i, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0:
            n_in //= 2  # the previous up-sampler halves the channels
        for _ in range(cfg["num_res_blocks"] + 1):
            total += _vae_res(n_in, n_out)
            n_in = n_out
        if i != len(mult) - 1:
            total += _vae_resample(n_out, "upsample3d" if up_temporal[i] else "upsample2d")
    return total + dims[-1] + conv(dims[-1], cfg["input_channels"], 3, 3, 3)


def vae_encoder_params(cfg: dict = VAE_CONFIG) -> int:
    return _vae_encoder(cfg) + conv(2 * cfg["z_dim"], 2 * cfg["z_dim"], 1, 1, 1)  # + quant_conv


def vae_decoder_params(cfg: dict = VAE_CONFIG) -> int:
    return _vae_decoder(cfg) + conv(cfg["z_dim"], cfg["z_dim"], 1, 1, 1)  # + post_quant_conv


def vae_params(cfg: dict = VAE_CONFIG) -> int:
    return vae_encoder_params(cfg) + vae_decoder_params(cfg)


# ------------------------------------------------------------------ text encoder (Qwen2.5-VL-7B)

def text_layer_params(cfg: dict = TEXT_CONFIG) -> int:
    h, kv = cfg["hidden_size"], cfg["hidden_size"] // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    attn = linear(h, h) + 2 * linear(h, kv) + linear(h, h, bias=False)
    mlp = 3 * linear(h, cfg["intermediate_size"], bias=False)
    return attn + mlp + 2 * h  # + input and post-attention RMSNorm


def language_model_params(cfg: dict = TEXT_CONFIG) -> int:
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    head = 0 if cfg["tie_word_embeddings"] else vocab * h
    return vocab * h + cfg["num_hidden_layers"] * text_layer_params(cfg) + h + head


def vision_params(cfg: dict = VISION_CONFIG) -> int:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    patch = conv(cfg["in_channels"], h, cfg["temporal_patch_size"], cfg["patch_size"], cfg["patch_size"],
                 bias=False)
    block = 2 * h + linear(h, 3 * h) + linear(h, h) + 2 * linear(h, inter) + linear(inter, h)
    merged = h * cfg["spatial_merge_size"] ** 2
    merger = h + linear(merged, merged) + linear(merged, cfg["out_hidden_size"])
    return patch + cfg["depth"] * block + merger


def text_encoder_params(text: dict = TEXT_CONFIG, vision: dict = VISION_CONFIG) -> int:
    return language_model_params(text) + vision_params(vision)
