"""The VRAM/RAM estimator (engine/vram): exact parameter counts, the seed's table, monotonic properties, the
measured activation constants, and the `estimate_vram` command."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.spec import config as C
from engine.spec.errors import OptionError
from engine.spec.vram import estimate, estimate_config, estimate_options
from engine.spec.vram import memory as M
from engine.spec.vram import params as P
from engine.spec.vram.estimate import workload_from_config
from engine.spec.vram.constants import CONSTANTS

ROOT = Path(__file__).resolve().parent.parent


def est(**values) -> dict:
    values.setdefault("for_command", "train_network")
    return estimate_config(C.from_dict(C.EstimateVramConfig, values))


# ------------------------------------------------------------------ parameter counts

def test_parameter_counts_from_config_dims_are_exact():
    assert P.dit_params() == 20_430_401_088
    assert P.dit_block_params() == 339_831_296
    assert P.text_encoder_params() == 8_292_166_656
    assert P.vae_params() == 126_892_531


def test_parameter_counts_match_the_real_classes_on_the_meta_device():
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from engine.models.dit import PUBLISHED_DIT_CONFIG
    from engine.models.text_encoder import PUBLISHED_TE_CONFIG
    from engine.models.vae import PUBLISHED_VAE_CONFIG

    def count(m):
        return sum(p.numel() for p in m.parameters())

    with torch.device("meta"):
        dit = QwenImageTransformer2DModel(**{k: v for k, v in PUBLISHED_DIT_CONFIG.items() if not k.startswith("_")})
        vae = AutoencoderKLQwenImage(**{k: v for k, v in PUBLISHED_VAE_CONFIG.items() if not k.startswith("_")})
        te = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**PUBLISHED_TE_CONFIG))
    assert count(dit) == P.dit_params()
    assert count(dit.transformer_blocks[0]) == P.dit_block_params()
    assert count(vae) == P.vae_params()
    assert count(vae.encoder) + count(vae.quant_conv) == P.vae_encoder_params()
    assert count(te) == P.text_encoder_params()
    assert count(te.model.visual) == P.vision_params()
    # the Linear list the estimator quantises, swaps and adapts is exactly the block's Linear modules
    block = dit.transformer_blocks[0]
    linears = {n: (m.in_features, m.out_features) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears == {l.name: (l.n_in, l.n_out) for l in P.dit_block_linears()}


# ------------------------------------------------------------------ the seed's table (musubi-tuner docs)

SEED_RUN = dict(mixed_precision="bf16", gradient_checkpointing=True, xformers=True, network_dim=16,
                optimizer_type="adamw8bit", resolution=[1024, 1024], batch_size=1, caches_ready=True)


SEED_TABLE = [
    ({}, 42),
    ({"fp8_base": True, "fp8_scaled": True}, 30),
    ({"fp8_base": True, "fp8_scaled": True, "blocks_to_swap": 16}, 24),
    ({"fp8_base": True, "fp8_scaled": True, "blocks_to_swap": 45}, 12),
]


def seed_table_estimate(options: dict) -> float:
    """The estimate of a seed row under the fp8 layout musubi-tuner had when the table was measured (modulation
    layers bf16, per-tensor scales: docs/vram-constants.md); our engine's layout is smaller."""
    cfg = estimate_options(C.EstimateVramConfig(), "train_network", **SEED_RUN, **options)
    return estimate(replace(workload_from_config(cfg), fp8_layout=M.SEED_TABLE_FP8))["vram_gib"]


def test_seed_table_rows_within_six_percent_mean_unbiased_and_never_half_a_gib_high():
    # The seed's run: its example command (rank 16, AdamW8bit) with the table's conditions. GB read as GiB.
    rows = [(seed_table_estimate(options), seed) for options, seed in SEED_TABLE]
    errors = [(vram - seed) / seed for vram, seed in rows]
    assert all(abs(e) <= 0.06 for e in errors), rows
    assert abs(sum(errors) / len(errors)) <= 0.03, rows
    assert all(vram - seed < 0.5 for vram, seed in rows), rows


def test_the_seed_layout_differs_from_the_engines_only_in_fp8_rows():
    assert seed_table_estimate({}) == est(**SEED_RUN)["vram_gib"]
    fp8 = estimate_options(C.EstimateVramConfig(), "train_network", **SEED_RUN, **SEED_TABLE[1][0])
    ours = workload_from_config(fp8)
    seed = replace(ours, fp8_layout=M.SEED_TABLE_FP8)
    # ours: modulation in 1 byte + a bf16 scale per 64 inputs, the rest's scales per 64 inputs too;
    # the table's: modulation in bf16, one scale per tensor (12 quantised Linears per block)
    mod, rest = M.MODULATION_WEIGHTS, M.BLOCK_WEIGHTS - M.MODULATION_WEIGHTS
    expected = 60 * (mod * (2 - 1 - 2 / 64) - rest * 2 / 64 + 12 * 2)
    assert M.dit_bytes(seed) - M.dit_bytes(ours) == pytest.approx(expected, abs=64)


# ------------------------------------------------------------------ monotonic properties

train_runs = st.fixed_dictionaries({
    "for_command": st.sampled_from(["train_network", "train"]),
    "resolution": st.tuples(st.integers(16, 96), st.integers(16, 96)).map(lambda t: [16 * t[0], 16 * t[1]]),
    "batch_size": st.integers(1, 4),
    "network_dim": st.integers(1, 128),
    "fp8_base": st.booleans(),
    "blocks_to_swap": st.integers(0, 58),
    "gradient_checkpointing": st.booleans(),
    "gradient_checkpointing_cpu_offload": st.booleans(),
    "optimizer_type": st.sampled_from(["AdamW", "AdamW8bit", "Adafactor"]),
    "full_bf16": st.booleans(),
    "fused_backward_pass": st.booleans(),
    "mixed_precision": st.sampled_from(["no", "bf16"]),
    "fp8_vl": st.booleans(),
    "caches_ready": st.booleans(),
    "model_version": st.sampled_from(["original", "edit", "edit-2509"]),
})


def _fp8_scaled(run: dict) -> dict:
    return dict(run, fp8_scaled=run["fp8_base"])


@settings(max_examples=40, deadline=None)
@given(train_runs, st.integers(1, 10))
def test_more_swapped_blocks_never_need_more_vram(run, more):
    run = _fp8_scaled(run)
    more_swap = dict(run, blocks_to_swap=min(59, run["blocks_to_swap"] + more))
    assert est(**more_swap)["vram_gib"] <= est(**run)["vram_gib"]


@settings(max_examples=40, deadline=None)
@given(train_runs)
def test_checkpointing_never_needs_more_vram(run):
    run = _fp8_scaled(run)
    assert est(**dict(run, gradient_checkpointing=True))["vram_gib"] <= \
        est(**dict(run, gradient_checkpointing=False))["vram_gib"]


@settings(max_examples=40, deadline=None)
@given(train_runs)
def test_fp8_never_needs_more_vram_with_checkpointing(run):
    # Without checkpointing fp8 keeps a bf16 copy of every block's weights for backward, so there it can cost
    # more (the estimate says so in its notes); with checkpointing only one block's copy is alive. That copy is
    # what fp8 can never save: once nearly every block is swapped out (56+ of 60), the halved resident weights
    # (a few blocks; the swapped blocks' scales stay on the GPU, as in musubi) are worth less than it, so fp8
    # may then cost up to that copy (and the in-flight dequantised Linear) more. Where a preset swaps (<= 48) fp8
    # always saves.
    from engine.spec.vram.memory import BF16, BLOCK_WEIGHTS, LARGEST_LINEAR

    run = dict(run, gradient_checkpointing=True)
    fp8 = est(**dict(run, fp8_base=True, fp8_scaled=True))["vram_gib"]
    plain = est(**dict(run, fp8_base=False, fp8_scaled=False))["vram_gib"]
    if run["blocks_to_swap"] <= 55:
        assert fp8 <= plain
    else:
        assert fp8 <= plain + (BLOCK_WEIGHTS + 2 * LARGEST_LINEAR) * BF16 / 2**30


@settings(max_examples=40, deadline=None)
@given(train_runs, st.integers(1, 64))
def test_smaller_rank_never_needs_more_vram(run, less):
    run = dict(_fp8_scaled(run), for_command="train_network")
    smaller = dict(run, network_dim=max(1, run["network_dim"] - less))
    assert est(**smaller)["vram_gib"] <= est(**run)["vram_gib"]


@settings(max_examples=40, deadline=None)
@given(train_runs, st.integers(0, 8), st.integers(0, 8))
def test_smaller_image_never_needs_more_vram(run, dw, dh):
    run = _fp8_scaled(run)
    w, h = run["resolution"]
    smaller = dict(run, resolution=[max(16, w - 16 * dw), max(16, h - 16 * dh)])
    assert est(**smaller)["vram_gib"] <= est(**run)["vram_gib"]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 80), st.integers(1, 80), st.booleans(), st.integers(0, 58), st.booleans())
def test_generation_is_monotonic_in_size_swap_and_fp8(w, h, fp8, swap, te_cpu):
    run = dict(for_command="generate_image", image_size=[16 * h, 16 * w], fp8=fp8, fp8_scaled=fp8,
               blocks_to_swap=swap, text_encoder_cpu=te_cpu)
    base = est(**run)["vram_gib"]
    assert est(**dict(run, blocks_to_swap=min(59, swap + 1)))["vram_gib"] <= base
    assert est(**dict(run, fp8=True, fp8_scaled=True))["vram_gib"] <= base
    assert est(**dict(run, image_size=[max(16, 16 * h - 16), 16 * w]))["vram_gib"] <= base
    assert est(**dict(run, text_encoder_cpu=True))["vram_gib"] <= base


# ------------------------------------------------------------------ the measured constants reproduce a measurement

def _measure_module():
    spec = importlib.util.spec_from_file_location("measure_activations", ROOT / "benchmarks/measure_activations.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("checkpoint", [False, True])
def test_activation_constants_reproduce_a_cpu_measurement(checkpoint):
    m = _measure_module()
    k = {n: c.value for n, c in CONSTANTS.items()}
    r = m.measure_block(heads=2, img_tokens=192, txt_tokens=24, blocks=2, checkpoint=checkpoint)
    unit = (r["img_tokens"] + r["txt_tokens"]) * r["dim"] * r["elem_bytes"]
    if checkpoint:
        saved, backward = k["ckpt_saved_units"], k["ckpt_backward_units"]
    else:
        saved, backward = k["act_saved_units"], k["act_backward_units"]
    predicted = (r["blocks"] * saved + backward) * unit
    assert abs(predicted - r["backward_peak_bytes"]) / r["backward_peak_bytes"] <= 0.15, (predicted, r)


def test_inference_and_vae_constants_reproduce_a_cpu_measurement():
    m = _measure_module()
    k = {n: c.value for n, c in CONSTANTS.items()}
    r = m.measure_block_inference(heads=2, img_tokens=192, txt_tokens=24)
    predicted = k["infer_forward_units"] * (192 + 24) * r["dim"] * 2
    assert abs(predicted - r["peak_bytes"]) / r["peak_bytes"] <= 0.15, (predicted, r)
    for decode, name in ((False, "vae_encode_units"), (True, "vae_decode_units")):
        v = m.measure_vae(base_dim=8, size=48, decode=decode)
        predicted = k[name] * 48 * 48 * 8 * 2
        assert abs(predicted - v["peak_bytes"]) / v["peak_bytes"] <= 0.15, (name, predicted, v)


# ------------------------------------------------------------------ structure of the estimate

def test_peak_is_the_maximum_phase_and_parts_add_up():
    e = est(**dict(SEED_RUN, fp8_base=True, fp8_scaled=True, blocks_to_swap=16, caches_ready=False))
    assert e["vram_gib"] == max(p["vram_gib"] for p in e["phases"].values())
    assert e["ram_gib"] == max(p["ram_gib"] for p in e["phases"].values())
    # the headline is the training run; each caching command is its own row
    assert set(e["phases"]) == {"load", "training_step", "saving"}
    assert set(e["commands"]) == {"cache_latents", "cache_text_encoder_outputs"}
    assert e["commands"]["cache_text_encoder_outputs"]["fp8_vl"] is False
    assert set(e["parts"]) == {"weights", "lora_and_optimizer", "gradients", "activations", "block_swap_buffers",
                               "workspace"}
    assert abs(sum(e["parts"].values()) - e["vram_gib"]) < 0.01
    assert e["inputs"]["image_tokens"] == 64 * 64 and e["inputs"]["blocks_on_gpu"] == 44


def test_fp8_scaled_weights_cost_one_byte_plus_a_bf16_scale_per_64_inputs():
    bf16 = est(**SEED_RUN)["phases"]["load"]["parts"]["weights"]
    fp8 = est(**SEED_RUN, fp8_base=True, fp8_scaled=True)["phases"]["load"]["parts"]["weights"]
    weights = sum(l.n_in * l.n_out for l in P.dit_block_linears()) * 60
    expected_saving = weights * (2 - 1 - 2 / 64) / 1024 ** 3
    assert abs((bf16 - fp8) - expected_saving) < 0.01


def test_edit_controls_add_image_and_vision_tokens():
    t2i = est(**SEED_RUN)["inputs"]
    edit = est(**SEED_RUN, model_version="edit")["inputs"]
    plus = est(**SEED_RUN, model_version="edit-2509", num_control_images=2)["inputs"]
    assert edit["dit_tokens"] - t2i["dit_tokens"] == 4096 + 1024 * 1024 // 784
    assert plus["dit_tokens"] - t2i["dit_tokens"] == 2 * (4096 + 384 * 384 // 784)
    with pytest.raises(OptionError, match="num_control_images"):
        est(**SEED_RUN, num_control_images=1)


def test_caching_phase_needs_fp8_vl_below_16_gib():
    run = dict(SEED_RUN, fp8_base=True, fp8_scaled=True, blocks_to_swap=45, caches_ready=False)
    assert est(**run)["commands"]["cache_text_encoder_outputs"]["vram_gib"] > 15
    with_fp8 = est(**dict(run, fp8_vl=True))["commands"]["cache_text_encoder_outputs"]
    assert with_fp8["vram_gib"] < 10 and with_fp8["fp8_vl"] is True


def test_block_swap_moves_weights_to_ram():
    a = est(**SEED_RUN, fp8_base=True, fp8_scaled=True)
    b = est(**SEED_RUN, fp8_base=True, fp8_scaled=True, blocks_to_swap=30)
    moved = a["phases"]["training_step"]["parts"]["weights"] - b["phases"]["training_step"]["parts"]["weights"]
    ram = b["phases"]["training_step"]["ram_gib"] - a["phases"]["training_step"]["ram_gib"]
    assert moved > 9 and ram >= moved


def test_invalid_options_are_refused_with_a_hint():
    with pytest.raises(OptionError, match="blocks_to_swap 60"):
        est(blocks_to_swap=60)
    with pytest.raises(OptionError, match="fp8_base"):
        est(fp8_scaled=True)
    with pytest.raises(OptionError, match="multiple of 16"):
        est(resolution=[1000, 1024])


# ------------------------------------------------------------------ the command and the no-torch promise

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "engine", "estimate_vram", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_cli_prints_one_json_object_and_accepts_both_fp8_spellings():
    a = _cli("--for", "generate_image", "--fp8", "--fp8_scaled", "--image_size", "1024", "1024")
    b = _cli("--for", "generate_image", "--fp8_base", "--fp8_scaled", "--image_size", "1024", "1024")
    assert a.returncode == 0, a.stderr
    result = json.loads(a.stdout)  # the whole stdout is one JSON document
    assert {"vram_gib", "ram_gib", "phases", "parts", "peak_phase"} <= set(result)
    assert result["peak_phase"] == "denoising" and result["vram_gib"] < 24
    assert json.loads(b.stdout) == result
    events = [json.loads(line) for line in a.stderr.splitlines() if line.startswith("{")]
    assert [e["type"] for e in events if e["type"] in ("start", "estimate", "done")] == ["start", "estimate", "done"]


def test_cli_error_is_an_error_event_and_exit_2():
    proc = _cli("--for", "train_network", "--blocks_to_swap", "70")
    assert proc.returncode == 2 and proc.stdout == ""
    assert any('"error"' in line and "blocks_to_swap" in line for line in proc.stderr.splitlines())


def test_estimator_and_presets_do_not_import_torch():
    code = ("import sys, engine.spec.vram, engine.spec.presets\n"
            "engine.spec.presets.estimate_preset(engine.spec.presets.list_presets()[0])\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_constants_doc_lists_every_constant_with_its_value():
    from engine.spec.vram.constants import markdown_table

    doc = (ROOT / "docs/vram-constants.md").read_text(encoding="utf-8")
    assert markdown_table() in doc, "docs/vram-constants.md: paste engine.spec.vram.constants.markdown_table() output"


def test_commands_own_configs_estimate_directly():
    # train_network / train / generate_image can call engine.spec.vram.estimate_config(cfg) on their own config
    lora = estimate_config(C.TrainNetworkConfig(mixed_precision="bf16", gradient_checkpointing=True))
    assert lora["command"] == "train_network" and lora["inputs"]["width"] == 1024
    full = estimate_config(C.TrainConfig(full_bf16=True, mixed_precision="bf16", gradient_checkpointing=True,
                                         optimizer_type="Adafactor", fused_backward_pass=True))
    assert full["command"] == "train" and full["inputs"]["trainable_params"] == P.dit_params()
    gen = estimate_config(C.GenerateImageConfig(image_size=[768, 1024], fp8=True, fp8_scaled=True))
    assert gen["command"] == "generate_image" and gen["inputs"]["image_tokens"] == 48 * 64
    assert gen == est(for_command="generate_image", image_size=[768, 1024], fp8_base=True, fp8_scaled=True)


# ------------------------------------------------------------------ moments of a step, FSDP

def test_a_step_peak_is_the_largest_moment_not_the_sum_of_all():
    # LoRA with checkpointing: at the start of the backward all block inputs are kept and no gradient exists yet;
    # at its end every gradient exists and the inputs are gone. The peak holds the larger, not both.
    step = est(**SEED_RUN)["phases"]["training_step"]
    assert step["moment"] == "backward" and step["parts"]["gradients"] == 0
    accumulating = est(**SEED_RUN, gradient_accumulation_steps=2)["phases"]["training_step"]
    assert accumulating["parts"]["gradients"] > 0.5          # earlier micro-batches' gradients are held


def test_fsdp_shards_a_full_finetune_per_gpu():
    run = dict(SEED_RUN, for_command="train", optimizer_type="AdamW", full_bf16=True)
    one, eight = est(**run), est(**run, num_gpus=8)
    assert one["vram_gib"] > 150 and eight["vram_gib"] < one["vram_gib"] / 5
    w1, w8 = (e["phases"]["training_step"]["parts"]["weights"] for e in (one, eight))
    assert w8 == pytest.approx(w1 / 8, rel=1e-3)
    with pytest.raises(OptionError, match="num_gpus"):
        est(**SEED_RUN, num_gpus=2)                          # LoRA is data-parallel, not sharded
    with pytest.raises(OptionError, match="blocks_to_swap"):
        est(**run, num_gpus=2, blocks_to_swap=10)
