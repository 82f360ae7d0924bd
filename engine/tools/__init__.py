"""The LoRA tools stage: inspect_lora, convert_lora, merge_lora, extract_lora, resize_lora (docs/lora-tools.md).

Like data/, train/ and infer/ it sits over models/ and spec/: the DiT is read with the loaders' reader and checks,
LoRA files with engine/models/lora_formats.py and engine/spec/lora_keys.py, and every file is written atomically.
"""
