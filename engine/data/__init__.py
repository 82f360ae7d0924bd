"""The dataset stage: the two caching commands (cache_latents, cache_text_encoder_outputs) and the training side
of the caches (cached.py). The dataset reader, plan, check report and cache status are engine/spec/dataset/."""
