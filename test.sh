#!/usr/bin/env bash
# Sets up (once) and runs the whole test suite: unit, CLI, GUI (gradio_client) and browser (chromium) tests.
# Extra arguments go to pytest, e.g. ./test.sh -k lora
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh requirements.txt requirements-dev.txt
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[setup] installing Debian's chromium for the browser tests"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "[setup] chromium could not be installed; browser tests will be skipped"
fi
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest tests -q -ra --timeout 900 "$@"
