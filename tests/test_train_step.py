"""The training step's sequence and loss (engine/train/step.py): edit models get the clean control latents after
the noisy target tokens, RoPE shapes per image, and the loss covers the target tokens only; the velocity target is
ε − x0 at x_t = (1 − t)·x0 + t·ε; padded text gets a mask. Plus an edit-model LoRA run end to end."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from _train_util import cached_dataset, losses, train
from engine.models.latents import pack
from engine.train.step import flow_loss, predict, prepare_inputs
from engine.train.timesteps import TimestepSampler


def edit_batch():
    g = torch.Generator().manual_seed(0)
    return {"latents": torch.randn(2, 16, 1, 8, 6, generator=g),
            "latents_control_1": torch.randn(2, 16, 1, 4, 4, generator=g),     # out of order on purpose
            "latents_control_0": torch.randn(2, 16, 1, 6, 8, generator=g),
            "vl_embed": [torch.randn(5, 32, generator=g), torch.randn(3, 32, generator=g)], "stems": ["a", "b"]}


def test_edit_sequence_rope_shapes_and_mask():
    batch = edit_batch()
    gen_a, gen_b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    inputs = prepare_inputs(batch, TimestepSampler("uniform"), gen_a, torch.device("cpu"), torch.float32)
    n_target = 4 * 3
    assert inputs.n_target == n_target
    assert inputs.hidden.shape == (2, n_target + 12 + 4, 64)
    # the controls are clean (not noised), packed, in control order, after the target tokens
    assert torch.equal(inputs.hidden[:, n_target:n_target + 12], pack(batch["latents_control_0"]))
    assert torch.equal(inputs.hidden[:, n_target + 12:], pack(batch["latents_control_1"]))
    assert inputs.img_shapes == [[(1, 4, 3), (1, 3, 4), (1, 2, 2)]] * 2
    # the same generator draws: noise first, then t; x_t and the velocity target follow the formulas
    noise = torch.randn(batch["latents"].shape, generator=gen_b)
    t, timesteps = TimestepSampler("uniform").sample(2, (8, 6), gen_b)
    tb = t.reshape(-1, 1, 1, 1, 1)
    assert torch.allclose(inputs.hidden[:, :n_target], pack((1 - tb) * batch["latents"] + tb * noise))
    assert torch.allclose(inputs.target, noise - batch["latents"])
    assert torch.allclose(inputs.timestep, timesteps / 1000)
    # text: zero padded to the longest, with a mask
    assert inputs.text.shape == (2, 5, 32) and inputs.text_mask.tolist() == [[1] * 5, [1, 1, 1, 0, 0]]


class EchoDiT(torch.nn.Module):
    """Returns its input sequence (a trainable scale), to see which tokens reach the loss."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_mask, img_shapes,
                return_dict=False):
        self.calls.append((hidden_states.shape, encoder_hidden_states.shape, encoder_hidden_states_mask, img_shapes))
        self.out = hidden_states * self.scale
        self.out.retain_grad()
        return (self.out,)


def test_loss_covers_target_tokens_only():
    inputs = prepare_inputs(edit_batch(), TimestepSampler("sigma"), torch.Generator().manual_seed(1),
                            torch.device("cpu"), torch.float32)
    dit = EchoDiT()
    loss = flow_loss(predict(dit, inputs), inputs)
    loss.backward()
    grad = dit.out.grad
    assert grad[:, :inputs.n_target].abs().sum() > 0
    assert torch.count_nonzero(grad[:, inputs.n_target:]) == 0
    expected = torch.nn.functional.mse_loss(dit.out[:, :inputs.n_target], pack(inputs.target))
    assert torch.allclose(loss, expected)


def test_split_attn_runs_samples_alone_without_padding():
    inputs = prepare_inputs(edit_batch(), TimestepSampler("uniform"), torch.Generator().manual_seed(1),
                            torch.device("cpu"), torch.float32)
    dit = EchoDiT()
    predict(dit, inputs, split_attn=True)
    assert [c[1][1] for c in dit.calls] == [5, 3] and all(c[2] is None for c in dit.calls)


def test_loss_weighting_scales_per_sample():
    inputs = prepare_inputs(edit_batch(), TimestepSampler("sigma", weighting_scheme="cosmap"),
                            torch.Generator().manual_seed(2), torch.device("cpu"), torch.float32)
    assert inputs.weights is not None and inputs.weights.shape == (2,)
    pred = torch.zeros(2, inputs.n_target, 64)
    plain = torch.nn.functional.mse_loss(pred, pack(inputs.target), reduction="none").mean(dim=(1, 2))
    assert torch.allclose(flow_loss(pred, inputs), (plain * inputs.weights).mean())


@pytest.mark.parametrize("version", ["edit"])
def test_edit_lora_trains_end_to_end(demo_manifest, tmp_path_factory, version):
    root = tmp_path_factory.mktemp(f"train_{version}")
    toml = cached_dataset(demo_manifest, root, version)
    out = root / "out"
    events = train("train_network", out, "--model_version", version, "--dit", demo_manifest["dit"][version],
                   "--dataset_config", toml, "--output_dir", out, "--max_train_steps", 3, "--learning_rate", "1e-3")
    assert len(losses(events)) == 3 and all(v == v for v in losses(events).values())
    assert (out / "qwen_image_lora.safetensors").is_file()


def test_padded_text_mask_equals_per_sample_attention():
    """A batch with texts of different lengths (zero padding + mask) predicts what each sample alone predicts
    (--split_attn), on the real (tiny) DiT: the mask really hides the padding."""
    from engine.demo import build_dit

    g = torch.Generator().manual_seed(3)
    batch = {"latents": torch.randn(2, 16, 1, 4, 6, generator=g),
             "vl_embed": [torch.randn(7, 32, generator=g), torch.randn(3, 32, generator=g)], "stems": ["a", "b"]}
    inputs = prepare_inputs(batch, TimestepSampler("uniform"), torch.Generator().manual_seed(4),
                            torch.device("cpu"), torch.float32)
    assert inputs.text_mask is not None
    dit = build_dit("original").eval()
    with torch.no_grad():
        masked, alone = predict(dit, inputs), predict(dit, inputs, split_attn=True)
        unmasked = predict(dit, dataclasses.replace(inputs, text_mask=None))
    assert torch.allclose(masked, alone, atol=1e-5)
    assert not torch.allclose(unmasked[1], alone[1], atol=1e-3)     # without the mask the padding would leak in
