"""The browser/WebSocket door: handshake, one Pipecat pipeline per session, clean endings.

Life of a connection:
1. accept; the origin, per-IP and pending-connection limits; wait (up to
   ATLAS_SESSION_START_TIMEOUT_SECS) for a valid `session_start`, its token checked when auth is on.
   Anything else before it gets an `error` (NOT_STARTED, INVALID_JSON, ...) and the wait goes on.
   Only then is a session slot taken (ATLAS_MAX_SESSIONS) and the per-user limits applied, so a
   connection that never authenticates holds no slot.
2. `session_started` with the audio format, `status: listening`; the pipeline runs.
3. it ends on `session_stop`, on idle timeout, on max duration, on a pipeline failure, or when
   the client goes away. Whenever the client is still there it gets `session_end` with the metrics
   (sent from the serializer as the output transport stops, before the socket closes).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, replace

from fastapi import WebSocket, WebSocketDisconnect
from loguru import logger
from pipecat.frames.frames import OutputTransportMessageUrgentFrame
from starlette.websockets import WebSocketState

from bots.auth import AuthError
from bots.feedback import record_feedback
from bots.limits import AudioBudget, KeyedLimit, MessageRate, SharedKeyedLimit
from bots.runtime import Runtime
from bots.session import FIELD_LIMITS, Caller, VoiceSession, clean_text
from processors.client_events import ClientEventsObserver
from processors.turn_metrics import Turn
from transports.common import audio_socket_params, close_quietly
from transports.websocket.messages import session_end_message, turn_metrics_message
from transports.websocket.protocol import SessionStart, parse_before_start
from transports.websocket.serializer import AtlasProtocolSerializer
from transports.websocket.transport import AtlasWebsocketTransport
from vocabulary.audio import CLIENT_SAMPLE_RATE
from vocabulary.errors import SHUTTING_DOWN_MESSAGE, CloseCode, ErrorCode, ProtocolError, error_message
from vocabulary.frames import CodedErrorFrame

CLOSE_NORMAL = CloseCode.NORMAL
CLOSE_GOING_AWAY = CloseCode.GOING_AWAY
CLOSE_POLICY = CloseCode.POLICY
CLOSE_TRY_AGAIN = CloseCode.TRY_AGAIN


async def _send_json(websocket: WebSocket, message: dict) -> None:
    if websocket.client_state == WebSocketState.CONNECTED:
        try:
            await websocket.send_text(json.dumps(message))
        except Exception as e:  # the client may vanish at any moment
            logger.debug(f"send failed: {e}")


async def _send_error(websocket: WebSocket, runtime: Runtime, code: ErrorCode, message: str) -> None:
    """An `error` outside a running session (those inside go through the serializer), counted in /metrics."""
    runtime.monitor.error(str(code))
    await _send_json(websocket, error_message(code, message))


async def handshake(websocket: WebSocket, runtime: Runtime, rate: MessageRate | None = None) -> SessionStart | None:
    """Wait for a valid session_start; answer every other message with an error."""
    s = runtime.settings
    deadline = time.monotonic() + s.session_start_timeout_secs
    while True:
        remaining = deadline - time.monotonic()
        try:
            message = await asyncio.wait_for(websocket.receive(), timeout=max(remaining, 0.001))
        except TimeoutError:
            await _send_error(
                websocket,
                runtime,
                ErrorCode.SESSION_START_TIMEOUT,
                f"no session_start within {s.session_start_timeout_secs:g}s",
            )
            await websocket.close(CLOSE_POLICY)
            return None
        if message["type"] == "websocket.disconnect":
            return None
        if rate is not None and not rate.allow():
            if rate.flooding:
                await _send_error(
                    websocket,
                    runtime,
                    ErrorCode.MESSAGE_RATE_EXCEEDED,
                    "over twice the message rate for seconds; the connection is closed",
                )
                await close_quietly(websocket, CLOSE_POLICY)
                return None
            if rate.should_tell():
                await _send_error(websocket, runtime, ErrorCode.MESSAGE_RATE_EXCEEDED, rate.refusal().message)
            continue
        try:
            data = message["bytes"] if message.get("bytes") is not None else message.get("text") or ""
            start = parse_before_start(data, s.max_audio_frame_bytes, s.max_text_message_bytes)
            if start.agent is not None and start.agent not in runtime.agents.by_name:
                shown = start.agent if len(start.agent) <= 64 else start.agent[:64] + "..."
                raise ProtocolError(ErrorCode.UNKNOWN_AGENT, f"no agent named '{shown}' on this server")
        except ProtocolError as e:
            await _send_error(websocket, runtime, e.code, e.message)
            continue
        if runtime.auth.enabled:
            try:
                start = replace(start, verified_user_id=await runtime.auth.verify(start.auth_token))
            except AuthError as e:
                logger.info(f"session refused: {e}")
                await _send_error(websocket, runtime, ErrorCode.AUTH_FAILED, str(e))
                await websocket.close(CLOSE_POLICY)
                return None
        if start.resume_session_id is not None:
            try:
                return await resumed(start, runtime)
            except ProtocolError as e:  # the client may start afresh on this connection
                logger.info(f"resume of session {start.resume_session_id[:64]} refused: {e.message}")
                await _send_error(websocket, runtime, e.code, e.message)
                continue
        return start


@dataclass(frozen=True)
class Resumed(SessionStart):
    """A session_start that resumes a conversation: its messages, its agent, how many times it was resumed."""

    history: tuple = ()
    resumed_agent: str | None = None
    reconnects: int = 0


def _agent_of(start: SessionStart, runtime: Runtime) -> str | None:
    """The agent a session_start names; a resumed conversation keeps its agent (if the server still has it)."""
    if isinstance(start, Resumed) and start.resumed_agent in runtime.agents.by_name:
        return start.resumed_agent
    return start.agent


async def resumed(start: SessionStart, runtime: Runtime) -> Resumed:
    """Check `start.resume` (the token, its user, the conversation still kept here) or ProtocolError RESUME_FAILED."""
    who = start.verified_user_id or f"client:{clean_text(start.user_id, FIELD_LIMITS['client_user_id']) or ''}"
    assert start.resume_session_id is not None
    before = runtime.resume_tokens.redeem(start.resume_token, start.resume_session_id, who)
    kept = await runtime.take_resumable(start.resume_session_id, who)
    if kept is None:
        window = runtime.settings.resume_window_secs
        raise ProtocolError(
            ErrorCode.RESUME_FAILED,
            f"that conversation cannot be resumed (it ended over {window:g} s ago, or on another machine); "
            "start a new session",
        )
    agent, history = kept
    return Resumed(**vars(start), history=tuple(history), resumed_agent=agent, reconnects=before + 1)


class Session(VoiceSession):
    """One live conversation over one WebSocket (the Atlas protocol)."""

    def __init__(
        self,
        runtime: Runtime,
        websocket: WebSocket,
        start: SessionStart,
        rate: MessageRate | None = None,
        budget: AudioBudget | None = None,
    ):
        ws = websocket
        super().__init__(
            runtime,
            Caller(
                user_id=start.verified_user_id,
                client_user_id=start.user_id,
                conversation_id=start.conversation_id,
                user_agent=ws.headers.get("user-agent"),
                ip_address=ws.client.host if ws.client else None,
            ),
            transport_name="websocket",
            agent=runtime.agents.named(_agent_of(start, runtime)),
            resumable=True,
        )
        if isinstance(start, Resumed):  # the conversation goes on: its messages, the session it continues
            self.history, self.resumed_from, self.reconnects = (
                list(start.history),
                start.resume_session_id,
                start.reconnects,
            )
            self.info.resumed_from, self.info.reconnects = self.resumed_from, self.reconnects
        self.websocket = websocket
        self.start = start
        self.speed = start.speed
        self.rate = rate  # the connection's message rate, carried on from the handshake
        self.budget = budget  # the connection's audio budget (seconds of audio, real time + a burst)
        self.serializer: AtlasProtocolSerializer | None = None

    def session_end_message(self) -> dict:
        """`session_end`, with the token that lets the client rate this session afterwards (`POST /feedback`)."""
        token = self.runtime.feedback_tokens.issue(self.session_id, self.caller.user_id, self.transport_name)
        return {**session_end_message(self.final()), "feedbackToken": token}

    def on_feedback(self, rating: int, comment: str | None) -> None:
        record_feedback(self.runtime, self.session_id, self.caller.user_id, self.transport_name, rating, comment)

    async def _send(self, message: dict) -> None:
        if self.worker is not None and not self.worker.has_finished():
            await self.worker.queue_frame(OutputTransportMessageUrgentFrame(message=message))

    def on_reply_started(self, turn: Turn) -> None:
        task = asyncio.get_running_loop().create_task(self._send(turn_metrics_message(turn.record())))
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def cut_off(self, code: ErrorCode, message: str) -> None:
        await _send_json(self.websocket, error_message(code, message))
        if self.serializer is not None and not self.serializer.end_sent:
            self.serializer.end_sent = True
            await _send_json(self.websocket, self.session_end_message())
        await close_quietly(self.websocket, CLOSE_POLICY)

    async def notify_limit(self, code: ErrorCode, message: str) -> None:
        await _send_json(self.websocket, error_message(code, message))
        self.count_error(str(code))

    async def on_cancel_before_start(self) -> None:
        # The output transport never started, so it will not write session_end; its cleanup closes the socket
        # before `run`'s own fallback could write it.
        if self.serializer is not None and not self.serializer.end_sent:
            self.serializer.end_sent = True
            await _send_json(self.websocket, self.session_end_message())

    async def on_pipeline_error(self, frame) -> None:
        # Counted by the serializer when the `error` message goes out.
        logger.warning(f"session {self.session_id}: pipeline error: {frame.error}")
        if isinstance(frame, CodedErrorFrame):
            await self._send(error_message(frame.code, frame.client_message))
        else:
            await self._send(error_message(ErrorCode.PIPELINE_ERROR, "a speech engine failed; the session goes on"))

    async def run(self) -> None:
        rt, s = self.runtime, self.runtime.settings
        out_rate = rt.output_sample_rate

        async def on_session_stop():
            # Called from inside the input transport's receive loop: end from another task.
            self.stop_soon("client_stop")

        serializer = self.serializer = AtlasProtocolSerializer(
            rate=self.rate,
            budget=self.budget,
            on_flood=self.on_flood,
            max_audio_bytes=s.max_audio_frame_bytes,
            max_text_bytes=s.max_text_message_bytes,
            on_session_stop=on_session_stop,
            on_audio=self.touch_audio,
            session_end=self.session_end_message,
            on_error=self.count_error,
            audio_batch_ms=s.audio_in_batch_ms,
            on_feedback=self.on_feedback,
        )
        transport = AtlasWebsocketTransport(self.websocket, audio_socket_params(serializer, out_rate))
        self.make_worker(transport, observers=[ClientEventsObserver(self._send)], out_rate=out_rate)

        @transport.event_handler("on_client_disconnected")
        async def _on_disconnected(_transport, _ws):
            await self.stop("client_disconnected")

        await _send_json(
            self.websocket,
            {
                "type": "session_started",
                "sessionId": self.session_id,
                # What lets this client resume the conversation if its connection drops (session_start `resume`).
                "resumeToken": self.runtime.resume_tokens.issue(self.session_id, self.who, self.reconnects),
                "resumed": self.resumed_from is not None,
                **({"resumedFrom": self.resumed_from} if self.resumed_from else {}),
                "audioFormat": {"encoding": "pcm_s16le", "sampleRate": out_rate, "channels": 1},
                "input": {
                    "encoding": "pcm_s16le",
                    "sampleRate": CLIENT_SAMPLE_RATE,
                    "channels": 1,
                    "maxFrameBytes": s.max_audio_frame_bytes,
                },
            },
        )
        await _send_json(self.websocket, {"type": "status", "status": "listening"})
        try:
            await super().run()
        finally:
            if not serializer.end_sent:
                # Ended before the pipeline had started (e.g. session_stop right after session_started,
                # while the STT was still connecting): the output transport never saw the cancel.
                serializer.end_sent = True
                await _send_json(self.websocket, self.session_end_message())
            await close_quietly(self.websocket, CLOSE_NORMAL)


def _gate(websocket: WebSocket, runtime: Runtime) -> tuple[ErrorCode, str, int] | None:
    """Why this connection may not have a session at all: (code, message, close code), or None."""
    s = runtime.settings
    if s.allowed_origins:
        origin = websocket.headers.get("origin", "")
        if origin not in s.allowed_origins:
            logger.warning(f"websocket from origin {origin[:100]!r} refused")
            return ErrorCode.ORIGIN_NOT_ALLOWED, "this page's origin may not open a voice session", CLOSE_POLICY
    if runtime.shutting_down:
        return ErrorCode.SERVER_SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE, CLOSE_GOING_AWAY
    if not runtime.ready.is_set():
        return ErrorCode.SERVER_NOT_READY, "engines are still loading; retry in a few seconds", CLOSE_TRY_AGAIN
    if not runtime.can_admit():  # full now: say so at once (the slot itself is taken after session_start)
        return (
            ErrorCode.SERVER_BUSY,
            runtime.busy_message(),
            CLOSE_TRY_AGAIN,
        )
    return None


async def _refuse(websocket: WebSocket, runtime: Runtime, code: ErrorCode, message: str, close: int) -> None:
    await _send_error(websocket, runtime, code, message)
    await close_quietly(websocket, close)


async def _acquire(websocket: WebSocket, runtime: Runtime, limit: KeyedLimit | SharedKeyedLimit, key: str) -> bool:
    """Take `key`'s slot in a per-IP or per-user limit, or refuse the connection with the limit's code."""
    try:
        await limit.acquire(key)
        return True
    except ProtocolError as e:
        logger.warning(f"session refused for {limit.what} {key[:64]!r}: {e.code}")
        close = CLOSE_TRY_AGAIN if e.code == ErrorCode.LIMITS_UNAVAILABLE else CLOSE_POLICY
        await _refuse(websocket, runtime, e.code, e.message, close)
        return False


async def serve_websocket(websocket: WebSocket, runtime: Runtime) -> None:
    await websocket.accept()
    s, limits = runtime.settings, runtime.limits
    ip = websocket.client.host if websocket.client else "unknown"
    admitted = ip_held = pending = False
    user = None
    try:
        refusal = _gate(websocket, runtime)
        if refusal:
            await _refuse(websocket, runtime, *refusal)
            return
        if not await _acquire(websocket, runtime, limits.by_ip, ip):
            return
        ip_held = True
        try:
            limits.acquire_pending(ip)
            pending = True
        except ProtocolError as e:
            logger.warning(f"connection from {ip} refused: {e.code} (too many waiting to start)")
            await _refuse(
                websocket,
                runtime,
                e.code,
                e.message,
                CLOSE_TRY_AGAIN if e.code == ErrorCode.SERVER_BUSY else CLOSE_POLICY,
            )
            return
        rate = MessageRate(s.max_messages_per_sec)
        start = await handshake(websocket, runtime, rate)
        if start is None:
            return
        limits.release_pending(ip)
        pending = False
        if runtime.shutting_down:
            await _refuse(websocket, runtime, ErrorCode.SERVER_SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE, CLOSE_GOING_AWAY)
            return
        if not runtime.admit():
            await _refuse(
                websocket,
                runtime,
                ErrorCode.SERVER_BUSY,
                runtime.busy_message(),
                CLOSE_TRY_AGAIN,
            )
            return
        admitted = True
        # Per user: the verified id when auth is on. Without auth the client's userId is only a claim,
        # so it counts per address: nobody can use up another address's sessions by claiming its id.
        key = start.verified_user_id or f"anon:{ip}:{start.user_id}"
        if not await _acquire(websocket, runtime, limits.by_user, key):
            return
        user = key
        await Session(runtime, websocket, start, rate, AudioBudget(s.audio_burst_secs)).run()
    except WebSocketDisconnect:
        pass
    except Exception as e:  # never let one session take the server down
        logger.exception(f"websocket session failed: {e}")
        await _send_error(websocket, runtime, ErrorCode.INTERNAL_ERROR, "internal error; the session ended")
        await close_quietly(websocket, CloseCode.INTERNAL)
    finally:
        if pending:
            limits.release_pending(ip)
        if admitted:
            runtime.release()
        if ip_held:
            limits.by_ip.release(ip)
        if user is not None:
            limits.by_user.release(user)
