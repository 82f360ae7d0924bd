"""`python -m engine convert_lora --input F --output G --format kohya|musubi|diffusers|comfyui`.

The factors are copied bit for bit and each module's alpha moves between an `.alpha` tensor (kohya, musubi,
comfyui) and diffusers' PEFT config (`lora_alpha` + `alpha_pattern` in `lora_adapter_metadata`), so converting
there and back gives the same tensors; the training metadata (ss_*, modelspec) is kept. Layouts:
engine/spec/lora_keys.py. LoHa/LoKr/DoRA files are refused (they have no lora_A/lora_B form).
"""

from __future__ import annotations

import logging

from engine.spec.errors import OptionError
from engine.tools.lora_io import check_output, read_plain, write_lora

log = logging.getLogger(__name__)


def run(cfg, events) -> list[str]:
    if not cfg.input:
        raise OptionError("--input is required: the LoRA file to convert.", "Add --input FILE.safetensors.")
    out = check_output(cfg.output, [cfg.input], "--output")
    events.phase("loading")
    plain = read_plain(cfg.input, "--input")
    events.phase("saving")
    write_lora(plain, out, cfg.format)
    events.progress(1, 1, unit="file")
    log.info("converted %s (%s, %d modules) to %s: %s", cfg.input, plain.format, len(plain.modules), cfg.format, out)
    return [str(out)]
