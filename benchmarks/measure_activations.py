"""Measure the activation memory of one Qwen-Image transformer block on CPU, for engine/spec/vram/.

Method (documented in docs/vram-constants.md): a TorchDispatchMode sees every tensor an operator returns,
counts the bytes of each new storage once, and subtracts them again when the storage is freed (a
weakref finalizer on the storage; torch keeps one Python object per live storage). That is the same
quantity the CUDA caching allocator reports as "allocated" — live tensor storage — without needing a GPU.
Only the kernels differ: CPU scaled_dot_product_attention uses a flash-style kernel that keeps the
log-sum-exp (O(tokens), like xformers/flash on GPU), so the per-token numbers carry over.

We build the real diffusers `QwenImageTransformerBlock` at a scaled-down width (head_dim 128 as in the real
model, fewer heads), run forward + backward for LoRA-style training (frozen weights, inputs requiring grad)
and report, per token and per unit of model width, in bf16:
  saved    — bytes kept alive for backward by one block without checkpointing (activations)
  peak     — peak live bytes while running the block's backward, above what was saved
  ckpt     — bytes kept per block with torch.utils.checkpoint (its inputs, i.e. the residual stream)
The estimator multiplies these by tokens × 3072 × blocks. Run: `python benchmarks/measure_activations.py`.
"""

from __future__ import annotations

import argparse
import json
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """Live bytes of tensor storage created inside the mode, with the running peak."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _freed(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Outputs that share storage with an input (views, in-place ops) allocate nothing new.
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self.live and key not in inputs and storage.nbytes() > 0:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._freed, key)
        return out


def _block_and_inputs(heads: int, img_tokens: int, txt_tokens: int, dtype: torch.dtype, seed: int = 0):
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

    torch.manual_seed(seed)
    head_dim = 128
    dim = heads * head_dim
    block = QwenImageTransformerBlock(dim, heads, head_dim).to(dtype).requires_grad_(False)
    img = torch.randn(1, img_tokens, dim, dtype=dtype, requires_grad=True)
    txt = torch.randn(1, txt_tokens, dim, dtype=dtype, requires_grad=True)
    temb = torch.randn(1, dim, dtype=dtype)
    # RoPE as complex frequencies per token (head_dim/2 pairs), as QwenEmbedRope returns them.
    angles = torch.rand(img_tokens + txt_tokens, head_dim // 2) * 6.28
    freqs = torch.polar(torch.ones_like(angles), angles)
    rope = (freqs[:img_tokens], freqs[img_tokens:])
    return block, img, txt, temb, rope, dim


def measure_block(heads: int = 2, img_tokens: int = 256, txt_tokens: int = 32, blocks: int = 2,
                  checkpoint: bool = False, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Run `blocks` copies of one block in sequence (forward + backward) and return bytes, raw and normalised."""
    from torch.utils.checkpoint import checkpoint as ckpt

    block, img, txt, temb, rope, dim = _block_and_inputs(heads, img_tokens, txt_tokens, dtype)
    grad_img, grad_txt = torch.randn_like(img), torch.randn_like(txt)
    elem = torch.empty((), dtype=dtype).element_size()
    tokens = img_tokens + txt_tokens
    with LiveTensorBytes() as mem:
        base = mem.current
        h, e = img, txt
        for _ in range(blocks):
            if checkpoint:
                e, h = ckpt(block, h, e, None, temb, rope, use_reentrant=False)
            else:
                e, h = block(h, e, None, temb, rope)
        after_forward = mem.current - base
        mem.reset_peak()
        torch.autograd.backward((h, e), (grad_img, grad_txt))
        backward_peak = mem.peak - base
    unit = tokens * dim * elem  # one model-width tensor over all tokens
    per_block_saved = after_forward / blocks
    return {
        "dim": dim, "heads": heads, "img_tokens": img_tokens, "txt_tokens": txt_tokens, "blocks": blocks,
        "checkpoint": checkpoint, "dtype": str(dtype).replace("torch.", ""), "elem_bytes": elem,
        "after_forward_bytes": after_forward, "backward_peak_bytes": backward_peak,
        # in units of "one width-d tensor per token": the estimator's constants
        "saved_per_block_units": per_block_saved / unit,
        "backward_extra_units": (backward_peak - after_forward) / unit,
    }


def measure_block_inference(heads: int = 2, img_tokens: int = 256, txt_tokens: int = 32,
                            dtype: torch.dtype = torch.bfloat16) -> dict:
    """Peak live bytes of one block's forward under no_grad (denoising), above its inputs."""
    block, img, txt, temb, rope, dim = _block_and_inputs(heads, img_tokens, txt_tokens, dtype)
    img, txt = img.detach(), txt.detach()
    elem = torch.empty((), dtype=dtype).element_size()
    with torch.no_grad(), LiveTensorBytes() as mem:
        base = mem.current
        e, h = block(img, txt, None, temb, rope)
        peak = mem.peak - base
    return {"dim": dim, "img_tokens": img_tokens, "txt_tokens": txt_tokens, "peak_bytes": peak,
            "forward_peak_units": peak / ((img_tokens + txt_tokens) * dim * elem)}


def measure_vae(base_dim: int = 16, size: int = 64, decode: bool = True,
                dtype: torch.dtype = torch.bfloat16) -> dict:
    """Peak live bytes of a VAE encode or decode of one size×size image, per pixel per base channel."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=base_dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                 temperal_downsample=[False, True, True]).to(dtype).eval()
    elem = torch.empty((), dtype=dtype).element_size()
    x = (torch.randn(1, 16, 1, size // 8, size // 8) if decode else torch.randn(1, 3, 1, size, size)).to(dtype)
    with torch.no_grad(), LiveTensorBytes() as mem:
        base = mem.current
        out = vae.decode(x).sample if decode else vae.encode(x).latent_dist.mode()
        peak = mem.peak - base
    del out
    return {"base_dim": base_dim, "size": size, "decode": decode, "peak_bytes": peak,
            "units_per_pixel": peak / (size * size * base_dim * elem)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, nargs="+", default=[2, 8])
    p.add_argument("--img_tokens", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--txt_tokens", type=int, default=64)
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--vae_sizes", type=int, nargs="*", default=[64, 128])
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    for heads in args.heads:
        for n in args.img_tokens:
            for gc in (False, True):
                r = measure_block(heads, n, args.txt_tokens, args.blocks, checkpoint=gc)
                _print(r)
        for n in args.img_tokens:
            _print(measure_block_inference(heads, n, args.txt_tokens))
    for size in args.vae_sizes:
        for decode in (False, True):
            _print(measure_vae(16, size, decode))


def _print(r: dict) -> None:
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)


if __name__ == "__main__":
    main()
