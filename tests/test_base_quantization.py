"""`--base_model_precision nf4-bnb / int8-bnb` (engine/models/bnb_quant.py): the frozen DiT's block Linears are
stored by bitsandbytes while the file is read; on the demo DiT the loss stays within tolerance of the plain model,
a LoRA trains on it, and its file is the same format as one trained on the plain DiT. The installed bitsandbytes
runs nf4 and int8 on the CPU, so these run here; a machine where its kernels fail is refused before loading."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from _train_util import cached_dataset, fixed_loss, losses, train
from engine.models import bnb_quant, dit_setup
from engine.spec.variants import get_variant

MODES = ("nf4-bnb", "int8-bnb")
TOLERANCE = {"nf4-bnb": 0.02, "int8-bnb": 0.005}     # relative, of the fixed-noise loss


@pytest.fixture(scope="module")
def t2i(demo_manifest, tmp_path_factory):
    return cached_dataset(demo_manifest, tmp_path_factory.mktemp("bnb_data"))


def _load(manifest, precision="no_change"):
    return dit_setup.load(manifest["dit"]["original"], get_variant("original"), torch.device("cpu"), torch.float32,
                          base_precision=precision)


@pytest.mark.parametrize("mode", MODES)
def test_quantized_dit_loss_within_tolerance(demo_manifest, t2i, mode):
    plain, quant = _load(demo_manifest), _load(demo_manifest, mode)
    layer = quant.transformer_blocks[0].attn.to_q
    assert type(layer).__name__ == ("Linear4bit" if mode == "nf4-bnb" else "Linear8bitLt")
    assert layer.weight.dtype == (torch.uint8 if mode == "nf4-bnb" else torch.int8)
    assert quant.img_in.weight.dtype == torch.float32                  # only block Linears are quantised
    x = torch.randn(3, layer.in_features)
    ref = plain.transformer_blocks[0].attn.to_q(x)
    with torch.no_grad():
        err = float((layer(x) - ref).norm() / ref.norm())
    assert 0 < err < (0.15 if mode == "nf4-bnb" else 0.02)            # quantised (not a copy), and close
    a, b = fixed_loss(plain, t2i), fixed_loss(quant, t2i)
    assert abs(a - b) / a < TOLERANCE[mode], (a, b)


def test_quantize_while_streaming_holds_no_full_copy(demo_manifest):
    """The load hook swaps each target tensor for a one-element placeholder as it is read: the state dict the
    loader builds never holds the plain block weights."""
    hook = bnb_quant.BnbHook("nf4-bnb", torch.float32)
    w = torch.randn(64, 32)
    placeholder = hook.transform("transformer_blocks.0.attn.to_q.weight", w)
    assert placeholder.shape == w.shape and placeholder.untyped_storage().nbytes() == 4
    assert hook.transform("img_in.weight", w) is w                        # not a target: unchanged
    assert hook.transform("transformer_blocks.0.attn.to_q.bias", w[0]) is not None


@pytest.fixture(scope="module")
def runs(demo_manifest, t2i, tmp_path_factory):
    out = {}
    for precision in ("no_change", "nf4-bnb"):
        d = tmp_path_factory.mktemp(f"run_{precision}")
        events = train("train_network", d, "--dit", demo_manifest["dit"]["original"], "--dataset_config", t2i,
                       "--output_dir", d, "--output_name", "q", "--max_train_steps", 6, "--learning_rate", "3e-3",
                       "--network_dim", 4, "--seed", 5, "--base_model_precision", precision)
        out[precision] = (d / "q.safetensors", events)
    return out


def test_lora_on_nf4_base_trains_and_has_the_same_format(runs):
    (plain, plain_events), (nf4, nf4_events) = runs["no_change"], runs["nf4-bnb"]
    with safe_open(str(plain), "pt") as a, safe_open(str(nf4), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            ta, tb = a.get_tensor(k), b.get_tensor(k)
            assert ta.shape == tb.shape and ta.dtype == tb.dtype, k
        assert set(a.metadata()) == set(b.metadata())
    la, lb = losses(plain_events), losses(nf4_events)
    assert la.keys() == lb.keys()
    assert all(abs(la[s] - lb[s]) / la[s] < 0.05 for s in la), (la, lb)   # same noise: close losses


def test_lora_from_nf4_base_reads_as_the_same_format(runs, demo_manifest):
    """Same reader result as the plain run's file (which tests/test_train_lora.py loads in diffusers)."""
    from engine.models.lora_formats import read_lora

    path, _ = runs["nf4-bnb"]
    assert read_lora(path).format == read_lora(runs["no_change"][0]).format


def test_refused_before_loading_when_kernels_fail(demo_manifest, t2i, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(bnb_quant.bitsandbytes().functional, "quantize_4bit", broken)
    events = train("train_network", tmp_path, "--dit", demo_manifest["dit"]["original"], "--dataset_config", t2i,
                   "--output_dir", tmp_path, "--max_train_steps", 1, "--base_model_precision", "nf4-bnb",
                   expect_rc=2)
    error = next(e for e in events if e["type"] == "error")
    assert "--base_model_precision nf4-bnb" in error["message"] and "no kernel" in error["message"]
    assert "no_change" in error["hint"]
    assert not any(e["type"] == "phase" and e.get("name") == "loading" for e in events)


def test_refused_without_bitsandbytes(demo_manifest, t2i, tmp_path, monkeypatch):
    def missing():
        raise ImportError("No module named 'bitsandbytes'")

    monkeypatch.setattr(bnb_quant, "bitsandbytes", missing)
    events = train("train_network", tmp_path, "--dit", demo_manifest["dit"]["original"], "--dataset_config", t2i,
                   "--output_dir", tmp_path, "--max_train_steps", 1, "--base_model_precision", "int8-bnb",
                   expect_rc=2)
    assert "cannot be imported" in next(e for e in events if e["type"] == "error")["message"]


@pytest.mark.parametrize("extra, words", [(["--fp8_base"], "both quantise"), (["--blocks_to_swap", "1"], "blocks_to_swap")])
def test_refused_combinations(demo_manifest, t2i, tmp_path, extra, words):
    events = train("train_network", tmp_path, "--dit", demo_manifest["dit"]["original"], "--dataset_config", t2i,
                   "--output_dir", tmp_path, "--max_train_steps", 1, "--base_model_precision", "nf4-bnb", *extra,
                   expect_rc=2)
    assert words in next(e for e in events if e["type"] == "error")["message"]


def test_finetune_has_no_such_option():
    from engine.spec.options import TrainConfig, TrainNetworkConfig

    assert "base_model_precision" in TrainNetworkConfig.__dataclass_fields__
    assert "base_model_precision" not in TrainConfig.__dataclass_fields__


def test_estimator_and_presets_know_the_quantized_base():
    from engine.spec.errors import OptionError
    from engine.spec.options import TrainNetworkConfig
    from engine.spec.presets import PRESET_DIR, estimate_preset, load_preset
    from engine.spec.vram import estimate_config

    def vram(**kw):
        cfg = TrainNetworkConfig(model_version="edit", gradient_checkpointing=True, mixed_precision="bf16", **kw)
        return estimate_config(cfg, "train_network", resolution=[1024, 1024])

    plain, fp8 = vram(), vram(fp8_base=True, fp8_scaled=True)
    nf4, int8 = vram(base_model_precision="nf4-bnb"), vram(base_model_precision="int8-bnb")
    assert nf4["parts"]["weights"] < int8["parts"]["weights"] < fp8["parts"]["weights"] < plain["parts"]["weights"]
    assert 9 < nf4["parts"]["weights"] < 11 and 18 < int8["parts"]["weights"] < 20    # ~0.52 and ~1 byte/weight
    # the seed's claim: Qwen-Image-Edit LoRA on 24 GB with a quantised base (nf4 by this estimator)
    edit = TrainNetworkConfig(model_version="edit")
    assert estimate_preset(load_preset(PRESET_DIR / "lora-24gb-nf4.toml"), edit)["vram_gib"] <= 24
    assert estimate_preset(load_preset(PRESET_DIR / "lora-32gb-int8.toml"), edit)["vram_gib"] <= 32
    with pytest.raises(OptionError, match="both quantise"):
        vram(base_model_precision="nf4-bnb", fp8_base=True)
