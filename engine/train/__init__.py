"""Training (`python -m engine train_network` for a LoRA, `python -m engine train` for a full finetune).

- run.py            the two commands (same loop, different trainee)
- loop.py           accelerate setup, the epoch/step loop, gradient averaging across processes, events, triggers
- validate.py       every refusal before a model loads (files, option combinations, caches, resume folder)
- trainee.py        what trains: LoRA on a frozen DiT or the whole DiT, with fp8 / block swap / checkpointing
- step.py           one step's math: noisy target + clean controls, RoPE shapes, velocity target, masked loss
- checkpoints.py    file names, atomic model files (streaming for --mem_eff_save), resumable states, pruning
- samples.py        sample images during training through engine.infer
- report.py         run config next to the outputs, estimate / vram events
- items.py          cached items kept in RAM after their first load
- lora.py, lora_metadata.py   the LoRA network and its ss_* / modelspec metadata
- timesteps.py      timestep sampling, noisy inputs, loss weighting
- optim.py          optimizers, LR schedulers, fused Adafactor backward with stochastic rounding
"""
