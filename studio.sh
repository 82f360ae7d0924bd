#!/usr/bin/env bash
# Sets up (once) and starts Qwen-Image Studio in your browser. With no models configured it uses the
# built-in demo models. Options are passed to launch.py (see `./studio.sh --help`).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh requirements.txt
exec .venv/bin/python launch.py "$@"
