#!/usr/bin/env bash
# One command for a fresh Debian machine: install everything (system packages included), then
#   scripts/quickstart.sh serve [--host H --port P]   start the server on the offline engines
#   scripts/quickstart.sh test  [pytest args]         the static checks, then the whole test suite
#                                                     (-m "not slow": the fast tier)
# Idempotent: a second run skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

cmd="${1:-serve}"
shift || true
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

# --- system packages --------------------------------------------------------------------------
# build-essential/cmake: llama.cpp compiles from source; chromium: the browser test;
# pocketsphinx-testdata: real recorded speech for the tests; postgresql: the database behind the
# Supabase tests (started on a private port by the fixtures); prometheus: its promtool checks and
# unit-tests monitoring/alert_rules.yml.
packages=(python3 python3-venv python3-dev build-essential cmake git curl)
if [ "$cmd" = test ]; then packages+=(chromium chromium-driver pocketsphinx-testdata postgresql prometheus); fi
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  step "Installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi

# --- Python environment -----------------------------------------------------------------------
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || { echo "Python >= 3.11 is required (found $("$PY" --version))"; exit 1; }
if [ ! -x .venv/bin/python ]; then
  step "Creating .venv"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip wheel

# Every dependency comes from requirements.lock: exact versions, each file checked against its SHA-256
# (pip --require-hashes). Regenerate it with scripts/lock.sh after changing pyproject.toml. llama.cpp's
# lines go to their own file: it is compiled below with our CMake flags, after its dependencies are in.
locked="$(mktemp -d)"
awk '/^llama-cpp-python==/{p=1; print > "'"$locked"'/llama.txt"; next}
     p && /^ /{print > "'"$locked"'/llama.txt"; next}
     {p=0; print > "'"$locked"'/rest.txt"}' requirements.lock

step "Installing the locked dependencies and the models (the LLM alone is 1.1 GB in 22 parts)"
.venv/bin/python -m pip install --progress-bar on --require-hashes -r "$locked/rest.txt"

# Built for the x86-64 AVX2 baseline, not -march=native (llama.cpp's default): a VM can resume on another
# host CPU (seen here: built on an AMD EPYC, run on an Intel Xeon, and the native build died with a
# general protection fault at its first token). No pip cache: a cached wheel may be a native one.
LLAMA_MARK=.venv/.llama-cpp-portable
if ! .venv/bin/python -c 'import llama_cpp' 2>/dev/null || [ ! -f "$LLAMA_MARK" ]; then
  step "Building llama.cpp (llama-cpp-python, about 6 minutes on 2 cores the first time)"
  llama_cmake="-DGGML_NATIVE=OFF"
  [ "$(uname -m)" = x86_64 ] && llama_cmake="$llama_cmake -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
  # pip is silent while a wheel compiles: show cmake/ninja's own progress lines instead.
  .venv/bin/python -m pip uninstall -y --quiet llama-cpp-python 2>/dev/null || true
  set +o pipefail
  CMAKE_ARGS="$llama_cmake" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" .venv/bin/python -m pip install -v --no-cache-dir \
    --no-deps --require-hashes -r "$locked/llama.txt" 2>&1 \
    | grep --line-buffered -E '^\s*\[ *[0-9]+(/[0-9]+|%)\]|Successfully (built|installed)|ERROR|error:' || true
  set -o pipefail
  .venv/bin/python -c 'import llama_cpp' || { echo "llama-cpp-python failed to build"; exit 1; }
  touch "$LLAMA_MARK"
fi
rm -rf "$locked"
.venv/bin/python -m pip install --quiet --no-deps -e .

step "Assembling and verifying the offline models"
.venv/bin/atlas-voice models

case "$cmd" in
  serve)
    step "Starting Atlas on the offline engines: open http://127.0.0.1:8000/ (Ctrl-C stops)"
    exec .venv/bin/atlas-voice serve "$@"
    ;;
  test)
    step "Static checks: ruff (lint, format) and mypy"
    bash scripts/check.sh
    step "Running the test suite"
    exec .venv/bin/python -m pytest "$@"
    ;;
  *)
    echo "usage: $0 serve|test [args]"; exit 2
    ;;
esac
