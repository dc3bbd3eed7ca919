"""The phone door: Twilio Programmable Voice answers with TwiML that connects the call's audio to
`/twilio/ws` as a bidirectional Media Stream; the shared pipeline then talks on it.

- `POST /twilio/voice` (the number's voice webhook): checks `X-Twilio-Signature` with the twilio
  library when TWILIO_AUTH_TOKEN is set (403 when wrong), then answers
  `<Connect><Stream url="wss://PUBLIC_HOST/twilio/ws">` with the caller's identity as Stream
  parameters. When the server is full (ATLAS_MAX_SESSIONS) or still loading, the TwiML says sorry
  and hangs up instead.
- `/twilio/ws`: Twilio's `connected` and `start` messages, then Pipecat's TwilioFrameSerializer
  (mu-law 8 kHz both ways, `clear` on interruption, hang-up through Twilio's REST API at
  TWILIO_API_BASE_URL when the bot ends the call). Our subclass adds what the stock serializer
  lacks: a `mark` after each reply (Twilio echoes it once the caller has heard the reply, logged
  with the delay), the caller's `stop` ending the session cleanly without a hang-up request for a
  call that is already over, and malformed messages dropped and counted instead of raising.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import time

from fastapi import Request, WebSocket, WebSocketDisconnect
from fastapi.responses import Response
from loguru import logger
from pipecat.audio.resamplers.soxr_stream_resampler import SOXRStreamAudioResampler
from pipecat.frames.frames import (
    BotStoppedSpeakingFrame,
    InputAudioRawFrame,
    OutputTransportMessageUrgentFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketParams,
    FastAPIWebsocketTransport,
)

from bots.pipeline import CLIENT_SAMPLE_RATE, Runtime
from bots.session import Caller, VoiceSession, close_quietly
from config.settings import secret
from transports.protocol import AudioBatcher, ErrorCode

PHONE_RATE = 8000  # Twilio Media Streams: 8 kHz mu-law both ways

BUSY_MESSAGE = "Sorry, all of our lines are busy right now. Please call again in a few minutes. Goodbye."
NOT_READY_MESSAGE = "Sorry, the assistant is starting up. Please call again in a minute. Goodbye."


def _twiml(body: str) -> Response:
    return Response(f'<?xml version="1.0" encoding="UTF-8"?>\n{body}', media_type="application/xml")


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


async def twilio_voice(request: Request, runtime: Runtime) -> Response:
    s = runtime.settings
    form = dict(await request.form())
    token = secret(s.twilio_auth_token)
    if token:
        from twilio.request_validator import RequestValidator

        signature = request.headers.get("x-twilio-signature", "")
        if not RequestValidator(token).validate(public_url(request, s.public_host), form, signature):
            logger.warning("POST /twilio/voice refused: bad X-Twilio-Signature")
            runtime.monitor.error("TWILIO_SIGNATURE_INVALID")
            return Response("invalid Twilio signature", status_code=403)
    if not runtime.ready.is_set():
        return _twiml(sorry_twiml(NOT_READY_MESSAGE))
    if runtime.shutting_down:
        return _twiml(sorry_twiml(BUSY_MESSAGE))
    if runtime.sessions >= s.max_sessions:
        logger.warning(f"call {form.get('CallSid')} refused: at the limit of {s.max_sessions} sessions")
        runtime.monitor.error(str(ErrorCode.SERVER_BUSY))
        return _twiml(sorry_twiml(BUSY_MESSAGE))

    from twilio.twiml.voice_response import Connect, VoiceResponse

    host = s.public_host or request.headers.get("host", "localhost")
    response = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url=f"wss://{host}/twilio/ws")
    for name, key in (("from", "From"), ("to", "To"), ("callSid", "CallSid")):
        if form.get(key):
            stream.parameter(name=name, value=form[key])
    response.append(connect)
    return _twiml(str(response))


class AtlasTwilioSerializer(TwilioFrameSerializer):
    """Pipecat's Twilio serializer, plus: audio and `stop` reported to the session, bad input dropped."""

    def __init__(self, *args, on_audio=None, on_stop=None, on_bad_message=None, on_mark=None,
                 audio_batch_ms: int = 40, **kwargs):
        super().__init__(*args, **kwargs)
        self._batch = AudioBatcher(CLIENT_SAMPLE_RATE, audio_batch_ms)  # after the 8 -> 16 kHz resampling
        # Pipecat's default (SoX "VHQ" stream) holds 8 -> 16 kHz input back ~100 ms and hands it on in bursts,
        # so the VAD heard the end of speech late: the bench measured ~125 ms between the server's and the
        # caller's voice-to-voice on this door. SoX's "quick" cubic filter keeps 1 sample; phone audio has
        # nothing above 4 kHz for a steeper filter to protect.
        self._input_resampler = SOXRStreamAudioResampler(quality="QQ")
        self._on_mark = on_mark
        self._on_audio = on_audio
        self._on_stop = on_stop
        self._on_bad_message = on_bad_message

    async def deserialize(self, data: str | bytes):
        try:
            frame = await super().deserialize(data)
        except (binascii.Error, ValueError, TypeError, AttributeError) as e:
            self._bad(f"{type(e).__name__}: {e}")
            return None
        if isinstance(frame, InputAudioRawFrame):
            if self._on_audio:
                self._on_audio()
            audio = self._batch.add(frame.audio)
            if audio is None:
                return None
            frame.audio = audio
            return frame
        if frame is None:  # not media: look for the caller hanging up (parsed again only here)
            try:
                message = json.loads(data)
            except (ValueError, TypeError):
                self._bad("not JSON")
                return None
            event = message.get("event") if isinstance(message, dict) else None
            if event == "stop":
                self._hangup_attempted = True  # the call is already over: no REST hang-up
                if self._on_stop:
                    await self._on_stop()
            elif event == "mark" and self._on_mark:
                self._on_mark(str((message.get("mark") or {}).get("name")))
        return frame

    def _bad(self, what: str) -> None:
        logger.debug(f"twilio: malformed media stream message dropped ({what})")
        if self._on_bad_message:
            self._on_bad_message()


class ReplyMarks(BaseObserver):
    """After each reply's last audio, a `mark`; Twilio echoes it when the caller has heard it all."""

    FRAME_TYPES = (BotStoppedSpeakingFrame,)

    def __init__(self, session: "TwilioSession"):
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
            await self.session.queue_message({"event": "mark", "streamSid": self.session.stream_sid,
                                              "mark": {"name": name}})


class TwilioSession(VoiceSession):
    def __init__(self, runtime: Runtime, websocket: WebSocket, start: dict):
        params = start.get("customParameters") or {}
        super().__init__(runtime, Caller(
            client_user_id=params.get("from"), conversation_id=start.get("callSid"), user_agent="twilio",
            ip_address=websocket.client.host if websocket.client else None,
        ), transport_name="twilio")
        self.websocket = websocket
        self.stream_sid = start["streamSid"]
        self.call_sid = start.get("callSid")
        self.account_sid = start.get("accountSid")
        self.marks = ReplyMarks(self)

    async def queue_message(self, message: dict) -> None:
        if self.worker is not None and not self.worker.has_finished():
            await self.worker.queue_frame(OutputTransportMessageUrgentFrame(message=message))

    async def run(self) -> None:
        s = self.runtime.settings
        account_sid = s.twilio_account_sid or self.account_sid
        token = secret(s.twilio_auth_token)
        hang_up = bool(account_sid and token and self.call_sid)

        async def on_stop():
            asyncio.get_running_loop().create_task(self.stop("caller_hangup"))

        serializer = AtlasTwilioSerializer(
            self.stream_sid, call_sid=self.call_sid, account_sid=account_sid, auth_token=token or None,
            base_url=s.twilio_api_base_url,
            params=TwilioFrameSerializer.InputParams(auto_hang_up=hang_up),
            on_audio=self.touch_audio, on_stop=on_stop, on_mark=self.marks.echoed,
            on_bad_message=lambda: self.count_error(str(ErrorCode.INVALID_MESSAGE)),
            audio_batch_ms=s.audio_in_batch_ms,
        )
        transport = FastAPIWebsocketTransport(
            self.websocket,
            FastAPIWebsocketParams(audio_in_enabled=True, audio_out_enabled=True, add_wav_header=False,
                                   audio_in_sample_rate=CLIENT_SAMPLE_RATE, audio_out_sample_rate=PHONE_RATE,
                                   serializer=serializer),
        )
        # Replies are made at the phone's 8 kHz (the cloud voice renders it; Piper is resampled once), so the
        # serializer's stream resampler has nothing to do: the bench measured 22.05 kHz output adding ~300 ms
        # to the first reply audio on this door.
        self.make_worker(transport, observers=[self.marks], out_rate=PHONE_RATE)

        @transport.event_handler("on_client_disconnected")
        async def _on_disconnected(_transport, _ws):
            await self.stop("caller_hangup")

        try:
            await super().run()
        finally:
            await close_quietly(self.websocket, 1000)


async def read_start(websocket: WebSocket, timeout: float) -> dict | None:
    """Twilio's `connected` then `start` messages; the `start` object, or None if they do not come."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        try:
            raw = await asyncio.wait_for(websocket.receive_text(), remaining)
            message = json.loads(raw)
        except (TimeoutError, ValueError, KeyError):
            return None
        if isinstance(message, dict) and message.get("event") == "start":
            start = message.get("start")
            if isinstance(start, dict) and isinstance(start.get("streamSid") or message.get("streamSid"), str):
                start.setdefault("streamSid", message.get("streamSid"))
                return start
            return None


async def serve_twilio(websocket: WebSocket, runtime: Runtime) -> None:
    await websocket.accept()
    admitted = False
    try:
        if not runtime.ready.is_set() or not runtime.admit():
            runtime.monitor.error(str(ErrorCode.SERVER_BUSY if runtime.ready.is_set() else ErrorCode.SERVER_NOT_READY))
            await websocket.close(1013)
            return
        admitted = True
        start = await read_start(websocket, runtime.settings.session_start_timeout_secs)
        if start is None:
            logger.warning("twilio media stream without a valid `start` message; closed")
            runtime.monitor.error(str(ErrorCode.SESSION_START_TIMEOUT))
            await websocket.close(1008)
            return
        await TwilioSession(runtime, websocket, start).run()
    except WebSocketDisconnect:
        pass
    except Exception as e:  # one call never takes the server down
        logger.exception(f"twilio session failed: {e}")
        await close_quietly(websocket, 1011)
    finally:
        if admitted:
            runtime.release()
