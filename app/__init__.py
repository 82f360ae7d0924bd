"""Qwen-Image Studio's Gradio front end. Importing it must stay cheap: no torch, diffusers or transformers."""
