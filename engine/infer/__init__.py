"""Inference (`python -m engine generate_image`).

- generate.py   the command: validate → VAE-encode controls → encode prompts (TE freed) → DiT once → denoise → save
- validate.py   every refusal before any model loads (sizes, files, mask/RCM rules, DiT edit evidence, LoRA counts)
- jobs.py       one Job per run or per --from_file line (musubi's prompt-line options)
- controls.py   control-image sizes (official / output size / own bucket); shared with text-encoder caching
- sampling.py   diffusers' scheduler with Qwen-Image's config, true CFG with norm rescale, the denoising loop
- masks.py      inpaint mask and Reference Consistency Mask (blend hooks for the loop), torchvision-free blur
- dit_setup.py  DiT loading with LoRA merge, fp8, block swap and the attention backend
- outputs.py    PNG (+ `parameters` JSON text chunk) and latent files with musubi's names
Prompt embeddings come from `engine.models.textenc.encode_prompts`.
"""
