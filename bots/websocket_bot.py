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
from dataclasses import replace

from fastapi import WebSocket, WebSocketDisconnect
from loguru import logger
from pipecat.frames.frames import OutputTransportMessageUrgentFrame
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams
from starlette.websockets import WebSocketState

from bots.auth import AuthError
from bots.pipeline import CLIENT_SAMPLE_RATE, Runtime
from bots.session import Caller, VoiceSession, close_quietly
from processors.client_events import ClientEventsObserver
from processors.errors import CodedErrorFrame
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
CLOSE_TRY_AGAIN = 1013  # server not ready, or at its session limit


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


class Session(VoiceSession):
    """One live conversation over one WebSocket (the Atlas protocol)."""

    def __init__(self, runtime: Runtime, websocket: WebSocket, start: SessionStart):
        ws = websocket
        super().__init__(runtime, Caller(
            user_id=start.verified_user_id, client_user_id=start.user_id, conversation_id=start.conversation_id,
            user_agent=ws.headers.get("user-agent"), ip_address=ws.client.host if ws.client else None,
        ), transport_name="websocket")
        self.websocket = websocket
        self.start = start

    def session_end_message(self) -> dict:
        return {"type": "session_end", **self.final()}

    async def _send(self, message: dict) -> None:
        if self.worker is not None and not self.worker.has_finished():
            await self.worker.queue_frame(OutputTransportMessageUrgentFrame(message=message))

    async def notify_limit(self, code: ErrorCode, message: str) -> None:
        await _send_json(self.websocket, error_message(code, message))
        self.count_error(str(code))

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
            asyncio.get_running_loop().create_task(self.stop("client_stop"))

        serializer = AtlasProtocolSerializer(
            max_audio_bytes=s.max_audio_frame_bytes,
            max_text_bytes=s.max_text_message_bytes,
            on_session_stop=on_session_stop,
            on_audio=self.touch_audio,
            session_end=self.session_end_message,
            on_error=self.count_error,
            audio_batch_ms=s.audio_in_batch_ms,
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
        self.make_worker(transport, observers=[ClientEventsObserver(self._send)], out_rate=out_rate)

        @transport.event_handler("on_client_disconnected")
        async def _on_disconnected(_transport, _ws):
            await self.stop("client_disconnected")

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
        try:
            await super().run()
        finally:
            await close_quietly(self.websocket, CLOSE_NORMAL)


async def serve_websocket(websocket: WebSocket, runtime: Runtime) -> None:
    await websocket.accept()
    admitted = False
    try:
        if not runtime.ready.is_set():
            await _send_error(websocket, runtime, ErrorCode.SERVER_NOT_READY,
                              "engines are still loading; retry in a few seconds")
            await websocket.close(CLOSE_TRY_AGAIN)
            return
        if not runtime.admit():
            await _send_error(websocket, runtime, ErrorCode.SERVER_BUSY,
                              f"this server is at its limit of {runtime.settings.max_sessions} sessions; retry later")
            await websocket.close(CLOSE_TRY_AGAIN)
            return
        admitted = True
        start = await handshake(websocket, runtime)
        if start is None:
            return
        await Session(runtime, websocket, start).run()
    except WebSocketDisconnect:
        pass
    except Exception as e:  # never let one session take the server down
        logger.exception(f"websocket session failed: {e}")
        await _send_error(websocket, runtime, ErrorCode.INTERNAL_ERROR, "internal error; the session ended")
        await close_quietly(websocket, 1011)
    finally:
        if admitted:
            runtime.release()
