"""The Atlas WebSocket protocol: message validation, error codes, and Pipecat's serializer for it.

Pipecat has no serializer for a JSON-control + raw-PCM protocol, so this module writes one
(`AtlasProtocolSerializer`) on Pipecat's `FrameSerializer` interface. Everything a client can send
is validated here, and every rejection is an `error` message with a code from `ErrorCode` (the
list in docs/PROTOCOL.md). `docs/PROTOCOL.md` is the contract; keep the two in step.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputTransportMessageFrame,
    OutputTransportMessageUrgentFrame,
    TTSTextFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.serializers.base_serializer import FrameSerializer
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketOutputTransport,
    FastAPIWebsocketTransport,
)

from processors.sentence_marker import SentenceStartFrame

CLIENT_SAMPLE_RATE = 16000
MAX_ID_LENGTH = 256
# Frame.metadata key: when the caller's audio in this frame reached the server (time.monotonic()); the
# pipeline measures how far behind the caller it runs from it (ATLAS_MAX_AUDIO_LAG_SECS).
RECEIVED_AT = "atlas_received_at"


class ErrorCode(StrEnum):
    NOT_STARTED = "NOT_STARTED"  # audio or a control message before session_start
    ALREADY_STARTED = "ALREADY_STARTED"  # a second session_start
    INVALID_JSON = "INVALID_JSON"  # a text frame that is not JSON
    INVALID_MESSAGE = "INVALID_MESSAGE"  # JSON that is not an object, or has no string `type`
    UNKNOWN_TYPE = "UNKNOWN_TYPE"  # a `type` the server does not know
    INVALID_FIELD = "INVALID_FIELD"  # a required field missing, or a field of the wrong type
    FRAME_TOO_LARGE = "FRAME_TOO_LARGE"  # a binary or text frame over the documented maximum
    ODD_LENGTH_PCM = "ODD_LENGTH_PCM"  # binary audio whose length is not whole 16-bit samples
    SESSION_START_TIMEOUT = "SESSION_START_TIMEOUT"  # no session_start soon enough after connecting
    SESSION_IDLE_TIMEOUT = "SESSION_IDLE_TIMEOUT"  # no audio for ATLAS_SESSION_IDLE_TIMEOUT_SECS
    SESSION_MAX_DURATION = "SESSION_MAX_DURATION"  # the session reached ATLAS_SESSION_MAX_SECS
    SERVER_NOT_READY = "SERVER_NOT_READY"  # engines still loading
    SERVER_BUSY = "SERVER_BUSY"  # the server is at ATLAS_MAX_SESSIONS; retry later
    SERVER_SHUTTING_DOWN = "SERVER_SHUTTING_DOWN"  # the server is stopping (SIGTERM); reconnect elsewhere
    AUTH_FAILED = "AUTH_FAILED"  # session_start without a valid access token (auth on)
    ORIGIN_NOT_ALLOWED = "ORIGIN_NOT_ALLOWED"  # a browser Origin not in ATLAS_ALLOWED_ORIGINS
    TOO_MANY_SESSIONS = "TOO_MANY_SESSIONS"  # this IP or user already has its maximum of live sessions
    RATE_LIMITED = "RATE_LIMITED"  # this IP or user started too many sessions in the last minute
    MESSAGE_RATE_EXCEEDED = "MESSAGE_RATE_EXCEEDED"  # more messages a second than ATLAS_MAX_MESSAGES_PER_SEC
    AUDIO_RATE_EXCEEDED = "AUDIO_RATE_EXCEEDED"  # audio faster than real time beyond ATLAS_AUDIO_BURST_SECS
    AUDIO_BACKLOG = "AUDIO_BACKLOG"  # the server fell ATLAS_MAX_AUDIO_LAG_SECS behind the caller's audio
    TWILIO_SIGNATURE_INVALID = "TWILIO_SIGNATURE_INVALID"  # phone door: a request Twilio did not sign
    TWILIO_STREAM_REFUSED = "TWILIO_STREAM_REFUSED"  # phone door: a stream no signed webhook announced
    PIPELINE_ERROR = "PIPELINE_ERROR"  # an engine failed during the session
    STT_RECONNECTING = "STT_RECONNECTING"  # the STT provider's socket dropped; reconnecting, audio replayed
    LLM_UNAVAILABLE = "LLM_UNAVAILABLE"  # the LLM provider failed after retries; a fallback answers
    TTS_FALLBACK = "TTS_FALLBACK"  # the TTS provider failed; the local voice speaks the rest of the reply
    INTERNAL_ERROR = "INTERNAL_ERROR"  # anything else; the message names no internals


SHUTTING_DOWN_MESSAGE = "the server is restarting; reconnect in a moment"


class ProtocolError(Exception):
    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def to_message(self) -> dict[str, Any]:
        return error_message(self.code, self.message)


def error_message(code: ErrorCode, message: str) -> dict[str, Any]:
    return {"type": "error", "code": str(code), "message": message}


CONTROL_TYPES = {"mute", "unmute", "interrupt", "session_stop"}
CLIENT_TYPES = CONTROL_TYPES | {"session_start"}


@dataclass(frozen=True)
class SessionStart:
    user_id: str
    conversation_id: str
    auth_token: str | None
    verified_user_id: str | None = None  # the token's `sub` when auth is on


def _string_field(msg: dict, name: str, required: bool) -> str | None:
    if name not in msg or msg[name] is None:
        if required:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"session_start needs a string field '{name}'")
        return None
    value = msg[name]
    if not isinstance(value, str):
        raise ProtocolError(
            ErrorCode.INVALID_FIELD, f"'{name}' must be a string, got {type(value).__name__}"
        )
    if len(value) > MAX_ID_LENGTH and name != "authToken":
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"'{name}' is longer than {MAX_ID_LENGTH} characters")
    return value


def text_too_large(data: str, max_bytes: int) -> bool:
    """Whether a text frame is over `max_bytes` of UTF-8 (a character takes 1 to 4 bytes)."""
    return len(data) > max_bytes or (len(data) * 4 > max_bytes and len(data.encode("utf-8", "surrogatepass")) > max_bytes)


def parse_text_message(data: str, max_bytes: int) -> dict[str, Any]:
    """Parse one client text frame into a validated message dict, or raise ProtocolError."""
    if text_too_large(data, max_bytes):
        raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"text messages are limited to {max_bytes} bytes")
    try:
        msg = json.loads(data)
    except (ValueError, RecursionError):
        raise ProtocolError(ErrorCode.INVALID_JSON, "text frames must be JSON objects") from None
    if not isinstance(msg, dict):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "a message must be a JSON object")
    kind = msg.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "a message needs a string field 'type'")
    if kind not in CLIENT_TYPES:
        shown = kind if len(kind) <= 40 else kind[:40] + "..."
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type '{shown}'")
    return msg


def parse_session_start(msg: dict[str, Any]) -> SessionStart:
    return SessionStart(
        user_id=_string_field(msg, "userId", True),
        conversation_id=_string_field(msg, "conversationId", True),
        auth_token=_string_field(msg, "authToken", False),
    )


def parse_before_start(data: str | bytes, max_audio_bytes: int, max_text_bytes: int) -> SessionStart:
    """A client frame on a connection without a session yet: a valid `session_start`, or ProtocolError."""
    if isinstance(data, (bytes, bytearray)):
        check_audio(data, max_audio_bytes)
        raise ProtocolError(ErrorCode.NOT_STARTED, "send session_start before audio")
    msg = parse_text_message(data, max_text_bytes)
    if msg["type"] != "session_start":
        raise ProtocolError(ErrorCode.NOT_STARTED, f"send session_start before '{msg['type']}'")
    return parse_session_start(msg)


def check_audio(data: bytes, max_bytes: int) -> None:
    if len(data) > max_bytes:
        raise ProtocolError(
            ErrorCode.FRAME_TOO_LARGE, f"audio frames are limited to {max_bytes} bytes; this one has {len(data)}"
        )
    if len(data) % 2:
        raise ProtocolError(
            ErrorCode.ODD_LENGTH_PCM, f"audio must be whole 16-bit samples; got {len(data)} bytes (odd)"
        )


def stamped(frame: InputAudioRawFrame) -> InputAudioRawFrame:
    """Mark a caller audio frame with when it arrived (see RECEIVED_AT)."""
    frame.metadata[RECEIVED_AT] = time.monotonic()
    return frame


class AudioBatcher:
    """Joins the caller's short audio messages into frames of at least `ms` milliseconds.

    Browsers and Twilio send 20 ms of audio per message. Every frame in a Pipecat pipeline costs
    a queue hop and a task wake-up at each processor it visits (the input transport, STT, the user
    aggregator with its VAD and turn strategies); at 100 sessions that per-frame work is what fills
    the core. Pipecat's input transport passes frames on at whatever size they arrive, so the
    serializers batch here. Silero scores 32 ms windows whatever the frame size; a 40 ms frame
    holds the audio back at most 20 ms. Larger messages pass through at once.
    """

    def __init__(self, sample_rate: int, ms: int):
        self._min = max(2, sample_rate * ms // 1000 * 2)
        self._pending = bytearray()

    def add(self, pcm: bytes) -> bytes | None:
        if not self._pending and len(pcm) >= self._min:
            return pcm
        self._pending += pcm
        if len(self._pending) < self._min:
            return None
        out = bytes(self._pending)
        self._pending.clear()
        return out


class AtlasProtocolSerializer(FrameSerializer):
    """Serializer for one session of the Atlas protocol (it keeps that session's small state).

    In: binary PCM s16le 16 kHz mono -> InputAudioRawFrame; `mute`/`unmute` gate the audio (muted
    audio becomes silence of the same length, so the VAD closes any open turn); `interrupt` ->
    InterruptionFrame; `session_stop` is handed to `on_session_stop`. Bad input becomes an urgent
    `error` message that travels to the output transport; the session goes on. Every `error`
    sent is reported to `on_error` (the session's error count and /metrics).

    Out: audio -> `audio_chunk` (base64 PCM at the session's output rate) stamped with the
    reply sentence it belongs to; spoken text -> `bot_transcript`; an interruption while the client
    may still be playing -> `audio_flush`; transport messages -> their JSON; the end of the
    pipeline (End/Cancel, written just before the transport closes the socket) -> `session_end`
    from the `session_end` callback.
    """

    def __init__(
        self, *, max_audio_bytes: int, max_text_bytes: int, on_session_stop=None, on_audio=None, session_end=None,
        on_error=None, audio_batch_ms: int = 40, rate=None, budget=None, on_flood=None,
    ):
        super().__init__()
        self._batch = AudioBatcher(CLIENT_SAMPLE_RATE, audio_batch_ms)
        self._max_audio = max_audio_bytes
        self._max_text = max_text_bytes
        self._on_session_stop = on_session_stop
        self._on_audio = on_audio
        self._session_end = session_end
        self._on_error = on_error  # called with the code of every `error` message sent
        self._rate = rate  # bots.limits.MessageRate: over it, messages are dropped before parsing
        self._budget = budget  # bots.limits.AudioBudget: audio over real time (+ a burst) is dropped
        self._on_flood = on_flood  # called once when the message rate says the connection is flooding
        self.muted = False
        self.end_sent = False  # session_end written (the door sends it itself when the pipeline never started)
        self.sentence_index = -1  # the first SentenceStartFrame makes it 0
        # When the client will have played every audio chunk sent so far (monotonic clock).
        self.client_playing_until = 0.0

    # ---- client -> server -------------------------------------------------------------------
    async def deserialize(self, data: str | bytes) -> Frame | None:
        if self._rate is not None and not self._rate.allow():
            if self._on_flood is not None and self._rate.flooding:
                on_flood, self._on_flood = self._on_flood, None
                await on_flood()
                return None
            if self._rate.should_tell():
                return OutputTransportMessageUrgentFrame(message=self._rate.refusal().to_message())
            return None
        try:
            if isinstance(data, (bytes, bytearray)):
                check_audio(data, self._max_audio)
                if not data:
                    return None
                if self._budget is not None and not self._budget.take(len(data) / (2 * CLIENT_SAMPLE_RATE)):
                    if self._budget.should_tell():
                        return OutputTransportMessageUrgentFrame(message=self._budget.refusal().to_message())
                    return None
                if self._on_audio:
                    self._on_audio(len(data))
                audio = self._batch.add(bytes(len(data)) if self.muted else bytes(data))
                if audio is None:
                    return None
                return stamped(InputAudioRawFrame(audio=audio, sample_rate=CLIENT_SAMPLE_RATE, num_channels=1))
            msg = parse_text_message(data, self._max_text)
        except ProtocolError as e:
            return OutputTransportMessageUrgentFrame(message=e.to_message())
        kind = msg["type"]
        if kind == "session_start":
            return OutputTransportMessageUrgentFrame(
                message=error_message(ErrorCode.ALREADY_STARTED, "this connection already has a session")
            )
        if kind == "mute":
            self.muted = True
        elif kind == "unmute":
            self.muted = False
        elif kind == "interrupt":
            return InterruptionFrame()
        elif kind == "session_stop" and self._on_session_stop:
            await self._on_session_stop()
        return None

    # ---- server -> client -------------------------------------------------------------------
    async def serialize(self, frame: Frame) -> str | bytes | None:
        if isinstance(frame, OutputAudioRawFrame):
            now = time.monotonic()
            duration = len(frame.audio) / (2 * frame.sample_rate * frame.num_channels)
            self.client_playing_until = max(now, self.client_playing_until) + duration
            return json.dumps(
                {
                    "type": "audio_chunk",
                    "audio": base64.b64encode(frame.audio).decode("ascii"),
                    "sentenceIndex": max(self.sentence_index, 0),
                }
            )
        if isinstance(frame, SentenceStartFrame):
            self.sentence_index += 1
            return None
        if isinstance(frame, TTSTextFrame):
            # Queued behind its sentence's audio: that sentence has now been sent in full.
            text = frame.text.strip()
            if not text:
                return None
            return json.dumps({"type": "bot_transcript", "text": text, "sentenceIndex": max(self.sentence_index, 0)})
        if isinstance(frame, InterruptionFrame):
            # Pipecat interrupts at every user turn start; only tell the client to drop audio
            # when some may still be queued or playing there.
            playing = time.monotonic() < self.client_playing_until + 0.25
            self.client_playing_until = 0.0  # the client drops its queue
            if playing:
                return json.dumps({"type": "audio_flush", "reason": "interruption"})
            return None
        if isinstance(frame, (OutputTransportMessageFrame, OutputTransportMessageUrgentFrame)):
            if self._on_error is not None and frame.message.get("type") == "error":
                self._on_error(frame.message.get("code", ""))
            return json.dumps(frame.message)
        if isinstance(frame, (EndFrame, CancelFrame)) and self._session_end is not None and not self.end_sent:
            self.end_sent = True
            return json.dumps(self._session_end())
        return None


class AtlasOutputTransport(FastAPIWebsocketOutputTransport):
    """Pipecat's WebSocket output with three changes.

    1. Queued non-audio frames reach the serializer. Pipecat's media sender releases frames such
       as TTSTextFrame in order behind the audio queued before them and then calls
       `write_transport_frame`, which the FastAPI transport ignores. We serialize them, so the
       client learns which sentence the audio belongs to when that audio has been sent.
    2. Pacing keeps the client `PLAYBACK_LEAD_SECS` ahead instead of one 40 ms chunk. Pipecat
       sends audio at exactly real time once the first chunk is out, so any network hiccup longer
       than a chunk is an audible gap. A 200 ms lead absorbs ordinary jitter while keeping "sent"
       within 200 ms of "heard", which is what the context keeps on interruption.

    The client's playback clock is the serializer's `client_playing_until`, advanced as each
    chunk is serialized and reset on interruption, so pacing and `audio_flush` read one clock.
    """

    PLAYBACK_LEAD_SECS = 0.2

    async def write_transport_frame(self, frame: Frame):
        await self._write_frame(frame)

    async def push_frame(self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM):
        # 3. Word-timed text (a voice with word timestamps, e.g. ElevenLabs) is released by the media
        #    sender's clock when the word plays and pushed on without reaching the serializer: send
        #    it to the client then, as that word's `bot_transcript`.
        if direction == FrameDirection.DOWNSTREAM and isinstance(frame, TTSTextFrame) and frame.pts:
            await self._write_frame(frame)
        await super().push_frame(frame, direction)

    async def _write_audio_sleep(self):
        ahead = self._params.serializer.client_playing_until - time.monotonic() - self.PLAYBACK_LEAD_SECS
        if ahead > 0:
            await asyncio.sleep(ahead)


class AtlasWebsocketTransport(FastAPIWebsocketTransport):
    """FastAPIWebsocketTransport with `AtlasOutputTransport` as its output."""

    def __init__(self, websocket, params, **kwargs):
        super().__init__(websocket, params, **kwargs)
        self._output = AtlasOutputTransport(self, self._client, self._params, name=self._output_name)
