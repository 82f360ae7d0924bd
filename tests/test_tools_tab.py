"""The Tools tab: the LoRA summary it shares with the Generate tab's picker (no browser), and one conversion run
from the tab in a real browser."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from _app_util import browser_page, studio  # noqa: F401  (studio is a fixture)
from _lora_tools_util import make_lora
from app.tabs.tools import inspect_markdown


@pytest.fixture
def comfy_lora(demo_manifest, tmp_path):
    """A ComfyUI-layout LoRA (diffusion_model.* lora_A/lora_B + alpha) for the demo DiT."""
    kohya = make_lora(demo_manifest["dit"]["original"], tmp_path / "k.safetensors", layers=("attn.to_q",),
                      metadata={"ss_base_model_version": "qwen_image", "ss_steps": "77"})
    state = {}
    for key, t in load_file(kohya).items():
        stem, _, part = key.partition(".")
        module = "diffusion_model." + stem.removeprefix("lora_unet_").replace("transformer_blocks_", "transformer_blocks.") \
            .replace("_attn_to_q", ".attn.to_q")
        state[f"{module}.{ {'lora_down.weight': 'lora_A.weight', 'lora_up.weight': 'lora_B.weight'}.get(part, part)}"] = t
    path = tmp_path / "comfy_lora.safetensors"
    save_file(state, path, metadata={"ss_base_model_version": "qwen_image", "ss_steps": "77"})
    return path


def test_summary_markdown_and_refusal(comfy_lora, tmp_path):
    md = inspect_markdown(str(comfy_lora))
    assert "| format | comfyui |" in md and "| steps | 77 |" in md and "Qwen-Image" in md
    assert inspect_markdown("  \n", empty="") == ""
    flux = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(2, 4)}, flux)
    assert "Flux LoRA" in inspect_markdown(str(flux)) and "**Fix:**" in inspect_markdown(str(flux))


@pytest.mark.browser
def test_convert_from_the_tools_tab(studio, comfy_lora, tmp_path):
    from playwright.sync_api import expect

    out = tmp_path / "converted_kohya.safetensors"
    with browser_page() as page:
        page.goto(studio["open_url"])
        page.get_by_role("tab", name="Tools").click()
        page.locator("#tools-convert_lora-input textarea, #tools-convert_lora-input input").first.fill(str(comfy_lora))
        page.locator("#tools-convert_lora-output textarea, #tools-convert_lora-output input").first.fill(str(out))
        page.locator("#tools-convert_lora-run").click()
        expect(page.locator("#tools-command textarea, #tools-command input").first).to_have_value(
            re.compile(re.escape(f" convert_lora --input {comfy_lora} --output {out}") + "$"), timeout=30_000)
        result = page.locator("#tools-result")
        expect(result).to_contain_text("Wrote", timeout=120_000)
        expect(result).to_contain_text("kohya")
        page.locator("#tools-inspect-files textarea").fill(str(out))
        page.locator("#tools-inspect").click()
        expect(page.locator("#tools-inspect-report")).to_contain_text("converted_kohya.safetensors")
    state = load_file(out)
    assert "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight" in state and len(state) == 6


def test_merge_and_extract_estimates_follow_the_largest_layer(demo_manifest, comfy_lora, tmp_path):
    """The estimate comes from headers (no torch) and follows the largest Linear, not the number of blocks."""
    from pathlib import Path

    from engine.spec import config as C
    from engine.spec.safetensors_header import Header, TensorInfo
    from engine.spec.vram.tools import estimate_extract, estimate_merge, estimate_tool

    def dit_header(blocks: int) -> Header:     # the 20B DiT's largest Linear: img_mod.1, 18432 x 3072 bf16
        n = 18432 * 3072
        tensors = {f"transformer_blocks.{b}.img_mod.1.weight": TensorInfo("BF16", (18432, 3072), 0, 2 * n)
                   for b in range(blocks)}
        return Header(Path("dit.safetensors"), tensors)

    numel, gib = 18432 * 3072, 2 ** 30
    small, big = estimate_merge([dit_header(2)], [comfy_lora], True), estimate_merge([dit_header(60)], [comfy_lora],
                                                                                     True)
    assert small == big                                         # streamed: 60 blocks cost what 2 cost
    assert big["parts"]["weights"] == pytest.approx(numel * (2 + 4) / gib, abs=1e-3)
    assert big["vram_gib"] == pytest.approx(numel * 18 / gib + 0.53, abs=0.1)      # ~1.0 GiB + CUDA context
    extract = estimate_extract([dit_header(60)], [dit_header(60)], True)
    assert extract["vram_gib"] == pytest.approx(numel * 24 / gib + 0.53, abs=0.1)
    cpu = estimate_merge([dit_header(60)], [comfy_lora], False)
    assert cpu["vram_gib"] == 0 and cpu["ram_gib"] == pytest.approx(big["ram_gib"] + big["vram_gib"] - 0.53, abs=0.1)
    # from a config, as the Tools tab asks before starting a job
    dit = demo_manifest["dit"]["original"]
    assert estimate_tool("merge_lora", C.MergeLoraConfig(dit=dit, lora_weight=[str(comfy_lora)]))["vram_gib"] > 0
    assert estimate_tool("convert_lora", C.ConvertLoraConfig()) is None
    with pytest.raises(Exception, match="--model_org is required"):
        estimate_tool("extract_lora", C.ExtractLoraConfig(model_tuned=dit))
