"""A local fake of PlayHT's v2 HTTP streaming TTS endpoint, `POST /api/v2/tts/stream`.

PlayHT shut its API down on 2025-12-31; this models the endpoint as it was documented
(docs.play.ht "Text to speech HTTP streaming" / "Stream Audio From Text", v2):

* headers: `Authorization: <secret>` (the docs show both the raw secret and `Bearer <secret>`; both accepted),
  `X-User-ID: <user id>`, `Content-Type: application/json`, `Accept: audio/mpeg` (or another audio type,
  `application/octet-stream`, `*/*`);
* body: `text` (required, non-empty, at most 2,000 characters, 20,000 with `Play3.0-mini`), `voice` (required, an
  `s3://.../manifest.json` voice URL), `output_format` (mp3 | wav | ogg | flac | mulaw | raw; default mp3),
  `sample_rate` (8000..48000; default 24000), `speed` (0.1..5.0), `quality` (draft | low | medium | high | premium),
  `voice_engine`, `seed` (>= 0), `temperature` (0..2), `emotion`, `voice_guidance` (1..6), `style_guidance`
  (1..30), `text_guidance` (1..2), `language`, and the PlayDialog fields (`voice_2`, `turn_prefix`, ...);
  unknown fields are refused (400) so a misspelt parameter fails a test;
* errors: PlayHT's `{"error_message": ..., "error_id": ...}` body for 4xx, `{"message": ..., "error": ...}` for 5xx;
* the response: 200 with a chunked body of real Piper speech for the text at `sample_rate`: `raw` = PCM16LE mono,
  `wav` = a RIFF header then PCM16LE, `mulaw` = G.711 mu-law bytes, `mp3` = MPEG-1/2 layer III (libmp3lame via
  PyAV; at the nearest MP3 rate when `sample_rate` is not one), `flac` = FLAC, `ogg` = Ogg/Opus (at the nearest
  Opus rate). `speed` changes Piper's speaking rate.

Scripting (thread-safe): `fail_next`, `fail_always`, `cut_next_after`, `clear_faults`; latency via
`first_byte_delay` (plus `chunk_ms` / `chunk_gap` for the streaming cadence). Faults are queued in the order
scripted; each valid request takes the next one.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import re
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from fakes.base import FakeServer, RecordedRequest, piper_pcm

STREAM_PATH = "/api/v2/tts/stream"
OUTPUT_FORMATS = ("mp3", "wav", "ogg", "flac", "mulaw", "raw")
CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "wav": "audio/wav",
    "ogg": "audio/ogg",
    "flac": "audio/flac",
    "mulaw": "audio/basic",
    "raw": "application/octet-stream",
}
QUALITIES = ("draft", "low", "medium", "high", "premium")
VOICE_ENGINES = (
    "PlayHT1.0",
    "PlayHT2.0",
    "PlayHT2.0-turbo",
    "Play3.0",
    "Play3.0-mini",
    "PlayDialog",
    "PlayDialog-turbo",
    "PlayDialogMultilingual",
    "PlayDialogArabic",
)
KNOWN_FIELDS = frozenset(
    {
        "text",
        "voice",
        "quality",
        "output_format",
        "speed",
        "sample_rate",
        "seed",
        "temperature",
        "voice_engine",
        "emotion",
        "voice_guidance",
        "style_guidance",
        "text_guidance",
        "language",
        "voice_2",
        "turn_prefix",
        "turn_prefix_2",
        "prompt",
        "prompt_2",
        "voice_conditioning_seconds",
        "voice_conditioning_seconds_2",
        "num_candidates",
    }
)
_VOICE_RE = re.compile(r"^s3://[A-Za-z0-9._-]+/\S+/manifest\.json$")
_MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
_OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
_ERROR_IDS = {
    400: "INVALID_PARAMETERS",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    406: "NOT_ACCEPTABLE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    429: "RATE_LIMIT_EXCEEDED",
}
_5XX_NAMES = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


class PlayHTError(Exception):
    def __init__(self, status: int, message: str, error_id: str | None = None) -> None:
        self.status, self.message = status, message
        self.error_id = error_id or _ERROR_IDS.get(status, "ERROR")
        super().__init__(f"{status} {self.error_id}: {message}")

    def body(self) -> dict[str, str]:
        if self.status >= 500:
            return {"message": self.message, "error": _5XX_NAMES.get(self.status, "Server Error")}
        return {"error_message": self.message, "error_id": self.error_id}


@dataclass
class PlayHTRequest(RecordedRequest):
    """A recorded streaming request plus what the fake sent back."""

    bytes_sent: int = 0  # body bytes written (audio, including a WAV header)
    chunks_sent: int = 0
    output_format: str | None = None
    sample_rate: int | None = None
    fault: str | None = None  # "fail" or "cut" when a scripted fault applied
    first_byte_at: float | None = None  # time.monotonic() of the first body chunk


@dataclass
class _Fault:
    kind: str  # "fail" | "cut"
    status: int = 0
    after_bytes: int = 0


# ---- audio -------------------------------------------------------------------------------------------------


def speech_pcm(text: str, sample_rate: int, speed: float = 1.0) -> bytes:
    """Piper speech for `text` as PCM16 mono at `sample_rate`; `speed` > 1 speaks faster. Piper's synthesis is
    randomized, so this is cached per (text, rate, speed): the fake streams exactly what this returns."""
    return _speech_pcm(text, int(sample_rate), round(float(speed), 4))


@functools.lru_cache(maxsize=256)
def _speech_pcm(text: str, sample_rate: int, speed: float) -> bytes:
    if abs(speed - 1.0) < 1e-6:
        return piper_pcm(text, sample_rate)
    import soxr
    from piper import SynthesisConfig

    from fakes.base import _engine_lock, _piper_voice

    voice = _piper_voice()
    config = SynthesisConfig(length_scale=(voice.config.length_scale or 1.0) / speed)
    with _engine_lock:
        pcm = b"".join(c.audio_int16_bytes for c in voice.synthesize(text, syn_config=config))
    if voice.config.sample_rate == sample_rate:
        return pcm
    audio = np.frombuffer(pcm, np.int16).astype(np.float32) / 32768.0
    audio = soxr.resample(audio, voice.config.sample_rate, sample_rate)
    return np.clip(audio * 32767.0, -32768, 32767).astype(np.int16).tobytes()


def wav_header(data_bytes: int, sample_rate: int) -> bytes:
    """A 44-byte RIFF/WAVE header for PCM16 mono."""
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data_bytes)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
        + b"data"
        + struct.pack("<I", data_bytes)
    )


def pcm_to_mulaw(pcm: bytes) -> bytes:
    """G.711 mu-law encoding of PCM16 (bit-exact with audioop.lin2ulaw / the CCITT reference)."""
    v = np.frombuffer(pcm, np.int16).astype(np.int32) >> 2  # 14-bit, arithmetic shift as in the reference
    mask = np.where(v < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(v), 8159) + 0x21
    seg = np.searchsorted(np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF]), mag)
    uval = np.where(seg >= 8, 0x7F, (seg << 4) | ((mag >> (seg + 1)) & 0x0F))  # out of range: clip
    return (uval ^ mask).astype(np.uint8).tobytes()


def _nearest(rates: tuple[int, ...], rate: int) -> int:
    return min(rates, key=lambda r: (abs(r - rate), -r))


def encode_pcm(pcm: bytes, sample_rate: int, fmt: str) -> bytes:
    """PCM16 mono -> mp3 / flac / ogg (Opus) bytes with PyAV."""
    import av
    import soxr

    container, codec, rates = {
        "mp3": ("mp3", "libmp3lame", _MP3_RATES),
        "flac": ("flac", "flac", None),
        "ogg": ("ogg", "libopus", _OPUS_RATES),
    }[fmt]
    rate = sample_rate if rates is None or sample_rate in rates else _nearest(rates, sample_rate)
    samples = np.frombuffer(pcm, np.int16)
    if rate != sample_rate:
        resampled = soxr.resample(samples.astype(np.float32) / 32768.0, sample_rate, rate)
        samples = np.clip(resampled * 32767.0, -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        if fmt == "mp3":
            stream.bit_rate = 64_000 if rate >= 32000 else 32_000
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        frame.pts = 0
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def render(
    text: str,
    fmt: str,
    sample_rate: int,
    speed: float = 1.0,
    synthesize: Callable[[str, int, float], bytes] | None = None,
) -> tuple[bytes, bytes]:
    """(header, audio) bytes of `text` in PlayHT output format `fmt` (cached per args)."""
    return _render(text, fmt, int(sample_rate), round(float(speed), 4), synthesize or speech_pcm)


@functools.lru_cache(maxsize=256)
def _render(
    text: str, fmt: str, sample_rate: int, speed: float, synthesize: Callable[[str, int, float], bytes]
) -> tuple[bytes, bytes]:
    pcm = synthesize(text, sample_rate, speed)
    if fmt == "raw":
        return b"", pcm
    if fmt == "wav":
        return wav_header(len(pcm), sample_rate), pcm
    if fmt == "mulaw":
        return b"", pcm_to_mulaw(pcm)
    return b"", encode_pcm(pcm, sample_rate, fmt)


# ---- the server --------------------------------------------------------------------------------------------


class FakePlayHT(FakeServer):
    """Fake `api.play.ht`: point the PlayHT TTS service's base URL at `fake.http_url`."""

    request_class = PlayHTRequest

    def __init__(
        self,
        *,
        api_key: str = "test-playht-key",
        user_id: str = "test-playht-user",
        first_byte_delay: float = 0.0,
        chunk_ms: int = 100,
        chunk_gap: float = 0.005,
        synthesize: Callable[[str, int, float], bytes] | None = None,
    ) -> None:
        """
        Args:
            api_key: the secret accepted in `Authorization` (raw or `Bearer <key>`).
            user_id: the user id accepted in `X-User-ID`.
            first_byte_delay: extra seconds before the response starts (after synthesis).
            chunk_ms: audio per body chunk (bytes scaled by the format's size, so compressed formats too).
            chunk_gap: seconds between chunks, so clients see a stream rather than one buffer.
            synthesize: (text, sample_rate, speed) -> PCM16 mono; default `speech_pcm` (real Piper speech,
                cached). Piper runs one synthesis at a time (~0.1-0.2 s a sentence), so a load test with many
                distinct texts may plug in something cheaper.
        """
        super().__init__()
        self.api_key, self.user_id = api_key, user_id
        self.first_byte_delay = first_byte_delay
        self.chunk_ms, self.chunk_gap = chunk_ms, chunk_gap
        self.synthesize = synthesize or speech_pcm
        self._inflight: dict[tuple, asyncio.Future] = {}  # render key -> running synthesis (dedups concurrency)
        self.requests: list[PlayHTRequest] = []  # type: ignore[assignment]
        self.completed = 0
        self._faults = self._fault_queue()
        self.app.router.add_post(STREAM_PATH, self._stream)
        self.app.router.add_route("*", "/{tail:.*}", self._not_found)

    # ---- scripting (any thread) ---------------------------------------------------------------------------

    def fail_next(self, status: int, times: int = 1) -> None:
        """The next `times` valid requests get HTTP `status` (e.g. 429, 500, 503) with PlayHT's JSON error body."""
        self._faults.add(_Fault("fail", status=status), times)

    def fail_always(self, status: int) -> None:
        self._faults.set_always(_Fault("fail", status=status))

    def cut_next_after(self, bytes_: int, times: int = 1) -> None:
        """The next `times` valid requests get a 200 whose body is cut (connection closed, no terminating chunk)
        after `bytes_` body bytes."""
        self._faults.add(_Fault("cut", after_bytes=bytes_), times)

    # ---- accessors ----------------------------------------------------------------------------------------

    @property
    def texts(self) -> list[str]:
        """Texts of the requests that passed auth and validation, in arrival order."""
        return [r.body["text"] for r in list(self.requests) if "accepted" in r.events]

    @property
    def status_counts(self) -> dict[int, int]:
        return dict(Counter(r.status for r in list(self.requests)))

    # ---- HTTP ---------------------------------------------------------------------------------------------

    @staticmethod
    def _error(rec: PlayHTRequest, err: PlayHTError) -> web.Response:
        rec.status = err.status
        rec.events.append(f"error:{err.error_id}")
        return web.json_response(err.body(), status=err.status)

    async def _not_found(self, request: web.Request) -> web.Response:
        rec = self.record(request, await request.text())
        return self._error(rec, PlayHTError(404, f"Cannot {request.method} {request.path}"))

    def _check_headers(self, request: web.Request) -> None:
        auth = request.headers.get("authorization", "").strip()
        user = request.headers.get("x-user-id", "").strip()
        if not auth or not user:
            missing = " and ".join(n for n, v in (("AUTHORIZATION", auth), ("X-USER-ID", user)) if not v)
            raise PlayHTError(401, f"Missing {missing} header. Both your secret key and your user ID are required.")
        secret = auth[7:].strip() if auth.lower().startswith("bearer ") else auth
        if secret != self.api_key:
            raise PlayHTError(401, "Invalid API key. Check the AUTHORIZATION header.")
        if user != self.user_id:
            raise PlayHTError(403, "The API key does not belong to the user in the X-USER-ID header.")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise PlayHTError(415, f"Unsupported Content-Type {ctype or '(none)'}; send application/json.")
        for item in request.headers.get("accept", "*/*").split(","):
            media = item.split(";")[0].strip().lower()
            if media in ("*/*", "audio/*", "application/octet-stream") or media.startswith("audio/"):
                return
        raise PlayHTError(
            406,
            "Accept must be an audio type (e.g. audio/mpeg) or */*; the streamable-URL "
            "(application/json) variant is not supported by this fake.",
        )

    @staticmethod
    def _validate(body: Any) -> dict[str, Any]:
        """PlayHT's request checks; returns the effective parameters."""
        if not isinstance(body, dict):
            raise PlayHTError(400, "The request body must be a JSON object.")
        unknown = sorted(set(body) - KNOWN_FIELDS)
        if unknown:
            raise PlayHTError(400, f"Unknown parameter(s): {', '.join(unknown)}.")
        get = body.get  # a null field means "use the default", as PlayHT's SDKs send them
        engine = get("voice_engine") or "PlayHT2.0-turbo"
        if engine not in VOICE_ENGINES:
            raise PlayHTError(400, f"voice_engine must be one of {', '.join(VOICE_ENGINES)}.")
        text = get("text")
        if not isinstance(text, str) or not text.strip():
            raise PlayHTError(400, "text is required and must be a non-empty string.")
        limit = 20_000 if engine == "Play3.0-mini" else 2_000
        if len(text) > limit:
            raise PlayHTError(400, f"text must be at most {limit} characters for {engine}.")
        voice = get("voice")
        if not isinstance(voice, str) or not _VOICE_RE.match(voice):
            raise PlayHTError(400, "voice is required and must be a voice manifest URL (s3://.../manifest.json).")
        fmt = get("output_format") or "mp3"
        if fmt not in OUTPUT_FORMATS:
            raise PlayHTError(400, f"output_format must be one of {', '.join(OUTPUT_FORMATS)}.")
        rate = get("sample_rate")
        rate = 24000 if rate is None else rate
        if not _is_int(rate) or not 8000 <= rate <= 48000:
            raise PlayHTError(400, "sample_rate must be an integer between 8000 and 48000.")
        speed = get("speed")
        speed = 1.0 if speed is None else speed
        if not _is_num(speed) or not 0.1 <= speed <= 5.0:
            raise PlayHTError(400, "speed must be a number between 0.1 and 5.0.")
        if get("quality") is not None and get("quality") not in QUALITIES:
            raise PlayHTError(400, f"quality must be one of {', '.join(QUALITIES)}.")
        if get("seed") is not None and (not _is_int(get("seed")) or get("seed") < 0):
            raise PlayHTError(400, "seed must be a non-negative integer.")
        for name, lo, hi in (
            ("temperature", 0, 2),
            ("voice_guidance", 1, 6),
            ("style_guidance", 1, 30),
            ("text_guidance", 1, 2),
        ):
            value = get(name)
            if value is not None and (not _is_num(value) or not lo <= value <= hi):
                raise PlayHTError(400, f"{name} must be a number between {lo} and {hi}.")
        return {"text": text, "format": fmt, "sample_rate": rate, "speed": float(speed)}

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        rec = self.record(request, body)
        try:
            self._check_headers(request)
            if isinstance(body, str):
                raise PlayHTError(400, "The request body is not valid JSON.")
            params = self._validate(body)
        except PlayHTError as err:
            return self._error(rec, err)
        rec.events.append("accepted")
        rec.output_format, rec.sample_rate = params["format"], params["sample_rate"]

        fault = self._faults.take()
        if fault is not None:
            rec.fault = fault.kind
            if fault.kind == "fail":
                msg = {429: "Too many requests. Please slow down.", 503: "Service temporarily unavailable."}
                return self._error(rec, PlayHTError(fault.status, msg.get(fault.status, "Internal server error")))

        header, audio = await self._render(params["text"], params["format"], params["sample_rate"], params["speed"])
        try:
            await self._sleep(request, self.first_byte_delay)
        except ConnectionError:
            rec.status = 499
            rec.events.append("client_disconnected")
            return web.Response(status=499)

        resp = web.StreamResponse(status=200, headers={"Content-Type": CONTENT_TYPES[params["format"]]})
        resp.enable_chunked_encoding()
        rec.status = 200
        await resp.prepare(request)
        _, pcm = await self._render(params["text"], "raw", params["sample_rate"], params["speed"])
        seconds = len(pcm) / 2 / params["sample_rate"]
        chunk = max(64, int(len(audio) * (self.chunk_ms / 1000.0) / max(seconds, 1e-3)))
        pieces = [header + audio[:chunk]] + [audio[i : i + chunk] for i in range(chunk, len(audio), chunk)]
        cut_at = fault.after_bytes if fault is not None and fault.kind == "cut" else None
        try:
            for i, piece in enumerate(pieces):
                if cut_at is not None and rec.bytes_sent + len(piece) >= cut_at:
                    piece = piece[: max(0, cut_at - rec.bytes_sent)]
                    if piece:
                        await resp.write(piece)
                        rec.bytes_sent += len(piece)
                    rec.events.append("closed_by_fault")
                    request.transport.close()  # flushes what was written, then closes: no terminating chunk
                    return resp
                if i and self.chunk_gap:
                    await self._sleep(request, self.chunk_gap)
                if self._gone(request):
                    raise ConnectionResetError()
                await resp.write(piece)
                if rec.first_byte_at is None:
                    rec.first_byte_at = time.monotonic()
                rec.bytes_sent += len(piece)
                rec.chunks_sent += 1
            await resp.write_eof()
        except ConnectionError:
            rec.events.append("client_disconnected")
            return resp
        self.completed += 1
        rec.events.append("completed")
        return resp

    async def _render(self, text: str, fmt: str, rate: int, speed: float) -> tuple[bytes, bytes]:
        """`render` off the event loop; concurrent requests for the same audio share one synthesis."""
        key = (text, fmt, rate, speed)
        fut = self._inflight.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().run_in_executor(None, render, text, fmt, rate, speed, self.synthesize)
            self._inflight[key] = fut
            fut.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(fut)

    def warm_up(self) -> None:
        """Load Piper (about 1.5 s the first time in a process) before timing anything."""
        self.synthesize("Ready.", 16000, 1.0)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
