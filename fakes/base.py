"""What every fake vendor shares: an aiohttp app served from its own thread and event loop (so a fake keeps
answering while test code blocks), a request log, and the real local engines (Piper to make reply audio,
Whisper to transcribe received audio), each loaded once per process."""

from __future__ import annotations

import asyncio
import functools
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import web


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RecordedRequest:
    """One request as the fake saw it: enough to assert the wire (path, query, headers, body)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any = None
    status: int = 200
    events: list[str] = field(default_factory=list)  # e.g. "client_disconnected", "closed_by_fault"


class FaultQueue:
    """Faults a test scripts from its own thread, taken in order by the fake's loop: each entry
    `times` times. `always`, while set, is what every take returns (until `clear`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[list] = []  # [fault, remaining takes]
        self._always: Any = None

    def add(self, fault: Any, times: int = 1) -> None:
        with self._lock:
            self._entries.append([fault, times])

    def set_always(self, fault: Any) -> None:
        with self._lock:
            self._always = fault

    def take(self) -> Any:
        with self._lock:
            if self._always is not None:
                return self._always
            if not self._entries:
                return None
            head = self._entries[0]
            head[1] -= 1
            if head[1] <= 0:
                self._entries.pop(0)
            return head[0]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._always = None


class ClientGone(ConnectionResetError):
    """The client closed its connection while the fake was still answering."""


class FakeServer:
    """Base class: subclasses add routes to `self.app` in `__init__` and record into `self.requests`
    (as `request_class`, a RecordedRequest subclass when a vendor needs more fields)."""

    request_class: type[RecordedRequest] = RecordedRequest

    def __init__(self) -> None:
        self.app = web.Application()
        self._fault_queues: list[FaultQueue] = []
        self.requests: list[RecordedRequest] = []
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._stopped = threading.Event()

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> FakeServer:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            try:
                self._runner = web.AppRunner(self.app, handle_signals=False)
                self.loop.run_until_complete(self._runner.setup())
                self.port = _free_port()
                site = web.TCPSite(self._runner, "127.0.0.1", self.port)
                self.loop.run_until_complete(site.start())
            except BaseException as e:  # noqa: BLE001 - reported to the starting thread
                errors.append(e)
                ready.set()
                return
            ready.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self._runner.cleanup())
            self.loop.close()
            self._stopped.set()

        self._thread = threading.Thread(target=run, name=type(self).__name__, daemon=True)
        self._thread.start()
        ready.wait(30)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self.loop and self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._stopped.wait(10)

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_until(self, predicate, timeout: float = 10.0) -> bool:
        """Poll `predicate()` from a test thread until it holds or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.01)
        return bool(predicate())

    def _fault_queue(self) -> FaultQueue:
        """A new queue of scripted faults, emptied by `clear_faults`."""
        queue = FaultQueue()
        self._fault_queues.append(queue)
        return queue

    def clear_faults(self) -> None:
        """Forget every scripted fault not yet used."""
        for queue in self._fault_queues:
            queue.clear()

    @staticmethod
    def _gone(request: web.Request) -> bool:
        transport = request.transport
        return transport is None or transport.is_closing()

    async def _sleep(self, request: web.Request, seconds: float) -> None:
        """Sleep, but notice within 50 ms that the client left (raises ClientGone)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while True:
            if self._gone(request):
                raise ClientGone()
            remaining = end - loop.time()
            if remaining <= 0:
                return
            await asyncio.sleep(min(0.05, remaining))

    def record(self, request: web.Request, body: Any = None) -> RecordedRequest:
        rec = self.request_class(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
        )
        self.requests.append(rec)
        return rec


@functools.lru_cache(maxsize=1)
def _piper_voice():
    from piper import PiperVoice

    from services.local import models

    return PiperVoice.load(models.piper_voice_dir() / f"{models.PIPER_VOICE}.onnx")


_engine_lock = threading.Lock()


def piper_pcm(text: str, sample_rate: int, *, same_every_run: bool = False) -> bytes:
    """Real speech for `text` as 16-bit mono PCM at `sample_rate` (Piper's joe voice, resampled).
    `same_every_run`: Piper's sampling noise off, so every run hears exactly the same speech."""
    import soxr

    voice = _piper_voice()
    config = None
    if same_every_run:
        from piper.config import SynthesisConfig

        config = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    with _engine_lock:
        pcm = b"".join(c.audio_int16_bytes for c in voice.synthesize(text, syn_config=config))
    rate = voice.config.sample_rate
    if rate == sample_rate:
        return pcm
    audio = np.frombuffer(pcm, np.int16).astype(np.float32) / 32768.0
    audio = soxr.resample(audio, rate, sample_rate)
    return np.clip(audio * 32767.0, -32768, 32767).astype(np.int16).tobytes()


@functools.lru_cache(maxsize=1)
def _whisper():
    from faster_whisper import WhisperModel

    from services.local import models

    return WhisperModel(str(models.whisper_model_dir()), device="cpu", compute_type="int8", cpu_threads=1)


def whisper_transcribe(pcm16k: bytes) -> tuple[str, float]:
    """Transcribe 16 kHz 16-bit mono PCM with the local Whisper: (text, confidence 0..1)."""
    import math

    audio = np.frombuffer(pcm16k, np.int16).astype(np.float32) / 32768.0
    with _engine_lock:
        segments, _ = _whisper().transcribe(audio, language="en", beam_size=1, vad_filter=False)
        segments = list(segments)
    text = " ".join(s.text.strip() for s in segments).strip()
    if not segments:
        return "", 0.0
    logprob = sum(s.avg_logprob for s in segments) / len(segments)
    return text, round(min(1.0, math.exp(logprob)), 3)
