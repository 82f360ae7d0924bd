"""extract_lora and resize_lora: a finetune that is the base plus a known low-rank delta gives back that delta
(kept energy 1 at its rank, reported per module); a partial rank keeps what the singular values say; resize lowers
the rank with the error it reports, fixed or by kept energy."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from _lora_tools_util import error_of, make_lora, run_inproc
from engine.models.lora_formats import read_lora
from engine.spec.lora_keys import summarize

TRUE_RANK = 3


@pytest.fixture(scope="module")
def finetune(demo_manifest, tmp_path_factory):
    """(base path, tuned path, {module: true delta}): tuned = base + a rank-3 delta on 3 layers of each block,
    stored in fp32 so the delta is not rounded away."""
    base = demo_manifest["dit"]["original"]
    folder = tmp_path_factory.mktemp("ft")
    state = load_file(base)
    gen = torch.Generator().manual_seed(5)
    deltas = {}
    for key in list(state):
        state[key] = state[key].float()
        name = key.removeprefix("model.diffusion_model.")
        if name.endswith((".attn.to_q.weight", ".img_mlp.net.2.weight", ".txt_mod.1.weight")):
            out_f, in_f = state[key].shape
            d = torch.randn(out_f, TRUE_RANK, generator=gen) @ torch.randn(TRUE_RANK, in_f, generator=gen) * 0.01
            state[key] = state[key] + d
            deltas[name.removesuffix(".weight")] = d
    with safe_open(base, "pt") as f:
        meta = f.metadata()
    tuned = folder / "qwen_image_finetuned.safetensors"
    save_file(state, tuned, metadata=meta)
    return base, tuned, deltas


def _extract(finetune, out, dim):
    base, tuned, _ = finetune
    return run_inproc("extract_lora", "--model_org", base, "--model_tuned", tuned, "--save_to", out, "--dim", dim,
                      "--device", "cpu")


def test_extract_reproduces_a_low_rank_finetune(finetune, tmp_path):
    _, _, deltas = finetune
    out = tmp_path / "extracted.safetensors"
    rc, events = _extract(finetune, out, 4)
    assert rc == 0, error_of(events)
    lora = read_lora(out)
    assert set(lora.factors) == set(deltas)                       # unchanged layers are left out
    for module, d in deltas.items():
        got = lora.factors[module].delta()
        assert float((got - d).norm() / d.norm()) < 1e-4, module
    kept = {e["module"]: e["kept_energy"] for e in events if e["type"] == "progress" and e.get("kept_energy")}
    assert set(kept) == set(deltas) and min(kept.values()) > 0.99999
    s = summarize(out)
    assert s["version"] == "original" and s["rank"] == 4 and s["modules"] == len(deltas)
    with safe_open(str(out), "pt") as f:
        assert set(json.loads(f.metadata()["qis_kept_energy"])) == set(deltas)


def test_extract_at_lower_rank_reports_the_share(finetune, tmp_path):
    _, _, deltas = finetune
    rc, events = _extract(finetune, tmp_path / "r1.safetensors", 1)
    assert rc == 0, error_of(events)
    for e in events:
        if e["type"] == "progress" and e.get("kept_energy"):
            s = torch.linalg.svdvals(deltas[e["module"]])
            assert e["kept_energy"] == pytest.approx(float(s[0] ** 2 / (s ** 2).sum()), abs=1e-5)
            assert e["kept_energy"] < 0.999


def test_extract_refusals(finetune, demo_manifest, tmp_path):
    base, tuned, _ = finetune
    rc, events = run_inproc("extract_lora", "--model_org", base, "--model_tuned", demo_manifest["vae"],
                            "--save_to", tmp_path / "x.safetensors")
    assert rc == 2 and "not a Qwen-Image DiT" in error_of(events)["message"]
    rc, events = run_inproc("extract_lora", "--model_org", base, "--model_tuned", tuned, "--save_to", tuned)
    assert rc == 2 and "never overwrite" in error_of(events)["message"]
    rc, events = run_inproc("extract_lora", "--model_org", base, "--model_tuned", base, "--save_to",
                            tmp_path / "same.safetensors")
    assert rc == 2 and "no Linear weight differs" in error_of(events)["message"]
    rc, events = run_inproc("extract_lora", "--model_org", base, "--model_tuned", demo_manifest["dit"]["edit"],
                            "--save_to", tmp_path / "e.safetensors")
    assert rc == 2 and "edit-model DiT" in error_of(events)["message"]


@pytest.fixture(scope="module")
def big_lora(demo_manifest, tmp_path_factory):
    return make_lora(demo_manifest["dit"]["original"], tmp_path_factory.mktemp("rs") / "r8.safetensors", rank=8,
                     alpha=4.0, seed=3, metadata={"ss_base_model_version": "qwen_image", "sshs_model_hash": "x"})


def test_resize_to_a_fixed_rank_reports_the_error(big_lora, tmp_path):
    out = tmp_path / "r2.safetensors"
    rc, events = run_inproc("resize_lora", "--model", big_lora, "--save_to", out, "--new_rank", 2, "--device", "cpu")
    assert rc == 0, error_of(events)
    src, new = read_lora(big_lora), read_lora(out)
    reported = {e["module"]: e["error"] for e in events if e["type"] == "progress" and "error" in e}
    for module, f in src.factors.items():
        d, got = f.delta(), new.factors[module].delta()
        s = torch.linalg.svdvals(d)
        best = float((s[2:] ** 2).sum().sqrt() / s.norm())               # Eckart-Young: the best rank-2 error
        actual = float((got - d).norm() / d.norm())
        assert new.factors[module].tensors["down"].shape[0] == 2
        assert actual == pytest.approx(best, rel=1e-3, abs=1e-6) and reported[module] == pytest.approx(actual, abs=1e-5)
    s = summarize(out)
    assert s["rank"] == 2 and s["training"]["network dim"] == "2" and "file hash" not in s["training"]
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["qis_resize"])
    assert meta["max_error"] == pytest.approx(max(reported.values()), abs=1e-5)


def test_resize_by_kept_energy(big_lora, tmp_path):
    # a LoRA whose true rank is 2 inside rank-8 factors: sv_fro 0.999 finds rank 2 with ~0 error
    state = load_file(big_lora)
    for key in [k for k in state if k.endswith("lora_down.weight")]:
        state[key][2:] = 0
    padded = tmp_path / "padded.safetensors"
    save_file(state, padded)
    out = tmp_path / "dyn.safetensors"
    rc, events = run_inproc("resize_lora", "--model", padded, "--save_to", out, "--new_rank", 6,
                            "--dynamic_method", "sv_fro", "--dynamic_param", "0.999")
    assert rc == 0, error_of(events)
    ranks = {e["rank"] for e in events if e["type"] == "progress" and "rank" in e}
    errors = [e["error"] for e in events if e["type"] == "progress" and "error" in e]
    assert ranks == {2} and max(errors) < 1e-3
    rc, events = run_inproc("resize_lora", "--model", padded, "--save_to", tmp_path / "x.safetensors",
                            "--dynamic_method", "sv_fro")
    assert rc == 2 and "needs --dynamic_param" in error_of(events)["message"]
    rc, events = run_inproc("resize_lora", "--model", padded, "--save_to", padded)
    assert rc == 2 and "never overwrite" in error_of(events)["message"]
