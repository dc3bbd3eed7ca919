"""Local fakes of Twilio for a voice bot: the REST API's Call resource (how a bot hangs up) and the caller's side of
a bidirectional Media Stream (what Twilio sends to, and expects from, the bot's WebSocket).

`FakeTwilioREST` models `api.twilio.com` 2010-04-01 as documented ("Call resource": Update a Call, Fetch a Call;
"Errors" 20003 / 20404), enough for Pipecat's `TwilioFrameSerializer(base_url=fake.http_url)` auto hang-up:

* `POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json` with an `application/x-www-form-urlencoded` body;
  `Status` may be `completed` or `canceled` (hang up), `Url` / `Twiml` (+ `Method`, ...) redirect a live call;
  other parameters are ignored, as Twilio does; an update carrying none of them, or another `Status`, is 400;
* `GET` of the same path fetches the Call resource; other methods are 405 (code 20004);
* HTTP Basic auth: `AccountSid:AuthToken`, or `ApiKeySid:ApiKeySecret` for an API key of that account (the
  `api_keys` argument). No, wrong or other-account credentials -> 401 `{"code": 20003, "message": "Authenticate",
  "more_info": "https://www.twilio.com/docs/errors/20003", "status": 401}` with `WWW-Authenticate`;
* 404 code 20404 for a malformed Call SID, for an unknown one when `known_calls` is given, and for a second
  hang-up of a call this fake already ended (what Pipecat's serializer expects for "already terminated");
* answers: 200 with the Call resource JSON (`sid`, `account_sid`, `status`, `date_*` in RFC 2822, `duration`,
  `end_time`, `uri`, `subresource_uris`, ...), `Twilio-Request-Id` on every response.

Not covered: creating/listing calls, pagination, regions/edges (one host), subaccounts, rate limits (20429),
`StatusCallback` webhooks, Twilio's request signing of webhooks it would send.

Scripting: `fail_next(status, code, message)` (thread-safe), `response_delay`. Records: `requests` (every HTTP
request), `updates` (every Call update: call sid, params, auth ok, response status) and `hangups` (those setting
`Status=completed|canceled`), `calls` (call sid -> state).

`TwilioCaller` is Twilio's side of a bidirectional Media Stream ("Media Streams - WebSocket Messages"), an asyncio
client of the bot's WebSocket:

* `TwilioCaller.dial(server, auth_token, ...)` first does what Twilio does when a call comes in: POSTs the
  number's voice webhook (`/twilio/voice`, signed), parses the TwiML answer with a strict XML parser, and streams
  to the `<Stream url>` it names with its `<Parameter>`s (a `wss://` URL is reached as `ws://` on a plain-HTTP
  test server, as a TLS-terminating proxy would);
* handshake headers `X-Twilio-Signature` (HMAC-SHA1 of the stream URL with the auth token, when one is given)
  and Twilio's user agent; then `connected` (`protocol` "Call", `version` "1.0.0"), `start` (`sequenceNumber` "1",
  `start.accountSid/streamSid/callSid/tracks/customParameters/mediaFormat`), and from then on a `media` message
  every 20 ms of real time (160 bytes of 8 kHz G.711 mu-law, base64, `track` "inbound", `chunk` from "1",
  `timestamp` = ms since the stream started), speech when `say()` queued some and silence otherwise, as a phone
  line does; `dtmf` (`track` "inbound_track") on demand; `stop` then close on `hang_up()`. `sequenceNumber`
  counts every message after `connected`, as strings, by 1;
* from the bot it accepts `media` (`media.payload`: base64 mu-law, any length, no file header), `mark`
  (`mark.name`) and `clear`, each with the stream's `streamSid`. Received audio is "played" in real time: a
  `mark` is echoed (`{"event": "mark", "sequenceNumber", "streamSid", "mark": {"name"}}`) once the audio queued
  before it has played, at once when nothing is queued; `clear` drops the queued audio and echoes the pending
  marks at once. Anything else (binary frames, bad JSON, unknown events, a wrong `streamSid`, bad base64, an empty
  or WAV-headed payload, a mark without a name) is recorded in `protocol_errors`; messages with a wrong
  `streamSid` are otherwise ignored.
* per turn (one `say()`): the client-clock time the user's speech ended, the first bot `media` after it, the reply
  audio (8 kHz PCM16) with arrival times, marks and clears, and `voice_to_voice_ms`, as `app/talk.py` measures
  it for the /ws protocol. The bot ending the call (closing the socket) sets `closed_by_server` / `closed_at`.

Not covered: unidirectional streams, `outbound` / `both_tracks`, Twilio's reconnect/fallback behaviour, the 10-minute
downstream buffer limit (31931), real network jitter (frames are paced by the local clock and sent in bursts to
catch up if the loop stalls).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hashlib
import hmac
import json
import math
import re
import secrets
import time
import wave
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from app.talk import load_wav, speech_end_seconds
from fakes.base import FakeServer

API_VERSION = "2010-04-01"
CALL_PATH = "/2010-04-01/Accounts/{account_sid}/Calls/{call_sid}.json"
TWILIO_RATE = 8000
FRAME_MS = 20
FRAME_BYTES = TWILIO_RATE * FRAME_MS // 1000  # 160 mu-law bytes = 160 samples
MULAW_SILENCE = 0xFF  # mu-law code of 0
USER_AGENT = "Twilio.TmeWs/1.0"
_SID_RE = {p: re.compile(rf"^{p}[0-9a-f]{{32}}$") for p in ("AC", "CA", "MZ", "SK")}


def new_sid(prefix: str) -> str:
    """A Twilio-shaped SID: two-letter prefix + 32 lowercase hex digits (AC account, CA call, MZ stream, SK key)."""
    return prefix + secrets.token_hex(16)


def twilio_signature(auth_token: str, url: str, params: dict[str, str] | None = None) -> str:
    """`X-Twilio-Signature`: base64(HMAC-SHA1(auth token, URL + each POST param's name+value sorted by name))."""
    data = url + "".join(k + v for k, v in sorted((params or {}).items()))
    return base64.b64encode(hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()).decode()


# ---- G.711 mu-law (bit-exact with audioop.lin2ulaw / ulaw2lin, i.e. the CCITT reference code) -------------

_SEG_UEND = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])


def _ulaw_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


_ULAW_TO_LIN = _ulaw_table()


def mulaw_encode(pcm: bytes | np.ndarray) -> bytes:
    """PCM16 (bytes or int16 array) -> G.711 mu-law bytes."""
    samples = np.frombuffer(pcm, np.int16) if isinstance(pcm, (bytes, bytearray, memoryview)) else pcm
    v = samples.astype(np.int32) >> 2  # 14-bit, arithmetic shift as in the reference
    mask = np.where(v < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(v), 8159) + 0x21
    seg = np.searchsorted(_SEG_UEND, mag)
    uval = np.where(seg >= 8, 0x7F, (seg << 4) | ((mag >> (seg + 1)) & 0x0F))
    return (uval ^ mask).astype(np.uint8).tobytes()


def mulaw_decode(data: bytes) -> bytes:
    """G.711 mu-law bytes -> PCM16 little-endian bytes."""
    return _ULAW_TO_LIN[np.frombuffer(data, np.uint8)].astype("<i2").tobytes()


# ==== REST ================================================================================================


def _rfc2822(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, UTC).replace(microsecond=0))


@dataclass
class CallUpdate:
    """One `POST .../Calls/{CallSid}.json` as the fake saw and answered it."""

    account_sid: str
    call_sid: str
    params: dict[str, str]
    status: str | None  # the `Status` parameter sent (None when absent)
    login: str | None  # Basic auth user (AccountSid or API key SID)
    auth_ok: bool
    response_status: int = 0
    error_code: int | None = None
    at: float = field(default_factory=time.monotonic)


@dataclass
class _Fail:
    status: int
    code: int
    message: str


class FakeTwilioREST(FakeServer):
    """Fake `api.twilio.com` for the Call resource: pass `base_url=fake.http_url` to TwilioFrameSerializer."""

    def __init__(
        self,
        account_sid: str | None = None,
        auth_token: str = "test-twilio-auth-token",
        *,
        api_keys: dict[str, str] | None = None,
        known_calls: Iterable[str] | None = None,
        response_delay: float = 0.0,
    ) -> None:
        """
        Args:
            account_sid: the account (`AC` + 32 hex); a new one when omitted.
            auth_token: the account's Auth Token (Basic auth password with the account SID as user).
            api_keys: API key SID (`SK...`) -> secret, also accepted as Basic credentials for this account.
            known_calls: when given, only these Call SIDs exist (others are 404 20404); when None, any
                well-formed Call SID is taken as a live call of this account.
            response_delay: seconds before every answer.
        """
        super().__init__()
        self.account_sid = account_sid or new_sid("AC")
        self.auth_token = auth_token
        self.api_keys = dict(api_keys or {})
        self.strict_calls = known_calls is not None
        self.response_delay = response_delay
        self.calls: dict[str, dict[str, Any]] = {}
        for sid in known_calls or ():
            self.add_call(sid)
        self.updates: list[CallUpdate] = []
        self._faults = self._fault_queue()
        self.app.router.add_route("*", "/2010-04-01/Accounts/{account_sid}/Calls/{call_sid}.json", self._call)
        self.app.router.add_route("*", "/{tail:.*}", self._not_found)

    # ---- scripting (any thread) ---------------------------------------------------------------------------

    def add_call(
        self,
        call_sid: str,
        *,
        status: str = "in-progress",
        from_: str = "+15005550006",
        to: str = "+15005550001",
        direction: str = "inbound",
    ) -> dict[str, Any]:
        """Register a live call (needed with `known_calls`; otherwise calls appear on first use)."""
        now = time.time()
        call = {
            "sid": call_sid,
            "status": status,
            "from": from_,
            "to": to,
            "direction": direction,
            "date_created": now,
            "start_time": now,
            "date_updated": now,
            "end_time": None,
        }
        self.calls[call_sid] = call
        return call

    def fail_next(
        self, status: int = 500, code: int = 20500, message: str = "Internal Server Error", times: int = 1
    ) -> None:
        """The next `times` authenticated requests get `status` with Twilio's error body (`code`, `message`)."""
        self._faults.add(_Fail(status, code, message), times)

    # ---- accessors ----------------------------------------------------------------------------------------

    @property
    def hangups(self) -> list[CallUpdate]:
        """The updates that ended (or tried to end) a call: `Status=completed|canceled`, whatever the answer."""
        return [u for u in self.updates if u.status in ("completed", "canceled")]

    def call_url(self, call_sid: str, account_sid: str | None = None) -> str:
        return self.http_url + CALL_PATH.format(account_sid=account_sid or self.account_sid, call_sid=call_sid)

    # ---- the API ------------------------------------------------------------------------------------------

    @staticmethod
    def _json(status: int, body: dict[str, Any], extra: dict[str, str] | None = None) -> web.Response:
        headers = {"Twilio-Request-Id": new_sid("RQ"), **(extra or {})}
        return web.Response(
            status=status, text=json.dumps(body), content_type="application/json", charset="utf-8", headers=headers
        )

    @classmethod
    def _error(cls, status: int, code: int, message: str, extra: dict[str, str] | None = None) -> web.Response:
        body = {
            "code": code,
            "message": message,
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        }
        return cls._json(status, body, extra)

    def _not_found_body(self, path: str) -> web.Response:
        return self._error(404, 20404, f"The requested resource {path} was not found")

    async def _not_found(self, request: web.Request) -> web.Response:
        self.record(request).status = 404
        return self._not_found_body(request.path)

    def _login(self, request: web.Request, account_sid: str) -> tuple[str | None, bool]:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic" or not value:
            return None, False
        try:
            user, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None, False
        if not sep:
            return user, False
        if account_sid != self.account_sid:  # credentials of one account can't reach another's resources
            return user, False
        if user == self.account_sid:
            return user, hmac.compare_digest(password, self.auth_token)
        if user in self.api_keys:
            return user, hmac.compare_digest(password, self.api_keys[user])
        return user, False

    def _resource(self, call: dict[str, Any]) -> dict[str, Any]:
        uri = CALL_PATH.format(account_sid=self.account_sid, call_sid=call["sid"])
        base = uri[: -len(".json")]
        end = call["end_time"]
        duration = None if end is None else str(int(end - call["start_time"]))
        return {
            "sid": call["sid"],
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "date_created": _rfc2822(call["date_created"]),
            "date_updated": _rfc2822(call["date_updated"]),
            "start_time": _rfc2822(call["start_time"]),
            "end_time": None if end is None else _rfc2822(end),
            "duration": duration,
            "status": call["status"],
            "direction": call["direction"],
            "from": call["from"],
            "from_formatted": call["from"],
            "to": call["to"],
            "to_formatted": call["to"],
            "parent_call_sid": None,
            "phone_number_sid": None,
            "caller_name": None,
            "answered_by": None,
            "forwarded_from": None,
            "group_sid": None,
            "trunk_sid": None,
            "queue_time": "0",
            "annotation": None,
            "price": None,
            "price_unit": "USD",
            "uri": uri,
            "subresource_uris": {
                name: f"{base}/{path}.json"
                for name, path in (
                    ("notifications", "Notifications"),
                    ("recordings", "Recordings"),
                    ("payments", "Payments"),
                    ("events", "Events"),
                    ("siprec", "Siprec"),
                    ("streams", "Streams"),
                    ("transcriptions", "Transcriptions"),
                    ("user_defined_message_subscriptions", "UserDefinedMessageSubscriptions"),
                    ("user_defined_messages", "UserDefinedMessages"),
                )
            },
        }

    async def _call(self, request: web.Request) -> web.Response:
        account_sid, call_sid = request.match_info["account_sid"], request.match_info["call_sid"]
        params: dict[str, str] = {}
        if request.method == "POST" and request.content_type == "application/x-www-form-urlencoded":
            params = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        else:
            await request.read()
        rec = self.record(request, params or None)
        login, auth_ok = self._login(request, account_sid)
        update = None
        if request.method == "POST":
            update = CallUpdate(account_sid, call_sid, params, params.get("Status"), login, auth_ok)
            self.updates.append(update)

        def answer(resp: web.Response, code: int | None = None) -> web.Response:
            rec.status = resp.status
            if update is not None:
                update.response_status, update.error_code = resp.status, code
            return resp

        if self.response_delay:
            await asyncio.sleep(self.response_delay)
        if request.method not in ("GET", "POST"):
            return answer(self._error(405, 20004, "Method not allowed"), 20004)
        if not auth_ok:
            return answer(
                self._error(401, 20003, "Authenticate", {"WWW-Authenticate": 'Basic realm="Twilio API"'}), 20003
            )
        fault = self._faults.take()
        if fault is not None:
            rec.events.append("fault")
            return answer(self._error(fault.status, fault.code, fault.message), fault.code)
        call = self.calls.get(call_sid)
        if not _SID_RE["CA"].match(call_sid) or (call is None and self.strict_calls):
            return answer(self._not_found_body(request.path), 20404)
        if call is None:
            call = self.add_call(call_sid)
        if request.method == "GET":
            return answer(self._json(200, self._resource(call)))

        status = params.get("Status")
        redirect = params.get("Url") or params.get("Twiml")
        if status is None and not redirect:
            return answer(self._error(400, 20001, "Missing required parameter: Url, Twiml or Status"), 20001)
        if status is not None and status not in ("completed", "canceled"):
            return answer(self._error(400, 20001, f"Status '{status}' is not valid: completed or canceled"), 20001)
        ended = call["status"] in ("completed", "canceled", "failed", "busy", "no-answer")
        if ended:  # Pipecat treats 404/20404 as "already terminated"
            return answer(self._not_found_body(request.path), 20404)
        now = time.time()
        unanswered = call["status"] in ("queued", "ringing")
        if status == "completed" or (status == "canceled" and unanswered):  # canceled spares answered calls
            call["status"] = "canceled" if unanswered else "completed"
            call["end_time"] = now
        call["date_updated"] = now
        return answer(self._json(200, self._resource(call)))


# ==== the Media Stream caller ==============================================================================


@dataclass
class ReceivedMark:
    """A `mark` from the bot and when the caller echoed it back."""

    name: str
    received_at: float
    due: float  # when the audio queued before it finishes playing
    echoed_at: float | None = None
    cleared: bool = False  # echoed early because a `clear` dropped the audio before it


@dataclass
class ClearEvent:
    at: float
    dropped_ms: float  # queued audio not played
    marks_flushed: list[str] = field(default_factory=list)


@dataclass
class CallTurn:
    """One user utterance and the bot's reply, timed on the caller's clock (time.monotonic)."""

    audio_file: str
    speech_start: float = math.inf  # when its first frame went out
    speech_end: float = math.inf  # speech_start + where the speech ends in the audio
    sent_at: float | None = None  # when its last frame went out
    first_audio: float | None = None  # first bot media received at or after speech_end
    reply_audio: bytearray = field(default_factory=bytearray)  # PCM16 8 kHz
    media_times: list[float] = field(default_factory=list)  # arrival time of each media message
    marks: list[str] = field(default_factory=list)
    cleared: bool = False

    @property
    def reply_bytes(self) -> int:
        return len(self.reply_audio)

    @property
    def reply_seconds(self) -> float:
        return len(self.reply_audio) / 2 / TWILIO_RATE

    @property
    def voice_to_voice_ms(self) -> float | None:
        return None if self.first_audio is None else round((self.first_audio - self.speech_end) * 1000, 1)


@dataclass
class _Utterance:
    turn: CallTurn
    frames: list[bytes]
    speech_end_s: float
    done: asyncio.Future
    index: int = 0


@dataclass
class CallPlan:
    """What the voice webhook's TwiML told Twilio to do with a call."""

    call_sid: str
    account_sid: str
    twiml: str
    stream_url: str | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    says: list[str] = field(default_factory=list)
    hangup: bool = False


async def answer_call(
    server: str,
    auth_token: str | None,
    *,
    account_sid: str | None = None,
    call_sid: str | None = None,
    from_: str = "+15005550006",
    to: str = "+15005550001",
    signature: str | None = None,
) -> CallPlan:
    """POST the number's voice webhook as Twilio does (form body, `X-Twilio-Signature` over URL + params) and
    read the TwiML answer with a strict XML parser (ValueError if it is not one well-formed `<Response>`)."""
    import xml.etree.ElementTree as ET

    import httpx

    account_sid = account_sid or new_sid("AC")
    call_sid = call_sid or new_sid("CA")
    url = server.rstrip("/") + "/twilio/voice"
    form = {
        "CallSid": call_sid,
        "AccountSid": account_sid,
        "From": from_,
        "To": to,
        "CallStatus": "ringing",
        "Direction": "inbound",
        "ApiVersion": API_VERSION,
    }
    headers = {"User-Agent": "TwilioProxy/1.1"}
    if signature is not None or auth_token:
        headers["X-Twilio-Signature"] = signature if signature is not None else twilio_signature(auth_token, url, form)
    async with httpx.AsyncClient(timeout=20) as http:
        r = await http.post(url, data=form, headers=headers)
    if r.status_code != 200:
        raise ValueError(f"the voice webhook answered {r.status_code}: {r.text[:200]}")
    if not r.headers.get("content-type", "").startswith(("application/xml", "text/xml")):
        raise ValueError(f"the voice webhook answered {r.headers.get('content-type')}, not XML")
    try:
        root = ET.fromstring(r.content)  # bytes: the XML declaration, if any, must be the first thing
    except ET.ParseError as e:
        raise ValueError(f"malformed TwiML ({e}): {r.text[:300]}") from None
    if root.tag != "Response":
        raise ValueError(f"TwiML must be a <Response>, got <{root.tag}>")
    plan = CallPlan(call_sid=call_sid, account_sid=account_sid, twiml=r.text)
    for stream in root.iter("Stream"):
        plan.stream_url = stream.get("url")
        plan.parameters = {p.get("name"): p.get("value") for p in stream.iter("Parameter")}
    plan.says = [say.text or "" for say in root.iter("Say")]
    plan.hangup = root.find("Hangup") is not None
    return plan


class TwilioCaller:
    """A phone caller as Twilio streams it to the bot's WebSocket. Usage:

    async with TwilioCaller("ws://127.0.0.1:8000/twilio/ws") as call:
        turn = await call.say("hello.wav")
        await call.wait_reply_done(timeout=30)
        print(turn.voice_to_voice_ms)
    """

    def __init__(
        self,
        url: str,
        *,
        account_sid: str | None = None,
        call_sid: str | None = None,
        stream_sid: str | None = None,
        custom_parameters: dict[str, str] | None = None,
        auth_token: str | None = None,
        headers: dict[str, str] | None = None,
        on_event: Callable[[dict], None] | None = None,
        signed_url: str | None = None,
        local_addr: tuple[str, int] | None = None,
    ) -> None:
        """
        Args:
            url: the bot's Media Stream WebSocket (ws:// or wss://).
            account_sid, call_sid, stream_sid: the SIDs in `start` (new ones when omitted).
            custom_parameters: `<Parameter>`s of the `<Stream>` TwiML, sent in `start.customParameters`.
            auth_token: when given, the handshake carries `X-Twilio-Signature` for `signed_url` (default `url`)
                signed with it.
            signed_url: the stream URL as the TwiML named it (what Twilio signs), when `url` differs.
            local_addr: the (address, port) to connect from, e.g. ("127.0.0.7", 0) to be another client IP.
            headers: extra handshake headers.
            on_event: called with every message received from the bot (parsed, with `_t`).
        """
        self.url = url
        self.account_sid = account_sid or new_sid("AC")
        self.call_sid = call_sid or new_sid("CA")
        self.stream_sid = stream_sid or new_sid("MZ")
        self.custom_parameters = dict(custom_parameters or {})
        self.auth_token = auth_token
        self.signed_url = signed_url or url
        self.local_addr = local_addr
        self.extra_headers = dict(headers or {})
        self.on_event = on_event or (lambda e: None)
        self.out_rate = TWILIO_RATE

        self.ws = None
        self.sent: list[dict] = []  # every message sent, as sent
        self.sent_at: list[float] = []
        self.received: list[dict] = []  # every JSON message received, with `_t` (arrival time)
        self.protocol_errors: list[str] = []
        self.reply_audio = bytearray()  # all bot audio, PCM16 8 kHz
        self.marks: list[ReceivedMark] = []
        self.clears: list[ClearEvent] = []
        self.dtmf_sent: list[str] = []
        self.turns: list[CallTurn] = []
        self.stream_start: float | None = None
        self.closed_by_server = False
        self.closed_at: float | None = None
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.hung_up_at: float | None = None
        self.last_media_at: float | None = None
        self.media_frames_sent = 0

        self._seq = 0
        self._chunk = 0
        self._send_lock = asyncio.Lock()
        self._speech: collections.deque[_Utterance] = collections.deque()
        self._pending_marks: collections.deque[ReceivedMark] = collections.deque()
        self._marks_changed = asyncio.Event()
        self._changed = asyncio.Event()
        self._play_until = 0.0
        self._hanging_up = False
        self._tasks: list[asyncio.Task] = []

    @classmethod
    async def dial(
        cls,
        server: str,
        auth_token: str | None,
        *,
        account_sid: str | None = None,
        call_sid: str | None = None,
        from_: str = "+15005550006",
        to: str = "+15005550001",
        **kwargs,
    ) -> TwilioCaller:
        """A call as Twilio places it: the signed voice webhook, its TwiML parsed strictly, then a caller for
        the `<Stream>` it names (not connected yet). `server` is the bot's http(s) base URL."""
        plan = await answer_call(server, auth_token, account_sid=account_sid, call_sid=call_sid, from_=from_, to=to)
        url = plan.stream_url
        if server.startswith("http://"):
            url = "ws://" + server.removeprefix("http://") + "/" + url.split("/", 3)[3]
        return cls(
            url,
            account_sid=plan.account_sid,
            call_sid=plan.call_sid,
            custom_parameters=plan.parameters,
            auth_token=auth_token,
            signed_url=plan.stream_url,
            **kwargs,
        )

    # ---- lifecycle ----------------------------------------------------------------------------------------

    async def __aenter__(self) -> TwilioCaller:
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.hang_up()

    @property
    def connected(self) -> bool:
        return self.ws is not None and self.closed_at is None and not self._hanging_up

    async def connect(self, open_timeout: float = 10.0) -> None:
        """Open the WebSocket, send `connected` and `start`, and start streaming (silence until `say`)."""
        import websockets

        headers = dict(self.extra_headers)
        if self.auth_token:
            headers["X-Twilio-Signature"] = twilio_signature(self.auth_token, self.signed_url)
        extra = {"local_addr": self.local_addr} if self.local_addr else {}
        self.ws = await websockets.connect(
            self.url,
            additional_headers=headers,
            max_size=None,
            open_timeout=open_timeout,
            user_agent_header=USER_AGENT,
            **extra,
        )
        await self._send({"event": "connected", "protocol": "Call", "version": "1.0.0"}, sequenced=False)
        await self._send(
            {
                "event": "start",
                "start": {
                    "accountSid": self.account_sid,
                    "streamSid": self.stream_sid,
                    "callSid": self.call_sid,
                    "tracks": ["inbound"],
                    "customParameters": self.custom_parameters,
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": TWILIO_RATE, "channels": 1},
                },
                "streamSid": self.stream_sid,
            }
        )
        self.stream_start = time.monotonic()
        self._tasks = [
            asyncio.create_task(self._read(), name="twilio-caller-read"),
            asyncio.create_task(self._mic(), name="twilio-caller-mic"),
            asyncio.create_task(self._speaker(), name="twilio-caller-speaker"),
        ]

    async def hang_up(self, timeout: float = 5.0) -> None:
        """The caller hangs up: Twilio sends `stop` and closes the socket. A no-op once the bot closed it."""
        if self.ws is None or self._hanging_up:
            return
        self._hanging_up = True
        mic = self._tasks[1] if len(self._tasks) > 1 else None
        if mic is not None:
            mic.cancel()
            await asyncio.gather(mic, return_exceptions=True)
        if self.closed_at is None:
            try:
                await self._send(
                    {
                        "event": "stop",
                        "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
                        "streamSid": self.stream_sid,
                    }
                )
                self.hung_up_at = time.monotonic()
                await asyncio.wait_for(self.ws.close(), timeout)
            except Exception:  # noqa: BLE001 - the bot may have gone at the same moment
                pass
        await self._stop_tasks(timeout)

    async def _stop_tasks(self, timeout: float) -> None:
        reader, *others = self._tasks or [None]
        for task in others:
            task.cancel()
        if reader is not None:  # ends once the close handshake is done
            await asyncio.wait([reader], timeout=timeout)
            reader.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for u in self._speech:
            if not u.done.done():
                u.done.set_result(None)
        self._speech.clear()

    # ---- sending ------------------------------------------------------------------------------------------

    async def _send(self, message: dict, sequenced: bool = True) -> None:
        async with self._send_lock:
            if sequenced:
                self._seq += 1
                message = {
                    "event": message["event"],
                    "sequenceNumber": str(self._seq),
                    **{k: v for k, v in message.items() if k != "event"},
                }
            await self.ws.send(json.dumps(message))
            self.sent.append(message)
            self.sent_at.append(time.monotonic())

    async def _mic(self) -> None:
        """The phone line: one 20 ms media message per 20 ms of real time, speech when queued, else silence."""
        silence = bytes([MULAW_SILENCE]) * FRAME_BYTES
        t0 = self.stream_start
        k = 0
        try:
            while True:
                due = t0 + k * FRAME_MS / 1000
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                frame, finished = silence, None
                if self._speech:
                    u = self._speech[0]
                    if u.index == 0:
                        u.turn.speech_start = due
                        u.turn.speech_end = due + u.speech_end_s
                    frame = u.frames[u.index]
                    u.index += 1
                    if u.index >= len(u.frames):
                        self._speech.popleft()
                        finished = u
                self._chunk += 1
                await self._send(
                    {
                        "event": "media",
                        "media": {
                            "track": "inbound",
                            "chunk": str(self._chunk),
                            "timestamp": str(k * FRAME_MS),
                            "payload": base64.b64encode(frame).decode(),
                        },
                        "streamSid": self.stream_sid,
                    }
                )
                self.media_frames_sent += 1
                if finished is not None:
                    finished.turn.sent_at = time.monotonic()
                    if not finished.done.done():
                        finished.done.set_result(None)
                k += 1
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the socket closed under us; _read records how
            return

    async def say(self, path: str | Path | None = None, audio: np.ndarray | None = None) -> CallTurn:
        """Speak a 16-bit WAV (any rate; or int16 `audio` at 8 kHz) in real time; returns once it has all been
        sent. Silence resumes right after. The turn's speech end is where its last loud frame ends."""
        if audio is None:
            if path is None:
                raise ValueError("say() needs a WAV path or 8 kHz int16 audio")
            audio = load_wav(path, TWILIO_RATE)
        if not self.connected:
            raise ConnectionError("the call is not connected")
        audio = np.asarray(audio, dtype=np.int16)
        coded = mulaw_encode(audio)
        if len(coded) % FRAME_BYTES:
            coded += bytes([MULAW_SILENCE]) * (FRAME_BYTES - len(coded) % FRAME_BYTES)
        frames = [coded[i : i + FRAME_BYTES] for i in range(0, len(coded), FRAME_BYTES)]
        turn = CallTurn(audio_file=str(path) if path is not None else "<audio>")
        self.turns.append(turn)
        if not frames:
            turn.speech_start = turn.speech_end = turn.sent_at = time.monotonic()
            return turn
        utterance = _Utterance(
            turn, frames, speech_end_seconds(audio, TWILIO_RATE), asyncio.get_running_loop().create_future()
        )
        self._speech.append(utterance)
        await utterance.done
        return turn

    async def send_silence(self, seconds: float) -> None:
        """Let `seconds` of line silence go out (the line streams silence by itself; this just waits)."""
        await asyncio.sleep(seconds)

    async def send_dtmf(self, digit: str) -> None:
        """A keypress, as Twilio reports it: `{"event": "dtmf", "dtmf": {"track": "inbound_track", "digit"}}`."""
        if digit not in "0123456789*#" or len(digit) != 1:
            raise ValueError(f"not a DTMF digit: {digit!r}")
        await self._send(
            {"event": "dtmf", "streamSid": self.stream_sid, "dtmf": {"track": "inbound_track", "digit": digit}}
        )
        self.dtmf_sent.append(digit)

    # ---- receiving ----------------------------------------------------------------------------------------

    def _error(self, what: str) -> None:
        self.protocol_errors.append(what)

    def _turn_at(self, t: float) -> CallTurn | None:
        for turn in reversed(self.turns):
            if t >= turn.speech_end:
                return turn
        return None

    async def _read(self) -> None:
        import websockets

        try:
            async for raw in self.ws:
                now = time.monotonic()
                if isinstance(raw, bytes):
                    self._error(f"binary frame of {len(raw)} bytes: Twilio takes JSON text messages")
                    continue
                try:
                    message = json.loads(raw)
                except ValueError:
                    self._error(f"not JSON: {raw[:80]!r}")
                    continue
                if not isinstance(message, dict):
                    self._error(f"not a JSON object: {raw[:80]!r}")
                    continue
                message["_t"] = now
                self.received.append(message)
                try:
                    await self._handle(message, now)
                finally:
                    self.on_event(message)
                    self._changed.set()
        except websockets.ConnectionClosed:
            pass
        except Exception as e:  # noqa: BLE001
            self._error(f"reader failed: {e!r}")
        finally:
            if self.closed_at is None:
                self.closed_at = time.monotonic()
                self.closed_by_server = not self._hanging_up
                self.close_code = getattr(self.ws, "close_code", None)
                self.close_reason = getattr(self.ws, "close_reason", None)
            self._changed.set()
            if self.closed_by_server:
                for task in self._tasks[1:]:
                    task.cancel()
                for u in self._speech:
                    if not u.done.done():
                        u.done.set_result(None)
                self._speech.clear()

    async def _handle(self, message: dict, now: float) -> None:
        event = message.get("event")
        if self._hanging_up:
            return
        if event not in ("media", "mark", "clear"):
            self._error(f"unknown event {event!r}")
            return
        if message.get("streamSid") != self.stream_sid:
            self._error(f"{event} with streamSid {message.get('streamSid')!r}, expected {self.stream_sid!r}")
            return
        if event == "media":
            media = message.get("media")
            payload = media.get("payload") if isinstance(media, dict) else None
            if not isinstance(payload, str) or not payload:
                self._error(f"media without a payload: {json.dumps(media)[:80]}")
                return
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                self._error(f"media payload is not base64: {payload[:40]!r}")
                return
            if data[:4] == b"RIFF" or data[:3] == b"ID3":
                self._error("media payload carries a file header: Twilio wants raw audio/x-mulaw")
            pcm = mulaw_decode(data)
            self.reply_audio += pcm
            self.last_media_at = now
            self._play_until = max(self._play_until, now) + len(data) / TWILIO_RATE
            turn = self._turn_at(now)
            if turn is not None:
                if turn.first_audio is None:
                    turn.first_audio = now
                turn.reply_audio += pcm
                turn.media_times.append(now)
        elif event == "mark":
            mark = message.get("mark")
            name = mark.get("name") if isinstance(mark, dict) else None
            if not isinstance(name, str) or not name:
                self._error(f"mark without a name: {json.dumps(mark)[:80]}")
                return
            received = ReceivedMark(name, now, max(self._play_until, now))
            self.marks.append(received)
            turn = self._turn_at(now)
            if turn is not None:
                turn.marks.append(name)
            self._pending_marks.append(received)
            self._marks_changed.set()
        else:  # clear
            dropped = max(0.0, self._play_until - now)
            self._play_until = now
            flushed = list(self._pending_marks)
            self._pending_marks.clear()
            self.clears.append(ClearEvent(now, round(dropped * 1000, 1), [m.name for m in flushed]))
            turn = self._turn_at(now)
            if turn is not None:
                turn.cleared = True
            for m in flushed:
                m.cleared = True
                await self._echo_mark(m)

    async def _echo_mark(self, mark: ReceivedMark) -> None:
        await self._send({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": mark.name}})
        mark.echoed_at = time.monotonic()

    async def _speaker(self) -> None:
        """Plays the bot's audio on the caller's clock: echoes each mark once the audio before it has played."""
        try:
            while True:
                if not self._pending_marks:
                    self._marks_changed.clear()
                    await self._marks_changed.wait()
                    continue
                delay = self._pending_marks[0].due - time.monotonic()
                if delay > 0:
                    self._marks_changed.clear()
                    try:
                        await asyncio.wait_for(self._marks_changed.wait(), delay)
                    except TimeoutError:
                        pass
                    continue
                await self._echo_mark(self._pending_marks.popleft())
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the socket closed under us
            return

    # ---- waiting ------------------------------------------------------------------------------------------

    @property
    def is_playing(self) -> bool:
        """Whether bot audio received is still playing on the caller's side."""
        return time.monotonic() < self._play_until

    @property
    def playback_ends_at(self) -> float:
        return self._play_until

    async def wait_reply_done(self, timeout: float = 60.0, quiet: float = 1.0) -> CallTurn | None:
        """Wait until the last turn got a reply, it has played out and no bot media came for `quiet` seconds
        (the line streams silence meanwhile); returns that turn. Before any `say()`, waits the same way for the
        bot's first audio (a greeting) and returns None. Returns early if the bot hangs up after replying."""
        deadline = time.monotonic() + timeout
        turn = self.turns[-1] if self.turns else None
        while time.monotonic() < deadline:
            got = turn.first_audio is not None if turn is not None else self.last_media_at is not None
            now = time.monotonic()
            if got and now >= self._play_until and now - (self.last_media_at or 0.0) >= quiet:
                return turn
            if self.closed_at is not None:
                if got:
                    return turn
                raise ConnectionError(f"the bot closed the call before replying (code {self.close_code})")
            await asyncio.sleep(FRAME_MS / 1000)
        raise TimeoutError(f"no complete reply within {timeout}s")

    async def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 30.0) -> dict:
        """The first received message (past or future) matching `predicate`."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for message in self.received[seen:]:
                if predicate(message):
                    return message
            seen = len(self.received)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.closed_at is not None:
                raise TimeoutError("expected message did not arrive")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.1))
            except TimeoutError:
                pass

    async def wait_mark_echoed(self, name: str, timeout: float = 30.0) -> ReceivedMark:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.marks:
                if m.name == name and m.echoed_at is not None:
                    return m
            await asyncio.sleep(0.01)
        raise TimeoutError(f"mark {name!r} not echoed within {timeout}s")

    async def wait_closed(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.closed_at is None:
            if time.monotonic() >= deadline:
                raise TimeoutError("the call is still open")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(0.1, deadline - time.monotonic()))
            except TimeoutError:
                pass

    def save_reply(self, path: str | Path) -> None:
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(TWILIO_RATE)
            w.writeframes(bytes(self.reply_audio))
