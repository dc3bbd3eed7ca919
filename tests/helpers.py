"""Shared test helpers: speech synthesis, WER, recorded rows. The server subprocess is bench/harness.py's."""

from __future__ import annotations

import asyncio
import json
import re
import time
import wave
from pathlib import Path

import numpy as np

from bench.harness import LIMITS_OFF, free_port, metric_samples, running_server, server_process  # noqa: F401

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


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def connected_client(url: str):
    """A VoiceClient with a started session and a moment of silence sent (the usual test opening)."""
    from app.talk import VoiceClient

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


# Debian's Chromium headless, with no background traffic (this machine's network is closed), as root.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_with_microphone(playwright, wav: Path, *extra: str):
    """Headless Chromium whose fake microphone plays `wav` (in a loop), permission granted."""
    return playwright.chromium.launch(
        executable_path=CHROMIUM,
        headless=True,
        args=[
            *CHROMIUM_ARGS,
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}",
            *extra,
        ],
    )


class TransportEnds:
    """Stands in for a transport's two ends (the pipeline builder only calls input() and output())."""

    def __init__(self):
        from pipecat.processors.frame_processor import FrameProcessor

        self._in, self._out = FrameProcessor(), FrameProcessor()

    def input(self):
        return self._in

    def output(self):
        return self._out
