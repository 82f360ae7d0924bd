"""fp8 storage: quantisation error bounds, scale layout, DiT output close to the plain one, refusal of fp8 input."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from _dit_util import dit_inputs, run, tiny_dit
from engine.spec.errors import ModelFileError
from engine.models.fp8 import (FP8, Fp8Quantizer, chain, dequantize_weight, is_target, patch_fp8_linears,
                               quantize_model, quantize_weight, scale_shape)


def test_target_keys():
    assert is_target("transformer_blocks.3.attn.to_q.weight")
    assert is_target("transformer_blocks.3.img_mod.1.weight")                  # modulation is quantised too
    assert not is_target("transformer_blocks.3.attn.norm_q.weight")
    assert not is_target("transformer_blocks.3.attn.to_q.bias")
    assert not is_target("img_in.weight") and not is_target("proj_out.weight")
    assert not is_target("time_text_embed.timestep_embedder.linear_1.weight")


@pytest.mark.parametrize("shape, expected", [((96, 256), (96, 4, 1)), ((32, 100), (32, 1)), ((7,), (1,))])
def test_scale_layout_and_error_bound(shape, expected):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=g) * torch.logspace(-3, 0, shape[-1])).to(torch.bfloat16)
    q, scale = quantize_weight(w)
    assert q.dtype == FP8 and q.shape == w.shape and scale.dtype == torch.bfloat16
    assert tuple(scale.shape) == expected == scale_shape(shape)
    # scale = max|w| / 448 per block (in the stored dtype)
    blocks = w.float().reshape(shape[0], -1, 64) if len(expected) == 3 else w.float()
    amax = blocks.abs().amax(-1) if len(expected) > 1 else w.float().abs().amax().reshape(1)
    torch.testing.assert_close(scale.float().reshape(amax.shape), (amax / 448).to(torch.bfloat16).float())
    # |w - deq| <= max(|w| / 16, scale / 1024): e4m3 has 3 mantissa bits (half-ulp 2^-4 relative), and the
    # subnormal step is 2^-9 (half-step 2^-10) in scaled units.
    deq = dequantize_weight(q, scale, torch.float32)
    per_elem_scale = deq / q.float().where(q.float() != 0, torch.ones(1))
    s = scale.float().expand(shape[0], -1, 64).reshape(shape) if len(expected) == 3 else scale.float().expand(shape)
    bound = torch.maximum(w.float().abs() / 16, s / 1024) + 1e-12
    assert ((w.float() - deq).abs() <= bound).all()
    assert torch.isfinite(per_elem_scale).all()


def test_blockwise_beats_per_tensor():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g) * torch.logspace(-3, 0, 256)     # columns of very different range
    q, s = quantize_weight(w)
    err_block = (dequantize_weight(q, s, torch.float32) - w).norm() / w.norm()
    q2, s2 = quantize_weight(w.reshape(-1))                                  # 1-D: one scale for all
    err_tensor = (dequantize_weight(q2, s2, torch.float32).reshape(w.shape) - w).norm() / w.norm()
    assert err_block < err_tensor


def test_refuses_fp8_input():
    w = torch.randn(8, 64).to(FP8)
    with pytest.raises(ModelFileError, match="already float8_e4m3fn"):
        quantize_weight(w, key="transformer_blocks.0.attn.to_q.weight")


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_dit_output_close_to_plain():
    """Tolerance: relative L2 error of the DiT output below 3 % for --fp8_scaled, 10 % for plain --fp8_base
    (measured on this tiny model: 0.26 % and 0.24 %; its weights sit in e4m3's normal range, real ones less so)."""
    dit = tiny_dit()
    with torch.no_grad():
        ref = run(dit, dit_inputs())
        scaled = copy.deepcopy(dit)
        assert quantize_model(scaled, scaled=True) == 28
        out_scaled = run(scaled, dit_inputs())
        base = copy.deepcopy(dit)
        quantize_model(base, scaled=False)
        out_base = run(base, dit_inputs())
    assert scaled.transformer_blocks[0].attn.to_q.weight.dtype == FP8
    assert scaled.img_in.weight.dtype == torch.float32
    assert "transformer_blocks.0.img_mlp.net.2.scale_weight" in scaled.state_dict()
    assert _rel(out_scaled, ref) < 0.03
    assert _rel(out_base, ref) < 0.10
    assert _rel(out_scaled, ref) > 0      # really quantised


def test_load_time_transform_with_lora_merge(tmp_path):
    """Meta model patched first, then load_dit with chain(LoRA merge, fp8 quantiser): same result as merging and
    quantising an already loaded model."""
    from safetensors.torch import save_file

    from engine.models.lora_formats import LoraMerger, merge_loras, read_lora
    from engine.models import common, dit as dit_mod
    from engine.train.lora import create_network

    dit = tiny_dit()
    net = create_network(dit, dim=4, alpha=4)
    for m in net.loras:
        torch.nn.init.normal_(m.lora_up.weight, std=0.2)
    net.save_weights(tmp_path / "l.safetensors")
    lora = read_lora(tmp_path / "l.safetensors")
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dit.config.items() if not k.startswith("_")}
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, tmp_path / "dit.safetensors",
              metadata={"config": json.dumps(config)})

    expected = copy.deepcopy(dit)
    merge_loras(expected, [(lora, 1.0)])
    quantize_model(expected)

    model = common.build_empty(dit_mod.dit_class(), config)
    patch_fp8_linears(model, scaled=True)
    merger, quantizer = LoraMerger([(lora, 1.0)]), Fp8Quantizer(scaled=True)
    common.load_weights(model, [tmp_path / "dit.safetensors"], torch.float32, "cpu",
                        transform=chain(merger.transform, quantizer.transform))
    merger.check_all_used()
    assert quantizer.count == 28
    for k, v in expected.state_dict().items():
        got = model.state_dict()[k]
        assert got.dtype == v.dtype, k
        assert torch.equal(got.float(), v.float()), k
    with torch.no_grad():
        torch.testing.assert_close(run(model, dit_inputs()), run(expected, dit_inputs()))


def test_fp8_with_lora_training_grads():
    """LoRA wraps the fp8 forward: grads reach the LoRA, the fp8 base stays frozen."""
    from engine.train.lora import create_network

    dit = tiny_dit()
    quantize_model(dit)
    net = create_network(dit)
    net.apply_to()
    try:
        for m in net.loras:
            torch.nn.init.normal_(m.lora_up.weight, std=0.1)
        run(dit, dit_inputs()).pow(2).mean().backward()
    finally:
        net.remove()
    assert net.loras[0].lora_down.weight.grad is not None
    assert dit.transformer_blocks[0].attn.to_q.weight.grad is None
