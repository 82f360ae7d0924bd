"""Inference (`python -m engine generate_image`).

- generate.py   the command: check → VAE-encode controls → encode prompts (TE freed) → DiT once → denoise → save
- sampling.py   diffusers' scheduler with Qwen-Image's config, true CFG with norm rescale, the denoising loop
- masks.py      inpaint mask and Reference Consistency Mask (blend hooks for the loop), torchvision-free blur
- preview.py    live previews of the clean estimate during denoising
- outputs.py    PNG (+ `parameters` JSON text chunk) and latent files with musubi's names
The checks before any model loads, the prompt-line jobs and the control sizes are engine/spec's (checks.py, jobs.py,
controls.py); the DiT setup is engine/models/dit_setup.py; prompt embeddings come from engine/models/textenc.py.
"""
