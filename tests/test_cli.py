"""The command's basics a newcomer meets first: `--version`, and `.env.example` listing every setting."""

from __future__ import annotations

import subprocess
import sys

from config.settings import Settings
from tests.helpers import REPO


def test_version_names_atlas_pipecat_and_python():
    r = subprocess.run([sys.executable, "-m", "app.cli", "--version"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0
    from importlib.metadata import version

    assert r.stdout.startswith(f"atlas-voice {version('atlas-voice')} (Pipecat {version('pipecat-ai')}, Python 3.")


def test_env_example_lists_every_setting_with_its_default_and_is_current():
    sys.path.insert(0, str(REPO / "scripts"))
    import env_example

    text = (REPO / ".env.example").read_text()
    assert text == env_example.render(), "run scripts/env_example.py"
    for field in Settings.model_fields.values():
        assert f"# {field.validation_alias.choices[0]}=" in text
    # Defaults as the settings object has them, in the form the environment takes.
    assert "# ATLAS_PORT=8000\n" in text and "# ATLAS_ALLOW_ANONYMOUS=false\n" in text
    assert "# ATLAS_CONTEXT_MESSAGES=10\n" in text and "# ANTHROPIC_API_KEY=\n" in text
    # Uncommented, the file is a valid .env that the settings object reads (every value its default).
    pairs = [line[2:].split("=", 1) for line in text.splitlines() if line.startswith("# ") and "=" in line[2:]]
    values = {k: v for k, v in pairs if k.isupper() and v}
    assert len(values) > 80 and Settings(**values).port == 8000
