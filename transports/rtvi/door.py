"""The doors of Pipecat's own clients (its JS, React, iOS and Android SDKs and its prebuilt page): RTVI over
WebRTC (Pipecat's SmallWebRTC transport, aiortc) and RTVI over a WebSocket (Pipecat's protobuf serializer), on
the one shared pipeline, with the recording, limits and auth of every other door.

The flow is Pipecat's development runner's (pipecat/runner/run.py), so a client configured for it works here:
1. `POST /start` `{"transport": "webrtc" | "websocket", "body": {"agent": ...}}`, with
   `Authorization: Bearer <Supabase token>` when auth is on. It checks the server is ready, the agent and the
   token, and answers a start ticket (transports/rtvi/tickets.py): `{"sessionId": <ticket>}` for WebRTC,
   `{"wsUrl": ".../rtvi/ws", "token": <ticket>}` for the WebSocket. It holds nothing yet.
2. WebRTC: `POST /sessions/<ticket>/api/offer` with the SDP offer (`PATCH` the same path with trickled ICE
   candidates). WebSocket: connect to `/rtvi/ws?token=<ticket>`. Either redeems the ticket (once), takes the
   caller's places in the per-IP and per-user limits and a session of this process (429/close 1013 with the
   limit's code when full), and starts the session.
3. RTVI messages tell the client what happens: `bot-ready` once it sent `client-ready`, the user's
   transcription (partials, then finals), the bot's text as spoken, speaking states, interruptions, metrics,
   and `error` as `<CODE>: <message>` with the codes of docs/PROTOCOL.md (compat SafeErrorsRTVIProcessor).

Bounds: the offer body is at most 64 KiB; WebRTC audio arrives at the media clock and is held to real time plus
ATLAS_AUDIO_BURST_SECS like every door's; the WebSocket's messages are bounded in size, rate and seconds of
audio (transports/rtvi/serializer.py). Sessions end on the client leaving, `disconnect-bot`, the idle timeout
(no turn for ATLAS_SESSION_IDLE_TIMEOUT_SECS), the maximum duration, or a client that never connects its
media within ATLAS_SESSION_START_TIMEOUT_SECS of the offer.

With several worker processes, a ticket is redeemed in whichever process the offer reaches (the key is shared;
app/workers.py). Trickled ICE candidates (`PATCH`) must reach the process holding the peer connection: clients
that gather candidates before the offer (the prebuilt page, `waitForICEGathering`) need nothing else; others
need sticky routing by path.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import Request, WebSocket
from fastapi.responses import JSONResponse
from loguru import logger
from pipecat.frames.frames import InputAudioRawFrame, OutputTransportMessageUrgentFrame
from pipecat.processors.frameworks.rtvi import models as RTVI
from pipecat.serializers.protobuf import ProtobufFrameSerializer
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import IceServer, SmallWebRTCConnection
from pipecat.transports.smallwebrtc.request_handler import (
    IceCandidate,
    SmallWebRTCPatchRequest,
    SmallWebRTCRequest,
    SmallWebRTCRequestHandler,
)
from pipecat.transports.smallwebrtc.transport import SmallWebRTCInputTransport, SmallWebRTCTransport
from pipecat.transports.websocket.fastapi import FastAPIWebsocketTransport

from bots.limits import AudioBudget, MessageRate
from bots.runtime import Runtime
from bots.session import Caller, VoiceSession
from compat.pipecat import become
from config.settings import secret
from transports.common import (
    Admission,
    admit,
    audio_socket_params,
    close_quietly,
    error_response,
    parse_speed,
    read_start_request,
    refusal_response,
)
from transports.rtvi.serializer import BoundedProtobufSerializer
from transports.rtvi.tickets import KINDS, StartTickets
from vocabulary.audio import CLIENT_SAMPLE_RATE
from vocabulary.errors import CloseCode, ErrorCode, ProtocolError, error_message
from vocabulary.records import TurnRecord

MAX_OFFER_BYTES = 64 * 1024
WS_PATH = "/rtvi/ws"


class RTVISession(VoiceSession):
    """A session whose client speaks RTVI: errors and limits are told as RTVI `error` messages."""

    async def tell(self, code: ErrorCode | str, message: str) -> None:
        """An RTVI `error` for the client (`<CODE>: <message>`), sent ahead of queued frames."""
        worker = self.worker
        if worker is not None and worker.rtvi is not None and not worker.has_finished():
            await worker.rtvi.push_transport_message(
                RTVI.Error(data=RTVI.ErrorData(error=f"{code}: {message}", fatal=False))
            )

    async def tell_refused(self, code: ErrorCode, message: str) -> None:
        self.count_error(str(code))
        await self.tell(code, message)

    async def notify_limit(self, code: ErrorCode, message: str) -> None:
        await self.tell_refused(code, message)
        await asyncio.sleep(0.2)  # the message goes out before the cancel that follows

    async def on_tool_failure(self, name: str, reason: str) -> None:
        await super().on_tool_failure(name, reason)
        await self.tell(ErrorCode.TOOL_FAILED, f"the tool '{name}' failed; the conversation goes on")

    def on_turn_recorded(self, record: TurnRecord) -> None:
        self.touch_audio()  # a media stream never stops sending: a session is idle when nobody talks


class _BudgetedWebRTCInput(SmallWebRTCInputTransport):
    """The WebRTC input, holding the caller's audio to real time plus a burst (`atlas_budget`, set by the door):
    the media clock is the client's, and a client could send faster than it. Audio over the budget is dropped
    before the VAD and the STT see it, and told at most once a second."""

    async def push_audio_frame(self, frame: InputAudioRawFrame):
        budget: AudioBudget = self.atlas_budget  # type: ignore[attr-defined]
        if budget.take(len(frame.audio) / 2 / frame.sample_rate / frame.num_channels):
            await super().push_audio_frame(frame)
        elif budget.should_tell():
            await self.atlas_refused(ErrorCode.AUDIO_RATE_EXCEEDED, budget.refusal().message)  # type: ignore[attr-defined]


class WebRTCSession(RTVISession):
    def __init__(self, runtime: Runtime, caller: Caller, agent: str | None, connection: SmallWebRTCConnection):
        super().__init__(runtime, caller, transport_name="webrtc", agent=runtime.agents.named(agent))
        self.connection = connection
        self.connected = asyncio.Event()

    async def _wait_for_media(self) -> None:
        try:
            await asyncio.wait_for(self.connected.wait(), self.runtime.settings.session_start_timeout_secs)
        except TimeoutError:
            logger.info(f"webrtc session {self.session_id}: the client never connected its media")
            await self.stop("no_participant")

    async def run(self) -> None:
        out_rate = self.runtime.output_sample_rate
        transport = SmallWebRTCTransport(
            webrtc_connection=self.connection,
            params=TransportParams(
                audio_in_enabled=True,
                audio_out_enabled=True,
                audio_in_sample_rate=CLIENT_SAMPLE_RATE,
                audio_out_sample_rate=out_rate,
            ),
        )
        media_in = transport.input()
        become(media_in, _BudgetedWebRTCInput)
        media_in.atlas_budget = AudioBudget(self.runtime.settings.audio_burst_secs)  # type: ignore[attr-defined]
        media_in.atlas_refused = self.tell_refused  # type: ignore[attr-defined]
        self.make_worker(transport, out_rate=out_rate, rtvi=True)

        @transport.event_handler("on_client_connected")
        async def _connected(_transport, _client):
            self.connected.set()
            self.touch_audio()

        @transport.event_handler("on_client_disconnected")
        async def _disconnected(_transport, _client):
            await self.stop("client_disconnected")

        waiter = asyncio.create_task(self._wait_for_media())
        try:
            await super().run()
        finally:
            waiter.cancel()


class WebsocketRTVISession(RTVISession):
    def __init__(self, runtime: Runtime, caller: Caller, agent: str | None, websocket: WebSocket):
        super().__init__(runtime, caller, transport_name="rtvi_ws", agent=runtime.agents.named(agent))
        self.websocket = websocket

    async def cut_off(self, code: ErrorCode, message: str) -> None:
        await self.tell(code, message)
        await close_quietly(self.websocket, CloseCode.POLICY)

    async def run(self) -> None:
        s = self.runtime.settings
        out_rate = self.runtime.output_sample_rate
        serializer = BoundedProtobufSerializer(
            max_audio_bytes=s.max_audio_frame_bytes,
            max_text_bytes=s.max_text_message_bytes,
            rate=MessageRate(s.max_messages_per_sec),
            budget=AudioBudget(s.audio_burst_secs),
            on_audio=self.touch_audio,
            on_refused=self.tell_refused,
            on_flood=self.on_flood,
        )
        transport = FastAPIWebsocketTransport(self.websocket, audio_socket_params(serializer, out_rate))
        self.make_worker(transport, out_rate=out_rate, rtvi=True)

        @transport.event_handler("on_client_disconnected")
        async def _disconnected(_transport, _ws):
            await self.stop("client_disconnected")

        try:
            await super().run()
        finally:
            await close_quietly(self.websocket, CloseCode.NORMAL)


class RTVIDoors:
    """`POST /start`, the WebRTC offer and ICE routes, and the RTVI WebSocket, for one process."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        s = runtime.settings
        self.tickets = StartTickets(secret(s.session_token_secret), s.session_start_timeout_secs)
        self.ice_urls = [u.strip() for u in s.webrtc_ice_servers.split(",") if u.strip()]
        self.webrtc = SmallWebRTCRequestHandler(ice_servers=[IceServer(urls=u) for u in self.ice_urls] or None)
        self._pc_ticket: dict[str, str] = {}  # peer connection id -> the jti of the ticket that opened it

    async def close(self) -> None:
        await self.webrtc.close()

    # --- POST /start ---------------------------------------------------------------------------------------

    async def start(self, request: Request) -> JSONResponse:
        start = await read_start_request(request, self.runtime)
        if isinstance(start, JSONResponse):
            return start
        kind = start.request.get("transport", "webrtc")
        if kind not in KINDS:
            return error_response(
                400, str(ErrorCode.INVALID_FIELD), f"'transport' must be one of {', '.join(KINDS)} on this server"
            )
        if not self.runtime.can_admit():  # full now: say so before the client sets up its media
            self.runtime.monitor.error(str(ErrorCode.SERVER_BUSY))
            return error_response(429, str(ErrorCode.SERVER_BUSY), self.runtime.busy_message(), {"Retry-After": "30"})
        try:
            speed = parse_speed(start.body.get("speed"))
        except ProtocolError as e:
            return error_response(400, str(e.code), e.message)
        ticket = self.tickets.issue(kind, start.caller.user_id, start.agent, speed)
        if kind == "websocket":
            scheme = "wss" if _is_https(request) else "ws"
            host = request.headers.get("host", f"{request.url.hostname}:{request.url.port}")
            return JSONResponse({"wsUrl": f"{scheme}://{host}{WS_PATH}", "token": ticket})
        answer: dict = {"sessionId": ticket}
        if self.ice_urls:
            answer["iceConfig"] = {"iceServers": [{"urls": self.ice_urls}]}
        return JSONResponse(answer)

    # --- WebRTC ------------------------------------------------------------------------------------------

    async def offer(self, ticket: str, request: Request) -> JSONResponse:
        """`POST /sessions/<ticket>/api/offer` (a new session, or a renegotiation of its own connection) and
        `PATCH` (its trickled ICE candidates)."""
        body = await request.body()
        if len(body) > MAX_OFFER_BYTES:
            return error_response(
                413, str(ErrorCode.FRAME_TOO_LARGE), f"an offer is limited to {MAX_OFFER_BYTES} bytes"
            )
        try:
            data = json.loads(body)
            if not isinstance(data, dict):
                raise ValueError
        except ValueError:
            return error_response(400, str(ErrorCode.INVALID_JSON), "the body must be a JSON object")
        try:
            claims = self.tickets.check(ticket, "webrtc")
        except ProtocolError as e:
            self.runtime.monitor.error(str(e.code))
            return error_response(401, str(e.code), e.message)
        pc_id = data.get("pc_id")
        if pc_id is not None and (not isinstance(pc_id, str) or self._pc_ticket.get(pc_id) != claims["jti"]):
            return error_response(404, str(ErrorCode.INVALID_FIELD), "no such peer connection for this ticket")
        try:
            if request.method == "PATCH":
                candidates = data.get("candidates")
                if pc_id is None or not isinstance(candidates, list) or len(candidates) > 64:
                    raise ValueError("a PATCH carries pc_id and at most 64 candidates")
                await self.webrtc.handle_patch_request(
                    SmallWebRTCPatchRequest(pc_id=pc_id, candidates=[IceCandidate(**c) for c in candidates])
                )
                return JSONResponse({"status": "success"})
            sdp, sdp_type = data.get("sdp"), data.get("type")
            if not isinstance(sdp, str) or sdp_type != "offer":
                raise ValueError("an offer carries 'sdp' and type 'offer'")
            webrtc_request = SmallWebRTCRequest(
                sdp=sdp, type="offer", pc_id=pc_id, restart_pc=bool(data.get("restart_pc"))
            )
        except (TypeError, ValueError) as e:
            return error_response(400, str(ErrorCode.INVALID_FIELD), str(e) or "not a WebRTC offer")
        if pc_id is not None:  # a renegotiation of this ticket's own connection
            return JSONResponse(await self.webrtc.handle_web_request(webrtc_request, _no_new_connection))
        try:
            self.tickets.redeem(ticket, "webrtc")
        except ProtocolError as e:
            self.runtime.monitor.error(str(e.code))
            return error_response(401, str(e.code), e.message)
        caller = _caller(claims, request.headers.get("user-agent"), request.client.host if request.client else None)
        admission = await admit(self.runtime, caller, "/sessions/.../api/offer")
        if isinstance(admission, ProtocolError):
            return refusal_response(admission)
        started: list[WebRTCSession] = []

        async def on_connection(connection: SmallWebRTCConnection) -> None:
            session = WebRTCSession(self.runtime, caller, claims["agent"] or None, connection)
            session.speed = float(claims.get("speed", 1.0))
            started.append(session)
            self.runtime.track(asyncio.create_task(self._run(session, admission)))

        try:
            answer = await self.webrtc.handle_web_request(webrtc_request, on_connection)
        except Exception as e:
            logger.warning(f"webrtc offer refused: {type(e).__name__}: {e}")
            if not started:
                admission.release()
            return error_response(400, str(ErrorCode.INVALID_FIELD), "the offer could not be answered")
        if not started:  # Pipecat logs and swallows a failing callback
            admission.release()
            return error_response(500, str(ErrorCode.INTERNAL_ERROR), "internal error; the session did not start")
        assert answer is not None
        self._pc_ticket[answer["pc_id"]] = claims["jti"]
        return JSONResponse({**answer, "sessionId": started[0].session_id})

    async def _run(self, session: RTVISession, admission: Admission) -> None:
        try:
            await session.run()
        except Exception as e:  # never let one session take the server down
            logger.exception(f"{session.transport_name} session {session.session_id} failed: {e}")
        finally:
            admission.release()
            if isinstance(session, WebRTCSession):
                self._pc_ticket.pop(session.connection.pc_id, None)
                await session.connection.disconnect()

    # --- the RTVI WebSocket ------------------------------------------------------------------------------

    async def serve_websocket(self, websocket: WebSocket) -> None:
        await websocket.accept()
        rt = self.runtime
        allowed = rt.settings.allowed_origins
        if allowed and websocket.headers.get("origin", "") not in allowed:  # as /ws: a page of another site
            rt.monitor.error(str(ErrorCode.ORIGIN_NOT_ALLOWED))
            await _refuse(
                websocket, ErrorCode.ORIGIN_NOT_ALLOWED, "this page's origin may not open a session", CloseCode.POLICY
            )
            return
        try:
            claims = self.tickets.redeem(websocket.query_params.get("token"), "websocket")
        except ProtocolError as e:
            rt.monitor.error(str(e.code))
            await _refuse(websocket, e.code, e.message, CloseCode.POLICY)
            return
        if rt.shutting_down:
            await _refuse(websocket, ErrorCode.SERVER_SHUTTING_DOWN, "the server is restarting", CloseCode.GOING_AWAY)
            return
        ip = websocket.client.host if websocket.client else None
        caller = _caller(claims, websocket.headers.get("user-agent"), ip)
        admission = await admit(rt, caller, WS_PATH)
        if isinstance(admission, ProtocolError):
            retry = admission.code in (ErrorCode.SERVER_BUSY, ErrorCode.LIMITS_UNAVAILABLE)
            close = CloseCode.TRY_AGAIN if retry else CloseCode.POLICY
            await _refuse(websocket, admission.code, admission.message, close)
            return
        session = WebsocketRTVISession(rt, caller, claims["agent"] or None, websocket)
        session.speed = float(claims.get("speed", 1.0))
        await self._run(session, admission)


async def _no_new_connection(_connection) -> None:
    raise AssertionError("a renegotiation reuses its connection")


def _caller(claims: dict, user_agent: str | None, ip: str | None) -> Caller:
    return Caller(user_id=claims["sub"] or None, user_agent=user_agent, ip_address=ip)


def _is_https(request: Request) -> bool:
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip()
    return request.url.scheme == "https" or forwarded == "https"


async def _refuse(websocket: WebSocket, code: ErrorCode, message: str, close: int) -> None:
    """Refuse a socket before its session: an RTVI `error` in a protobuf message frame, then the close."""
    rtvi_error = RTVI.Error(data=RTVI.ErrorData(error=f"{code}: {message}", fatal=True)).model_dump()
    try:
        data = await ProtobufFrameSerializer().serialize(OutputTransportMessageUrgentFrame(message=rtvi_error))
        if isinstance(data, bytes):
            await websocket.send_bytes(data)
    except Exception:
        pass
    logger.info(f"rtvi websocket refused: {code} ({error_message(code, message)['message']})")
    await close_quietly(websocket, close)
