"""What a `/ws` client may send, validated: every rejection is a ProtocolError with a code from
vocabulary.errors (the list in docs/PROTOCOL.md, the contract; keep the two in step)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from transports.common import parse_speed, text_too_large
from vocabulary.errors import ErrorCode, ProtocolError

MAX_ID_LENGTH = 256

CONTROL_TYPES = {"mute", "unmute", "interrupt", "session_stop", "feedback"}
CLIENT_TYPES = CONTROL_TYPES | {"session_start"}


@dataclass(frozen=True)
class SessionStart:
    user_id: str
    conversation_id: str
    auth_token: str | None
    verified_user_id: str | None = None  # the token's `sub` when auth is on
    agent: str | None = None  # one of the server's agents (checked by the door), None for the default
    speed: float = 1.0  # the voice's speed, MIN_VOICE_SPEED..MAX_VOICE_SPEED
    resume_session_id: str | None = None  # `resume`: the session whose conversation this one continues
    resume_token: str | None = None  # ... and that session's resumeToken


def _string_field(msg: dict, name: str, required: bool) -> str | None:
    if name not in msg or msg[name] is None:
        if required:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"session_start needs a string field '{name}'")
        return None
    value = msg[name]
    if not isinstance(value, str):
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"'{name}' must be a string, got {type(value).__name__}")
    if len(value) > MAX_ID_LENGTH and name != "authToken":
        raise ProtocolError(ErrorCode.INVALID_FIELD, f"'{name}' is longer than {MAX_ID_LENGTH} characters")
    return value


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


def _required_string(msg: dict, name: str) -> str:
    value = _string_field(msg, name, True)
    assert value is not None  # _string_field raises for a missing required field
    return value


def _resume(msg: dict[str, Any]) -> tuple[str | None, str | None]:
    resume = msg.get("resume")
    if resume is None:
        return None, None
    if not isinstance(resume, dict):
        raise ProtocolError(ErrorCode.INVALID_FIELD, "'resume' must be an object with 'sessionId' and 'token'")
    session_id, token = resume.get("sessionId"), resume.get("token")
    if not isinstance(session_id, str) or not isinstance(token, str) or len(session_id) > 64 or len(token) > 2048:
        raise ProtocolError(ErrorCode.INVALID_FIELD, "'resume' needs the string fields 'sessionId' and 'token'")
    return session_id, token


def parse_session_start(msg: dict[str, Any]) -> SessionStart:
    resume_session_id, resume_token = _resume(msg)
    return SessionStart(
        user_id=_required_string(msg, "userId"),
        conversation_id=_required_string(msg, "conversationId"),
        auth_token=_string_field(msg, "authToken", False),
        agent=_string_field(msg, "agent", False),
        speed=parse_speed(msg.get("speed")),
        resume_session_id=resume_session_id,
        resume_token=resume_token,
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
