"""VRAM presets (presets/*.toml, engine/presets.py): valid, under budget by the estimator, one config."""

from __future__ import annotations

import dataclasses

import pytest

from engine import config as C
from engine.errors import OptionError
from engine.presets import (KIND_CONFIG, PRESET_DIR, apply_preset, estimate_preset, list_presets, load_preset,
                            preset_argv, ram_header_value)

PRESETS = list_presets()
IDS = [p.path.stem for p in PRESETS]


def test_the_preset_set_covers_every_budget():
    budgets = {kind: sorted(p.vram_budget_gib for p in PRESETS if p.kind == kind) for kind in KIND_CONFIG}
    assert budgets["train_network"] == [12, 16, 24, 32, 48, 80]
    assert budgets["train"] == [12, 16, 24, 32, 48, 80]
    assert {8, 12, 16, 24} <= set(budgets["generate_image"])


@pytest.mark.parametrize("preset", PRESETS, ids=IDS)
def test_preset_fits_its_budget_and_states_the_estimated_ram(preset):
    e = estimate_preset(preset)
    assert e["vram_gib"] <= preset.vram_budget_gib, (preset.name, e["vram_gib"], e["peak_phase"])
    assert preset.ram_gib == ram_header_value(e), (
        f"{preset.path.name}: ram_gib says {preset.ram_gib}, the estimator says {e['ram_gib']}; update the header")
    assert (e["inputs"]["width"], e["inputs"]["height"]) == preset.resolution


@pytest.mark.parametrize("preset", PRESETS, ids=IDS)
def test_preset_holds_only_fields_it_changes(preset):
    defaults = preset.config_class()
    for name, value in preset.fields.items():
        assert getattr(defaults, name) != value, f"{preset.path.name}: {name} = {value!r} is the default"


@pytest.mark.parametrize("preset", PRESETS, ids=IDS)
def test_preset_config_cli_and_toml_are_one_config(preset, tmp_path):
    cfg = apply_preset(preset)
    for name, value in preset.fields.items():
        assert getattr(cfg, name) == value
    cls = preset.config_class
    prog = f"python -m engine {preset.kind}"
    assert C.parse_args(cls, preset_argv(preset), prog=prog) == cfg
    C.save_toml(cfg, tmp_path / "run.toml")
    assert C.load_toml(cls, tmp_path / "run.toml") == cfg


def test_apply_keeps_the_users_other_fields():
    preset = load_preset(PRESET_DIR / "lora-16gb.toml")
    user = C.TrainNetworkConfig(network_dim=32, learning_rate=1e-4, blocks_to_swap=2)
    cfg = apply_preset(preset, user)
    assert (cfg.network_dim, cfg.learning_rate, cfg.blocks_to_swap) == (32, 1e-4, preset.fields["blocks_to_swap"])
    with pytest.raises(OptionError, match="not options of GenerateImageConfig"):
        apply_preset(preset, C.GenerateImageConfig())


def test_dropping_any_memory_saver_of_a_preset_never_lowers_the_estimate():
    # A preset's memory savers must all be seen by the estimator: dropping any one never lowers the estimate.
    # (fp8_scaled is a quality option: its scales cost a little memory; mixed_precision is a prerequisite.)
    savers = {"fp8_base", "fp8", "blocks_to_swap", "gradient_checkpointing", "gradient_checkpointing_cpu_offload",
              "full_bf16", "fused_backward_pass", "fp8_vl", "text_encoder_cpu", "vae_enable_tiling", "optimizer_type"}
    for preset in PRESETS:
        full = estimate_preset(preset)["vram_gib"]
        for name in savers & set(preset.fields):
            reduced = dataclasses.replace(preset, fields={k: v for k, v in preset.fields.items() if k != name})
            if name == "fp8_base":  # fp8_scaled alone is refused for LoRA training
                reduced = dataclasses.replace(reduced, fields={k: v for k, v in reduced.fields.items()
                                                               if k != "fp8_scaled"})
            assert estimate_preset(reduced)["vram_gib"] >= full - 1e-9, (preset.name, name)


def _write(tmp_path, text):
    path = tmp_path / "p.toml"
    path.write_text(text, encoding="utf-8")
    return path


HEADER = ('[preset]\nname = "x"\nkind = "{kind}"\nvram_budget_gib = 12\nresolution = [1024, 1024]\n'
          'ram_gib = 4\ndescription = "d"\n')


@pytest.mark.parametrize("body, kind, message", [
    ("fp8_bse = true\n", "train_network", "Did you mean 'fp8_base'"),
    ("fused_backward_pass = true\n", "train_network", "unknown option 'fused_backward_pass'"),
    ("blocks_to_swap = \"many\"\n", "generate_image", "must be a int"),
    ("optimizer_type = \"AdamW\"\n", "cache_latents", "kind 'cache_latents'"),
    ("mixed_precision = \"fp8\"\n", "train", "not one of no, fp16, bf16"),
])
def test_invalid_presets_are_refused_naming_the_field(tmp_path, body, kind, message):
    with pytest.raises(OptionError, match=message) as err:
        load_preset(_write(tmp_path, body + HEADER.format(kind=kind)))
    assert err.value.hint


def test_header_problems_are_refused(tmp_path):
    with pytest.raises(OptionError, match="no \\[preset\\] table"):
        load_preset(_write(tmp_path, "fp8 = true\n"))
    with pytest.raises(OptionError, match="lacks 'ram_gib'"):
        load_preset(_write(tmp_path, HEADER.format(kind="train").replace("ram_gib = 4\n", "")))
    with pytest.raises(OptionError, match="resolution"):
        load_preset(_write(tmp_path, HEADER.format(kind="train").replace("[1024, 1024]", "[1000, 1024]")))
    with pytest.raises(OptionError, match="unknown \\[preset\\] key"):
        load_preset(_write(tmp_path, HEADER.format(kind="train") + "fp8 = true\n"))
