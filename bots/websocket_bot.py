"""The browser/WebSocket door: handshake, one Pipecat pipeline per session, clean endings.

Life of a connection:
1. accept; wait (up to ATLAS_SESSION_START_TIMEOUT_SECS) for a valid `session_start`. Anything
   else before it gets an `error` (NOT_STARTED, INVALID_JSON, ...) and the wait goes on.
2. `session_started` with the audio format, `status: listening`; the pipeline runs.
3. it ends on `session_stop`, on idle timeout, on max duration, on a pipeline failure, or when
   the client goes away. Whenever the client is still there it gets `session_end` with the metrics
   (sent from the serializer as the output transport stops, before the socket closes).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field, replace

from fastapi import WebSocket, WebSocketDisconnect
from loguru import logger
from pipecat.frames.frames import OutputTransportMessageUrgentFrame
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams
from pipecat.workers.runner import WorkerRunner
from starlette.websockets import WebSocketState

from bots.auth import AuthError
from bots.pipeline import CLIENT_SAMPLE_RATE, Runtime, build_pipeline
from processors.client_events import ClientEventsObserver
from processors.errors import CodedErrorFrame
from processors.turn_metrics import Turn, TurnMetricsObserver
from storage.records import (
    INSERT,
    SESSIONS,
    TURNS,
    UPSERT,
    SessionInfo,
    provider_models,
    turn_row,
)
from transports.protocol import (
    AtlasProtocolSerializer,
    AtlasWebsocketTransport,
    ErrorCode,
    ProtocolError,
    SessionStart,
    check_audio,
    error_message,
    parse_session_start,
    parse_text_message,
)

# WebSocket close codes (documented in docs/PROTOCOL.md)
CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008  # no session_start in time
CLOSE_TRY_AGAIN = 1013  # server not ready


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


async def handshake(websocket: WebSocket, runtime: Runtime) -> SessionStart | None:
    """Wait for a valid session_start; answer every other message with an error."""
    s = runtime.settings
    deadline = time.monotonic() + s.session_start_timeout_secs
    while True:
        remaining = deadline - time.monotonic()
        try:
            message = await asyncio.wait_for(websocket.receive(), timeout=max(remaining, 0.001))
        except TimeoutError:
            await _send_error(websocket, runtime, ErrorCode.SESSION_START_TIMEOUT,
                              f"no session_start within {s.session_start_timeout_secs:g}s")
            await websocket.close(CLOSE_POLICY)
            return None
        if message["type"] == "websocket.disconnect":
            return None
        try:
            if message.get("bytes") is not None:
                check_audio(message["bytes"], s.max_audio_frame_bytes)
                raise ProtocolError(ErrorCode.NOT_STARTED, "send session_start before audio")
            msg = parse_text_message(message.get("text") or "", s.max_text_message_bytes)
            if msg["type"] != "session_start":
                raise ProtocolError(ErrorCode.NOT_STARTED, f"send session_start before '{msg['type']}'")
            start = parse_session_start(msg)
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
        return start


@dataclass
class Session:
    """One live conversation over one WebSocket."""

    runtime: Runtime
    websocket: WebSocket
    start: SessionStart
    session_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started_at: float = field(default_factory=time.monotonic)
    last_audio_at: float = field(default_factory=time.monotonic)
    end_reason: str = "client_disconnected"
    stopping: bool = False
    worker: PipelineWorker | None = None
    transport_name: str = "websocket"
    metrics: TurnMetricsObserver = field(init=False)
    info: SessionInfo = field(init=False)
    _final: dict | None = None  # the session_end message, built once

    def __post_init__(self):
        self.metrics = TurnMetricsObserver(on_turn_closed=self._record_turn)
        ws, start = self.websocket, self.start
        self.info = SessionInfo(
            id=self.session_id, transport=self.transport_name, started_at=time.time(),
            user_id=start.verified_user_id, client_user_id=start.user_id, conversation_id=start.conversation_id,
            models=provider_models(self.runtime.settings), user_agent=ws.headers.get("user-agent"),
            ip_address=ws.client.host if ws.client else None,
        )

    def _touch_audio(self, _n: int) -> None:
        self.last_audio_at = time.monotonic()

    def _record_turn(self, turn: Turn) -> None:
        self.runtime.recorder.submit(TURNS, INSERT, [turn_row(self.info, turn)])
        self.runtime.monitor.turn_recorded(self.transport_name, turn.breakdown())

    def _count_error(self, code: str) -> None:
        self.metrics.count_error(code)
        self.runtime.monitor.error(code)

    def session_end_message(self) -> dict:
        """Built once, when the session ends: the client and the database get these same numbers."""
        if self._final is None:
            self.metrics.close_turns()  # the last turn's row is written now
            self._final = {
                "type": "session_end",
                "sessionId": self.session_id,
                "reason": self.end_reason,
                "duration": round(time.monotonic() - self.started_at, 3),
                "metrics": self.metrics.summary(),
            }
        return self._final

    def _record_end(self) -> None:
        final = self.session_end_message()
        summary = final["metrics"]
        ended_at = self.info.started_at + final["duration"]
        row = self.info.end_row(summary, ended_at=ended_at, end_reason=final["reason"])
        self.runtime.recorder.submit(SESSIONS, UPSERT, [row])
        self.runtime.monitor.session_ended(self.transport_name, final["reason"], summary, self.info.cost(summary))

    async def stop(self, reason: str, error: tuple[ErrorCode, str] | None = None) -> None:
        """End the session once, for the first reason that comes (later ones are ignored)."""
        if self.worker is None or self.worker.has_finished() or self.stopping:
            return
        self.stopping = True
        self.end_reason = reason
        if error:
            await _send_json(self.websocket, error_message(*error))
        await self.worker.cancel(reason=reason)

    async def _watchdog(self) -> None:
        s = self.runtime.settings
        while True:
            await asyncio.sleep(min(1.0, s.session_idle_timeout_secs / 4))
            now = time.monotonic()
            if now - self.last_audio_at > s.session_idle_timeout_secs:
                await self.stop(
                    "idle_timeout",
                    (ErrorCode.SESSION_IDLE_TIMEOUT, f"no audio for {s.session_idle_timeout_secs:g}s"),
                )
                return
            if now - self.started_at > s.session_max_secs:
                await self.stop(
                    "max_duration",
                    (ErrorCode.SESSION_MAX_DURATION, f"sessions last at most {s.session_max_secs:g}s"),
                )
                return

    async def run(self) -> None:
        rt, s = self.runtime, self.runtime.settings
        out_rate = rt.output_sample_rate

        async def on_session_stop():
            # Called from inside the input transport's receive loop: end from another task.
            asyncio.get_running_loop().create_task(self.stop("client_stop"))

        serializer = AtlasProtocolSerializer(
            max_audio_bytes=s.max_audio_frame_bytes,
            max_text_bytes=s.max_text_message_bytes,
            on_session_stop=on_session_stop,
            on_audio=self._touch_audio,
            session_end=self.session_end_message,
            on_error=self._count_error,
        )
        transport = AtlasWebsocketTransport(
            self.websocket,
            FastAPIWebsocketParams(
                audio_in_enabled=True,
                audio_out_enabled=True,
                audio_in_sample_rate=CLIENT_SAMPLE_RATE,
                audio_out_sample_rate=out_rate,
                serializer=serializer,
                allowed_origins=[],
            ),
        )
        built = build_pipeline(rt, transport)

        async def send(message: dict) -> None:
            if self.worker is not None and not self.worker.has_finished():
                await self.worker.queue_frame(OutputTransportMessageUrgentFrame(message=message))

        events = ClientEventsObserver(send)
        self.worker = PipelineWorker(
            built.pipeline,
            params=PipelineParams(
                audio_in_sample_rate=CLIENT_SAMPLE_RATE,
                audio_out_sample_rate=out_rate,
                enable_metrics=True,
                enable_usage_metrics=True,
            ),
            observers=[events, self.metrics],
            idle_timeout_secs=None,
            enable_rtvi=False,
            conversation_id=self.start.conversation_id,
        )

        @transport.event_handler("on_client_disconnected")
        async def _on_disconnected(_transport, _ws):
            await self.stop("client_disconnected")

        @self.worker.event_handler("on_pipeline_error")
        async def _on_error(_worker, frame):
            logger.warning(f"session {self.session_id}: pipeline error: {frame.error}")
            if isinstance(frame, CodedErrorFrame):
                await send(error_message(frame.code, frame.client_message))
            else:
                await send(error_message(ErrorCode.PIPELINE_ERROR, "a speech engine failed; the session goes on"))

        await _send_json(
            self.websocket,
            {
                "type": "session_started",
                "sessionId": self.session_id,
                "audioFormat": {"encoding": "pcm_s16le", "sampleRate": out_rate, "channels": 1},
                "input": {"encoding": "pcm_s16le", "sampleRate": CLIENT_SAMPLE_RATE, "channels": 1,
                          "maxFrameBytes": s.max_audio_frame_bytes},
            },
        )
        await _send_json(self.websocket, {"type": "status", "status": "listening"})
        logger.info(f"session {self.session_id} started (user {self.start.verified_user_id or self.start.user_id})")

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(self.worker)
        rt.recorder.submit(SESSIONS, INSERT, [self.info.start_row()])
        rt.monitor.session_started(self.transport_name)
        rt.active_sessions += 1
        watchdog = asyncio.create_task(self._watchdog())
        try:
            await runner.run()
        finally:
            watchdog.cancel()
            rt.active_sessions -= 1
            self._record_end()
            summary = self._final["metrics"]
            logger.info(
                f"session {self.session_id} ended ({self.end_reason}): {summary['turns']} turns, "
                f"v2v p50 {summary['p50Latency']} ms p95 {summary['p95Latency']} ms"
            )
            if self.websocket.client_state == WebSocketState.CONNECTED:
                try:
                    await self.websocket.close(CLOSE_NORMAL)
                except Exception:
                    pass


async def serve_websocket(websocket: WebSocket, runtime: Runtime) -> None:
    await websocket.accept()
    try:
        if not runtime.ready.is_set():
            await _send_error(websocket, runtime, ErrorCode.SERVER_NOT_READY,
                              "engines are still loading; retry in a few seconds")
            await websocket.close(CLOSE_TRY_AGAIN)
            return
        start = await handshake(websocket, runtime)
        if start is None:
            return
        await Session(runtime, websocket, start).run()
    except WebSocketDisconnect:
        pass
    except Exception as e:  # never let one session take the server down
        logger.exception(f"websocket session failed: {e}")
        await _send_error(websocket, runtime, ErrorCode.INTERNAL_ERROR, "internal error; the session ended")
        try:
            await websocket.close(1011)
        except Exception:
            pass
