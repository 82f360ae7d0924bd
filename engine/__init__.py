"""Qwen-Image Studio engine: training and inference for the Qwen-Image family. Never imports gradio."""
