"""Training samples (engine/train/samples.py): musubi's sample-prompt grammar (`--l` is the CFG scale, `--g` and
`--f` are read and ignored) and control images fed at the official sizes, as the text-encoder cache conditioned
the model in training (engine/spec/controls.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.spec import controls
from engine.spec.errors import OptionError
from engine.spec.jobs import GENERATE, SAMPLE, Job, parse_prompt_line
from engine.spec.variants import get_variant
from engine.train import samples
from tests._generate_util import shrink_official_area

BASE = Job(prompt="", negative_prompt=None, image_size=[256, 256], seed=42, infer_steps=20, guidance_scale=4.0,
           flow_shift=None)


def test_sample_grammar_g_does_not_turn_cfg_off():
    job = parse_prompt_line("a cat --g 1.0 --w 64", BASE, 1, grammar=SAMPLE)
    assert job.guidance_scale == 4.0 and job.width == 64           # --g ignored, CFG stays at its default
    job = parse_prompt_line("a cat --g 1.0 --l 3.5", BASE, 1, grammar=SAMPLE)
    assert job.guidance_scale == 3.5                               # --l is the CFG scale
    # generate_image's --from_file keeps musubi's inference grammar: --g is the CFG scale there
    assert parse_prompt_line("a cat --g 1.0", BASE, 1, grammar=GENERATE).guidance_scale == 1.0


def test_sample_grammar_accepts_frame_count():
    job = parse_prompt_line("a cat --f 1 --s 3", BASE, 2, grammar=SAMPLE)
    assert job.infer_steps == 3 and job.prompt == "a cat"
    with pytest.raises(OptionError, match="--from_file line 2: unknown option --f"):
        parse_prompt_line("a cat --f 1", BASE, 2, grammar=GENERATE)
    with pytest.raises(OptionError, match="--sample_prompts line 3: --f needs a number"):
        parse_prompt_line("a cat --f one", BASE, 3, grammar=SAMPLE)
    with pytest.raises(OptionError, match="--sample_prompts line 4: unknown option --zz"):
        parse_prompt_line("a cat --zz 1", BASE, 4, grammar=SAMPLE)


def _train_cfg(manifest: dict, prompts: Path, out: Path, version: str) -> SimpleNamespace:
    return SimpleNamespace(device="cpu", dit=manifest["dit"][version], vae=manifest["vae"],
                           text_encoder=manifest["text_encoder"], tokenizer=manifest["tokenizer"],
                           sample_prompts=str(prompts), seed=None, output_dir=str(out), fp8_vl=False)


def test_sample_file_with_musubi_options_is_read(demo_manifest, tmp_path):
    """A musubi sample file with --g 1.0 --f 1 passes the pre-load checks and keeps CFG on."""
    control = demo_manifest["examples"]["control"]
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"make it red --w 64 --h 64 --g 1.0 --f 1 --ci {control}\n", encoding="utf-8")
    jobs = samples.check_prompts(_train_cfg(demo_manifest, prompts, tmp_path, "edit"), get_variant("edit"))
    assert [j.guidance_scale for j in jobs] == [4.0]


@pytest.mark.parametrize("version", ["edit", "edit-2509"])
def test_sample_controls_at_official_sizes(demo_manifest, tmp_path, monkeypatch, version):
    """The VAE latents and vision-encoder image of a sample's control are the official sizes (shrunk for the tiny
    models), not the control's native size, for a sample whose output size differs from the control."""
    shrink_official_area(monkeypatch, side=96, vl_side=32)
    control = demo_manifest["examples"]["control"]
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"make it red --w 48 --h 80 --s 2 --ci {control}\n", encoding="utf-8")
    variant = get_variant(version)
    prepared = samples.SamplePrompts.prepare(_train_cfg(demo_manifest, prompts, tmp_path, version), variant,
                                             torch.device("cpu"), torch.float32, "demo")
    p = prepared.prepared[0]
    with controls.Image.open(control) as im:
        native = im.size
    want = controls.control_sizes(variant, native, (48, 80), official=True)
    assert want.vae != native                                      # the test would not tell the two apart otherwise
    assert p.control_shapes == ((1, want.vae[1] // 16, want.vae[0] // 16),)
    assert p.vl_images[0].size == want.vl
    assert (want.vl == want.vae) == (version == "edit")            # 2509: the 384²-area (here 32²) VL image
