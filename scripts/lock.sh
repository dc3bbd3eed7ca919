#!/usr/bin/env bash
# Regenerate requirements.lock from pyproject.toml (all extras the quick start installs), with the
# SHA-256 of every file, as scripts/quickstart.sh installs it (pip --require-hashes). Run it after
# changing a dependency, commit the result.
set -euo pipefail
cd "$(dirname "$0")/.."
tools="$(mktemp -d)"
python3 -m venv "$tools"
"$tools/bin/pip" install --quiet 'pip-tools==7.7.0'
# Only PyPI: a machine's own extra indexes or wheel folders must not leak into the lock.
PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_EXTRA_INDEX_URL= "$tools/bin/pip-compile" --quiet --generate-hashes \
  --allow-unsafe --strip-extras --extra models --extra dev --no-emit-index-url --output-file requirements.lock \
  pyproject.toml
rm -rf "$tools"
echo "requirements.lock: $(grep -c '^[a-z]' requirements.lock) pinned packages"
