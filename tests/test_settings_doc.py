"""Every setting is documented: each environment variable `config.settings.Settings` reads has a row in the
README's settings table."""

from __future__ import annotations

from pathlib import Path

from config.settings import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_has_a_row_in_the_readme():
    rows = {line.split("|")[1].strip().strip("`") for line in README.splitlines() if line.startswith("| `")}
    missing = [
        field.validation_alias.choices[0]
        for field in Settings.model_fields.values()
        if not any(alias in rows for alias in field.validation_alias.choices)
    ]
    assert not missing, f"settings without a README row: {missing}"
