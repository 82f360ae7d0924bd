"""Device and dtype choices shared by every stage."""

from __future__ import annotations

import logging

import torch

from engine.spec.errors import OptionError

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda was given but no CUDA GPU is visible to PyTorch.",
                          "Use --device cpu (slow), or install a CUDA build of torch and check nvidia-smi.")
    return torch.device(name)


def compute_dtype(device: torch.device, file_dtype: torch.dtype | None = None) -> torch.dtype:
    """The file's bf16 on CUDA; float32 on CPU (bf16 matmuls on CPU are slow and lossy)."""
    if device.type == "cpu":
        return torch.float32
    return file_dtype if file_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
