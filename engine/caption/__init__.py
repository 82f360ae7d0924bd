"""caption_images: captions and edit instructions written by the Qwen2.5-VL text encoder (torch)."""
