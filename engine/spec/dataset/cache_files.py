"""Cache file names, fingerprints and the staleness report ("never stale").

Names are musubi-tuner's (engine/spec/naming.py), so its trainer reads our caches and we read its names:
  latents: `<cache_dir>/<stem>_<W:04d>x<H:04d>_<arch>.safetensors` (W, H = original image size)
  text:    `<cache_dir>/<stem>_<arch>_te.safetensors`
with arch `qi` (text-to-image) or `qie` (any edit version).

Each file's metadata records, besides musubi's keys (architecture, width/height or caption1, format_version):
  qis_kind           "latents" | "text"
  qis_model_version  the --model_version it was made for
  qis_source         JSON: content fingerprints of what it was made from (image + controls for latents;
                     caption text + controls for text, controls only in edit versions)
  qis_settings       JSON: everything that changes the tensors (bucket, control sizes, dataset resize keys,
                     vision-encoder sizes, fp8_vl ...)
  qis_encoder        JSON: identity of the VAE / text encoder (+ tokenizer): path, size, mtime, header hash
An entry is up to date when all of these match what the current dataset and models would produce. Content
hashes decide (a `touch` does not make a cache stale); size and mtime let a fingerprint reuse the hash stored
in the cache file instead of re-reading the image. Latents do not depend on the edit version, text embeddings
do (switching edit <-> edit-2509 <-> edit-2511 makes text caches stale).

A file made by musubi-tuner (its metadata and none of ours) is checked by engine/spec/dataset/foreign_cache.py
instead: shapes, keys and file times; its status says `origin` "musubi-tuner".

Importable without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from engine.spec import naming
from engine.spec.dataset.dropout import empty_caption_items
from engine.spec.dataset import foreign_cache
from engine.spec.dataset.plan import Plan, PlannedItem, build_plan
from engine.spec.errors import ModelFileError
from engine.spec.safetensors_header import expand_shards, read_header
from engine.spec.variants import get_variant

FORMAT_VERSION = "1.0.1"
ARCHITECTURE = "qwen_image"      # musubi writes this full name for qi and qie alike
QIS_KEYS = ("qis_kind", "qis_model_version", "qis_source", "qis_settings", "qis_encoder")


def latent_cache_path(item: PlannedItem, arch: str) -> Path:
    return item.spec.cache_directory / naming.latent_cache_name(item.stem, item.size, arch)


def text_cache_path(item: PlannedItem, arch: str) -> Path:
    return item.spec.cache_directory / naming.text_cache_name(item.stem, arch)


def is_our_cache_file(path: Path, arch: str) -> bool:
    """Only files with our naming pattern are ever removed (never images or anything else)."""
    return naming.is_cache_name(path.name, arch)


# ------------------------------------------------------------------------------------------ fingerprints

def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_fingerprint(path: Path, known: dict | None = None) -> dict:
    """{name, size, mtime_ns, sha256}. Reuses `known`'s hash when size and mtime are unchanged."""
    st = path.stat()
    if known and known.get("size") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns:
        digest = known["sha256"]
    else:
        digest = sha256_file(path)
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}


def read_with_fingerprint(path: Path) -> tuple[dict, bytes]:
    """The file's bytes and the fingerprint of exactly those bytes (so a file edited while caching runs can
    never be recorded with the fingerprint of its new content and the tensors of its old one)."""
    st = path.stat()
    data = path.read_bytes()
    return {"name": path.name, "size": len(data), "mtime_ns": st.st_mtime_ns,
            "sha256": hashlib.sha256(data).hexdigest()}, data


def latent_source(item: PlannedItem, known: dict | None = None) -> dict:
    known = known or {}
    controls = known.get("controls") or []
    source = {"image": file_fingerprint(item.item.image_path, known.get("image")),
              "controls": [file_fingerprint(p, controls[i] if i < len(controls) else None)
                           for i, p in enumerate(item.item.control_paths)]}
    if item.item.mask_path is not None:          # a loss mask (mask_directory) is part of the latent cache
        source["mask"] = file_fingerprint(item.item.mask_path, known.get("mask"))
    return source


def text_source(item: PlannedItem, edit: bool, known: dict | None = None) -> dict:
    known = known or {}
    controls = known.get("controls") or []
    source: dict[str, Any] = {"caption_sha256": sha256_text(item.item.caption or "")}
    if item.item.caption_path is not None:
        source["caption_file"] = file_fingerprint(item.item.caption_path, known.get("caption_file"))
    if edit:
        source["controls"] = [file_fingerprint(p, controls[i] if i < len(controls) else None)
                              for i, p in enumerate(item.item.control_paths)]
    return source


def _content(fp: Any) -> Any:
    """What decides staleness: hashes and sizes, not names, paths or mtimes."""
    if isinstance(fp, dict):
        return {k: _content(v) for k, v in fp.items() if k not in ("name", "mtime_ns", "path")}
    if isinstance(fp, list):
        return [_content(v) for v in fp]
    return fp


def encoder_identity(paths: Iterable[str | os.PathLike | None]) -> dict:
    """Identity of model files: resolved path, size, mtime and a hash of each safetensors header (or, for a
    tokenizer folder, of its small files). The header hash is what we compare; path and mtime are for people."""
    files = []
    for p in paths:
        if p is None:
            continue
        p = Path(p)
        if p.is_dir() and not list(p.glob("*.safetensors")):
            files += [_small_file_identity(f) for f in sorted(p.iterdir()) if f.is_file()]
            continue
        for f in expand_shards(p):
            header = read_header(f)
            layout = {n: [t.dtype, list(t.shape), t.start, t.end] for n, t in header.tensors.items()}
            blob = json.dumps([layout, header.metadata], sort_keys=True).encode()
            st = f.stat()
            files.append({"path": str(f.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                          "header_sha256": hashlib.sha256(blob).hexdigest()})
    return {"files": files}


def _small_file_identity(f: Path) -> dict:
    st = f.stat()
    return {"path": str(f.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(f)}


# ------------------------------------------------------------------------------------------ metadata

def make_metadata(kind: str, version: str, source: dict, settings: dict, encoder: dict | None,
                  extra: dict[str, str]) -> dict[str, str]:
    meta = {"architecture": ARCHITECTURE, "format_version": FORMAT_VERSION, **extra,
            "qis_kind": kind, "qis_model_version": version, "qis_source": _dumps(source),
            "qis_settings": _dumps(settings)}
    if encoder is not None:
        meta["qis_encoder"] = _dumps(encoder)
    return meta


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def latent_settings(item: PlannedItem, dtype: str) -> dict:
    return {**item.spec.settings(), "bucket": list(item.bucket),
            "control_buckets": [list(b) for b in item.control_buckets], "dtype": dtype}


def read_metadata(path: Path) -> dict[str, str] | None:
    """The file's metadata, or None when it is not a readable safetensors file (e.g. a half-written one)."""
    try:
        return read_header(path).metadata
    except (ModelFileError, OSError):
        return None


def _loads(meta: dict, key: str) -> Any:
    try:
        return json.loads(meta[key])
    except (KeyError, json.JSONDecodeError):
        return None


# ------------------------------------------------------------------------------------------ staleness

@dataclass
class EntryStatus:
    stem: str
    kind: str          # latents | text
    path: Path
    state: str         # ok | missing | stale
    reason: str        # empty when ok (a note for an accepted file of another tool)
    origin: str = foreign_cache.ORIGIN_OURS    # who wrote the file: qis | musubi-tuner

    def as_dict(self) -> dict:
        return {"stem": self.stem, "kind": self.kind, "path": str(self.path), "state": self.state,
                "reason": self.reason, "origin": self.origin}


@dataclass
class Expected:
    """What an up-to-date file must record. None fields are not checked (e.g. encoder not given)."""
    kind: str
    version: str | None         # checked for text caches only
    settings: dict | None
    encoder: dict | None
    text_width: int | None = None   # the text encoder's hidden size, to check another tool's text cache


def entry_status(item: PlannedItem, path: Path, expected: Expected, edit: bool) -> EntryStatus:
    state, reason = "ok", ""
    meta = read_metadata(path) if path.is_file() else None
    if not path.is_file():
        state, reason = "missing", "no cache file"
    elif meta is None:
        state, reason = "stale", "the file is not a readable safetensors file"
    elif foreign_cache.is_foreign(meta):
        reason = foreign_cache.stale_reason(item, path, expected.kind, edit, expected.text_width)
        state = "stale" if reason else "ok"
        return EntryStatus(item.stem, expected.kind, path, state, reason or foreign_cache.note(expected.kind, edit),
                           foreign_cache.ORIGIN_MUSUBI)
    else:
        reason = _stale_reason(item, meta, expected, edit)
        state = "stale" if reason else "ok"
    return EntryStatus(item.stem, expected.kind, path, state, reason)


def _stale_reason(item: PlannedItem, meta: dict, exp: Expected, edit: bool) -> str:
    if meta.get("qis_kind") != exp.kind:
        return "made by another tool or an older version (neither our fingerprints nor musubi-tuner's metadata)"
    if exp.kind == "text" and exp.version and meta.get("qis_model_version") != exp.version:
        return f"made for --model_version {meta.get('qis_model_version')}, now {exp.version}"
    recorded = _loads(meta, "qis_source") or {}
    if exp.kind == "latents":
        current = latent_source(item, recorded)
        what = _source_change(recorded, current, item)
    else:
        current = text_source(item, edit, recorded)
        what = _source_change(recorded, current, item)
    if what:
        return what
    if exp.settings is not None:
        got = _loads(meta, "qis_settings") or {}
        changed = sorted(k for k in exp.settings if got.get(k) != exp.settings[k])
        if changed:
            return "settings changed: " + ", ".join(f"{k} {got.get(k)} -> {exp.settings.get(k)}" for k in changed)
    if exp.encoder is not None:
        got = _loads(meta, "qis_encoder")
        if _encoder_key(got) != _encoder_key(exp.encoder):
            return "made with different model weights (" + _encoder_names(got) + ")"
    return ""


def _source_change(recorded: dict, current: dict, item: PlannedItem) -> str:
    if _content(recorded.get("image")) != _content(current.get("image")):
        return f"image {item.item.image_path.name} changed"
    if _content(recorded.get("mask")) != _content(current.get("mask")):
        if not recorded.get("mask") or not current.get("mask"):
            return "loss mask " + ("added" if current.get("mask") else "removed")
        return f"loss mask {item.item.mask_path.name} changed"
    if recorded.get("caption_sha256") != current.get("caption_sha256"):
        return "caption changed"
    rec_c, cur_c = recorded.get("controls"), current.get("controls")
    if _content(rec_c) != _content(cur_c):
        if rec_c is not None and cur_c is not None and len(rec_c) != len(cur_c):
            return f"number of control images changed ({len(rec_c)} -> {len(cur_c)})"
        return "a control image changed"
    return ""


def _encoder_key(identity: dict | None) -> list | None:
    if not identity:
        return None
    return [(f.get("size"), f.get("header_sha256") or f.get("sha256")) for f in identity.get("files", [])]


def _encoder_names(identity: dict | None) -> str:
    if not identity:
        return "none recorded"
    return ", ".join(Path(f["path"]).name for f in identity.get("files", [])) or "none recorded"


def cache_status(plan: Plan, model_version: str, kinds: tuple[str, ...] = ("latents", "text"),
                 latent_expected: dict | None = None, text_expected: dict | None = None,
                 vae: str | None = None, text_encoder: str | None = None, tokenizer: str | None = None
                 ) -> list[EntryStatus]:
    """One status per item and cache kind (the Cache tab and training use it).

    latent_expected / text_expected: settings the caller knows (e.g. {"dtype": "bfloat16"}); latents always
    compare the dataset-derived settings (bucket, control sizes, resize keys).
    vae / text_encoder (+ tokenizer): when given, files made with other weights are stale.
    """
    variant = get_variant(model_version)
    out = []
    vae_id = encoder_identity([vae]) if vae else None
    te_id = encoder_identity([text_encoder, tokenizer]) if text_encoder else None
    te_width = foreign_cache.text_encoder_width(text_encoder)
    for item in plan.items():
        if "latents" in kinds:
            # The dataset-derived settings are always compared; the dtype only when the caller knows it.
            settings = {**latent_settings(item, ""), **(latent_expected or {})}
            if not (latent_expected or {}).get("dtype"):
                settings.pop("dtype")
            out.append(entry_status(item, latent_cache_path(item, variant.cache_arch),
                                    Expected("latents", None, settings, vae_id), variant.is_edit))
        if "text" in kinds:
            out.append(entry_status(item, text_cache_path(item, variant.cache_arch),
                                    Expected("text", model_version, text_expected, te_id, te_width), variant.is_edit))
    if "text" in kinds:         # the empty-caption embeddings of datasets with caption_dropout_rate > 0
        for item in empty_caption_items(plan, variant.is_edit):
            out.append(entry_status(item, text_cache_path(item, variant.cache_arch),
                                    Expected("text", model_version, text_expected, te_id, te_width), variant.is_edit))
    return out


def summarize(statuses: list[EntryStatus]) -> dict[str, int]:
    counts = {"ok": 0, "missing": 0, "stale": 0}
    for s in statuses:
        counts[s.state] += 1
    return counts


def staleness_report(dataset_config: str | os.PathLike, model_version: str, vae: str | None = None,
                     text_encoder: str | None = None, tokenizer: str | None = None) -> dict:
    """JSON-ready report for the Cache tab: dataset problems, per-entry state with reason, counts per kind.

    Reads headers and source files only (no model is loaded; torch is not imported)."""
    plan = build_plan(dataset_config, model_version)
    statuses = cache_status(plan, model_version, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
    return {"model_version": model_version,
            "dataset_errors": [p.as_dict() for p in plan.errors],
            "entries": [s.as_dict() for s in statuses],
            "latents": summarize([s for s in statuses if s.kind == "latents"]),
            "text": summarize([s for s in statuses if s.kind == "text"])}
