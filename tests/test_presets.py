"""VRAM presets (presets/*.toml, engine/spec/presets.py): valid, under budget by the estimator, one config."""

from __future__ import annotations

import dataclasses

import pytest

from engine.spec import config as C
from engine.spec.errors import OptionError
from engine.spec.presets import (KIND_CONFIG, PRESET_DIR, apply_preset, estimate_preset, list_presets, load_preset,
                            preset_argv, ram_header_value)

PRESETS = list_presets()
IDS = [p.path.stem for p in PRESETS]


def test_the_preset_set_covers_every_budget():
    budgets = {kind: sorted(p.vram_budget_gib for p in PRESETS if p.kind == kind) for kind in KIND_CONFIG}
    assert budgets["train_network"] == [12, 16, 24, 24, 32, 32, 48, 80]     # + nf4 (24) and int8 (32) bases
    assert budgets["train"] == [12, 16, 24, 32, 48, 80]
    assert {8, 12, 16, 24} <= set(budgets["generate_image"])


@pytest.mark.parametrize("preset", PRESETS, ids=IDS)
def test_preset_fits_its_budget_and_states_the_estimated_ram(preset):
    e = estimate_preset(preset)
    assert e["vram_gib"] <= preset.vram_budget_gib, (preset.name, e["vram_gib"], e["peak_phase"])
    for name, row in e["commands"].items():              # the caching jobs the run needs fit the card too
        assert row["vram_gib"] <= preset.vram_budget_gib, (preset.name, name, row["vram_gib"])
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
              "full_bf16", "fused_backward_pass", "fp8_vl", "text_encoder_cpu", "vae_enable_tiling", "optimizer_type",
              "base_model_precision"}
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


# ------------------------------------------------------------------ the GUI component (app/presets_ui.py)

def test_cards_show_budget_flags_and_estimate():
    from app import presets_ui

    card = presets_ui.preset_card(load_preset(PRESET_DIR / "lora-24gb.toml"))
    assert card["budget_gib"] == 24 and "--blocks_to_swap" in card["flags"] and card["vram_gib"] <= 24
    text = presets_ui.card_markdown(card)
    assert "LoRA · 24 GB" in text and "--fp8_scaled" in text and f"{card['vram_gib']:.1f} GiB VRAM" in text


def test_live_estimate_follows_the_form_and_warns_when_it_does_not_fit():
    from app import presets_ui

    cfg = C.TrainNetworkConfig(mixed_precision="bf16", gradient_checkpointing=True)
    big = presets_ui.estimate_for("train_network", cfg, (1024, 1024))
    small = presets_ui.estimate_for("train_network", cfg, (512, 512))
    assert small["vram_gib"] < big["vram_gib"]
    assert "Will not fit" in presets_ui.fit_message(big, gpu_gib=24.0, ram_gib=64.0)
    assert "Fits this GPU" in presets_ui.fit_message(big, gpu_gib=80.0, ram_gib=64.0)
    swapped = apply_preset(load_preset(PRESET_DIR / "lora-12gb.toml"), cfg)
    message = presets_ui.fit_message(presets_ui.estimate_for("train_network", swapped, (1024, 1024)), 12.0, 8.0)
    assert "Fits this GPU" in message and "more RAM" in message
    assert "No NVIDIA GPU" in presets_ui.fit_message(big, None, None)


def test_component_applies_a_preset_to_the_form_by_name():
    import gradio as gr

    from app import presets_ui
    from app.forms import build_form

    with gr.Blocks():
        form = build_form(C.TrainNetworkConfig, include=["mixed_precision", "gradient_checkpointing", "fp8_base",
                                                         "fp8_scaled", "blocks_to_swap", "network_dim", "fp8_vl"])
        presets_ui.build("train_network", form, elem_prefix="t", gpu_gib=16.0, ram_gib=32.0)
    preset = load_preset(PRESET_DIR / "lora-16gb.toml")
    applied, missing = presets_ui.apply_to_form(preset, C.TrainNetworkConfig(network_dim=8), form.names)
    assert (applied.blocks_to_swap, applied.fp8_scaled, applied.network_dim, missing) == (36, True, 8, [])
    cards = [presets_ui.preset_card(p) for p in list_presets("train_network")]
    index = [c["file"] for c in cards].index("lora-16gb.toml")
    values = presets_ui._applier(preset, form, index, cards, 16.0)(*form.values(C.TrainNetworkConfig(network_dim=8)))
    n = len(form.names)
    assert values[:n] == form.values(applied) and values[n] == f"Applied **{preset.name}**."
    looks = values[n + 1:n + 1 + len(cards)]
    assert "qis-applied" in looks[index]["elem_classes"] and "applied" in looks[index]["value"]   # outlined
    assert all("qis-applied" not in look["elem_classes"] for i, look in enumerate(looks) if i != index)
    assert "qis-fits" in looks[index]["elem_classes"] and "✓ fits" in looks[index]["value"]     # 16 GiB GPU
    # a DiT with 2 blocks (the demo's): the preset's blocks_to_swap is clamped to 1, and the note says so
    small = presets_ui._applier(preset, form, index, cards, 16.0, blocks=lambda cfg: 2)(*form.values(
        C.TrainNetworkConfig()))
    assert small[form.names.index("blocks_to_swap")] == 1 and "blocks_to_swap 36 → 1" in small[n]
    text = presets_ui.live_estimate("train_network", form, form.values(applied), (1024, 1024), 16.0, 32.0)
    assert "Estimated peak" in text and "Fits this GPU (16 GiB)" in text
    # a form without --fp8_vl cannot take the whole preset: it says which option is missing, and the estimate
    # (bf16 text encoder for caching) says it will not fit
    names = [n for n in form.names if n != "fp8_vl"]
    applied, missing = presets_ui.apply_to_form(preset, C.TrainNetworkConfig(), names)
    assert missing == ["fp8_vl"]
    text = presets_ui.fit_message(presets_ui.estimate_for("train_network", dataclasses.replace(applied, fp8_vl=False),
                                                          (1024, 1024)), 16.0, 32.0)
    assert "Will not fit" in text and "`cache_text_encoder_outputs` needs" in text and "fp8_vl" in text


def test_presets_ui_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, app.presets_ui; assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=PRESET_DIR.parent)
    assert proc.returncode == 0, proc.stderr
