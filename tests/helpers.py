"""Shared test helpers: speech synthesis, WER, a server subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
import wave
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")

_NORMALIZE = {"mr": "mister", "mrs": "missus", "dr": "doctor"}


def words(text: str) -> list[str]:
    text = re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " "))
    return [_NORMALIZE.get(w, w) for w in text.split()]


def wer(reference: str, hypothesis: str) -> float:
    ref, hyp = words(reference), words(hypothesis)
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            cur = min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
            prev, d[j] = d[j], cur
    return d[len(hyp)] / max(len(ref), 1)


def write_wav(path: Path, pcm: np.ndarray, rate: int = 16000) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.astype(np.int16).tobytes())
    return path


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16), w.getframerate()


class Speaker:
    """Piper (the shipped joe voice) speaking test utterances as 16 kHz WAVs."""

    def __init__(self, out_dir: Path):
        from piper import PiperVoice

        from services.local import models

        self.voice = PiperVoice.load(models.piper_voice_dir() / f"{models.PIPER_VOICE}.onnx")
        self.out_dir = out_dir

    def say(self, name: str, text: str, lead_silence: float = 0.3) -> Path:
        import soxr

        pcm = b"".join(c.audio_int16_bytes for c in self.voice.synthesize(text))
        audio = np.frombuffer(pcm, np.int16).astype(np.float32) / 32768.0
        audio = soxr.resample(audio, self.voice.config.sample_rate, 16000)
        audio = np.clip(audio * 32767.0, -32768, 32767).astype(np.int16)
        audio = np.concatenate([np.zeros(int(16000 * lead_silence), np.int16), audio])
        return write_wav(self.out_dir / f"{name}.wav", audio)


def librivox_clips() -> list[tuple[Path, str]]:
    clips = []
    for line in (LIBRIVOX / "transcription").read_text().splitlines():
        m = re.match(r"<s> (.*) </s> \((.*)\)", line.strip())
        if m:
            clips.append((LIBRIVOX / f"{m.group(2)}.wav", m.group(1)))
    return clips


# Every test client comes from 127.0.0.1, often as the same user: the abuse limits are off unless a
# test turns them on (tests/test_limits.py). The message rate limit stays on everywhere.
LIMITS_OFF = {"ATLAS_MAX_SESSIONS_PER_IP": "0", "ATLAS_SESSION_STARTS_PER_MINUTE_PER_IP": "0",
              "ATLAS_MAX_SESSIONS_PER_USER": "0", "ATLAS_SESSION_STARTS_PER_MINUTE_PER_USER": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(env: dict[str, str], log_path: Path, timeout: float = 240.0):
    """`atlas-voice serve` in a subprocess; yields (base URL, process) once /healthz answers 200."""
    port = free_port()
    # Each server records into its own SQLite file and outbox next to its log (fresh each run).
    stores = {"ATLAS_SQLITE_PATH": log_path.with_suffix(".sqlite3"), "ATLAS_OUTBOX_PATH": log_path.with_suffix(".outbox.sqlite3")}
    for name, path in stores.items():
        if name not in env:
            for leftover in path.parent.glob(path.name + "*"):
                leftover.unlink()
    full_env = {**os.environ, "ATLAS_LOG_LEVEL": "DEBUG", **LIMITS_OFF, **{k: str(v) for k, v in stores.items()}, **env}
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bots.cli", "serve", "--port", str(port)],
        cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT,
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

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def connected_client(url: str):
    """A VoiceClient with a started session and a moment of silence sent (the usual test opening)."""
    from bots.talk import VoiceClient

    client = VoiceClient(url)
    await client.connect()
    await client.send_silence(0.3)
    return client


async def recorded(sink, session_id: str, turns: int, timeout: float = 20.0) -> tuple[dict, list[dict]]:
    """The session row (once ended) and its turn rows, read back through `sink` when they have all landed."""
    deadline = time.monotonic() + timeout
    while True:
        sessions = [r for r in await sink.fetch("voice_sessions") if r["id"] == session_id]
        rows = [r for r in await sink.fetch("voice_turns") if r["session_id"] == session_id]
        if sessions and sessions[0]["ended_at"] and len(rows) >= turns:
            return sessions[0], rows
        if time.monotonic() > deadline:
            raise AssertionError(f"session {session_id} not recorded in {timeout}s: {sessions} {rows}")
        await asyncio.sleep(0.2)
