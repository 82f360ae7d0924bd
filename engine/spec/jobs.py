"""One generation = one `Job`: the command-line options, or one line of a --from_file prompt file.

A Job holds the per-image options under the config's own field names (JOB_FIELDS of GenerateImageConfig), so a
job, the PNG parameters written for it and the form that loads them back all speak one vocabulary.

Prompt-line syntax (musubi's `parse_prompt_line`): the prompt, then options split on " --":
--w WIDTH --h HEIGHT --d SEED --s STEPS --g/--l GUIDANCE --fs FLOW_SHIFT --n NEGATIVE --ci CONTROL (repeatable)
--m MASK --rcm_th T --rcm_rel_th 1|true|yes --rcm_ks K --rcm_ds R. Options a line leaves out come from the
command line. Lines that are empty or start with '#' are skipped.

Two grammars, as musubi has two parsers. GENERATE (generate_image --from_file): `--g` and `--l` both set the CFG
scale. SAMPLE (training's --sample_prompts, musubi's sampling-prompt grammar, shared with its video models):
`--l` is the CFG scale, `--g` is an embedded guidance scale that Qwen-Image does not have, and `--f` is a frame
count; both are read and ignored, so `--g 1.0` does not turn CFG off and `--f 1` does not refuse the file.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from engine.spec.errors import OptionError

log = logging.getLogger(__name__)


@dataclass
class Job:
    """The options a prompt line may change, named as GenerateImageConfig names them (the rest of the run's
    config is shared by every job)."""
    prompt: str
    negative_prompt: str | None
    image_size: list[int]                 # [height, width], as --image_size
    seed: int
    infer_steps: int
    guidance_scale: float
    flow_shift: float | None
    control_image_path: list[str] = field(default_factory=list)
    mask_path: str | None = None
    rcm_threshold: float | None = None
    rcm_relative_threshold: bool = False
    rcm_kernel_size: int = 3
    rcm_dilate_size: int = 0
    line: int | None = None      # 1-based line number in --from_file, for error messages

    @property
    def height(self) -> int:
        return self.image_size[0]

    @property
    def width(self) -> int:
        return self.image_size[1]

    def where(self) -> str:
        return f"--from_file line {self.line}" if self.line else "command line"

    def parameters(self) -> dict:
        """The options of this job under the config's field names (PNG metadata the GUI loads back)."""
        return {name: _copy(getattr(self, name)) for name in JOB_FIELDS}


def _copy(value):
    return list(value) if isinstance(value, list) else value


JOB_FIELDS = tuple(f.name for f in fields(Job) if f.name != "line")


def random_seed() -> int:
    return random.randint(0, 2**32 - 1)


def job_from_config(cfg) -> Job:
    values = {name: _copy(getattr(cfg, name)) for name in JOB_FIELDS}
    values["prompt"] = cfg.prompt or ""
    values["seed"] = cfg.seed if cfg.seed is not None else random_seed()
    return Job(**values)


GENERATE, SAMPLE = "generate", "sample"


def jobs_from_config(cfg, grammar: str = GENERATE) -> list[Job]:
    """The jobs of a run: one from the options, or one per prompt line of --from_file (read in `grammar`)."""
    if not cfg.from_file:
        return [job_from_config(cfg)]
    path = Path(cfg.from_file)
    if not path.is_file():
        raise OptionError(f"{_FILE_OPTION[grammar]} {path}: no such file", "give a text file with one prompt per line")
    base = job_from_config(cfg)
    jobs = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = text.strip()
        if not text or text.startswith("#"):
            continue
        jobs.append(parse_prompt_line(text, base, number, seeded=cfg.seed is not None, grammar=grammar))
    if not jobs:
        raise OptionError(f"{_FILE_OPTION[grammar]} {path}: no prompt lines", "write one prompt per line ('#' starts a comment)")
    return jobs


# prompt-line option → the field it sets
_FLOAT = {"g": "guidance_scale", "l": "guidance_scale", "fs": "flow_shift", "rcm_th": "rcm_threshold"}
_INT = {"w": "width", "h": "height", "d": "seed", "s": "infer_steps", "rcm_ks": "rcm_kernel_size",
        "rcm_ds": "rcm_dilate_size"}
_STR = {"n": "negative_prompt", "m": "mask_path"}
# musubi's sampling grammar: options of other architectures that a Qwen sample line may carry, read and ignored
_SAMPLE_IGNORED = {"g": "embedded guidance (Qwen-Image has no guidance embedding; --l is the CFG scale)",
                   "f": "frame count (images have one frame)"}

_FILE_OPTION = {GENERATE: "--from_file", SAMPLE: "--sample_prompts"}
_KNOWN = {GENERATE: "use --w --h --d --s --g/--l --fs --n --ci --m --rcm_th --rcm_rel_th --rcm_ks --rcm_ds",
          SAMPLE: "use --w --h --d --s --l (CFG scale) --fs --n --ci (--g and --f are accepted and ignored)"}


def parse_prompt_line(text: str, base: Job, number: int = 0, seeded: bool = True, grammar: str = GENERATE) -> Job:
    """A job from one prompt line; unset options come from `base`. Without --d and without a command-line seed
    each line gets its own random seed. `grammar` SAMPLE reads musubi's sample-prompt options (module doc)."""
    text = " " + text if text.startswith("--") else text   # a line may hold options only (no prompt)
    parts = text.split(" --")
    values: dict = {"prompt": parts[0].strip(), "line": number or None}
    controls: list[str] = []
    if not seeded:
        values["seed"] = random_seed()
    for part in parts[1:]:
        key, _, arg = part.strip().partition(" ")
        arg = arg.strip()
        try:
            if grammar == SAMPLE and key in _SAMPLE_IGNORED:
                float(arg)                                  # still a number, as musubi parses it
                log.info("sample prompt line %d: --%s %s ignored: %s", number, key, arg, _SAMPLE_IGNORED[key])
            elif key in _FLOAT:
                values[_FLOAT[key]] = float(arg)
            elif key in _INT:
                values[_INT[key]] = int(arg)
            elif key in _STR:
                values[_STR[key]] = arg
            elif key == "ci":
                controls.append(arg)
            elif key == "rcm_rel_th":
                values["rcm_relative_threshold"] = arg.lower() in ("1", "true", "yes")
            else:
                raise OptionError(f"{_FILE_OPTION[grammar]} line {number}: unknown option --{key}",
                                  _KNOWN[grammar])
        except ValueError:
            raise OptionError(f"{_FILE_OPTION[grammar]} line {number}: --{key} needs a number, got {arg!r}",
                              f"write e.g. --{key} 4") from None
    if controls:
        values["control_image_path"] = controls
    if "width" in values or "height" in values:
        values["image_size"] = [values.pop("height", base.height), values.pop("width", base.width)]
    return replace(base, **values)
