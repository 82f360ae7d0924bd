"""LoRA files in every layout give the same merged DiT; our kohya file loads in diffusers with the same result;
our keys follow ComfyUI's key rules; LoRAs for other model families are refused with a clear error."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from _dit_util import dit_inputs, run, tiny_dit
from engine.spec.errors import ModelFileError
from engine.models.lora_formats import LoraMerger, merge_loras, module_path_from_kohya, read_lora
from engine.train.lora import create_network


@pytest.fixture(scope="module")
def trained():
    """A tiny DiT and a LoRA network (rank 4, alpha 2: scale 0.5) with random non-zero up weights."""
    dit = tiny_dit()
    net = create_network(dit, dim=4, alpha=2.0)
    torch.manual_seed(3)
    for m in net.loras:
        torch.nn.init.normal_(m.lora_up.weight, std=0.5)
    return dit, net


def _lora_output(dit, net, mult=1.0):
    net.set_multiplier(mult)
    net.apply_to()
    try:
        with torch.no_grad():
            return run(dit, dit_inputs())
    finally:
        net.remove()
        net.set_multiplier(1.0)


def _merged_output(dit, loras):
    merged = copy.deepcopy(dit)
    merge_loras(merged, loras)
    with torch.no_grad():
        return run(merged, dit_inputs()), merged


def _write_formats(net, folder):
    """The same LoRA written in each layout we read; returns {format: path}."""
    kohya = folder / "kohya.safetensors"
    net.save_weights(kohya)
    diffusers = folder / "diffusers.safetensors"
    net.save_diffusers(diffusers)
    comfy, diffsynth, peft, peft_state = {}, {}, {}, {}
    for m in net.loras:
        path = net._module_paths[m.lora_name]
        down, up = m.lora_down.weight.detach().clone(), m.lora_up.weight.detach().clone()
        comfy[f"diffusion_model.{path}.lora_A.weight"] = down
        comfy[f"diffusion_model.{path}.lora_B.weight"] = up
        comfy[f"diffusion_model.{path}.alpha"] = m.alpha.clone()
        root = math.sqrt(m.scale)                  # DiffSynth: no alpha key, scale baked into the factors
        diffsynth[f"diffusion_model.{path}.lora_A.default.weight"] = down * root
        diffsynth[f"diffusion_model.{path}.lora_B.default.weight"] = up * root
        peft_state[f"transformer.{path}.lora_A.weight"] = down
        peft_state[f"transformer.{path}.lora_B.weight"] = up
    save_file(comfy, folder / "comfy.safetensors")
    save_file(diffsynth, folder / "diffsynth.safetensors")
    # PEFT with lora_alpha != r: alpha lives only in the metadata (diffusers' save_lora_weights layout).
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 2.0})}
    save_file(peft_state, folder / "peft.safetensors", metadata=meta)
    return {"kohya": kohya, "diffusers": diffusers, "comfyui": folder / "comfy.safetensors",
            "diffsynth": folder / "diffsynth.safetensors", "peft_alpha": folder / "peft.safetensors"}


def test_every_format_gives_the_same_dit(trained, tmp_path):
    dit, net = trained
    reference = _lora_output(dit, net)
    with torch.no_grad():
        base = run(dit, dit_inputs())
    assert (reference - base).abs().max() > 1e-2          # the LoRA really changes the output
    merged_weights = None
    for fmt, path in _write_formats(net, tmp_path).items():
        lora = read_lora(path)
        assert len(lora) == 28, fmt
        out, merged = _merged_output(dit, [(lora, 1.0)])
        torch.testing.assert_close(out, reference, atol=2e-5, rtol=1e-4, msg=fmt)
        weights = merged.state_dict()
        if merged_weights is None:
            merged_weights = weights
        for k, v in weights.items():
            torch.testing.assert_close(v, merged_weights[k], atol=1e-6, rtol=1e-5, msg=f"{fmt} {k}")
    assert read_lora(tmp_path / "kohya.safetensors").format == "kohya"
    assert read_lora(tmp_path / "diffusers.safetensors").format == "diffusers"


def test_multipliers_and_several_loras(trained, tmp_path):
    dit, net = trained
    paths = _write_formats(net, tmp_path)
    a, b = read_lora(paths["kohya"]), read_lora(paths["comfyui"])
    out, _ = _merged_output(dit, [(a, 0.25), (b, 0.5)])
    torch.testing.assert_close(out, _lora_output(dit, net, 0.75), atol=2e-5, rtol=1e-4)
    out, _ = _merged_output(dit, [(a, 1.0), (b, -1.0)])
    with torch.no_grad():
        torch.testing.assert_close(out, run(dit, dit_inputs()), atol=2e-5, rtol=1e-4)


def test_file_is_not_modified_and_model_checked_first(trained, tmp_path):
    dit, net = trained
    path = _write_formats(net, tmp_path)["kohya"]
    before = path.read_bytes()
    other = tiny_dit(num_layers=1)
    untouched = copy.deepcopy(other.state_dict())
    with pytest.raises(ModelFileError, match="transformer_blocks.1"):
        merge_loras(other, [(read_lora(path), 1.0)])
    for k, v in other.state_dict().items():       # all-or-nothing: nothing merged before the error
        assert torch.equal(v, untouched[k])
    assert path.read_bytes() == before


def test_load_time_transform_matches_merge(trained, tmp_path):
    from engine.models.dit import load_dit

    dit, net = trained
    dit_file = tmp_path / "dit.safetensors"
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dit.config.items() if not k.startswith("_")}
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, dit_file,
              metadata={"config": json.dumps(config)})
    lora = read_lora(_write_formats(net, tmp_path)["kohya"])
    merger = LoraMerger([(lora, 0.7)])
    loaded = load_dit(dit_file, device="cpu", transform=merger.transform)
    merger.check_all_used()
    _, merged = _merged_output(dit, [(lora, 0.7)])
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, atol=1e-6, rtol=1e-5, msg=k)
    with pytest.raises(ModelFileError, match="not in the DiT"):
        LoraMerger([(lora, 1.0)]).check_all_used()


def test_our_kohya_and_diffusers_files_load_in_diffusers(trained, tmp_path):
    """diffusers' own load_lora_weights on a QwenImagePipeline reproduces our engine's LoRA output."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    dit, net = trained
    paths = _write_formats(net, tmp_path)
    reference = _lora_output(dit, net)
    for fmt in ("kohya", "diffusers"):
        pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                 tokenizer=None, transformer=copy.deepcopy(dit))
        pipe.load_lora_weights(str(paths[fmt]), adapter_name="ours")
        with torch.no_grad():
            out = run(pipe.transformer, dit_inputs())
        torch.testing.assert_close(out, reference, atol=2e-5, rtol=1e-4, msg=fmt)


def _comfy_unet_key_map(dit) -> dict[str, str]:
    """ComfyUI's comfy/lora.py model_lora_keys_unet for QwenImage:
    {key}, transformer.{key}, diffusion_model.{key}, lora_unet_{key_} for every `<key>.weight`."""
    key_map = {}
    for k in dit.state_dict():
        if k.endswith(".weight"):
            key = k[: -len(".weight")]
            for name in (key, f"transformer.{key}", f"diffusion_model.{key}", "lora_unet_" + key.replace(".", "_")):
                key_map[name] = k
    return key_map


def test_our_keys_follow_comfyui_rules(trained, tmp_path):
    """Static check: every key of our files is `<mapped name><accepted suffix>`; kohya keeps `.alpha` next to
    lora_up/lora_down; the diffusers file has no `.alpha` (ComfyUI's scale 1.0 is then right: alpha baked in)."""
    from safetensors import safe_open

    dit, net = trained
    paths = _write_formats(net, tmp_path)
    key_map = _comfy_unet_key_map(dit)
    rules = {"kohya": (".lora_up.weight", ".lora_down.weight", ".alpha"),
             "diffusers": (".lora_B.weight", ".lora_A.weight")}
    for fmt, suffixes in rules.items():
        with safe_open(str(paths[fmt]), "pt") as f:
            keys = list(f.keys())
        names = {}
        for key in keys:
            suffix = next((s for s in suffixes if key.endswith(s)), None)
            assert suffix, f"{fmt}: {key} has no suffix ComfyUI accepts"
            name = key[: -len(suffix)]
            assert name in key_map, f"{fmt}: {name} is not in ComfyUI's key map"
            names.setdefault(name, set()).add(suffix)
        assert all(s == set(suffixes) for s in names.values()), fmt
        assert len(names) == 28
    assert module_path_from_kohya("transformer_blocks_0_attn_to_out_0") == "transformer_blocks.0.attn.to_out.0"
    assert module_path_from_kohya("transformer_blocks_7_img_mlp_net_0_proj") == "transformer_blocks.7.img_mlp.net.0.proj"


def test_loha_and_lokr(tmp_path):
    """LyCORIS LoHa/LoKr keys (musubi names) with ComfyUI's scale rule."""
    dit = tiny_dit()
    g = torch.Generator().manual_seed(0)
    w1a, w1b, w2a, w2b = (torch.randn(s, generator=g) for s in ((32, 4), (4, 32), (32, 4), (4, 32)))
    save_file({"lora_unet_transformer_blocks_0_attn_to_q.hada_w1_a": w1a,
               "lora_unet_transformer_blocks_0_attn_to_q.hada_w1_b": w1b,
               "lora_unet_transformer_blocks_0_attn_to_q.hada_w2_a": w2a,
               "lora_unet_transformer_blocks_0_attn_to_q.hada_w2_b": w2b,
               "lora_unet_transformer_blocks_0_attn_to_q.alpha": torch.tensor(2.0)}, tmp_path / "loha.safetensors")
    k1, k2a, k2b = torch.randn(4, 4, generator=g), torch.randn(48, 2, generator=g), torch.randn(2, 8, generator=g)
    save_file({"lora_unet_transformer_blocks_1_img_mod_1.lokr_w1": k1,
               "lora_unet_transformer_blocks_1_img_mod_1.lokr_w2_a": k2a,
               "lora_unet_transformer_blocks_1_img_mod_1.lokr_w2_b": k2b,
               "lora_unet_transformer_blocks_1_img_mod_1.alpha": torch.tensor(1.0)}, tmp_path / "lokr.safetensors")
    loha, lokr = read_lora(tmp_path / "loha.safetensors"), read_lora(tmp_path / "lokr.safetensors")
    assert (loha.format, lokr.format) == ("loha", "lokr")
    merged = copy.deepcopy(dit)
    merge_loras(merged, [(loha, 1.0), (lokr, 0.5)])
    q = dit.transformer_blocks[0].attn.to_q.weight + (w1a @ w1b) * (w2a @ w2b) * (2.0 / 4)
    mod = dit.transformer_blocks[1].img_mod[1].weight + 0.5 * torch.kron(k1, k2a @ k2b) * (1.0 / 2)
    torch.testing.assert_close(merged.transformer_blocks[0].attn.to_q.weight, q)
    torch.testing.assert_close(merged.transformer_blocks[1].img_mod[1].weight, mod)


@pytest.mark.parametrize("keys, family", [
    (["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], "Flux"),
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "SDXL"),
    (["lora_unet_blocks_0_self_attn_q.lora_down.weight"], "Wan"),
    (["diffusion_model.blocks.3.cross_attn.k.lora_A.weight"], "Wan"),
])
def test_other_family_is_refused(tmp_path, keys, family):
    path = tmp_path / "foreign.safetensors"
    save_file({k: torch.zeros(4, 8) for k in keys}, path)
    with pytest.raises(ModelFileError) as err:
        read_lora(path)
    assert family in err.value.message and str(path) in err.value.message


def test_unknown_keys_and_missing_factor(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file({"something.weight": torch.zeros(2)}, path)
    with pytest.raises(ModelFileError, match="name no Qwen-Image Linear"):
        read_lora(path)
    save_file({"lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight": torch.zeros(4, 32)}, path)
    with pytest.raises(ModelFileError, match="lacks up"):
        read_lora(path)
