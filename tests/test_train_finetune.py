"""`train` (full finetune) saves a DiT our loader reads back (ComfyUI layout, config in metadata, Edit-2511 marker),
--mem_eff_save's streaming writer gives the same file contents as safetensors' writer, and both training commands
refuse bad inputs with one clear error before any model loads."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from _train_util import cached_dataset, train
from engine.models.dit import load_dit
from engine.train.checkpoints import save_dit_file, write_streaming


@pytest.fixture(scope="module")
def setup(demo_manifest, tmp_path_factory):
    root = tmp_path_factory.mktemp("train_ft")
    return dict(root=root, toml=cached_dataset(demo_manifest, root), dit=demo_manifest["dit"]["original"],
                manifest=demo_manifest)


def test_full_finetune_saves_a_dit_the_loader_reads(setup):
    out = setup["root"] / "ft"
    train("train", out, "--dit", setup["dit"], "--dataset_config", setup["toml"], "--output_dir", out,
          "--output_name", "ft", "--max_train_steps", 4, "--optimizer_type", "Adafactor", "--optimizer_args",
          "relative_step=False", "scale_parameter=False", "--learning_rate", "1e-3", "--fused_backward_pass",
          "--max_grad_norm", "0", "--mem_eff_save", "--save_every_n_steps", 2, "--save_precision", "fp32")
    path = out / "ft.safetensors"
    assert (out / "ft-step00000002.safetensors").is_file()
    trained = load_dit(path)
    base = load_dit(setup["dit"])
    file = load_file(path)
    assert all(k.startswith("model.diffusion_model.") for k in file)
    for name, tensor in trained.state_dict().items():
        assert torch.equal(tensor, file["model.diffusion_model." + name])
    moved = sum(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), base.state_dict().values()))
    assert moved > len(file) // 2
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "Qwen-Image" and meta["ss_steps"] == "4"


def test_streaming_writer_matches_safetensors(tmp_path):
    state = {"b.weight": torch.randn(3, 5), "a.bias": torch.randn(7), "c.idx": torch.arange(4),
             "d.empty": torch.zeros(0)}
    write_streaming(state, tmp_path / "ours.safetensors", {"k": "v"}, torch.bfloat16, prefix="p.")
    save_file({"p." + k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in state.items()},
              str(tmp_path / "ref.safetensors"), {"k": "v"})
    ours, ref = load_file(tmp_path / "ours.safetensors"), load_file(tmp_path / "ref.safetensors")
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) and ours[k].dtype == ref[k].dtype
                                             for k in ref)
    with safe_open(str(tmp_path / "ours.safetensors"), "pt") as f:
        assert f.metadata() == {"k": "v"}
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("mem_eff", [False, True])
def test_edit_2511_dit_keeps_its_marker(tmp_path, mem_eff):
    from engine.demo import build_dit
    from engine.spec.errors import ModelFileError

    dit = build_dit("edit-2511")
    path = save_dit_file(dit, tmp_path / "qwen_image_edit_2511_ft.safetensors", torch.bfloat16, {}, mem_eff, True)
    loaded = load_dit(path, model_version="edit-2511")
    assert loaded.config.zero_cond_t
    assert all(torch.equal(a.to(torch.bfloat16), b) for a, b in zip(dit.state_dict().values(),
                                                                     loaded.state_dict().values()))
    with pytest.raises(ModelFileError, match="2511"):
        load_dit(path, model_version="edit")


BAD = [
    (["--fp8_scaled"], "--fp8_scaled was given without --fp8_base"),
    (["--sage_attn"], "inference only"),
    (["--gradient_checkpointing_cpu_offload"], "needs --gradient_checkpointing"),
    (["--sample_every_n_steps", "5"], "need --sample_prompts"),
    (["--log_with", "tensorboard"], "needs --logging_dir"),
    (["--save_every_n_steps", "0"], "must be at least 1"),
    (["--output_name", "runs/x"], "plain file name"),
]
BAD_FT = [
    (["--fused_backward_pass"], "Adafactor only"),
    (["--blocks_to_swap", "2"], "needs --fused_backward_pass"),
    (["--fp8_base"], "cannot be finetuned"),
    (["--full_bf16"], "needs --mixed_precision bf16"),
    (["--optimizer_type", "Adafactor", "--fused_backward_pass", "--gradient_accumulation_steps", "2"],
     "cannot accumulate"),
    (["--optimizer_type", "Adafactor", "--fused_backward_pass", "--mixed_precision", "fp16"], "loss scaling"),
]


@pytest.mark.parametrize("command,extra,message", [("train_network", *b) for b in BAD] + [("train", *b) for b in BAD_FT])
def test_bad_options_are_refused_before_loading(setup, tmp_path, command, extra, message):
    events = train(command, tmp_path, "--dit", setup["dit"], "--dataset_config", setup["toml"], "--output_dir",
                   tmp_path / "out", *extra, expect_rc=2)
    error = next(e for e in events if e["type"] == "error")
    assert message in error["message"] and error["hint"]
    assert not any(e["type"] == "phase" for e in events) and not (tmp_path / "out").exists()


def test_missing_caches_name_the_dataset_and_the_commands(setup, tmp_path):
    toml = tmp_path / "fresh.toml"
    toml.write_text(setup["toml"].read_text().replace("cache_t2i", "cache_none"), encoding="utf-8")
    events = train("train_network", tmp_path, "--dit", setup["dit"], "--dataset_config", toml, "--output_dir",
                   tmp_path / "out", expect_rc=2)
    error = next(e for e in events if e["type"] == "error")
    assert error["kind"] == "cache" and str(toml) in error["message"] and "missing" in error["message"]
    assert "cache_latents" in error["hint"] and "cache_text_encoder_outputs" in error["hint"]
    assert not (tmp_path / "out").exists()


def test_flash_attention_with_padded_batches_needs_split_attn():
    from types import SimpleNamespace

    from engine.spec.errors import OptionError
    from engine.spec.options import TrainNetworkConfig
    from engine.train.validate import check_batches

    cfg = TrainNetworkConfig(flash_attn=True, dataset_config="data.toml")
    with pytest.raises(OptionError, match="--split_attn"):
        check_batches(cfg, SimpleNamespace(batch_sizes={0: 1, 1: 2}))
    check_batches(cfg, SimpleNamespace(batch_sizes={0: 1}))                     # nothing padded
    cfg.split_attn = True
    check_batches(cfg, SimpleNamespace(batch_sizes={0: 2}))
