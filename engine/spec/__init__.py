"""The contract between the app and the engine, importable without torch (tests/test_spec.py proves it).

Everything the GUI process needs from the engine lives here: the option registry and config machinery, the event
stream, errors, model variants, presets, the VRAM estimator, the command registry, prompt-line jobs, control-image
geometry, output names, the dataset reader and cache status, and the checks that run before any model loads.
The engine's stages (engine/data, engine/train, engine/infer over engine/models) build on it; the app imports
nothing else from the engine (tests/test_spec.py checks that too). docs/architecture.md describes the layout.

Only the standard library, PIL, tomli_w and psutil may be imported here.
"""
