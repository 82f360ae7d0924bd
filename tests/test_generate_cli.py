"""generate_image behaviour on the demo model set: inpaint mask, RCM, refusals, batch mode, outputs and metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _generate_util import error_of, outputs_of, run_generate
from engine.infer.outputs import read_parameters

SIZE = 32   # output and control: 32x32 px (2x2 tokens) keeps every run a few seconds on CPU


@pytest.fixture(scope="module")
def base(demo_manifest):
    m = demo_manifest
    return ["--dit", m["dit"]["edit-2509"], "--vae", m["vae"], "--text_encoder", m["text_encoder"], "--tokenizer",
            m["tokenizer"], "--model_version", "edit-2509", "--device", "cpu", "--infer_steps", "4",
            "--guidance_scale", "2.0", "--negative_prompt", " ", "--image_size", str(SIZE), str(SIZE)]


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    rng = np.random.default_rng(0)
    arr = np.clip(rng.normal(128, 40, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("ctl") / "room.png"
    Image.fromarray(arr).save(path)
    return str(path)


def _mask(tmp_path, name, top, bottom):
    arr = np.zeros((SIZE, SIZE, 3), np.uint8)
    arr[:SIZE // 2], arr[SIZE // 2:] = top, bottom
    path = tmp_path / f"{name}.png"
    Image.fromarray(arr).save(path)
    return str(path)


def _gen(base, control, tmp_path, name, *extra, seed=5, latent=False):
    out = ["--output_type", "latent_images"] if latent else []
    rc, events = run_generate([*base, "--prompt", "make the wall blue", "--control_image_path", control,
                               "--resize_control_to_image_size", "--seed", str(seed),
                               "--save_path", str(tmp_path / name), *out, *extra], tmp_path / f"{name}.jsonl")
    assert rc == 0, [e for e in events if e["type"] in ("error", "log")][-3:]
    png = [p for p in outputs_of(events) if p.endswith(".png")][0]
    return np.asarray(Image.open(png), dtype=np.float32), events


def test_mask_white_black_half(base, control, tmp_path):
    plain, _ = _gen(base, control, tmp_path, "plain", seed=1)
    white, _ = _gen(base, control, tmp_path, "white", "--mask_path", _mask(tmp_path, "w", 255, 255), seed=1)
    assert np.array_equal(white, plain)                        # all white = change everything = unmasked

    black = _mask(tmp_path, "b", 0, 0)
    black_a, ev_black = _gen(base, control, tmp_path, "black_a", "--mask_path", black, seed=1, latent=True)
    black_b, _ = _gen(base, control, tmp_path, "black_b", "--mask_path", black, seed=2)
    free_b, _ = _gen(base, control, tmp_path, "free_b", seed=2)
    seed_effect_masked = np.abs(black_a - black_b).mean()
    seed_effect_free = np.abs(plain - free_b).mean()
    print(f"seed effect: masked {seed_effect_masked:.2f}, unmasked {seed_effect_free:.2f} (/255)")
    assert seed_effect_masked < 0.25 * seed_effect_free       # only the last 2 % of noise + the model remain

    # half mask, compared in latent space (the tiny VAE decoder mixes the halves of a 32-px image)
    _, ev_half = _gen(base, control, tmp_path, "half", "--mask_path", _mask(tmp_path, "h", 255, 0), seed=1,
                      latent=True)
    half_lat, black_lat = (_latent(ev) for ev in (ev_half, ev_black))
    rows = half_lat.shape[-2]
    kept_diff = (half_lat - black_lat)[..., rows // 2:, :].abs().mean()
    changed_diff = (half_lat - black_lat)[..., :rows // 2, :].abs().mean()
    print(f"half mask latents: kept half {kept_diff:.4f}, changed half {changed_diff:.4f}")
    assert kept_diff < 0.1 * changed_diff


def _latent(events):
    from engine.infer.outputs import load_latent

    return load_latent([p for p in outputs_of(events) if p.endswith(".safetensors")][0])[0]


def test_rcm_zero_threshold_is_plain_and_debug_masks(base, control, tmp_path):
    plain, _ = _gen(base, control, tmp_path, "plain")
    rcm, events = _gen(base, control, tmp_path, "rcm", "--rcm_threshold", "0", "--rcm_debug_save")
    assert np.array_equal(rcm, plain)
    masks = sorted(p.name for p in (tmp_path / "rcm").glob("*_rcm_mask_*.png"))
    assert masks == [f"room_th0.0_rel0_ks3_ds0_rcm_mask_{i:02d}.png" for i in (1, 2, 3)]   # steps after the first
    assert Image.open(tmp_path / "rcm" / masks[0]).size == (SIZE // 16, SIZE // 16)
    mask_events = [e for e in events if e["type"] == "image" and e.get("kind") == "rcm_mask"]
    assert [e["step"] for e in mask_events] == [1, 2, 3]
    strict, _ = _gen(base, control, tmp_path, "strict", "--rcm_threshold", "0.5", "--rcm_relative_threshold")
    assert not np.array_equal(strict, plain)


def test_previews_are_side_work(base, control, tmp_path):
    """--preview_every 1 on 4 steps: previews after steps 1, 2 and 3 (not the last: that one is the output), each
    announced as an image event of kind "preview", none among the outputs, and the output bit-identical."""
    plain, _ = _gen(base, control, tmp_path, "plain", "--mask_path", _mask(tmp_path, "h", 255, 0))
    shown, events = _gen(base, control, tmp_path, "shown", "--mask_path", _mask(tmp_path, "h", 255, 0),
                         "--preview_every", "1")
    assert np.array_equal(shown, plain)
    previews = [e for e in events if e["type"] == "image" and e.get("kind") == "preview"]
    assert [(e["step"], e["total"], e["index"]) for e in previews] == [(1, 4, 0), (2, 4, 0), (3, 4, 0)]
    for e in previews:
        path = Path(e["path"])
        assert path.parent == tmp_path / "shown" / "previews" and path.name.endswith(f"_000_step{e['step']:03d}.png")
        assert Image.open(path).size == (SIZE, SIZE)
    assert not set(outputs_of(events)) & {e["path"] for e in previews}
    progress = [e["step"] for e in events if e["type"] == "progress"]
    assert progress == [1, 2, 3, 4]


def test_preview_out_of_memory_turns_previews_off_not_the_run(base, control, tmp_path, monkeypatch):
    import torch

    from engine.infer import generate, preview
    from engine.models import vae

    real, calls = vae.decode_latents, []

    def first_call_runs_out(*args):       # the first decode of the run is the step-1 preview (controls are encoded)
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args)

    plain, _ = _gen(base, control, tmp_path, "plain")
    for module in (preview, generate):      # the two callers of the VAE decode: previews, then the output
        monkeypatch.setattr(module, "decode_latents", first_call_runs_out)
    shown, events = _gen(base, control, tmp_path, "oom", "--preview_every", "1")
    assert np.array_equal(shown, plain) and len(calls) == 2             # one failed preview, then the output only
    assert not [e for e in events if e.get("kind") == "preview"]
    warnings = [e["message"] for e in events if e["type"] == "log" and e["level"] == "warning"]
    assert any("previews are off for the rest of this run" in w for w in warnings)


def test_preview_steps_and_clean_estimate():
    import torch

    from engine.infer.preview import clean_estimate, preview_steps

    assert preview_steps(4, 2) == [2] and preview_steps(8, 2) == [2, 4, 6] and preview_steps(4, 1) == [1, 2, 3]
    assert preview_steps(3, 5) == [] and preview_steps(25, None) == []
    # on a straight flow x_t = (1 - s) x0 + s n with the true velocity v = n - x0, the estimate is x0 itself
    x0, noise, sigma = torch.randn(1, 4, 64), torch.randn(1, 4, 64), torch.tensor(0.7)
    xt = (1 - sigma) * x0 + sigma * noise
    assert torch.allclose(clean_estimate(xt, noise - x0, sigma), x0, atol=1e-6)


def test_preview_decode_counts_in_the_estimate():
    from engine.spec.config import GenerateImageConfig
    from engine.spec.vram import estimate_config

    plain = estimate_config(GenerateImageConfig(image_size=[1024, 1024]))
    shown = estimate_config(GenerateImageConfig(image_size=[1024, 1024], preview_every=5))
    assert "preview_decode" not in plain["phases"]
    preview, denoising = shown["phases"]["preview_decode"]["parts"], shown["phases"]["denoising"]["parts"]
    assert preview["activations"] == shown["phases"]["vae_decode"]["parts"]["activations"] > 0
    assert preview["weights"] > denoising["weights"] and shown["vram_gib"] >= plain["vram_gib"]


@pytest.mark.parametrize("extra, needle", [
    (["--mask_path", "MASK", "--rcm_threshold", "0.1"], "cannot be used together"),
    (["--rcm_threshold", "0.1", "--image_size", "48", "48"], "needs the first control image at the output size"),
    (["--resize_control_to_official_size"], "both given"),
    (["--image_size", "40", "32"], "not a multiple of 16"),
    (["--control_image_path", "/nonexistent.png"], "no such file"),
    (["--preview_every", "0"], "--preview_every 0: must be at least 1"),
])
def test_refusals_before_loading(base, control, tmp_path, extra, needle):
    extra = [_mask(tmp_path, "m", 255, 0) if x == "MASK" else x for x in extra]
    argv = [*base, "--prompt", "p", "--save_path", str(tmp_path / "o")]
    if "--control_image_path" not in extra:
        argv += ["--control_image_path", control]
    if "--resize_control_to_official_size" in extra or "--rcm_threshold" in extra:
        argv += ["--resize_control_to_image_size"] if "--image_size" not in extra else []
    rc, events = run_generate([*argv, *extra], tmp_path / "e.jsonl")
    assert rc == 2
    err = error_of(events)
    assert needle in err["message"] and err["hint"]
    assert not any(e["type"] == "phase" for e in events)           # refused before any model was loaded


def test_mask_without_edit_refused(demo_manifest, tmp_path):
    m = demo_manifest
    rc, events = run_generate(["--dit", m["dit"]["original"], "--vae", m["vae"], "--text_encoder", m["text_encoder"],
                               "--tokenizer", m["tokenizer"], "--prompt", "p", "--save_path", str(tmp_path),
                               "--mask_path", _mask(tmp_path, "m", 255, 0)], tmp_path / "e.jsonl")
    assert rc == 2 and "needs an edit model" in error_of(events)["message"]


def test_from_file_batch_metadata_and_latents(demo_manifest, tmp_path):
    m = demo_manifest
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na red fox --w 48 --h 32 --d 7 --s 2\n\nblue sea --d 8 --g 1.0 --n ugly\n")
    rc, events = run_generate(["--dit", m["dit"]["original"], "--vae", m["vae"], "--text_encoder",
                               m["text_encoder"], "--tokenizer", m["tokenizer"], "--device", "cpu", "--from_file",
                               str(prompts), "--image_size", "32", "32", "--infer_steps", "3",
                               "--output_type", "latent_images", "--save_path", str(tmp_path / "out"),
                               "--preview_every", "1"], tmp_path / "e.jsonl")
    assert rc == 0, error_of(events)
    outs = outputs_of(events)
    pngs = [p for p in outs if p.endswith(".png")]
    latents = [p for p in outs if p.endswith(".safetensors")]
    assert len(pngs) == 2 and len(latents) == 2
    previews = [(e["index"], e["step"]) for e in events if e["type"] == "image" and e.get("kind") == "preview"]
    assert previews == [(0, 1), (1, 1), (1, 2)]              # per job, its own step count (2 and 3 steps)
    assert Image.open(next(e["path"] for e in events if e.get("kind") == "preview")).size == (48, 32)
    logs = [e["message"] for e in events if e["type"] == "log"]
    assert sum(x.startswith("loading text encoder") for x in logs) == 1     # encoded all prompts, then freed
    assert sum(x.startswith("loading DiT") for x in logs) == 1               # DiT loaded once
    (est,) = [e for e in events if e["type"] == "estimate"]          # the log holds the estimate beside the peak
    from engine.spec.config import GenerateImageConfig
    from engine.spec.vram import estimate_config
    assert est["vram_gib"] == estimate_config(GenerateImageConfig(image_size=[32, 48],
                                                                       preview_every=1))["vram_gib"] > 0
    first, second = (read_parameters(p) for p in pngs)
    assert Image.open(pngs[0]).size == (48, 32) and first["seed"] == 7 and first["infer_steps"] == 2
    assert first["prompt"] == "a red fox" and first["image_size"] == [32, 48]
    assert second["seed"] == 8 and second["guidance_scale"] == 1.0 and second["negative_prompt"] == "ugly"
    assert "_7_000.png" in pngs[0] and "_7_latent" in latents[0]
    # decode-only mode gives the same image back from the latent file
    rc, ev2 = run_generate(["--vae", m["vae"], "--device", "cpu", "--latent_path", latents[0], "--save_path",
                            str(tmp_path / "dec")], tmp_path / "e2.jsonl")
    assert rc == 0, error_of(ev2)
    decoded = outputs_of(ev2)[0]
    assert np.array_equal(np.asarray(Image.open(decoded)), np.asarray(Image.open(pngs[0])))
    assert json.loads(Image.open(decoded).text["parameters"])["seed"] == 7


def test_attention_fallback_warns_once_and_matches_sdpa(demo_manifest, tmp_path):
    m = demo_manifest
    common = ["--dit", m["dit"]["original"], "--vae", m["vae"], "--text_encoder", m["text_encoder"], "--tokenizer",
              m["tokenizer"], "--device", "cpu", "--prompt", "a fox", "--image_size", "32", "32", "--infer_steps",
              "2", "--seed", "3"]
    rc, sdpa = run_generate([*common, "--save_path", str(tmp_path / "a")], tmp_path / "a.jsonl")
    rc2, flash = run_generate([*common, "--attn_mode", "flash", "--save_path", str(tmp_path / "b")],
                              tmp_path / "b.jsonl")
    assert rc == rc2 == 0
    warnings = [e for e in flash if e["type"] == "log" and e["level"] == "warning" and "attn_mode" in e["message"]]
    assert len(warnings) == 1 and "SDPA" in warnings[0]["message"]
    a, b = (np.asarray(Image.open(outputs_of(x)[0])) for x in (sdpa, flash))
    assert np.array_equal(a, b)


def test_edit_dit_without_edit_mode_refused_before_loading(demo_manifest, tmp_path):
    m = demo_manifest
    rc, events = run_generate(["--dit", m["dit"]["edit-2509"], "--vae", m["vae"], "--text_encoder",
                               m["text_encoder"], "--tokenizer", m["tokenizer"], "--prompt", "p", "--save_path",
                               str(tmp_path)], tmp_path / "e.jsonl")
    assert rc == 2 and "no edit mode was given" in error_of(events)["message"]
    assert not any(e["type"] == "phase" for e in events)


def test_prompt_line_options():
    from engine.spec.jobs import Job, parse_prompt_line

    base = Job("x", None, [256, 256], 1, 25, 4.0, None)
    job = parse_prompt_line("a cat --w 512 --h 384 --d 9 --s 10 --l 3.5 --fs 2.0 --n bad --ci a.png --ci b.png "
                            "--m m.png --rcm_th 0.2 --rcm_rel_th yes --rcm_ks 5 --rcm_ds 1", base, 3)
    assert (job.prompt, job.width, job.height, job.seed, job.infer_steps, job.guidance_scale, job.flow_shift) == \
        ("a cat", 512, 384, 9, 10, 3.5, 2.0)
    assert job.negative_prompt == "bad" and job.control_image_path == ["a.png", "b.png"] and job.mask_path == "m.png"
    assert (job.rcm_threshold, job.rcm_relative_threshold, job.rcm_kernel_size, job.rcm_dilate_size) == \
        (0.2, True, 5, 1)
    assert parse_prompt_line("--w 64", base, 1).image_size == [256, 64] and base.width == 256
    assert parse_prompt_line("--w 64", base, 1).prompt == ""
    with pytest.raises(Exception, match="unknown option --zz"):
        parse_prompt_line("p --zz 1", base, 4)


def test_a_job_speaks_the_configs_field_names():
    """One option, one name: a job's fields are GenerateImageConfig fields, and its PNG parameters use them."""
    from engine.spec.config import GenerateImageConfig, option_fields
    from engine.spec.jobs import JOB_FIELDS, job_from_config

    names = {f.name for f in option_fields(GenerateImageConfig)}
    assert set(JOB_FIELDS) <= names and len(JOB_FIELDS) == 13
    cfg = GenerateImageConfig(prompt="p", seed=3, rcm_threshold=0.1, image_size=[32, 48])
    assert job_from_config(cfg).parameters() == {n: getattr(cfg, n) for n in JOB_FIELDS}


def test_real_command_line_subprocess(demo_manifest, tmp_path):
    """The actual `python -m engine generate_image` process: exit 0, a PNG with its parameters, JSON events."""
    import subprocess
    import sys
    from pathlib import Path

    m = demo_manifest
    root = Path(__file__).resolve().parents[1]
    argv = [sys.executable, "-m", "engine", "generate_image", "--dit", m["dit"]["original"], "--vae", m["vae"],
            "--text_encoder", m["text_encoder"], "--tokenizer", m["tokenizer"], "--device", "cpu", "--prompt",
            "a lighthouse", "--image_size", "32", "32", "--infer_steps", "2", "--seed", "42", "--save_path",
            str(tmp_path / "out")]
    done = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    events = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    png = outputs_of(events)[0]
    assert Path(png).name.endswith("_42_000.png")
    params = read_parameters(png)
    assert params["prompt"] == "a lighthouse" and params["seed"] == 42 and params["model_version"] == "original"
