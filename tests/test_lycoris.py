"""`--network_module lycoris.kohya` (engine/train/lycoris_net.py): LoKr and LoHa from the lycoris-lora package train
on the demo DiT, the file holds LyCORIS's kohya names for the 14 Linear layers of every block, and the weight delta
our LoRA reader computes from the file (the formula ComfyUI applies to lokr_*/hada_* keys) is what the network
added during training."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

from _train_util import cached_dataset, fixed_loss, losses, train
from engine.models.dit import load_dit
from engine.models.lora_formats import BLOCK_LINEARS, LoraMerger, read_lora
from engine.train.lycoris_net import create_lycoris

PARTS = {"lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_w1_a", "lokr_w1_b", "alpha"},
         "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}}
ARGS = {"lokr": ["algo=lokr", "factor=4"], "loha": ["algo=loha"]}


@pytest.fixture(scope="module")
def t2i(demo_manifest, tmp_path_factory):
    return cached_dataset(demo_manifest, tmp_path_factory.mktemp("lycoris_data"))


@pytest.fixture(scope="module", params=["lokr", "loha"])
def run(request, demo_manifest, t2i, tmp_path_factory):
    algo = request.param
    out = tmp_path_factory.mktemp(f"lycoris_{algo}")
    events = train("train_network", out, "--dit", demo_manifest["dit"]["original"], "--dataset_config", t2i,
                   "--output_dir", out, "--output_name", algo, "--max_train_steps", 12, "--learning_rate", "1e-2",
                   "--network_module", "lycoris.kohya", "--network_dim", 4, "--network_alpha", 4, "--seed", 1,
                   "--network_args", *ARGS[algo])
    return algo, out / f"{algo}.safetensors", events


def test_keys_are_lycoris_kohya_names_for_every_block_linear(run):
    algo, path, events = run
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    modules = {k.split(".")[0] for k in keys}
    assert modules == {f"lora_unet_transformer_blocks_{b}_{lin.replace('.', '_')}" for b in range(2)
                       for lin in BLOCK_LINEARS}
    parts = {k.split(".", 1)[1] for k in keys}
    assert parts <= PARTS[algo] and parts & (PARTS[algo] - {"alpha"})
    assert meta["ss_network_module"] == "lycoris.kohya" and "algo" in json.loads(meta["ss_network_args"])
    assert read_lora(path).format == algo
    assert len(losses(events)) == 12


def test_the_file_reproduces_the_trained_network(run, demo_manifest, t2i):
    """The DiT with the trained LyCORIS network applied (its own forward) and the DiT with the file merged by our
    reader give the same loss; and the training moved it away from the base."""
    algo, path, _ = run
    dit_path = demo_manifest["dit"]["original"]
    base = load_dit(dit_path)
    net_dit = load_dit(dit_path).requires_grad_(False)
    net = create_lycoris(net_dit, 4, 4.0, None, dict(a.split("=") for a in ARGS[algo]))
    net.apply_to()
    net.load_weights(path)
    net.eval()
    merged = load_dit(dit_path, transform=LoraMerger([(read_lora(path), 1.0)]).transform)
    with_net, with_file, plain = fixed_loss(net_dit, t2i), fixed_loss(merged, t2i), fixed_loss(base, t2i)
    assert abs(with_net - with_file) < 1e-4 * abs(plain), (with_net, with_file)
    assert abs(with_net - plain) > 1e-3 * plain, (with_net, plain)


def test_diffusers_format_is_refused(demo_manifest, t2i, tmp_path):
    events = train("train_network", tmp_path, "--dit", demo_manifest["dit"]["original"], "--dataset_config", t2i,
                   "--output_dir", tmp_path, "--max_train_steps", 1, "--network_module", "lycoris.kohya",
                   "--save_format", "diffusers", expect_rc=2)
    assert "LoKr/LoHa" in next(e for e in events if e["type"] == "error")["message"]


def test_continue_from_a_lycoris_file(run, demo_manifest, t2i, tmp_path):
    algo, path, _ = run
    events = train("train_network", tmp_path, "--dit", demo_manifest["dit"]["original"], "--dataset_config", t2i,
                   "--output_dir", tmp_path, "--max_train_steps", 1, "--network_module", "lycoris.kohya",
                   "--network_dim", 4, "--network_alpha", 4, "--network_weights", path, "--network_args", *ARGS[algo])
    assert any(e["type"] == "done" for e in events)
    assert re.search(r"network weights loaded", json.dumps(events))


@pytest.mark.parametrize("precision", ["nf4-bnb", "fp8"])
def test_lycoris_on_a_quantized_base_uses_bypass_and_trains(demo_manifest, t2i, precision):
    """On nf4 (bitsandbytes) or fp8 weights LyCORIS cannot rebuild W + ΔW: it must add its delta to the base
    forward (bypass), and gradients must reach its weights."""
    from engine.data.cached import CachedDataset
    from engine.models import dit_setup
    from engine.spec.variants import get_variant
    from engine.train.step import flow_loss, predict, prepare_inputs
    from engine.train.timesteps import TimestepSampler

    dit = dit_setup.load(demo_manifest["dit"]["original"], get_variant("original"), torch.device("cpu"),
                         torch.float32, fp8=precision == "fp8", fp8_scaled=precision == "fp8",
                         base_precision=precision if precision != "fp8" else "no_change").requires_grad_(False)
    net = create_lycoris(dit, 4, 4.0, None, {"algo": "lokr", "factor": 4})
    net.apply_to()
    assert all(m.bypass_mode for m in net.loras)
    data = CachedDataset.open(t2i, "original")
    inputs = prepare_inputs(data.load_batch(data.items[:1]), TimestepSampler("uniform"),
                            torch.Generator().manual_seed(0), torch.device("cpu"), torch.float32)
    flow_loss(predict(dit, inputs), inputs).backward()
    # the last block's text-stream output is unused by the DiT, so its adapters get no gradient: check block 0
    none = [n for n, p in net.named_parameters() if "blocks_0_" in n and p.requires_grad and p.grad is None]
    assert not none and any("blocks_0_" in n for n, _ in net.named_parameters()), none[:4]
    assert any(p.grad.abs().sum() > 0 for p in net.parameters() if p.requires_grad)
