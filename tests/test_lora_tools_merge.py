"""merge_lora on the demo models: a merged DiT generates what the LoRAs applied at load time generate (fp32 exact
to float rounding, bf16 and fp8 within a stated tolerance), our fp8 file loads while foreign fp8 files stay refused,
the Edit-2511 marker and config survive, and wrong files are refused before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from _dit_util import dit_inputs, run
from _generate_util import outputs_of, run_generate
from _lora_tools_util import error_of, make_lora, run_inproc
from engine.spec.errors import ModelFileError


@pytest.fixture(scope="module")
def loras(demo_manifest, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    dit = demo_manifest["dit"]["original"]
    a = make_lora(dit, folder / "a.safetensors", rank=4, alpha=2.0, seed=1, scale=0.3,
                  metadata={"ss_base_model_version": "qwen_image"})
    b = make_lora(dit, folder / "b.safetensors", rank=2, alpha=2.0, seed=2, scale=0.3,
                  layers=("attn.to_v", "img_mlp.net.2", "img_mod.1"))
    return [a, b]


@pytest.fixture(scope="module")
def t2i(demo_manifest):
    m = demo_manifest
    return ["--vae", m["vae"], "--text_encoder", m["text_encoder"], "--tokenizer", m["tokenizer"], "--device",
            "cpu", "--prompt", "a small red boat", "--negative_prompt", " ", "--image_size", "32", "48",
            "--infer_steps", "3", "--guidance_scale", "2.0", "--seed", "11"]


def _generate(t2i, folder, name, *extra) -> np.ndarray:
    rc, events = run_generate([*t2i, "--save_path", str(folder / name), *extra], folder / f"{name}.jsonl")
    assert rc == 0, error_of(events)
    return np.asarray(Image.open(outputs_of(events)[0]), dtype=np.float32)


@pytest.fixture(scope="module")
def with_lora(t2i, loras, demo_manifest, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen")
    applied = _generate(t2i, folder, "applied", "--dit", demo_manifest["dit"]["original"], "--lora_weight",
                        *map(str, loras), "--lora_multiplier", "0.8", "-0.5")
    plain = _generate(t2i, folder, "plain", "--dit", demo_manifest["dit"]["original"])
    assert np.abs(applied - plain).mean() > 2.0          # the LoRAs visibly change the picture
    return applied


def _merge(demo_manifest, loras, out, precision, version="original", mults=("0.8", "-0.5")):
    rc, events = run_inproc("merge_lora", "--dit", demo_manifest["dit"][version], "--model_version", version,
                            "--lora_weight", *loras, "--lora_multiplier", *mults, "--save_merged_model", out,
                            "--merged_precision", precision, "--device", "cpu")
    return rc, events


@pytest.mark.parametrize("precision,tolerance", [("fp32", 0.05), ("bf16", 1.0), ("fp8", 3.0)])
def test_merged_dit_generates_what_the_lora_generates(t2i, loras, demo_manifest, with_lora, tmp_path, precision,
                                                      tolerance):
    out = tmp_path / f"merged_{precision}.safetensors"
    rc, events = _merge(demo_manifest, loras, out, precision)
    assert rc == 0, error_of(events)
    assert any(e["type"] == "progress" and e["unit"] == "tensor" for e in events)
    assert any(e["type"] == "estimate" for e in events)
    merged = _generate(t2i, tmp_path, "merged", "--dit", str(out))
    mad = np.abs(merged - with_lora).mean()
    print(f"merged {precision} vs LoRA applied at load: mean |diff| = {mad:.3f}/255")
    assert mad < tolerance
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert json.loads(meta["qis_merged_loras"])[1] == {"file": "b.safetensors", "multiplier": -0.5}
    assert json.loads(meta["config"])["num_layers"] == 2
    if precision == "fp8":
        assert meta["qis_fp8"] == "scaled" and "F8_E4M3" in dtypes


def test_fp8_files_our_loader_accepts_and_refuses(demo_manifest, loras, tmp_path):
    from engine.models.dit import load_dit
    from engine.models.fp8 import Fp8Hook

    out = tmp_path / "merged_fp8.safetensors"
    assert _merge(demo_manifest, loras, out, "fp8")[0] == 0
    bf16 = tmp_path / "merged_bf16.safetensors"
    assert _merge(demo_manifest, loras, bf16, "bf16")[0] == 0
    assert out.stat().st_size < 0.8 * bf16.stat().st_size
    a, b = load_dit(out).state_dict(), load_dit(bf16).state_dict()
    rel = max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b if b[k].dim() == 2)
    print(f"fp8 vs bf16 merged weights: worst relative error {rel:.4f}")
    assert rel < 0.08
    # --fp8_scaled on our fp8 file: dequantised while reading, then quantised again to the same blocks
    hook = Fp8Hook(True)
    again = load_dit(out, transform=hook.transform)
    hook.finish(again)
    with torch.no_grad():
        x, y = run(again, dit_inputs()), run(load_dit(out), dit_inputs())
    assert float((x - y).norm() / y.norm()) < 1e-2
    # the same tensors without our marker: the usual refusal of pre-quantized checkpoints
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    state = load_file(out)
    unmarked = tmp_path / "foreign_fp8.safetensors"
    save_file(state, unmarked, metadata={k: v for k, v in meta.items() if k != "qis_fp8"})
    with pytest.raises(ModelFileError, match="pre-quantized fp8"):
        load_dit(unmarked)
    # the marker on a layout that is not ours (a per-tensor scale, as ComfyUI's scaled fp8 files have)
    key = next(k for k in state if k.endswith(".scale_weight"))
    state[key] = torch.ones(1, dtype=state[key].dtype)
    tampered = tmp_path / "tampered_fp8.safetensors"
    save_file(state, tampered, metadata=meta)
    with pytest.raises(ModelFileError, match="block-wise scale shape"):
        load_dit(tampered)


def test_edit_2511_marker_and_config_are_kept(demo_manifest, tmp_path):
    from engine.models.dit import MARKER_2511, load_dit

    dit = demo_manifest["dit"]["edit-2511"]
    lora = make_lora(dit, tmp_path / "l2511.safetensors", metadata={"modelspec.architecture":
                                                                    "Qwen-Image-Edit-2511/lora"})
    out = tmp_path / "merged_2511.safetensors"
    rc, events = _merge(demo_manifest, [lora], out, "bf16", version="edit-2511", mults=("1.0",))
    assert rc == 0, error_of(events)
    with safe_open(str(out), "pt") as f:
        assert "model.diffusion_model." + MARKER_2511 in f.keys()
        assert json.loads(f.metadata()["config"])["zero_cond_t"] is True
    assert load_dit(out, model_version="edit-2511").config.zero_cond_t is True
    # a LoRA recorded for Qwen-Image is refused for the 2511 DiT, before anything is written
    t2i_lora = make_lora(dit, tmp_path / "t2i.safetensors", metadata={"modelspec.architecture": "Qwen-Image/lora"})
    rc, events = _merge(demo_manifest, [t2i_lora], tmp_path / "no.safetensors", "bf16", version="edit-2511",
                        mults=())
    assert rc == 2 and "trained for Qwen-Image," in error_of(events)["message"]
    assert not (tmp_path / "no.safetensors").exists()


def test_wrong_files_are_refused(demo_manifest, loras, tmp_path):
    dit = demo_manifest["dit"]["original"]
    rc, events = run_inproc("merge_lora", "--dit", demo_manifest["vae"], "--lora_weight", loras[0],
                            "--save_merged_model", tmp_path / "o.safetensors")
    assert rc == 2 and "not a Qwen-Image DiT" in error_of(events)["message"]
    rc, events = run_inproc("merge_lora", "--dit", dit, "--lora_weight", loras[0], "--save_merged_model", dit)
    assert rc == 2 and "never overwrite" in error_of(events)["message"]
    rc, events = run_inproc("merge_lora", "--dit", dit, "--lora_weight", *loras, "--lora_multiplier", "1", "2",
                            "3", "--save_merged_model", tmp_path / "o.safetensors")
    assert rc == 2 and "--lora_multiplier has 3 values for 2" in error_of(events)["message"]
    bigger = make_lora(demo_manifest["dit"]["original"], tmp_path / "big.safetensors")
    state = load_file(bigger)
    state["lora_unet_transformer_blocks_7_attn_to_q.lora_down.weight"] = torch.zeros(4, 32)
    state["lora_unet_transformer_blocks_7_attn_to_q.lora_up.weight"] = torch.zeros(32, 4)
    save_file(state, bigger)
    rc, events = run_inproc("merge_lora", "--dit", dit, "--lora_weight", bigger, "--save_merged_model",
                            tmp_path / "o.safetensors")
    assert rc == 2 and "transformer_blocks.7.attn.to_q is not in the DiT" in error_of(events)["message"]
    assert not (tmp_path / "o.safetensors").exists()


def test_merge_and_extract_hold_one_tensor_at_a_time(demo_manifest, loras, tmp_path, monkeypatch):
    """Streamed: while a tensor is read, at most the one before it is still alive (a tool that gathered the DiT
    would hold all of them)."""
    import weakref

    from engine.tools.dit_stream import DitSource

    alive, peak, reads = weakref.WeakSet(), [0], [0]
    original = DitSource.read

    def counting_read(self, name, device="cpu"):
        t = original(self, name, device)
        alive.add(t)
        peak[0], reads[0] = max(peak[0], len(alive)), reads[0] + 1
        return t

    monkeypatch.setattr(DitSource, "read", counting_read)
    rc, events = _merge(demo_manifest, loras, tmp_path / "m.safetensors", "bf16")
    assert rc == 0, error_of(events)
    assert reads[0] > 60 and peak[0] <= 2, (reads[0], peak[0])
    peak[0] = reads[0] = 0
    dit = demo_manifest["dit"]["original"]
    rc, events = run_inproc("extract_lora", "--model_org", dit, "--model_tuned", tmp_path / "m.safetensors",
                            "--save_to", tmp_path / "e.safetensors", "--device", "cpu")
    assert rc == 0, error_of(events)
    assert reads[0] > 60 and peak[0] <= 4, (reads[0], peak[0])
