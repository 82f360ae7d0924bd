"""Text embeddings equal diffusers' `encode_prompt` (real Qwen2 vocabulary, tiny Qwen2.5-VL), and the control
sizing rules of docs/architecture.md."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.spec import controls
from engine.models.textenc import encode_prompts, pad_embeddings
from engine.spec.variants import VARIANTS
from _generate_util import (image_only_processor, inject_mm_token_type_ids, real_tokenizer, small_vision_processor,
                            tiny_text_encoder)


@pytest.fixture(scope="module")
def tok():
    return real_tokenizer()


@pytest.fixture(scope="module")
def te(tok):
    return tiny_text_encoder(tok)


def _image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _diffusers_embeds(pipe, prompt, image=None):
    kwargs = {} if image is None else {"image": image}
    embeds, mask = pipe.encode_prompt(prompt=prompt, device=torch.device("cpu"), **kwargs)
    assert mask is None or mask.all()
    return embeds[0]


def test_t2i_embeddings_equal_diffusers(te, tok):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=te, tokenizer=tok, transformer=None)
    prompts = ["a red fox in the snow", "two cats"]
    ours = encode_prompts(te, tok, None, prompts, None, "original")
    for prompt, emb in zip(prompts, ours):
        ref = _diffusers_embeds(pipe, prompt)
        assert emb.shape == ref.shape and emb.shape[1] == 32
        torch.testing.assert_close(emb, ref, rtol=0, atol=1e-6)
    # batching (padding inside the forward) gives the same valid tokens as one prompt at a time
    single = encode_prompts(te, tok, None, prompts, None, "original", batch_size=1)
    for a, b in zip(ours, single):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # the kept tokens are the prompt plus the template's 5 closing tokens
    n_prompt = len(tok("a red fox in the snow")["input_ids"])
    assert ours[0].shape[0] == n_prompt + 5


def test_edit_plus_two_images_equal_diffusers(te, tok, monkeypatch):
    from diffusers import QwenImageEditPlusPipeline

    ref_proc = image_only_processor(tok)
    pipe = QwenImageEditPlusPipeline(scheduler=None, vae=None, text_encoder=te, tokenizer=tok,
                                     processor=ref_proc, transformer=None)
    images = [_image(64, 48, 1), _image(40, 56, 2)]
    ours = encode_prompts(te, tok, small_vision_processor(tok), ["put the cat on the sofa"], [images],
                          "edit-2509")[0]
    # diffusers 0.42.1 drops mm_token_type_ids (diffusers#14194): with it forwarded (PR #14189) they agree ...
    with inject_mm_token_type_ids(te, tok):
        ref = _diffusers_embeds(pipe, "put the cat on the sofa", images)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    n_img_tokens = sum(int(g.prod()) // 4 for g in ref_proc.image_processor(images)["image_grid_thw"])
    assert ours.shape[0] == len(tok("Picture 1: <|vision_start|><|vision_end|>Picture 2: <|vision_start|>"
                                     "<|vision_end|>put the cat on the sofa")["input_ids"]) + n_img_tokens + 5
    # ... and without it the image tokens get text positions, which changes the embedding
    plain = _diffusers_embeds(pipe, "put the cat on the sofa", images)
    assert not torch.allclose(plain, ours, atol=1e-4)


def test_edit_v1_embeddings_equal_diffusers(te, tok):
    from diffusers import QwenImageEditPipeline

    pipe = QwenImageEditPipeline(scheduler=None, vae=None, text_encoder=te, tokenizer=tok,
                                 processor=image_only_processor(tok), transformer=None)
    img = _image(64, 64, 3)
    ours = encode_prompts(te, tok, small_vision_processor(tok), ["make it blue"], [[img]], "edit")[0]
    with inject_mm_token_type_ids(te, tok):
        ref = _diffusers_embeds(pipe, "make it blue", img)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_pad_embeddings_mask_only_when_padded():
    a, b = torch.ones(3, 4), torch.ones(5, 4)
    stacked, mask = pad_embeddings([a, b])
    assert stacked.shape == (2, 5, 4) and mask.tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert stacked[0, 3:].abs().sum() == 0
    assert pad_embeddings([a, a])[1] is None


# ---- control sizing -------------------------------------------------------------------------------------------

def test_calculate_dimensions_matches_diffusers():
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    for w, h in [(1024, 1024), (1920, 1080), (512, 1400), (333, 777)]:
        for area in (1024 * 1024, 384 * 384):
            assert controls.calculate_dimensions(area, w / h) == plus.calculate_dimensions(area, w / h)


def test_official_sizes_per_variant():
    src = (1920, 1080)
    edit = controls.control_sizes(VARIANTS["edit"], src, (256, 256), official=True)
    assert edit.vae == edit.vl == (1376, 768) and edit.exact          # v1: ~1 MP for both encoders
    for name in ("edit-2509", "edit-2511"):
        s = controls.control_sizes(VARIANTS[name], src, (256, 256), official=True)
        assert s.vae == (1376, 768) and s.vl == (512, 288)           # 384² area for the vision encoder
    to_out = controls.control_sizes(VARIANTS["edit-2509"], src, (320, 192), to_image_size=True)
    assert to_out.vae == to_out.vl == (320, 192) and not to_out.exact
    own = controls.control_sizes(VARIANTS["edit"], (1000, 750), (256, 256))
    assert own.vae == own.vl and all(v % 16 == 0 for v in own.vae)
    assert abs(own.vae[0] * own.vae[1] - 750_000) < 0.05 * 750_000
    with pytest.raises(ValueError):
        controls.control_sizes(VARIANTS["edit"], src, (256, 256), official=True, to_image_size=True)


def test_prepare_control_resizes_like_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    img = _image(90, 60, 4)
    vae_img, vl_img = controls.prepare_control(VARIANTS["edit-2509"], img, (64, 64), official=True)
    proc = VaeImageProcessor(vae_scale_factor=16)
    w, h = controls.calculate_dimensions(1024 * 1024, 90 / 60)
    assert np.array_equal(np.asarray(vae_img), np.asarray(proc.resize(img, h, w)))
    w, h = controls.calculate_dimensions(384 * 384, 90 / 60)
    assert np.array_equal(np.asarray(vl_img), np.asarray(proc.resize(img, h, w)))
    crop_vae, crop_vl = controls.prepare_control(VARIANTS["edit"], img, (48, 48), to_image_size=True)
    assert crop_vae.size == crop_vl.size == (48, 48)
