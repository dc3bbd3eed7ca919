"""What the doors share: joining the caller's short audio messages, the size check of a text message,
closing a socket that may already be gone, and the admission of a session started over HTTP (`/daily/start`,
`/start`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from loguru import logger
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams
from starlette.websockets import WebSocketState

from bots.auth import AuthError
from bots.runtime import Runtime
from bots.session import Caller
from vocabulary.audio import CLIENT_SAMPLE_RATE, MAX_VOICE_SPEED, MIN_VOICE_SPEED
from vocabulary.errors import SHUTTING_DOWN_MESSAGE, ErrorCode, ProtocolError

MAX_START_BODY_BYTES = 4096


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    """An HTTP door's refusal: the `error` message of docs/PROTOCOL.md as a JSON body."""
    return JSONResponse({"type": "error", "code": code, "message": message}, status_code=status, headers=headers)


@dataclass
class StartRequest:
    """What a session asked for over HTTP says: who (verified when auth is on), which agent (None: the default),
    and the `body` a Pipecat client sends along (`{"body": {...}}`)."""

    caller: Caller
    agent: str | None
    body: dict
    request: dict  # the whole JSON body (Pipecat's runner protocol puts "transport" here)


async def read_start_request(request: Request, runtime: Runtime) -> StartRequest | JSONResponse:
    """Read a request for a session as every HTTP door reads one: the server ready, a JSON body of at most
    4096 bytes, the agent (`?agent=`, the body's "agent", or Pipecat's `{"body": {"agent": ...}}`), the Supabase
    token (`Authorization: Bearer`, when auth is on). Returns the request, or the refusal to answer with."""
    if not runtime.ready.is_set():
        return error_response(503, str(ErrorCode.SERVER_NOT_READY), "engines are still loading; retry in a few seconds")
    if runtime.shutting_down:
        return error_response(503, str(ErrorCode.SERVER_SHUTTING_DOWN), SHUTTING_DOWN_MESSAGE)
    data: dict = {}
    body = await request.body()
    if len(body) > MAX_START_BODY_BYTES:
        return error_response(
            413, str(ErrorCode.FRAME_TOO_LARGE), f"the request body is limited to {MAX_START_BODY_BYTES} bytes"
        )
    if body.strip():
        try:
            data = json.loads(body)
        except ValueError:
            data = None  # type: ignore[assignment]
        if not isinstance(data, dict):
            return error_response(400, str(ErrorCode.INVALID_JSON), "the body must be a JSON object")
    inner = data.get("body")
    if inner is not None and not isinstance(inner, dict):
        return error_response(400, str(ErrorCode.INVALID_FIELD), "'body' must be a JSON object")
    agent = request.query_params.get("agent")
    if agent is None:
        agent = data.get("agent", (inner or {}).get("agent"))
    if agent is not None and not isinstance(agent, str):
        return error_response(400, str(ErrorCode.INVALID_FIELD), "'agent' must be a string")
    if agent is not None and agent not in runtime.agents.by_name:
        runtime.monitor.error(str(ErrorCode.UNKNOWN_AGENT))
        shown = agent if len(agent) <= 64 else agent[:64] + "..."
        return error_response(400, str(ErrorCode.UNKNOWN_AGENT), f"no agent named '{shown}' on this server")
    ip = request.client.host if request.client else "unknown"
    caller = Caller(user_agent=request.headers.get("user-agent"), ip_address=ip)
    if runtime.auth.enabled:
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        try:
            caller.user_id = await runtime.auth.verify(token)
        except AuthError as e:
            runtime.monitor.error(str(ErrorCode.AUTH_FAILED))
            return error_response(401, str(ErrorCode.AUTH_FAILED), str(e))
    return StartRequest(caller, agent, data if inner is None else inner, data)


@dataclass
class Admission:
    """A session admitted to this process: a slot in the per-IP and per-user limits and one of the process's
    sessions (`Runtime.admit`). `release()` gives all of them back, once, however often it is called."""

    runtime: Runtime
    _held: list = field(default_factory=list)
    _admitted: bool = False

    def release_limits(self) -> None:
        for limit, key in self._held:
            limit.release(key)
        self._held.clear()

    def release(self) -> None:
        self.release_limits()
        if self._admitted:
            self._admitted = False
            self.runtime.release()


async def admit(runtime: Runtime, caller: Caller, door: str) -> Admission | ProtocolError:
    """Take the caller's places in the per-IP and per-user limits and a session of this process, or say why not
    (RATE_LIMITED, TOO_MANY_SESSIONS, LIMITS_UNAVAILABLE, SERVER_BUSY; counted in /metrics)."""
    admission = Admission(runtime)
    limits = runtime.limits
    ip = caller.ip_address or "unknown"
    for limit, key in ((limits.by_ip, ip), (limits.by_user, caller.user_id or f"anon:{ip}")):
        try:
            await limit.acquire(key)
        except ProtocolError as e:
            admission.release()
            runtime.monitor.error(str(e.code))
            logger.warning(f"{door} refused for {limit.what} {key[:64]!r}: {e.code}")
            return e
        admission._held.append((limit, key))
    if not runtime.admit():
        admission.release()
        runtime.monitor.error(str(ErrorCode.SERVER_BUSY))
        return ProtocolError(ErrorCode.SERVER_BUSY, runtime.busy_message())
    admission._admitted = True
    return admission


def refusal_response(e: ProtocolError) -> JSONResponse:
    """An admission refused (`admit`), as an HTTP answer: 503 when the shared limits cannot be reached, else 429."""
    unavailable = e.code == ErrorCode.LIMITS_UNAVAILABLE
    retry = "30" if e.code == ErrorCode.SERVER_BUSY else "60"
    return error_response(503 if unavailable else 429, str(e.code), e.message, {"Retry-After": retry})


def parse_speed(value: Any) -> float:
    """A session's voice speed: a number from MIN_VOICE_SPEED to MAX_VOICE_SPEED (None: 1.0), else ProtocolError."""
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ProtocolError(ErrorCode.INVALID_FIELD, "'speed' must be a number")
    if not MIN_VOICE_SPEED <= value <= MAX_VOICE_SPEED:
        raise ProtocolError(
            ErrorCode.INVALID_FIELD, f"'speed' must be from {MIN_VOICE_SPEED:g} to {MAX_VOICE_SPEED:g}, got {value:g}"
        )
    return float(value)


def audio_socket_params(serializer, out_rate: int) -> FastAPIWebsocketParams:
    """The params of a door's Pipecat WebSocket transport: caller audio in at 16 kHz, replies out at `out_rate`,
    every message through the door's own `serializer` (which checks what the client sends), no WAV headers.
    Origins are the doors' own check (ATLAS_ALLOWED_ORIGINS), not Pipecat's PIPECAT_ALLOWED_ORIGINS."""
    return FastAPIWebsocketParams(
        audio_in_enabled=True,
        audio_out_enabled=True,
        add_wav_header=False,
        audio_in_sample_rate=CLIENT_SAMPLE_RATE,
        audio_out_sample_rate=out_rate,
        serializer=serializer,
        allowed_origins=[],
    )


async def close_quietly(websocket, code: int) -> None:
    """Close a door's socket if the client is still there (it may vanish at any moment)."""
    if websocket.client_state == WebSocketState.CONNECTED:
        try:
            await websocket.close(code)
        except Exception:
            pass


def text_too_large(data: str, max_bytes: int) -> bool:
    """Whether a text frame is over `max_bytes` of UTF-8 (a character takes 1 to 4 bytes)."""
    return len(data) > max_bytes or (
        len(data) * 4 > max_bytes and len(data.encode("utf-8", "surrogatepass")) > max_bytes
    )


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
