"""Where the browser page and the dashboard's files are: `web/` in a clone (and an editable install), else
`share/atlas-voice/web` under the environment's prefix, where the wheel installs them (pyproject.toml's
data-files), so `pip install atlas-voice` serves the page from any directory."""

from __future__ import annotations

import sys
from pathlib import Path


def web_dir() -> Path:
    clone = Path(__file__).resolve().parent.parent / "web"
    for candidate in (clone, Path(sys.prefix) / "share" / "atlas-voice" / "web"):
        if (candidate / "index.html").is_file():
            return candidate
    raise RuntimeError(f"the web page's files are missing: neither {clone} nor {sys.prefix}/share/atlas-voice/web")
