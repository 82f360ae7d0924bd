"""The trainable LoRA network: targets, patterns, kohya math, dropouts, LoRA+, saving and continuing."""

from __future__ import annotations

import math
import types

import pytest
import torch
from safetensors import safe_open

from _dit_util import dit_inputs, run, tiny_dit
from engine.spec.errors import ModelFileError, OptionError
from engine.train.lora import create_network, parse_network_args, target_paths


@pytest.fixture(scope="module")
def dit():
    return tiny_dit()


def test_default_targets_are_the_14_block_linears(dit):
    net = create_network(dit)
    assert len(net.loras) == 28
    block0 = sorted(p.split(".", 2)[2] for p in net._module_paths.values() if p.startswith("transformer_blocks.0."))
    assert block0 == sorted(["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                             "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "img_mod.1", "txt_mod.1",
                             "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"])
    assert "lora_unet_transformer_blocks_0_img_mod_1" in {m.lora_name for m in net.loras}
    m = net.loras[0]
    assert (m.lora_dim, float(m.alpha), m.scale) == (4, 1.0, 0.25)       # musubi defaults: dim 4, alpha 1


def test_patterns_fullmatch_and_include_overrides_exclude(dit):
    # musubi's default exclude pattern never matches the dotted paths: nothing excluded.
    assert len(target_paths(dit, exclude=[r".*(_mod_).*"])) == 28
    no_mod = target_paths(dit, exclude=[r".*_mod\..*"])
    assert len(no_mod) == 24 and not any("_mod." in p for p in no_mod)
    assert len(target_paths(dit, exclude=[r"attn"])) == 28                 # fullmatch, not search
    back = target_paths(dit, exclude=[r".*_mod\..*"], include=[r"transformer_blocks\.1\.img_mod\.1"])
    assert len(back) == 25 and "transformer_blocks.1.img_mod.1" in back
    with pytest.raises(OptionError, match="no Linear"):
        create_network(dit, exclude_patterns=[".*"])
    with pytest.raises(OptionError, match="unknown key"):
        create_network(dit, conv_dimm=4)


def test_parse_network_args():
    args = parse_network_args(["rank_dropout=0.1", "exclude_patterns=[r'.*img_mod.*']", "verbose=True",
                               "loraplus_lr_ratio=4", "name=plain text"])
    assert args == {"rank_dropout": 0.1, "exclude_patterns": [".*img_mod.*"], "verbose": True,
                    "loraplus_lr_ratio": 4, "name": "plain text"}
    with pytest.raises(OptionError):
        parse_network_args(["novalue"])


def test_init_and_kohya_math(dit):
    net = create_network(dit, dim=8, alpha=4.0, multiplier=0.5)
    m = net.loras[0]
    bound = 1 / math.sqrt(m.lora_down.in_features)          # kaiming_uniform(a=√5) on (rank, in)
    assert m.lora_down.weight.abs().max() <= bound and m.lora_down.weight.std() > bound / 4
    assert torch.count_nonzero(m.lora_up.weight) == 0
    with torch.no_grad():
        base = run(dit, dit_inputs())
    net.apply_to()
    try:
        with torch.no_grad():
            torch.testing.assert_close(run(dit, dit_inputs()), base)   # zero up: LoRA starts as the identity
        torch.nn.init.normal_(m.lora_up.weight)
        layer = m.org_module[0]
        x = torch.randn(3, layer.in_features)
        expected = torch.nn.functional.linear(x, layer.weight, layer.bias) + \
            0.5 * (4.0 / 8) * (x @ m.lora_down.weight.T @ m.lora_up.weight.T)
        torch.testing.assert_close(layer(x), expected)
    finally:
        net.remove()
    assert "forward" not in layer.__dict__                  # remove() restores the class forward


def test_dropouts_only_in_training(dit):
    net = create_network(dit, dim=4, alpha=4.0, dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    m = net.loras[0]
    torch.nn.init.normal_(m.lora_up.weight)
    layer = m.org_module[0]
    x = torch.randn(2, 5, layer.in_features)
    net.apply_to()
    try:
        net.eval()
        a, b = layer(x), layer(x)
        assert torch.equal(a, b)
        net.train()
        torch.manual_seed(0)
        outs = [layer(x) for _ in range(8)]
        assert any(not torch.equal(o, a) for o in outs)
        # module dropout returns exactly the base output for some calls
        base = torch.nn.functional.linear(x, layer.weight, layer.bias)
        assert any(torch.equal(o, base) for o in outs)
    finally:
        net.remove()


def test_rank_dropout_keeps_expectation(dit):
    """Rank dropout rescales by 1/(1-p), so the mean over many draws approaches the undropped output."""
    net = create_network(dit, dim=4, alpha=4.0, rank_dropout=0.25)
    m = net.loras[0]
    torch.nn.init.normal_(m.lora_up.weight)
    layer = m.org_module[0]
    x = torch.randn(1, layer.in_features).expand(20000, -1)      # one mask per row: 20000 draws in one call
    net.apply_to()
    try:
        net.eval()
        full = layer(x[:1]).detach()
        net.train()
        torch.manual_seed(1)
        mean = layer(x).detach().mean(0, keepdim=True)
    finally:
        net.remove()
    base = torch.nn.functional.linear(x[:1], layer.weight, layer.bias)
    err = (mean - full).abs().max() / (full - base).abs().max()
    assert err < 0.05


def test_loraplus_groups(dit):
    net = create_network(dit, loraplus_lr_ratio=16)
    groups = net.prepare_optimizer_params(1e-4)
    assert [g["name"] for g in groups] == ["unet", "unet plus"]
    assert groups[1]["lr"] == pytest.approx(1.6e-3)
    ups = {id(m.lora_up.weight) for m in net.loras}
    assert {id(p) for p in groups[1]["params"]} == ups and not ups & {id(p) for p in groups[0]["params"]}
    assert len(create_network(dit).prepare_optimizer_params(1e-4)) == 1


def _cfg(**kw):
    from engine.spec.config import TrainNetworkConfig

    return TrainNetworkConfig(output_name="mylora", dit="/models/qwen_image_bf16.safetensors",
                              network_args=["rank_dropout=0.1"], **kw)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_save_precision_metadata_and_atomic(dit, tmp_path, precision, dtype):
    from engine.train.lora import SAVE_DTYPES
    from engine.train.lora_metadata import lora_metadata

    net = create_network(dit, dim=4, alpha=1.0)
    meta = lora_metadata(_cfg(model_version="edit-2509"), stats={"ss_num_train_items": 12, "ss_steps": 100})
    path = net.save_weights(tmp_path / "mylora.safetensors", SAVE_DTYPES[precision], meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mylora.safetensors"]      # no temp file left
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
        assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}
        assert f.get_tensor("lora_unet_transformer_blocks_0_attn_to_q.alpha").shape == ()
    assert md["ss_base_model_version"] == "qwen_image_edit"
    assert md["modelspec.architecture"] == "Qwen-Image-Edit-Plus/lora"
    assert md["modelspec.implementation"] == "https://github.com/QwenLM/Qwen-Image"
    assert md["modelspec.resolution"] == "1024x1024" and md["modelspec.title"] == "mylora"
    assert md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "1.0"
    assert md["ss_network_args"] == '{"rank_dropout": "0.1"}'
    assert md["ss_num_train_items"] == "12" and md["ss_sd_model_name"] == "qwen_image_bf16.safetensors"
    assert len(md["sshs_model_hash"]) == 64 and len(md["sshs_legacy_hash"]) == 8
    minimal = lora_metadata(_cfg(no_metadata=True))
    assert {k for k in minimal if k.startswith("ss_")} == {"ss_base_model_version", "ss_network_module",
                                                           "ss_network_dim", "ss_network_alpha", "ss_network_args"}


def test_model_hash_is_kohyas(dit, tmp_path):
    """sshs_model_hash = sha256 of the tensor data of the file written with the ss_* metadata only."""
    import hashlib

    from safetensors.torch import save_file

    from engine.train.lora_metadata import add_hashes

    state = create_network(dit).export_state()
    meta = add_hashes(state, {"ss_a": "1", "modelspec.title": "x"})
    save_file(state, tmp_path / "ref.safetensors", metadata={"ss_a": "1"})
    data = (tmp_path / "ref.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()


def test_continue_from_network_weights(dit, tmp_path):
    net = create_network(dit, dim=4, alpha=2.0)
    for m in net.loras:
        torch.nn.init.normal_(m.lora_up.weight)
    net.save_weights(tmp_path / "a.safetensors")
    net.save_diffusers(tmp_path / "a_diffusers.safetensors")
    for name in ("a.safetensors", "a_diffusers.safetensors"):
        other = create_network(dit, dim=4, alpha=1.0)
        other.load_weights(tmp_path / name)
        x = torch.randn(2, 32)
        for m, o in zip(net.loras, other.loras):
            # same delta (the diffusers file has alpha baked in, so factors differ but the product is equal)
            d1 = m.lora_up.weight @ m.lora_down.weight * m.scale
            d2 = o.lora_up.weight @ o.lora_down.weight * o.scale
            torch.testing.assert_close(d1, d2, atol=1e-6, rtol=1e-5)
        del x
    wrong = create_network(dit, dim=8)
    with pytest.raises(ModelFileError, match="network_dim"):
        wrong.load_weights(tmp_path / "a.safetensors")
    fewer = create_network(dit, exclude_patterns=[r".*_mod\..*"])
    with pytest.raises(ModelFileError, match="modules differ"):
        fewer.load_weights(tmp_path / "a.safetensors")


def test_only_lora_params_get_gradients(dit):
    net = create_network(dit)
    dit.requires_grad_(False)
    net.apply_to()
    try:
        net.train()
        for m in net.loras:
            torch.nn.init.normal_(m.lora_up.weight, std=0.1)
        loss = run(dit, dit_inputs()).pow(2).mean()
        loss.backward()
    finally:
        net.remove()
    # every LoRA of block 0 learns (the last block's text stream feeds nothing, so its txt LoRAs get no grad)
    block0 = [p for n, p in net.named_parameters() if "blocks_0_" in n]
    assert len(block0) == 28 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in block0)
    assert all(p.grad is None for p in dit.parameters())
    assert isinstance(net.loras[0].org_module, list) and not any(
        isinstance(c, types.MethodType) for c in net.children())
