"""A local fake of ElevenLabs' text-to-speech WebSockets: the multi-context endpoint
`/v1/text-to-speech/{voice_id}/multi-stream-input` (what Pipecat's ElevenLabsTTSService uses) and the
single-context `/v1/text-to-speech/{voice_id}/stream-input`.

Handshake checks, as ElevenLabs: `xi-api-key` header (wrong -> HTTP 401 `{"detail": {"status":
"invalid_api_key", ...}}`; absent -> the documented alternative, `xi_api_key` in the first message,
else an error message and close 1008), unknown voice -> 404 `voice_not_found`, unknown `model_id` ->
400, `eleven_v3` on the multi-context endpoint -> 403 (not available there), `language_code` on a
model that takes none -> 400, bad `output_format` / booleans / integers -> 400. This fake produces
`pcm_*`, `ulaw_8000` and `alaw_8000`; mp3/opus formats are refused with a clear reason.

Protocol (multi-context): `{"text": " ", "context_id", "voice_settings"?}` opens a context, `{"text",
"context_id"}` appends, `{"text": ""}` is a keepalive, `{"context_id", "flush": true}` generates the
buffer now, `{"context_id", "close_context": true}` closes the context, `{"close_socket": true}` closes
the socket (1000). Text is generated when the chunk schedule ([120, 160, 250, 290] characters, or the
context's `generation_config.chunk_length_schedule`) is reached, on flush, or at once per message with
`auto_mode=true`. Output: `{"audio": <base64>, "alignment", "normalizedAlignment", "contextId"}` chunks of
`chunk_ms` of real Piper speech, alignment spread proportionally over the characters each chunk voices
(times relative to the chunk, as documented), then `{"isFinal": true, "contextId"}` once a closed
context is done.

close_context follows the reference ("If it has already been set to flush it will continue
flushing"): after a flush, the flushed text is still generated, then isFinal (Pipecat's end of turn:
flush + close_context); without one (Pipecat's interruption) the context's pending audio stops at once
and isFinal is sent immediately. At most 5 contexts may be open per connection (more -> the documented
`max_active_conversations` error, close 1008); contexts and the socket time out after
`inactivity_timeout` seconds (default 20) without a message.

Faults (any thread): `fail_after_audio(seconds)` aborts the TCP connection (no close frame) once a
context has been sent that much audio; `reject_next(status)` refuses handshakes.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import re
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

from fakes.base import FakeServer, RecordedRequest, piper_pcm

MODELS = {
    "eleven_flash_v2_5",
    "eleven_flash_v2",
    "eleven_turbo_v2_5",
    "eleven_turbo_v2",
    "eleven_multilingual_v2",
    "eleven_multilingual_v1",
    "eleven_monolingual_v1",
    "eleven_v3",
    "eleven_v3_conversational",
}
NOT_ON_MULTI_CONTEXT = {"eleven_v3"}  # "Multi-context WebSockets are not available for the eleven_v3 model"
LANGUAGE_CODE_MODELS = {"eleven_flash_v2_5", "eleven_turbo_v2_5", "eleven_v3", "eleven_v3_conversational"}
DEFAULT_MODEL = "eleven_multilingual_v2"
PCM_RATES = {8000, 16000, 22050, 24000, 32000, 44100, 48000}
DOCUMENTED_FORMATS = (
    {f"pcm_{r}" for r in PCM_RATES}
    | {"ulaw_8000", "alaw_8000"}
    | {f"mp3_{r}_{b}" for r, b in [(22050, 32), (44100, 32), (44100, 64), (44100, 96), (44100, 128), (44100, 192)]}
    | {f"opus_48000_{b}" for b in (32, 64, 96, 128, 192)}
)
DEFAULT_SCHEDULE = [120, 160, 250, 290]
MAX_CONTEXTS = 5
INACTIVITY_MESSAGE = (
    "Have not received a new text input within the timeout of {} seconds. Streaming input "
    "terminated. Please make sure to either feed the input in the timely manner, or to send "
    'the end of input text (empty string "") when done.'
)


class _Rejected(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class _PolicyViolation(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


# --- audio helpers --------------------------------------------------------------------------------

_cache_lock = threading.Lock()
_cache: OrderedDict[tuple[str, int], bytes] = OrderedDict()


def cached_piper_pcm(text: str, sample_rate: int) -> bytes:
    """`piper_pcm` with a small LRU cache: a benchmark speaks the same replies over and over."""
    key = (text, sample_rate)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    pcm = piper_pcm(text, sample_rate)
    with _cache_lock:
        _cache[key] = pcm
        while len(_cache) > 512:
            _cache.popitem(last=False)
    return pcm


def _ulaw_byte(x: int) -> int:
    sign = 0x80 if x < 0 else 0
    x = min(abs(x), 32635) + 0x84
    exponent = max(0, min(7, x.bit_length() - 8))
    mantissa = (x >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def _alaw_byte(x: int) -> int:
    x >>= 3
    if x >= 0:
        mask = 0xD5
    else:
        mask, x = 0x55, -x - 1
    seg = next((i for i, end in enumerate((0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF)) if x <= end), 8)
    if seg >= 8:
        return 0x7F ^ mask
    value = (seg << 4) | ((x >> 1) & 0x0F if seg < 2 else (x >> seg) & 0x0F)
    return value ^ mask


@functools.lru_cache(maxsize=2)
def _g711_encode_table(law: str) -> np.ndarray:
    encode = _ulaw_byte if law == "ulaw" else _alaw_byte
    return np.array([encode(int(v)) for v in np.arange(65536, dtype=np.uint16).astype(np.int16)], np.uint8)


def g711_encode(pcm: bytes, law: str) -> bytes:
    """16-bit PCM -> mu-law ("ulaw") or A-law ("alaw") bytes."""
    return _g711_encode_table(law)[np.frombuffer(pcm, "<i2").astype(np.uint16)].tobytes()


# --- records --------------------------------------------------------------------------------------


@dataclass
class ElevenLabsContext:
    """One context (one per connection on stream-input) as the fake saw and voiced it."""

    context_id: str | None
    voice_settings: dict | None = None
    texts: list[str] = field(default_factory=list)  # text appended, message by message (not the init " ")
    generated: list[str] = field(default_factory=list)  # text voiced, generation by generation
    alignment_chars: list[str] = field(default_factory=list)
    audio_seconds: float = 0.0
    audio_bytes: int = 0
    flushes: int = 0
    closed: bool = False  # close_context received (or socket closed)
    final_sent: bool = False
    events: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.texts)


@dataclass
class ElevenLabsConnection:
    request: RecordedRequest
    endpoint: str  # "multi-stream-input" or "stream-input"
    voice_id: str
    model_id: str
    output_format: str
    sample_rate: int
    auto_mode: bool
    inactivity_timeout: int
    messages: list[dict] = field(default_factory=list)  # every JSON message received
    contexts: list[ElevenLabsContext] = field(default_factory=list)  # in opening order (ids may repeat)
    audio_seconds: float = 0.0
    closed: bool = False

    @property
    def query(self) -> dict[str, str]:
        return self.request.query

    @property
    def headers(self) -> dict[str, str]:
        return self.request.headers

    @property
    def path(self) -> str:
        return self.request.path

    @property
    def events(self) -> list[str]:
        return self.request.events


# --- the server -----------------------------------------------------------------------------------


class FakeElevenLabs(FakeServer):
    """Fake ElevenLabs streaming TTS. Use as a context manager; point clients at `.ws_url`."""

    def __init__(
        self,
        *,
        api_key: str = "test-elevenlabs-key",
        voices: set[str] | None = None,
        first_audio_delay: float = 0.0,
        chunk_ms: int = 250,
        synthesize: Callable[[str, int], bytes] | None = None,
    ) -> None:
        super().__init__()
        self.api_key = api_key
        self.voices = set(voices) if voices is not None else {"21m00Tcm4TlvDq8EAJjs"}
        self.first_audio_delay = first_audio_delay
        self.chunk_ms = chunk_ms
        self.synthesize = synthesize or cached_piper_pcm  # (text, sample_rate) -> PCM16 mono
        self.connections: list[ElevenLabsConnection] = []
        self._failures = self._fault_queue()
        self._rejects = self._fault_queue()
        self.app.router.add_get("/v1/text-to-speech/{voice_id}/multi-stream-input", self._multi)
        self.app.router.add_get("/v1/text-to-speech/{voice_id}/stream-input", self._single)
        self.app.router.add_route("*", "/{tail:.*}", self._not_found)

    # --- faults and accessors (any thread) -------------------------------------------------------

    def fail_after_audio(self, seconds: float, times: int = 1) -> None:
        """In the next `times` contexts, abort the connection after this much audio has been sent."""
        self._failures.add(float(seconds), times)

    def reject_next(self, status: int, times: int = 1) -> None:
        """The next `times` handshakes are refused with this HTTP status."""
        self._rejects.add(int(status), times)

    @property
    def contexts(self) -> list[ElevenLabsContext]:
        return [ctx for conn in list(self.connections) for ctx in list(conn.contexts)]

    def texts(self, context_id: str | None) -> str:
        """All text received for `context_id` (every context that used that id, joined)."""
        return "".join(ctx.text for ctx in self.contexts if ctx.context_id == context_id)

    @property
    def texts_by_context(self) -> dict[str | None, str]:
        out: dict[str | None, str] = {}
        for ctx in self.contexts:
            out[ctx.context_id] = out.get(ctx.context_id, "") + ctx.text
        return out

    @property
    def audio_seconds_sent(self) -> float:
        return sum(conn.audio_seconds for conn in list(self.connections))

    # --- HTTP side -------------------------------------------------------------------------------

    @staticmethod
    def _error(status: int, code: str, message: str) -> web.Response:
        return web.json_response({"detail": {"status": code, "message": message}}, status=status)

    async def _not_found(self, request: web.Request) -> web.Response:
        rec = self.record(request)
        rec.status = 404
        return web.json_response({"detail": "Not Found"}, status=404)

    async def _multi(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, multi=True)

    async def _single(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, multi=False)

    def _options(self, request: web.Request, multi: bool) -> dict[str, Any]:
        query = request.query
        voice_id = request.match_info["voice_id"]
        if voice_id not in self.voices:
            raise _Rejected(404, "voice_not_found", f"A voice with the voice_id {voice_id} was not found.")

        def boolean(name: str, default: bool) -> bool:
            value = query.get(name)
            if value is None:
                return default
            if value.lower() in ("true", "1", "yes", "on"):
                return True
            if value.lower() in ("false", "0", "no", "off"):
                return False
            raise _Rejected(400, "invalid_parameters", f"Invalid boolean '{value}' for {name}")

        for name in ("auto_mode", "enable_logging", "enable_ssml_parsing", "sync_alignment"):
            boolean(name, False)
        model_id = query.get("model_id", DEFAULT_MODEL)
        if model_id not in MODELS:
            raise _Rejected(400, "model_not_found", f"A model with model ID {model_id} does not exist.")
        if multi and model_id in NOT_ON_MULTI_CONTEXT:
            raise _Rejected(
                403, "model_not_supported", f"Multi-context WebSockets are not available for the {model_id} model."
            )
        language = query.get("language_code")
        if language is not None:
            if model_id not in LANGUAGE_CODE_MODELS:
                raise _Rejected(
                    400, "unsupported_language", f"Model '{model_id}' does not support the language_code parameter."
                )
            if not re.fullmatch(r"[a-z]{2,3}", language):
                raise _Rejected(400, "unsupported_language", f"Unsupported language_code '{language}'.")
        output_format = query.get("output_format", "mp3_44100_128")
        if output_format not in DOCUMENTED_FORMATS:
            raise _Rejected(400, "invalid_output_format", f"Invalid output_format '{output_format}'.")
        kind, _, rate = output_format.partition("_")
        if kind not in ("pcm", "ulaw", "alaw"):
            raise _Rejected(
                400,
                "invalid_output_format",
                f"output_format '{output_format}' is valid on ElevenLabs, but this fake produces "
                "only pcm_*, ulaw_8000 and alaw_8000",
            )
        if query.get("apply_text_normalization", "auto") not in ("auto", "on", "off"):
            raise _Rejected(400, "invalid_parameters", "apply_text_normalization must be auto, on or off")
        timeout = query.get("inactivity_timeout", "20")
        if not timeout.isdigit() or not 1 <= int(timeout) <= 180:
            raise _Rejected(400, "invalid_parameters", "inactivity_timeout must be an integer 1..180")
        if "seed" in query and not query["seed"].isdigit():
            raise _Rejected(400, "invalid_parameters", "seed must be an integer")
        return {
            "voice_id": voice_id,
            "model_id": model_id,
            "output_format": output_format,
            "sample_rate": int(rate),
            "auto_mode": boolean("auto_mode", False),
            "inactivity_timeout": int(timeout),
        }

    async def _serve(self, request: web.Request, multi: bool) -> web.StreamResponse:
        rec = self.record(request)
        status = self._rejects.take()
        if status is not None:
            rec.status = status
            rec.events.append(f"rejected_by_fault:{status}")
            return self._error(status, "rejected_by_fake", f"Rejected by the fake (scripted fault, status {status})")
        if request.headers.get("Upgrade", "").lower() != "websocket":
            rec.status = 400
            return self._error(400, "websocket_required", "This endpoint needs a WebSocket upgrade")
        key = request.headers.get("xi-api-key")
        if (key is not None and key != self.api_key) or (key is None and "authorization" in request.query):
            rec.status = 401
            return self._error(401, "invalid_api_key", "Invalid API key")
        try:
            options = self._options(request, multi)
        except _Rejected as e:
            rec.status = e.status
            rec.events.append(f"rejected:{e.code}")
            return self._error(e.status, e.code, e.message)

        transport = request.transport
        ws = web.WebSocketResponse(timeout=2.0, max_msg_size=16 * 1024 * 1024)
        await ws.prepare(request)
        rec.status = 101
        conn = ElevenLabsConnection(request=rec, endpoint="multi-stream-input" if multi else "stream-input", **options)
        self.connections.append(conn)
        session = _Session(self, conn, ws, transport, multi=multi, key_in_first_message=key is None)
        try:
            await session.run()
        finally:
            conn.closed = True
        return ws


# --- one connection -------------------------------------------------------------------------------


@dataclass
class _Segment:
    text: str
    committed_at: float


class _Ctx:
    """Runtime state of one context."""

    def __init__(self, record: ElevenLabsContext, schedule: list[float], fail_at: float | None) -> None:
        self.record = record
        self.schedule = schedule
        self.fail_at = fail_at
        self.buffer = ""
        self.queue: deque[_Segment] = deque()
        self.committed = 0  # segments committed so far
        self.done = 0  # segments fully voiced
        self.flush_mark = 0  # segments committed before the last flush
        self.worker: asyncio.Task | None = None
        self.closing = False  # close_context received while flushed work remains
        self.last_activity = 0.0


class _Session:
    def __init__(
        self,
        fake: FakeElevenLabs,
        conn: ElevenLabsConnection,
        ws: web.WebSocketResponse,
        transport,
        *,
        multi: bool,
        key_in_first_message: bool,
    ) -> None:
        self.fake, self.conn, self.ws, self.transport = fake, conn, ws, transport
        self.multi = multi
        self.need_key = key_in_first_message
        self.loop = asyncio.get_running_loop()
        self.contexts: dict[str | None, _Ctx] = {}  # open contexts by id
        self.draining: set[_Ctx] = set()  # closed after a flush, still voicing the flushed text
        self.last_message = self.loop.time()
        self.ended = False
        kind, _, _ = conn.output_format.partition("_")
        self.encoding = kind
        self.bytes_per_second = conn.sample_rate * (2 if kind == "pcm" else 1)

    # --- plumbing --------------------------------------------------------------------------------

    async def run(self) -> None:
        watchdog = asyncio.create_task(self._watchdog())
        try:
            await self._receive_loop()
        finally:
            watchdog.cancel()
            for ctx in [*self.contexts.values(), *self.draining]:
                self._cancel(ctx)

    async def _send(self, message: dict) -> bool:
        if self.ws.closed or self.ended:
            return False
        try:
            await self.ws.send_str(json.dumps(message))
            return True
        except (ConnectionError, RuntimeError):
            return False

    async def _policy_close(self, code: str, message: str) -> None:
        self.conn.events.append(f"closed_1008:{code}")
        await self._send({"message": message, "error": code, "code": 1008})
        self.ended = True
        await self.ws.close(code=1008, message=message.encode()[:120])

    def _abort(self, reason: str) -> None:
        self.conn.events.append(f"closed_by_fault:{reason}")
        self.ended = True
        if self.transport is not None:
            self.transport.abort()

    async def _watchdog(self) -> None:
        timeout = self.conn.inactivity_timeout
        while not self.ended:
            await asyncio.sleep(0.25)
            now = self.loop.time()
            if now - self.last_message >= timeout:
                await self._policy_close("input_timeout_exceeded", INACTIVITY_MESSAGE.format(timeout))
                return
            for cid, ctx in list(self.contexts.items()):
                busy = ctx.worker is not None and not ctx.worker.done()
                if not busy and now - ctx.last_activity >= timeout:
                    ctx.record.events.append("context_timeout")
                    ctx.record.closed = True
                    self.contexts.pop(cid, None)

    async def _receive_loop(self) -> None:
        while True:
            msg = await self.ws.receive()
            if msg.type != WSMsgType.TEXT:
                if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    if not self.ended:
                        self.conn.events.append("client_disconnected")
                    return
                await self._policy_close("invalid_message", "Binary messages are not accepted")
                return
            self.last_message = self.loop.time()
            try:
                message = json.loads(msg.data)
                if not isinstance(message, dict):
                    raise ValueError
            except ValueError:
                await self._policy_close("invalid_message", "Invalid JSON message")
                return
            self.conn.messages.append(message)
            try:
                if self.need_key:
                    if message.get("xi_api_key") != self.fake.api_key:
                        raise _PolicyViolation("invalid_api_key", "Invalid API key")
                    self.need_key = False
                keep_going = await (self._on_multi(message) if self.multi else self._on_single(message))
            except _PolicyViolation as e:
                await self._policy_close(e.code, e.message)
                return
            if not keep_going:
                return

    # --- messages in -----------------------------------------------------------------------------

    async def _on_multi(self, message: dict) -> bool:
        if message.get("close_socket") is True:
            await self._close_socket()
            return False
        cid = message.get("context_id")
        if cid is not None and not isinstance(cid, str):
            raise _PolicyViolation("invalid_message", "context_id must be a string")
        if message.get("close_context") is True:
            await self._close_context(cid)
            return True
        text = message.get("text")
        flush = message.get("flush") is True
        if text is not None and not isinstance(text, str):
            raise _PolicyViolation("invalid_message", "text must be a string")
        if text is None and not flush:
            raise _PolicyViolation("invalid_message", f"Unrecognized message: {json.dumps(message)[:80]}")
        ctx = self.contexts.get(cid)
        if text == "" and not flush:  # keepalive, for a context or for the socket
            if ctx is not None:
                ctx.last_activity = self.loop.time()
            return True
        if ctx is None:
            ctx = self._open(cid, message)
            if text == " ":
                text = None  # the context-init marker, not speech
        else:
            self._check_voice_settings(ctx, message)
        ctx.last_activity = self.loop.time()
        if text:
            self._append(ctx, text)
        if flush:
            self._flush(ctx)
        return True

    async def _on_single(self, message: dict) -> bool:
        text = message.get("text")
        if not isinstance(text, str):
            raise _PolicyViolation("invalid_message", "Every message needs a text field")
        ctx = self.contexts.get(None)
        if ctx is None:
            if self.conn.contexts:  # stream already ended
                return False
            ctx = self._open(None, message)
            ctx.last_activity = self.loop.time()
            if text.strip() == "":
                return True  # the initial " " (the first message must be one; be lenient about "")
        else:
            self._check_voice_settings(ctx, message)
        ctx.last_activity = self.loop.time()
        if text == "":  # end of input: voice the rest, send isFinal, close the socket
            self._flush(ctx)
            await self._close_context(None)
            await self._drain_and_close([ctx], "closed_after_end_of_input")
            return False
        self._append(ctx, text)
        if message.get("flush") is True or message.get("try_trigger_generation") is True:
            self._flush(ctx)
        return True

    def _open(self, cid: str | None, message: dict) -> _Ctx:
        if len(self.contexts) >= MAX_CONTEXTS:
            raise _PolicyViolation(
                "max_active_conversations",
                f"Maximum simultaneous contexts per WebSocket connection exceeded ({MAX_CONTEXTS}). "
                "Please close an existing context before opening a new one.",
            )
        record = ElevenLabsContext(context_id=cid, voice_settings=message.get("voice_settings"))
        schedule = (message.get("generation_config") or {}).get("chunk_length_schedule") or DEFAULT_SCHEDULE
        if not all(isinstance(v, (int, float)) and 50 <= v <= 500 for v in schedule):
            raise _PolicyViolation("invalid_message", "chunk_length_schedule values must be in 50..500")
        ctx = _Ctx(record, list(schedule), self.fake._failures.take())
        ctx.last_activity = self.loop.time()
        self.conn.contexts.append(record)
        self.contexts[cid] = ctx
        return ctx

    @staticmethod
    def _check_voice_settings(ctx: _Ctx, message: dict) -> None:
        if "voice_settings" in message and message["voice_settings"] != ctx.record.voice_settings:
            raise _PolicyViolation(
                "invalid_message",
                "voice_settings field must be provided in the first message "
                "and then either be not provided or not change.",
            )

    # --- text -> generations ---------------------------------------------------------------------

    def _append(self, ctx: _Ctx, text: str) -> None:
        ctx.record.texts.append(text)
        ctx.buffer += text
        if self.conn.auto_mode:
            self._commit(ctx, len(ctx.buffer))
            return
        threshold = ctx.schedule[min(ctx.committed, len(ctx.schedule) - 1)]
        if len(ctx.buffer) >= threshold:
            cut = max(ctx.buffer.rfind(" ", 0, len(ctx.buffer) - 1), int(threshold)) + 1
            self._commit(ctx, min(cut, len(ctx.buffer)))

    def _flush(self, ctx: _Ctx) -> None:
        ctx.record.flushes += 1
        self._commit(ctx, len(ctx.buffer))
        ctx.flush_mark = ctx.committed

    def _commit(self, ctx: _Ctx, cut: int) -> None:
        text, ctx.buffer = ctx.buffer[:cut], ctx.buffer[cut:]
        if not ctx.buffer.strip():  # whitespace left over belongs to what was just committed
            text, ctx.buffer = text + ctx.buffer, ""
        if not text:
            return
        ctx.queue.append(_Segment(text, self.loop.time()))
        ctx.committed += 1
        if ctx.worker is None or ctx.worker.done():
            ctx.worker = asyncio.create_task(self._voice(ctx))

    async def _close_context(self, cid: str | None) -> None:
        ctx = self.contexts.pop(cid, None)
        if ctx is None:
            self.conn.events.append(f"close_unknown_context:{cid}")
            return
        ctx.record.closed = True
        ctx.buffer = ""
        pending_flush = ctx.flush_mark > ctx.done
        if pending_flush:
            while ctx.committed > ctx.flush_mark and ctx.queue:  # unflushed text after the flush is dropped
                ctx.queue.pop()
                ctx.committed -= 1
            ctx.closing = True
            self.draining.add(ctx)
            if ctx.worker is None or ctx.worker.done():
                ctx.worker = asyncio.create_task(self._voice(ctx))
            return
        if ctx.queue or (ctx.worker is not None and not ctx.worker.done()):
            ctx.record.events.append("cancelled_on_close")
        self._cancel(ctx)
        await self._final(ctx)

    def _cancel(self, ctx: _Ctx) -> None:
        ctx.queue.clear()
        if ctx.worker is not None and not ctx.worker.done() and ctx.worker is not asyncio.current_task():
            ctx.worker.cancel()

    async def _final(self, ctx: _Ctx) -> None:
        message: dict[str, Any] = {"isFinal": True}
        if self.multi:
            message["contextId"] = ctx.record.context_id
        if await self._send(message):
            ctx.record.final_sent = True

    async def _close_socket(self) -> None:
        # "Any context that was previously set to flush will wait to flush before closing."
        for cid, ctx in list(self.contexts.items()):
            if ctx.flush_mark > ctx.done and ctx.worker is not None and not ctx.worker.done():
                ctx.closing = True
                self.draining.add(ctx)
            else:
                self._cancel(ctx)
            ctx.record.closed = True
            self.contexts.pop(cid, None)
        await self._drain_and_close(list(self.draining), "closed_by_close_socket")

    async def _drain_and_close(self, contexts: list, event: str) -> None:
        """Let these contexts finish voicing, then close the socket cleanly (1000), once."""
        for ctx in contexts:
            if ctx.worker is not None:
                try:
                    await ctx.worker
                except (asyncio.CancelledError, Exception):
                    pass
        if not self.ended:
            self.ended = True
            self.conn.events.append(event)
            await self.ws.close(code=1000)

    # --- audio out -------------------------------------------------------------------------------

    async def _voice(self, ctx: _Ctx) -> None:
        while ctx.queue and not self.ended:
            segment = ctx.queue[0]
            wait = segment.committed_at + self.fake.first_audio_delay - self.loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            rate = self.conn.sample_rate
            pcm = b""
            if segment.text.strip():
                pcm = await self.loop.run_in_executor(None, self.fake.synthesize, segment.text.strip(), rate)
            if self.encoding != "pcm":
                pcm = g711_encode(pcm, self.encoding)
            if not await self._send_generation(ctx, segment.text, pcm):
                return
            if ctx.queue and ctx.queue[0] is segment:
                ctx.queue.popleft()
            ctx.done += 1
            ctx.record.generated.append(segment.text)
        if ctx.closing and not ctx.record.final_sent and not self.ended:
            await self._final(ctx)
        self.draining.discard(ctx)

    async def _send_generation(self, ctx: _Ctx, text: str, audio: bytes) -> bool:
        width = 2 if self.encoding == "pcm" else 1
        bps = self.bytes_per_second
        total_ms = len(audio) / bps * 1000.0
        chunk_bytes = max(width, int(bps * self.fake.chunk_ms / 1000) // width * width)
        n = len(text)
        starts = [total_ms * i / n for i in range(n)] if n else []
        char_ms = total_ms / n if n else 0.0
        offset, i = 0, 0
        while offset < len(audio) or (offset == 0 and not audio):
            piece = audio[offset : offset + chunk_bytes]
            t0 = offset / bps * 1000.0
            t1 = (offset + len(piece)) / bps * 1000.0
            last = offset + len(piece) >= len(audio)
            chars, begins, durations = [], [], []
            while i < n and (starts[i] < t1 or last):
                chars.append(text[i])
                begins.append(int(round(starts[i] - t0)))
                durations.append(max(1, int(round(char_ms))))
                i += 1
            alignment = {"chars": chars, "charStartTimesMs": begins, "charDurationsMs": durations} if chars else None
            message: dict[str, Any] = {
                "audio": base64.b64encode(piece).decode() if piece else None,
                "isFinal": None,
                "normalizedAlignment": alignment,
                "alignment": alignment,
            }
            if self.multi:
                message = {
                    "audio": message["audio"],
                    "alignment": alignment,
                    "normalizedAlignment": alignment,
                    "contextId": ctx.record.context_id,
                }
            if not await self._send(message):
                return False
            seconds = len(piece) / bps
            ctx.record.audio_bytes += len(piece)
            ctx.record.audio_seconds += seconds
            ctx.record.alignment_chars.extend(chars)
            self.conn.audio_seconds += seconds
            if ctx.fail_at is not None and ctx.record.audio_seconds >= ctx.fail_at:
                ctx.record.events.append(f"closed_by_fault:fail_after_audio:{ctx.fail_at}")
                self._abort(f"fail_after_audio:{ctx.fail_at}")
                return False
            offset += len(piece)
            if not audio:
                break
        return True
