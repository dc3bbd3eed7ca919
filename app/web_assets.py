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


def prebuilt_client_dir() -> Path:
    """Pipecat's prebuilt client (the `pipecat-ai-prebuilt` package's built page), found without importing the
    package's module, which prints to stdout as it looks for the same folder."""
    import importlib.util

    spec = importlib.util.find_spec("pipecat_ai_prebuilt")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("Pipecat's prebuilt client is missing: pip install pipecat-ai-prebuilt")
    dist = Path(next(iter(spec.submodule_search_locations))) / "client" / "dist"
    if not (dist / "index.html").is_file():
        raise RuntimeError(f"Pipecat's prebuilt client has no built page at {dist}")
    return dist
