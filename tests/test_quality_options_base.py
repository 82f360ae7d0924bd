"""The options of engine/models/bnb_quant.py (--base_model_precision) and LyCORIS (--network_module lycoris.kohya)
work the same from the command line, a run TOML and the Train tab's form (app/forms.py builds it from the
registry, app/train_runs.py picks the fields of each kind)."""

from __future__ import annotations

import pytest

from app import train_runs as R
from app.forms import gui_fields, values_to_config
from engine.spec import config as C

CASES = [("base_model_precision", "nf4-bnb", ["--base_model_precision", "nf4-bnb"]),
         ("base_model_precision", "int8-bnb", ["--base_model_precision", "int8-bnb"]),
         ("network_module", "lycoris.kohya", ["--network_module", "lycoris.kohya"])]


@pytest.mark.parametrize("name, value, argv", CASES)
def test_cli_toml_and_form_are_one_config(name, value, argv, tmp_path):
    assert name in R.form_names() and name in R.kind_names("train_network", R.form_names())
    field = next(f for f in gui_fields(C.TrainNetworkConfig) if f.name == name)
    assert value in field.metadata["choices"]                          # the form's dropdown offers it
    from_form = values_to_config(C.TrainNetworkConfig, {name: value})
    from_cli = C.parse_args(C.TrainNetworkConfig, argv, prog="python -m engine train_network")
    assert getattr(from_form, name) == getattr(from_cli, name) == value
    assert C.to_argv(from_form)[-2:] == argv or all(a in C.to_argv(from_form) for a in argv)
    C.save_toml(from_form, tmp_path / "run.toml")
    assert getattr(C.load_toml(C.TrainNetworkConfig, tmp_path / "run.toml"), name) == value


def test_lora_only_options_are_not_finetune_options():
    assert "base_model_precision" not in R.kind_names("train", R.form_names())
