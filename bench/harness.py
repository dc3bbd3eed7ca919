"""An Atlas server in a subprocess, as the tests and `atlas-voice fuzz` start one, and reading its /metrics."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


# Every test client comes from 127.0.0.1, often as the same user: the abuse limits are off unless a
# test turns them on (tests/test_limits.py). The message rate limit stays on everywhere.
LIMITS_OFF = {
    "ATLAS_MAX_SESSIONS_PER_IP": "0",
    "ATLAS_SESSION_STARTS_PER_MINUTE_PER_IP": "0",
    "ATLAS_MAX_SESSIONS_PER_USER": "0",
    "ATLAS_SESSION_STARTS_PER_MINUTE_PER_USER": "0",
    # A stopped test server ends its sessions at once instead of letting them drain for minutes (tests of
    # the drain set it).
    "ATLAS_DRAIN_SECS": "0",
    # One process unless a test or scenario asks for workers: the tests read one process's logs and counts.
    "ATLAS_WORKERS": "1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(env: dict[str, str], log_path: Path, timeout: float = 240.0):
    """`atlas-voice serve` in a subprocess; yields (base URL, process) once /healthz answers 200."""
    port = free_port()
    # Each server records into its own SQLite file and outbox next to its log (fresh each run).
    stores = {
        "ATLAS_SQLITE_PATH": log_path.with_suffix(".sqlite3"),
        "ATLAS_OUTBOX_PATH": log_path.with_suffix(".outbox.sqlite3"),
    }
    for name, path in stores.items():
        if name not in env:
            # With workers each has its own outbox: <stem>.worker<N>.sqlite3; webhooks theirs: <stem>.webhooks.sqlite3.
            leftovers = [path.name + "*", path.stem + ".worker*", path.stem + ".webhooks*"]
            for leftover in [p for pattern in leftovers for p in path.parent.glob(pattern)]:
                leftover.unlink()
    full_env = {**os.environ, "ATLAS_LOG_LEVEL": "DEBUG", **LIMITS_OFF, **{k: str(v) for k, v in stores.items()}, **env}
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        cwd=REPO,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}); log:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not healthy in {timeout}s; log:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.3)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


@contextmanager
def running_server(env: dict[str, str], log_path: Path, timeout: float = 240.0):
    """`atlas-voice serve` in a subprocess; yields its base URL once /healthz answers 200."""
    with server_process(env, log_path, timeout) as (base, _proc):
        yield base


def metric_samples(text: str) -> dict[tuple, float]:
    """A Prometheus exposition as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
