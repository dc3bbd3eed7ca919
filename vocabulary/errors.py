"""Every error and close code a client can get, and the exception that carries one.

docs/PROTOCOL.md is the contract: tests/test_fuzz.py checks that its tables list exactly these codes.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Any


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
    LIMITS_UNAVAILABLE = "LIMITS_UNAVAILABLE"  # the shared limits' Redis is down and ATLAS_REDIS_FAILURE=closed
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
    TOOL_FAILED = "TOOL_FAILED"  # a tool the agent called raised or ran out of time; the caller heard an apology
    UNKNOWN_AGENT = "UNKNOWN_AGENT"  # session_start (or a door's request) named an agent the server does not have
    RESUME_FAILED = "RESUME_FAILED"  # session_start's `resume` cannot continue that conversation; start a new one
    INTERNAL_ERROR = "INTERNAL_ERROR"  # anything else; the message names no internals


SHUTTING_DOWN_MESSAGE = "the server is restarting; reconnect in a moment"


class ProtocolError(Exception):
    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def to_message(self) -> dict[str, Any]:
        return error_message(self.code, self.message)


def error_message(code: ErrorCode | str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": str(code), "message": message}


class CloseCode(IntEnum):
    """WebSocket close codes (docs/PROTOCOL.md)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # the server is shutting down
    POLICY = 1008  # origin not allowed, no session_start in time, bad token, a limit, a flood
    TOO_LARGE = 1009  # a message over the WebSocket limit (uvicorn's ws_max_size)
    INTERNAL = 1011
    TRY_AGAIN = 1013  # server not ready, or at its session limit
