"""What the engine's stages (data, train, infer) share, all torch: the model loaders and what runs under them.

- `safetensors_io`: tensors read one at a time without mmap, atomic writes (headers: engine/spec/safetensors_header.py).
- `common`: config from metadata, fp8 refusal, meta-device build + shape check, strict assign-loading.
- `dit`, `text_encoder`, `vae`, `tokenizer`: the loaders; `inspect`: `python -m engine inspect_model` (headers only).
- `dit_setup`: a DiT ready to run, in the one setup order (load with LoRA merge + fp8 → block swap →
  gradient checkpointing → attention kernel); `fp8`, `block_swap`, `checkpointing` are its parts.
- `lora_formats`: LoRA files of every common layout, merged at load time.
- `latents`: packing and the seed → noise recipe; `textenc`: prompt embeddings; `runtime`: device and dtype.
"""
