"""The phone door: Twilio Programmable Voice answers with TwiML that connects the call's audio to
`/twilio/ws` as a bidirectional Media Stream; the shared pipeline then talks on it.

Only streams that Twilio started, for a call Twilio announced through the signed webhook, get a session:

- The door is off (404) until TWILIO_AUTH_TOKEN (and TWILIO_ACCOUNT_SID) are set, unless
  ATLAS_TWILIO_ALLOW_UNSIGNED=true opens it without any check, for a local simulator only.
- `POST /twilio/voice` (the number's voice webhook) must carry a valid `X-Twilio-Signature` (403
  otherwise) and a well-formed CallSid. It answers `<Connect><Stream url="wss://PUBLIC_HOST/twilio/ws">`
  with the caller's number and a stream token as `<Parameter>`s (Twilio allows no query string in a
  stream URL). The token is a JWT signed with a key derived from TWILIO_AUTH_TOKEN, bound to the
  CallSid, valid ATLAS_TWILIO_STREAM_TOKEN_SECS and good for one stream. When the server is full,
  loading or stopping, the TwiML says sorry and hangs up instead.
- `/twilio/ws`: the upgrade request must carry Twilio's `X-Twilio-Signature` for the stream URL
  (refused with HTTP 403 before the socket opens). Until Twilio's `start` arrives the connection holds
  no session slot, only one of the ATLAS_MAX_PENDING_* places. `start` must have well-formed SIDs, the
  configured account, and a stream token that has not been used, for the same CallSid; otherwise the
  socket closes (1008) and `TWILIO_STREAM_REFUSED` is counted. Then the session is admitted
  (ATLAS_MAX_SESSIONS, and the per-user limits keyed by the caller's number).
- In the session: `AtlasTwilioSerializer` reads Twilio's messages itself (size, message rate and audio
  budget first; malformed ones dropped and counted, never logged whole) and writes through Pipecat's
  TwilioFrameSerializer (mu-law 8 kHz, `clear` on interruption). A `mark` follows each reply (Twilio
  echoes it once the caller has heard it). The bot hangs up through Twilio's REST API (at
  TWILIO_API_BASE_URL) only for a call the signed webhook announced, with SIDs checked by shape.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from urllib.parse import parse_qsl

import aiohttp
from fastapi import Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response
from loguru import logger
from pipecat.frames.frames import BotStoppedSpeakingFrame, OutputTransportMessageUrgentFrame
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketTransport,
)
from typing_extensions import TypeIs

from bots.limits import AudioBudget, MessageRate
from bots.runtime import Runtime
from bots.session import Caller, VoiceSession, clean_text
from compat.pipecat import skip_twilio_hang_up
from config.settings import Settings, secret
from transports.common import audio_socket_params, close_quietly, text_too_large
from transports.twilio.serializer import AtlasTwilioSerializer
from transports.twilio.tokens import MAX_PARAMETER_CHARS, TOKEN_PARAMETER, StreamTokens
from vocabulary.audio import PHONE_RATE
from vocabulary.errors import CloseCode, ErrorCode, ProtocolError

BUSY_MESSAGE = "Sorry, all of our lines are busy right now. Please call again in a few minutes. Goodbye."
NOT_READY_MESSAGE = "Sorry, the assistant is starting up. Please call again in a minute. Goodbye."

# Twilio SIDs: a two-letter prefix and 32 hex digits (https://www.twilio.com/docs/glossary/what-is-a-sid).
_SID = {prefix: re.compile(rf"{prefix}[0-9a-fA-F]{{32}}") for prefix in ("AC", "CA", "MZ")}
MAX_FORM_BYTES = 64 * 1024  # a voice webhook's form is well under 4 KiB
MAX_MESSAGES_BEFORE_START = 4  # Twilio sends `connected`, then `start`


def is_sid(value: object, prefix: str) -> TypeIs[str]:
    return isinstance(value, str) and _SID[prefix].fullmatch(value) is not None


def masked(number: str | None) -> str:
    """A phone number for the log: the last four digits only."""
    if not number:
        return "unknown"
    return "*" * max(0, min(len(number) - 4, 8)) + number[-4:]


def door_open(s: Settings) -> bool:
    return bool(s.twilio_auth_token) or s.twilio_allow_unsigned


def _disabled() -> JSONResponse:
    return JSONResponse(
        {"type": "error", "code": "TWILIO_DISABLED", "message": "the phone door is off until TWILIO_AUTH_TOKEN is set"},
        status_code=404,
    )


def _twiml(twiml: str) -> Response:
    # str(VoiceResponse()) already starts with the XML declaration: a second one is malformed XML.
    return Response(twiml, media_type="application/xml")


def sorry_twiml(message: str) -> str:
    from twilio.twiml.voice_response import VoiceResponse

    response = VoiceResponse()
    response.say(message)
    response.hangup()
    return str(response)


def public_url(request: Request, public_host: str | None) -> str:
    """The URL Twilio requested (and signed): behind a proxy the request's own URL is not it."""
    if public_host:
        query = f"?{request.url.query}" if request.url.query else ""
        return f"https://{public_host}{request.url.path}{query}"
    return str(request.url)


def stream_url(s: Settings, host: str) -> str:
    """The Media Stream URL the TwiML names; Twilio signs the stream's upgrade request for exactly this."""
    return f"wss://{s.public_host or host}/twilio/ws"


def stream_tokens(runtime: Runtime) -> StreamTokens | None:
    """The process's token issuer, made on first use; None when the door runs unsigned."""
    s = runtime.settings
    if not s.twilio_auth_token:
        return None
    if runtime.twilio_tokens is None:
        runtime.twilio_tokens = StreamTokens(secret(s.twilio_auth_token), s.twilio_stream_token_secs)
    return runtime.twilio_tokens


async def _read_form(request: Request) -> dict[str, str] | None:
    """The webhook's urlencoded form, or None when it is larger than any Twilio webhook."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


async def twilio_voice(request: Request, runtime: Runtime) -> Response:
    s = runtime.settings
    if not door_open(s):
        return _disabled()
    form = await _read_form(request)
    if form is None:
        return JSONResponse(
            {"type": "error", "code": "FRAME_TOO_LARGE", "message": "request too large"}, status_code=413
        )
    token = secret(s.twilio_auth_token)
    if token:
        from twilio.request_validator import RequestValidator

        signature = request.headers.get("x-twilio-signature", "")
        if not RequestValidator(token).validate(public_url(request, s.public_host), form, signature):
            logger.warning("POST /twilio/voice refused: bad X-Twilio-Signature")
            runtime.monitor.error(str(ErrorCode.TWILIO_SIGNATURE_INVALID))
            return Response("invalid Twilio signature", status_code=403)
    call_sid = form.get("CallSid")
    if not is_sid(call_sid, "CA"):
        runtime.monitor.error(str(ErrorCode.INVALID_FIELD))
        return JSONResponse(
            {"type": "error", "code": "INVALID_FIELD", "message": "CallSid is missing or malformed"}, status_code=400
        )
    # The agent: `?agent=` on the webhook URL (one per phone number), else ATLAS_TWILIO_AGENT, else the default.
    agent = request.query_params.get("agent") or s.twilio_agent
    if agent is not None and agent not in runtime.agents.by_name:
        logger.error(f"POST /twilio/voice: no agent named {agent[:64]!r} (agents: {', '.join(runtime.agents.names)})")
        runtime.monitor.error(str(ErrorCode.UNKNOWN_AGENT))
        return JSONResponse(
            {"type": "error", "code": "UNKNOWN_AGENT", "message": "the webhook names an unknown agent"},
            status_code=400,
        )
    if not runtime.ready.is_set():
        return _twiml(sorry_twiml(NOT_READY_MESSAGE))
    if runtime.shutting_down:
        return _twiml(sorry_twiml(BUSY_MESSAGE))
    if not runtime.can_admit():
        logger.warning(f"call {call_sid} refused: at the limit of {runtime.max_sessions} sessions")
        runtime.monitor.error(str(ErrorCode.SERVER_BUSY))
        return _twiml(sorry_twiml(BUSY_MESSAGE))

    from twilio.twiml.voice_response import Connect, VoiceResponse

    caller = clean_text(form.get("From"), 64)
    response = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url=stream_url(s, request.headers.get("host", "localhost")))
    parameters = (("from", caller), ("to", clean_text(form.get("To"), 64)), ("callSid", call_sid), ("agent", agent))
    for name, value in parameters:
        if value:
            stream.parameter(name=name, value=value)
    tokens = stream_tokens(runtime)
    if tokens is not None:
        stream.parameter(name=TOKEN_PARAMETER, value=tokens.issue(call_sid, caller))
    response.append(connect)
    return _twiml(str(response))


class ReplyMarks(BaseObserver):
    """After each reply's last audio, a `mark`; Twilio echoes it when the caller has heard it all."""

    FRAME_TYPES = (BotStoppedSpeakingFrame,)

    def __init__(self, session: TwilioSession):
        super().__init__(observe_every_push=False)
        self.session = session
        self.sent: dict[str, float] = {}
        self.heard: dict[str, float] = {}  # mark -> seconds from the reply's last audio sent to heard

    def echoed(self, name: str) -> None:
        if name in self.sent and name not in self.heard:
            self.heard[name] = time.monotonic() - self.sent[name]
            logger.debug(f"twilio: {name} heard by the caller {self.heard[name] * 1000:.0f} ms after it was sent")

    async def on_push_frame(self, data: FramePushed):
        if isinstance(data.frame, BotStoppedSpeakingFrame):
            name = f"reply-{len(self.sent)}"
            self.sent[name] = time.monotonic()
            await self.session.queue_message(
                {"event": "mark", "streamSid": self.session.stream_sid, "mark": {"name": name}}
            )


class StreamStart:
    """Twilio's `start` message, checked: well-formed SIDs, string parameters, and (signed door) a stream
    token the webhook issued for this call. `verified` is True when the call came through the signed
    webhook; only then may the bot hang it up."""

    def __init__(self, start: dict, runtime: Runtime):
        s = runtime.settings
        stream_sid, call_sid = start.get("streamSid"), start.get("callSid")
        account = start.get("accountSid")
        params = start.get("customParameters")
        if not is_sid(stream_sid, "MZ") or not is_sid(call_sid, "CA"):
            raise ProtocolError(ErrorCode.TWILIO_STREAM_REFUSED, "malformed streamSid or callSid")
        self.stream_sid: str = stream_sid
        self.call_sid: str = call_sid
        if s.twilio_account_sid and account != s.twilio_account_sid:
            raise ProtocolError(ErrorCode.TWILIO_STREAM_REFUSED, "a stream of another Twilio account")
        if params is None:
            params = {}
        if not isinstance(params, dict) or any(
            not isinstance(k, str) or not isinstance(v, str) or len(k) + len(v) > MAX_PARAMETER_CHARS
            for k, v in params.items()
        ):
            raise ProtocolError(ErrorCode.TWILIO_STREAM_REFUSED, "malformed customParameters")
        tokens = stream_tokens(runtime)
        self.verified = tokens is not None
        self.token_id: str | None = None  # the stream token's jti: single use on every worker and node too
        if tokens is not None:
            claims = tokens.redeem(params.get(TOKEN_PARAMETER), call_sid)
            self.caller = clean_text(claims.get("from"), 64)
            self.token_id = str(claims["jti"])
        else:  # the unsigned door (local testing): the parameters as sent
            self.caller = clean_text(params.get("from"), 64)
        # Set by our own TwiML from the webhook's `?agent=` (Twilio signs the upgrade that carries it).
        self.agent: str | None = params.get("agent") or None
        if self.agent is not None and self.agent not in runtime.agents.by_name:
            raise ProtocolError(ErrorCode.TWILIO_STREAM_REFUSED, "a stream for an agent this server does not have")


class TwilioSession(VoiceSession):
    def __init__(self, runtime: Runtime, websocket: WebSocket, start: StreamStart):
        super().__init__(
            runtime,
            Caller(
                client_user_id=start.caller,
                conversation_id=start.call_sid,
                user_agent="twilio",
                ip_address=websocket.client.host if websocket.client else None,
            ),
            transport_name="twilio",
            agent=runtime.agents.named(start.agent),
        )
        self.websocket = websocket
        self.stream_sid = start.stream_sid
        self.call_sid = start.call_sid
        self.verified = start.verified
        self.marks = ReplyMarks(self)
        self.serializer: AtlasTwilioSerializer | None = None

    def describe_user(self) -> str:
        return masked(self.caller.client_user_id)

    @property
    def can_transfer(self) -> bool:  # type: ignore[override]
        s = self.runtime.settings
        return bool(self.verified and secret(s.twilio_auth_token) and s.twilio_account_sid)

    async def transfer(self, number: str) -> str | None:
        """Hand the call to `number`: once the reply announcing it has been sent, Twilio's REST API gives the live
        call new TwiML, `<Dial>` to the number; Twilio then ends this media stream, and the session ends without
        the REST hang-up (it would end the transferred call)."""
        from twilio.twiml.voice_response import VoiceResponse

        await self.wait_reply_sent(timeout=10.0)
        s = self.runtime.settings
        response = VoiceResponse()
        response.dial(number)
        url = f"{s.twilio_api_base_url}/2010-04-01/Accounts/{s.twilio_account_sid}/Calls/{self.call_sid}.json"
        try:
            async with self.runtime.http().post(
                url,
                data={"Twiml": str(response)},
                auth=aiohttp.BasicAuth(s.twilio_account_sid or "", secret(s.twilio_auth_token)),
            ) as answer:
                if answer.status >= 300:
                    body = (await answer.text())[:200]
                    return f"Twilio refused the transfer (HTTP {answer.status}): {body}"
        except (aiohttp.ClientError, TimeoutError) as e:
            return f"Twilio could not be reached for the transfer: {type(e).__name__}"
        logger.info(f"call {self.call_sid}: transferred to {masked(number)}")
        if self.serializer is not None:
            skip_twilio_hang_up(self.serializer)
        self.stop_soon("transferred")
        return None

    async def cut_off(self, code: ErrorCode, message: str) -> None:
        await close_quietly(self.websocket, CloseCode.POLICY)

    async def queue_message(self, message: dict) -> None:
        if self.worker is not None and not self.worker.has_finished():
            await self.worker.queue_frame(OutputTransportMessageUrgentFrame(message=message))

    async def run(self) -> None:
        s = self.runtime.settings
        token = secret(s.twilio_auth_token)
        # The REST hang-up goes only to a call the signed webhook announced, of the configured account.
        hang_up = bool(self.verified and token and s.twilio_account_sid)

        async def on_stop():
            self.stop_soon("caller_hangup")

        serializer = self.serializer = AtlasTwilioSerializer(
            self.stream_sid,
            call_sid=self.call_sid if hang_up else None,
            account_sid=s.twilio_account_sid if hang_up else None,
            auth_token=token if hang_up else None,
            base_url=s.twilio_api_base_url,
            params=TwilioFrameSerializer.InputParams(auto_hang_up=hang_up),
            on_audio=self.touch_audio,
            on_stop=on_stop,
            on_mark=self.marks.echoed,
            on_error=self.count_error,
            audio_batch_ms=s.audio_in_batch_ms,
            max_text_bytes=s.max_text_message_bytes,
            rate=MessageRate(s.max_messages_per_sec),
            budget=AudioBudget(s.audio_burst_secs),
            on_flood=self.on_flood,
        )
        transport = FastAPIWebsocketTransport(self.websocket, audio_socket_params(serializer, PHONE_RATE))
        # Replies are made at the phone's 8 kHz (the cloud voice renders it; Piper is resampled once), so the
        # serializer's stream resampler has nothing to do.
        self.make_worker(transport, observers=[self.marks], out_rate=PHONE_RATE)

        @transport.event_handler("on_client_disconnected")
        async def _on_disconnected(_transport, _ws):
            await self.stop("caller_hangup")

        try:
            await super().run()
        finally:
            await close_quietly(self.websocket, CloseCode.NORMAL)


async def read_start(websocket: WebSocket, timeout: float, max_bytes: int) -> dict | None:
    """Twilio's `connected` then `start` messages: the `start` object, or None if it does not come
    (in time, within a few messages, each at most `max_bytes`)."""
    deadline = time.monotonic() + timeout
    for _ in range(MAX_MESSAGES_BEFORE_START):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        try:
            raw = await asyncio.wait_for(websocket.receive_text(), remaining)
        except (TimeoutError, KeyError):
            return None
        if text_too_large(raw, max_bytes):
            return None
        try:
            message = json.loads(raw)
        except (ValueError, RecursionError):
            return None
        if isinstance(message, dict) and message.get("event") == "start":
            start = message.get("start")
            if not isinstance(start, dict):
                return None
            start.setdefault("streamSid", message.get("streamSid"))
            return start
    return None


def upgrade_signed(websocket: WebSocket, s: Settings) -> bool:
    """Whether the upgrade request carries Twilio's signature for the stream URL the TwiML named."""
    from twilio.request_validator import RequestValidator

    url = stream_url(s, websocket.headers.get("host", "localhost"))
    signature = websocket.headers.get("x-twilio-signature", "")
    return bool(signature) and RequestValidator(secret(s.twilio_auth_token)).validate(url, {}, signature)


async def serve_twilio(websocket: WebSocket, runtime: Runtime) -> None:
    s, limits = runtime.settings, runtime.limits
    ip = websocket.client.host if websocket.client else "unknown"
    # Refusals before the socket opens are an HTTP 403 to the upgrade (nothing to tell a stranger).
    if not door_open(s):
        await websocket.close(CloseCode.POLICY)
        return
    if s.twilio_auth_token and not upgrade_signed(websocket, s):
        logger.warning(f"/twilio/ws refused: upgrade without a valid X-Twilio-Signature (from {ip})")
        runtime.monitor.error(str(ErrorCode.TWILIO_SIGNATURE_INVALID))
        await websocket.close(CloseCode.POLICY)
        return
    try:
        limits.acquire_pending(ip)
    except ProtocolError as e:
        runtime.monitor.error(str(e.code))
        await websocket.close(CloseCode.POLICY)
        return
    pending, admitted, user = True, False, None
    try:
        await websocket.accept()
        if not runtime.ready.is_set():
            runtime.monitor.error(str(ErrorCode.SERVER_NOT_READY))
            await websocket.close(CloseCode.TRY_AGAIN)
            return
        raw = await read_start(websocket, s.session_start_timeout_secs, s.max_text_message_bytes)
        if raw is None:
            logger.warning("twilio media stream without a valid `start` message; closed")
            runtime.monitor.error(str(ErrorCode.SESSION_START_TIMEOUT))
            await websocket.close(CloseCode.POLICY)
            return
        try:
            start = StreamStart(raw, runtime)
            if start.token_id is not None and not await limits.first_use(f"twilio-token:{start.token_id}"):
                raise ProtocolError(ErrorCode.TWILIO_STREAM_REFUSED, "the stream token was used already")
        except ProtocolError as e:
            logger.warning(f"twilio media stream refused: {e.message}")
            runtime.monitor.error(str(e.code))
            await websocket.close(CloseCode.POLICY)
            return
        limits.release_pending(ip)
        pending = False
        if not runtime.admit():
            runtime.monitor.error(str(ErrorCode.SERVER_BUSY))
            await websocket.close(CloseCode.TRY_AGAIN)
            return
        admitted = True
        key = f"phone:{start.caller or start.call_sid}"
        try:
            await limits.by_user.acquire(key)
        except ProtocolError as e:
            logger.warning(f"call {start.call_sid} refused: {e.code} for caller {masked(start.caller)}")
            runtime.monitor.error(str(e.code))
            await websocket.close(CloseCode.TRY_AGAIN if e.code == ErrorCode.LIMITS_UNAVAILABLE else CloseCode.POLICY)
            return
        user = key
        await TwilioSession(runtime, websocket, start).run()
    except WebSocketDisconnect:
        pass
    except Exception as e:  # one call never takes the server down
        logger.exception(f"twilio session failed: {e}")
        await close_quietly(websocket, CloseCode.INTERNAL)
    finally:
        if pending:
            limits.release_pending(ip)
        if admitted:
            runtime.release()
        if user is not None:
            limits.by_user.release(user)
