"""The typed config: one object behind the CLI, the run TOML and the GUI form (round trips)."""

import shlex

import pytest

from engine.spec import config as C

SEED_TRAIN = """--dit path/to/dit_model --vae path/to/vae_model --text_encoder path/to/text_encoder
    --dataset_config path/to/toml --sdpa --mixed_precision bf16 --timestep_sampling shift
    --weighting_scheme none --discrete_flow_shift 2.2 --optimizer_type adamw8bit --learning_rate 5e-5
    --gradient_checkpointing --max_data_loader_n_workers 2 --persistent_data_loader_workers
    --network_module networks.lora_qwen_image --network_dim 16 --max_train_epochs 16 --save_every_n_epochs 1
    --seed 42 --output_dir path/to/output_dir --output_name name-of-lora"""

SEED_FINETUNE = """--dit d --vae v --text_encoder t --dataset_config c --sdpa --mixed_precision bf16
    --gradient_checkpointing --optimizer_type adafactor --learning_rate 1e-6 --fused_backward_pass
    --optimizer_args relative_step=False scale_parameter=False warmup_init=False --max_grad_norm 0
    --lr_scheduler constant_with_warmup --lr_warmup_steps 10 --max_train_epochs 16 --save_every_n_epochs 1
    --seed 42 --output_dir o --output_name n --full_bf16"""

SEED_GENERATE = """--dit d --vae v --text_encoder t --prompt "A cat" --negative_prompt " " --image_size 1024 1024
    --infer_steps 25 --guidance_scale 4.0 --attn_mode sdpa --save_path out --output_type images --seed 1234
    --lora_multiplier 1.0 --lora_weight path/to/lora.safetensors --edit --control_image_path a.png b.png
    --rcm_threshold 0.2 --rcm_relative_threshold --rcm_kernel_size 3 --rcm_dilate_size 1"""


@pytest.mark.parametrize("cls,line", [(C.TrainNetworkConfig, SEED_TRAIN), (C.TrainConfig, SEED_FINETUNE),
                                      (C.GenerateImageConfig, SEED_GENERATE)])
def test_seed_command_lines_parse_and_round_trip(cls, line, tmp_path):
    cfg = C.parse_args(cls, shlex.split(line), "engine")
    # CLI → config → argv → config
    assert C.parse_args(cls, C.to_argv(cfg), "engine") == cfg
    # config → TOML → config
    C.save_toml(cfg, tmp_path / "run.toml")
    assert C.load_toml(cls, tmp_path / "run.toml") == cfg
    # TOML as --config_file, with a command-line override winning
    over = C.parse_args(cls, ["--config_file", str(tmp_path / "run.toml"), "--seed", "7"], "engine")
    assert over.seed == 7 and over.dit == cfg.dit


def test_values_are_typed():
    cfg = C.parse_args(C.GenerateImageConfig, shlex.split(SEED_GENERATE), "engine")
    assert cfg.image_size == [1024, 1024] and cfg.lora_multiplier == [1.0]
    assert cfg.control_image_path == ["a.png", "b.png"] and cfg.rcm_threshold == 0.2
    assert cfg.resolved_version() == "edit" and cfg.is_edit


def test_model_version_precedence():
    parse = lambda s: C.parse_args(C.GenerateImageConfig, s.split(), "engine")  # noqa: E731
    assert parse("").resolved_version() == "original"
    assert parse("--edit").resolved_version() == "edit"
    assert parse("--edit --edit_plus").resolved_version() == "edit-2509"
    assert parse("--edit_plus --model_version edit-2511").resolved_version() == "edit-2511"


def test_unknown_toml_key_names_it_with_a_suggestion(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[optimizer]\nlearning_rat = 1e-4\n')
    with pytest.raises(C.ConfigError, match=r"unknown option 'learning_rat'.*Did you mean 'learning_rate'"):
        C.load_toml(C.TrainNetworkConfig, path)


def test_mistyped_toml_value_names_the_key(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('network_dim = "sixteen"\n')
    with pytest.raises(C.ConfigError, match="network_dim.*must be a int"):
        C.load_toml(C.TrainNetworkConfig, path)


def test_broken_toml_names_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('network_dim = \n')
    with pytest.raises(C.ConfigError, match="run.toml: not valid TOML"):
        C.load_toml(C.TrainNetworkConfig, path)


def test_every_field_has_help_and_a_group():
    for cls in (C.TrainNetworkConfig, C.TrainConfig, C.GenerateImageConfig, C.CacheLatentsConfig,
                C.CacheTextEncoderConfig):
        for f in C.option_fields(cls):
            assert f.metadata["help"], f.name
            assert f.metadata["group"], f.name


def test_atomic_write_leaves_no_temp_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "a.toml"
    target.write_text("old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(C.os, "replace", boom)
    with pytest.raises(OSError):
        C.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.toml"]


def test_declared_ranges_are_checked_by_one_validate():
    """A field declares its range (opt(min=, max=, multiple_of=)); validate() checks it with a message that names the
    option and a fix, and --help states it."""
    C.validate(C.GenerateImageConfig(image_size=[64, 48], preview_every=2, blocks_to_swap=3))
    for values, needle in [(dict(image_size=[40, 32]), "--image_size 40 32: 40 is not a multiple of 16"),
                           (dict(preview_every=0), "--preview_every 0: must be at least 1"),
                           (dict(blocks_to_swap=-1), "--blocks_to_swap -1: must be at least 0"),
                           (dict(rcm_threshold=-0.1), "--rcm_threshold -0.1: must be at least 0")]:
        with pytest.raises(C.ConfigError, match=needle) as err:
            C.validate(C.GenerateImageConfig(**values))
        assert err.value.hint and err.value.kind == "option"
    with pytest.raises(C.ConfigError, match="e.g. 48 32"):
        C.validate(C.GenerateImageConfig(image_size=[40, 32]))
    with pytest.raises(C.ConfigError, match="is not one of"):
        C.validate(C.TrainNetworkConfig(mixed_precision="fp64"))
    help_text = " ".join(C.build_parser(C.GenerateImageConfig, "engine").format_help().split())
    assert "(a multiple of 16 from 16)" in help_text and "(1 or more)" in help_text


def test_a_range_error_from_the_command_line_is_one_error_event(tmp_path):
    from engine.__main__ import main

    events = tmp_path / "e.jsonl"
    assert main(["estimate_vram", "--for", "generate_image", "--image_size", "40", "32",
                 "--events_file", str(events)]) == 2
    import json

    types = [json.loads(line) for line in events.read_text().splitlines()]
    assert [e["type"] for e in types] == ["start", "error"]
    assert "not a multiple of 16" in types[1]["message"] and types[1]["kind"] == "option" and types[1]["hint"]
