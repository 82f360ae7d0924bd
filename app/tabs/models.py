"""Models tab: one path per role, "Inspect" (the engine reads the headers and says what each file is), saved
defaults, and where to download the real weights."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from app.context import ROLES, EngineCommandError
from app.views import error_markdown
from engine.spec import downloads

TABLE_HEADERS = ["role", "file", "component", "variant", "dtype", "parameters", "size", "notes"]
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def build(ctx) -> None:
    with gr.Tab("Models", id="models"):
        gr.Markdown(_intro(ctx))
        boxes = []
        for pair in (ROLES[0:2], ROLES[2:4], ROLES[4:6], ROLES[6:]):   # two boxes a row keeps long paths readable
            with gr.Row():
                boxes += [gr.Textbox(label=r.label, value=ctx.model_path(r.key), elem_id=f"model-{r.key}",
                                     placeholder="path to a .safetensors file or a folder") for r in pair]
        with gr.Row():
            inspect_btn = gr.Button("Inspect", variant="primary", elem_id="models-inspect")
            save_btn = gr.Button("Save as defaults", elem_id="models-save")
        table = gr.Dataframe(headers=TABLE_HEADERS, value=[], interactive=False, wrap=True,
                             column_widths=["21%", "27%", "11%", "9%", "6%", "10%", "9%", "7%"],
                             elem_id="models-table", label="What the files are")
        report = gr.Markdown(elem_id="models-report")
        with gr.Accordion("Where to download the models", open=ctx.demo is None):
            gr.Dataframe(value=[[r["component"], r["variant"], r["repo"], r["file"], r["note"]]
                                for r in downloads.as_rows()],
                         headers=["component", "version", "repository", "file", "note"], interactive=False,
                         wrap=True, elem_id="models-downloads")
            gr.Markdown(downloads.FP8_NOTE)

        inspect_btn.click(lambda *p: inspect(ctx, p), inputs=boxes, outputs=[table, report],
                          api_name="models_inspect")
        save_btn.click(lambda *p: save(ctx, p), inputs=boxes, outputs=report, api_name="models_save")


def _intro(ctx) -> str:
    text = ("Point each role at its weights. **Inspect** reads only the file headers, so it answers at once even "
            "for the 40 GB files, and says what each file really is. The Cache, Train and Generate tabs use "
            "the files inspected here (each has a folded *Models (override)* for a one-off change).")
    if ctx.demo is not None:
        text += ("\n\n*Demo mode:* the boxes hold the tiny random demo models, so every tab works without "
                 "downloads. Put your real files here and press **Save as defaults** to use them.")
    return text


def inspect(ctx, paths: tuple[str, ...]) -> tuple[list[list], str]:
    """Run `python -m engine inspect_model FILES --json` on the filled boxes; return table rows and a report."""
    ctx.choose_models({r.key: p or "" for r, p in zip(ROLES, paths)})     # every tab uses these from now on
    chosen = [(role, p.strip()) for role, p in zip(ROLES, paths) if p and p.strip()]
    files = [(role, p) for role, p in chosen if role.component != "tokenizer"]
    notes = [check_tokenizer(p) for role, p in chosen if role.component == "tokenizer"]
    rows: list[list] = []
    by_path: dict = {}
    if files:
        unique = list(dict.fromkeys(p for _, p in files))
        try:
            results = ctx.run_engine_json("inspect_model", [*unique, "--json"])
        except EngineCommandError as e:
            return [], "Inspect failed. " + error_markdown(e)
        by_path = dict(zip(unique, results))
        for role, path in files:
            info = by_path[path]
            problems = list(info.get("problems") or []) + role_mismatch(role, info)
            rows.append([role.label, Path(path).name, info.get("component"), info.get("variant") or "",
                         info.get("dtype") or "", fmt_count(info.get("params")), fmt_size(info.get("size_bytes")),
                         len(problems)])
            notes += [f"- **{role.label}** (`{Path(path).name}`): {p}" for p in problems]
    notes = [n for n in notes if n]
    if not chosen:
        return [], "Fill at least one path."
    said = "\n".join(notes) if notes else "No problems found."
    abilities = [caption_note(role, by_path[p]) for role, p in files if role.component == "text_encoder"]
    return rows, "\n\n".join([said, *filter(None, abilities)])


def caption_note(role, info: dict) -> str:
    """Whether the text-encoder file can also write captions (inspect_model's can_caption, from its headers)."""
    if info.get("can_caption") is True:
        return (f"**{role.label}** can also write captions and edit instructions (Dataset tab → *Write captions*): "
                "it has the language-model head (lm_head).")
    if info.get("can_caption") is False:
        return (f"**{role.label}** cannot write captions: the file has no lm_head (Qwen-Image does not need it). "
                "ComfyUI's qwen_2.5_vl_7b.safetensors has it.")
    return ""


def role_mismatch(role, info: dict) -> list[str]:
    """What is wrong with putting this file in this box."""
    found = info.get("component")
    if found and found not in (role.component, "unknown"):
        return [f"this box expects a {role.component.replace('_', ' ')}, but the file is a "
                f"{str(found).replace('_', ' ')}."]
    variant = info.get("variant")
    if role.component == "dit" and variant and variant != role.variant:
        return [f"this box is for the {role.variant} model, but the file looks like {variant}."]
    return []


def check_tokenizer(path: str) -> str:
    folder = Path(path)
    if not folder.is_dir():
        return (f"- **Tokenizer** (`{path}`): not a folder. Give the folder holding tokenizer.json "
                "(or vocab.json + merges.txt), or leave it empty to use the cached Qwen/Qwen-Image tokenizer.")
    if not any(all((folder / f).exists() for f in names) for names in TOKENIZER_FILES):
        return f"- **Tokenizer** (`{path}`): no tokenizer.json or vocab.json + merges.txt in this folder."
    return ""


def save(ctx, paths: tuple[str, ...]) -> str:
    ctx.save_model_paths({r.key: p for r, p in zip(ROLES, paths)})
    return f"Saved to `{ctx.data_dir / 'settings.json'}`; these paths are the defaults from now on."


def fmt_count(n) -> str:
    if not isinstance(n, (int, float)):
        return ""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(int(n))


def fmt_size(n) -> str:
    if not isinstance(n, (int, float)):
        return ""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
