"""The README's CLI reference is generated from the typed config; this keeps them in step."""

from engine import docs


def test_readme_cli_reference_matches_config():
    text = docs.README.read_text(encoding="utf-8")
    assert docs.readme_section(text) == docs.reference(), (
        "README.md's CLI reference is out of date: run `python -m engine.docs --write`")


def test_readme_download_table_matches_downloads_registry():
    text = docs.README.read_text(encoding="utf-8")
    table = docs.section(text, docs.DOWNLOADS_START, docs.DOWNLOADS_END)
    assert table == docs.downloads_table(), "README.md's model table is out of date: run `python -m engine.docs --write`"
    assert "qwen_image_edit_2511_bf16.safetensors" in table and "qwen_2.5_vl_7b.safetensors" in table


def test_every_command_has_help_that_exits_zero():
    import subprocess
    import sys

    from engine.spec.commands import COMMANDS

    for name in COMMANDS:
        proc = subprocess.run([sys.executable, "-m", "engine", name, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0, (name, proc.stderr)
        assert "usage:" in proc.stdout
