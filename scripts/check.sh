#!/usr/bin/env bash
# The static checks CI runs before the tests: ruff (lint and format) and mypy. The layers are checked by
# the tests (tests/test_architecture.py, import-linter). Run from the repository root, in the .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
"$bin/ruff" check .
"$bin/ruff" format --check .
"$bin/mypy"
