"""Model loading: safetensors I/O without mmap, shared loader steps, the DiT loader, file identification.

- `safetensors_io`: headers, shards, one-tensor-at-a-time reads, atomic writes.
- `common`: config from metadata, fp8 refusal, meta-device build + shape check, strict assign-loading.
- `dit`: `load_dit(...)` → diffusers `QwenImageTransformer2DModel`.
- `inspect`: `python -m engine inspect_model FILE... [--json]`.
- `downloads`: which file to download from where.
"""
