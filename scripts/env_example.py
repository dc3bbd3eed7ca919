"""Write `.env.example`: every setting `config.settings.Settings` reads, with its default, commented out.

The names and defaults come from the settings object (the code that reads them); what each one means comes
from the README's settings table, the documentation a user reads. tests/test_cli.py checks that the
committed file is what this script writes, so a new setting cannot be left out.

    .venv/bin/python scripts/env_example.py          # rewrite .env.example
    .venv/bin/python scripts/env_example.py --check  # exit 1 if it is out of date
"""

from __future__ import annotations

import re
import sys
import textwrap
from enum import Enum
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pydantic import SecretStr  # noqa: E402

from config.settings import Settings  # noqa: E402

HEADER = """\
# Atlas Voice settings. Copy to `.env` (read from the working directory) or set them in the environment.
# Every setting is listed, commented out, with its default; uncomment what you change. Secrets (API keys,
# tokens) have no default: leave them unset to keep that provider or door off.
# Written by scripts/env_example.py from config/settings.py and the README's settings table.
"""
_ROW = re.compile(r"^\| `([A-Z0-9_]+)` \| (.*?) \| (.*) \|$")


def readme_rows() -> dict[str, tuple[str, str]]:
    """The README's settings table: name -> (default as documented, meaning)."""
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        m = _ROW.match(line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3))
    return rows


def _plain(markdown: str) -> str:
    return re.sub(r"`([^`]*)`", r"\1", markdown).replace("\\|", "|")


def _value(field) -> str | None:
    """The default as an environment value, or None when it depends on the machine (say the README's words)."""
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, list):
            return ",".join(str(v) for v in value)
        return None  # a path under the user's home, a count of cores
    value = field.default
    if value is None:
        return ""
    if isinstance(value, SecretStr):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def render() -> str:
    rows = readme_rows()
    out = [HEADER]
    for field in Settings.model_fields.values():
        name = field.validation_alias.choices[0]
        documented_default, meaning = rows.get(name, ("", ""))
        value = _value(field)
        lines = textwrap.wrap(_plain(meaning), 110) or [""]
        if value is None:
            lines.append(f"default: {_plain(documented_default)}")
            value = ""
        out.append("\n".join(f"# {line}".rstrip() for line in lines))
        out.append(f"# {name}={value}\n")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    path = REPO / ".env.example"
    text = render()
    if "--check" in argv:
        if not path.exists() or path.read_text() != text:
            print(".env.example is out of date: run scripts/env_example.py", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    print(f"wrote {path} ({len(Settings.model_fields)} settings)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
