#!/usr/bin/env bash
# Regenerate the lock files from pyproject.toml, with the SHA-256 of every file, as scripts/quickstart.sh
# installs them (pip --require-hashes). Run it after changing a dependency, commit the result.
#   requirements.lock        everything: the base, [local] and [dev] (the test suite's install)
#   requirements-serve.lock  the base and [local], at the same versions (`quickstart.sh serve|install`: no test
#                            tools; with ATLAS_LOCAL_LLM=0 the quick start leaves out [local]'s weights)
set -euo pipefail
cd "$(dirname "$0")/.."
tools="$(mktemp -d)"
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools"
"$tools/bin/pip" install --quiet 'pip-tools==7.7.0'
# Only PyPI: a machine's own extra indexes or wheel folders must not leak into the lock.
compile() {
  PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_EXTRA_INDEX_URL= "$tools/bin/pip-compile" --quiet --generate-hashes \
    --allow-unsafe --strip-extras --no-emit-index-url "$@" pyproject.toml
}
compile --extra local --extra dev --output-file requirements.lock
# The serve lock is the full lock's subset: constrained to it, so both install the same versions.
compile --extra local --constraint requirements.lock --output-file requirements-serve.lock
echo "requirements.lock: $(grep -c '^[a-z]' requirements.lock) pinned packages"
echo "requirements-serve.lock: $(grep -c '^[a-z]' requirements-serve.lock) pinned packages"
