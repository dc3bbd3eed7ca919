"""A local fake of Daily's REST API (https://docs.daily.co/reference/rest-api), the part Atlas uses: rooms and
meeting tokens. Point Pipecat's `DailyRESTHelper(daily_api_url=fake.api_url, ...)` at it.

Covered, as documented by Daily:

* auth: `Authorization: Bearer <key>`; no header -> 400 `authorization-header-error`, not `Bearer ...` -> 400
  `invalid-request-error` "bad Authorization header format", a wrong key -> 401 `authentication-error`. Every
  error body is Daily's `{"error": <stable type>, "info": <human text>}` (docs/rest-api/errors); a body that is not
  JSON -> 400 `json-parsing-error`;
* `POST /v1/rooms` with `{name?, privacy?, properties?}`: `name` must match /^[A-Za-z0-9_-]{1,128}$/ (a random
  20-character name when absent; an existing name -> 400), `privacy` "public" (default) | "private", and the
  room properties type-checked (`exp`/`nbf` unix seconds, `max_participants` 1..200, booleans, enums; unknown
  properties refused with 400 `invalid-request-error`, so a misspelt property fails a test). Answer: the room
  object `{id, name, api_created, privacy, url: "https://<domain>.daily.co/<name>", created_at, config}`, where
  `config` holds only the properties that differ from Daily's defaults, as the reference says;
* `GET /v1/rooms` (`{total_count, data}`), `GET /v1/rooms/:name` (404 `not-found` when absent);
  `DELETE /v1/rooms/:name` -> `{"deleted": true, "name"}`, 404 `not-found` when absent. Rooms whose `exp` has
  passed count as deleted, as with Daily: GET answers 404, DELETE answers 404 plus `"deleted": true` (and drops it);
* `POST /v1/meeting-tokens` with `{properties: {room_name, is_owner, exp, nbf, user_name, user_id,
  eject_at_token_exp, ...}}` -> `{"token": <JWT>}`. The token is an HS256 JWT signed with the API key, with the
  abbreviated claims of Daily's self-signed tokens (`r` room_name, `o` is_owner, `u` user_name, `ud` user_id,
  `ejt` eject_at_token_exp, `exp`, `nbf`, `d` domain_id, `iat`, ...): tests decode it with pyjwt and the key, or
  with `decode_token` (full property names back).

Assumptions and gaps: Daily's reference documents no check that a token's `room_name` exists (self-signed
tokens never reach the API), so tokens are issued for any valid room name; `tokens_require_room=True` refuses
unknown rooms with 400 for a stricter test. `exp` is typed integer in the reference but Pipecat's own runner
sends floats, so any number is accepted (whole seconds kept). `permissions` goes into the `p` claim as sent
(Daily abbreviates its fields too). Not confirmed from Daily's docs (so kept loose in tests): the `info`
texts (ours), `not-found` as the 404 `error` type (the errors page's table does not list one), and that Daily
refuses unknown room / token properties. Not modelled: room updates (`POST /rooms/:name`),
`GET /meeting-tokens/:token`, presence, recordings, SIP/dial-in, domain config, the real rate limits (script
429s instead), and the meaning of properties (a room's `max_participants` or `eject_at_room_exp` is stored and
echoed, never enforced: no one joins a fake room).

Scripting (thread-safe, from the test thread): `fail_next(status, times, endpoint=...)` (Daily's body for the
status: 429 `rate-limit-error`, 5xx `server-error`, ...), `rate_limit_next`, `fail_always`, `stall_next`,
`clear_faults`; `advance(seconds)` moves the fake's clock (rooms expire). Faults apply to authenticated requests,
before validation; `endpoint` ("rooms" | "meeting-tokens") aims one at that kind of call only.
"""

from __future__ import annotations

import json
import re
import secrets
import string
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt
from aiohttp import web

from fakes.base import ClientGone, FakeServer, FaultQueue, RecordedRequest

DEFAULT_API_KEY = "test-daily-key-0123456789abcdef0123456789abcdef"  # >= 32 bytes: pyjwt warns of shorter HS256 keys
ROOM_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
MAX_PARTICIPANTS = 200  # "Contact us if you need to set the limit above 200."
RECORDING_TYPES = ("cloud", "cloud-audio-only", "local", "raw-tracks", "rtp-tracks", "output-byte-stream")

_BOOL, _INT, _NUM, _STR, _OBJ, _LIST = "bool", "int", "number", "str", "object", "list"
# Room properties (reference: rooms/create-room and rooms/update-room) -> expected JSON type. Objects and lists
# are accepted without looking inside.
ROOM_PROPERTIES: dict[str, str] = {
    "nbf": _NUM,
    "exp": _NUM,
    "max_participants": _INT,
    "eject_after_elapsed": _INT,
    "sfu_switchover": _NUM,
    "lang": _STR,
    "geo": _STR,
    "rtmp_geo": _STR,
    "meeting_join_hook": _STR,
    "enable_recording": _STR,
    "recordings_template": _STR,
    "sip": _OBJ,
    "sip_uri": _OBJ,
    "dialin": _OBJ,
    "recordings_bucket": _OBJ,
    "transcription_bucket": _OBJ,
    "auto_transcription_settings": _OBJ,
    "permissions": _OBJ,
    "streaming_endpoints": _LIST,
    "start_cloud_recording_opts": _OBJ,
    **{
        name: _BOOL
        for name in (
            "eject_at_room_exp",
            "enable_prejoin_ui",
            "enable_chat",
            "enable_emoji_reactions",
            "start_video_off",
            "start_audio_off",
            "enable_people_ui",
            "enable_pip_ui",
            "enable_hand_raising",
            "enable_knocking",
            "enable_screenshare",
            "enable_dialout",
            "enable_transcription_storage",
            "enable_mesh_sfu",
            "enable_advanced_chat",
            "enable_hidden_participants",
            "enable_network_ui",
            "enable_noise_cancellation_ui",
            "enable_breakout_rooms",
            "enable_live_captions_ui",
            "enable_video_processing_ui",
            "enable_shared_chat_history",
            "enable_cpu_warning_notifications",
            "enforce_unique_user_ids",
            "enable_terse_logging",
            "experimental_optimize_large_calls",
            "enable_adaptive_simulcast",
            "enable_multiparty_adaptive_simulcast",
            "disable_rtmp_geo_fallback",
            "enable_recording_ui",
            "start_cloud_recording",
            "auto_start_transcription",
            "enable_video_processing",
            "owner_only_broadcast",
        )
    },
}
# Documented defaults: a property equal to its default is left out of the room object's `config`.
ROOM_DEFAULTS: dict[str, Any] = {
    "max_participants": 200,
    "enable_chat": False,
    "start_video_off": False,
    "start_audio_off": False,
    "eject_at_room_exp": False,
    "enable_advanced_chat": False,
    "enable_hidden_participants": False,
    "enforce_unique_user_ids": False,
    "enable_terse_logging": False,
    "enable_transcription_storage": False,
    "enable_knocking": False,
}
# Meeting-token properties (meeting-tokens/create-meeting-token) -> (JSON type, claim in the JWT) per Daily's
# "token property abbreviations" for self-signed tokens.
TOKEN_PROPERTIES: dict[str, tuple[str, str]] = {
    "room_name": (_STR, "r"),
    "nbf": (_NUM, "nbf"),
    "exp": (_NUM, "exp"),
    "is_owner": (_BOOL, "o"),
    "user_name": (_STR, "u"),
    "user_id": (_STR, "ud"),
    "knocking": (_BOOL, "k"),
    "close_tab_on_exit": (_BOOL, "ctoe"),
    "redirect_on_meeting_exit": (_STR, "rome"),
    "intercom_join_alert": (_BOOL, "ij"),
    "start_cloud_recording": (_BOOL, "sr"),
    "start_cloud_recording_opts": (_OBJ, "sro"),
    "auto_start_transcription": (_BOOL, "ast"),
    "enable_recording": (_STR, "er"),
    "enable_screenshare": (_BOOL, "ss"),
    "start_video_off": (_BOOL, "vo"),
    "start_audio_off": (_BOOL, "ao"),
    "meeting_join_hook": (_STR, "mjh"),
    "eject_at_token_exp": (_BOOL, "ejt"),
    "eject_after_elapsed": (_INT, "eje"),
    "lang": (_STR, "uil"),
    "enable_recording_ui": (_BOOL, "erui"),
    "permissions": (_OBJ, "p"),
    # A documented token property missing from the abbreviation table: kept under its full name.
    "enable_prejoin_ui": (_BOOL, "enable_prejoin_ui"),
}
_CLAIM_TO_PROPERTY = {claim: name for name, (_, claim) in TOKEN_PROPERTIES.items()}
_ERROR_TYPES = {
    400: "invalid-request-error",
    401: "authentication-error",
    403: "forbidden-error",
    404: "not-found",
    429: "rate-limit-error",
}
_ERROR_INFO = {
    "invalid-request-error": "the request could not be completed",
    "authentication-error": "invalid API key",
    "forbidden-error": "this API key is not allowed to access this resource",
    "not-found": "not found",
    "rate-limit-error": "too many requests, please slow down",
    "server-error": "internal server error",
}


class DailyErrorResponse(Exception):
    """An error the fake answers with: HTTP `status` and Daily's `{"error", "info"}` body (+ `extra` fields)."""

    def __init__(
        self, status: int, error: str | None = None, info: str | None = None, extra: dict[str, Any] | None = None
    ) -> None:
        self.status = status
        self.error = error or _ERROR_TYPES.get(status, "server-error" if status >= 500 else "invalid-request-error")
        self.info = info or _ERROR_INFO.get(self.error, "error")
        self.extra = extra or {}
        super().__init__(f"{status} {self.error}: {self.info}")


@dataclass
class DailyRequest(RecordedRequest):
    """A recorded Daily API request plus what the fake did with it."""

    error: str | None = None  # Daily's `error` type when answered with one
    fault: str | None = None  # "fail" | "stall" when a scripted fault applied


@dataclass
class _Fault:
    kind: str  # "fail" | "stall"
    status: int = 0
    error: str | None = None
    info: str | None = None
    seconds: float = 0.0


class FakeDailyAPI(FakeServer):
    """Fake `api.daily.co`: `DailyRESTHelper(daily_api_key=fake.api_key, daily_api_url=fake.api_url, ...)`."""

    request_class = DailyRequest

    def __init__(
        self,
        *,
        api_key: str = DEFAULT_API_KEY,
        domain: str = "atlas-test",
        domain_id: str | None = None,
        tokens_require_room: bool = False,
    ) -> None:
        """
        Args:
            api_key: the only Bearer key accepted; also the HS256 secret the tokens are signed with.
            domain: the Daily domain (subdomain) in room URLs: `https://<domain>.daily.co/<room>`.
            domain_id: the `d` claim in tokens (a fixed UUID by default).
            tokens_require_room: refuse tokens for a `room_name` that is not a live room (400); off by default,
                as Daily documents no such check.
        """
        super().__init__()
        self.api_key = api_key
        self.domain = domain
        self.domain_id = domain_id or str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{domain}.daily.co"))
        self.tokens_require_room = tokens_require_room
        self.requests: list[DailyRequest] = []  # type: ignore[assignment]
        self.rooms: dict[str, dict[str, Any]] = {}  # name -> {"room": room object, "properties": as sent}
        self.deleted_rooms: list[str] = []  # names, in the order DELETE removed them
        self.tokens: list[dict[str, Any]] = []  # issued: {"token", "properties" (as sent), "claims"}
        self.clock_offset = 0.0  # seconds added to time.time() (see `advance`)
        self._lock = threading.Lock()
        self._faults = {"*": self._fault_queue(), "rooms": self._fault_queue(), "meeting-tokens": self._fault_queue()}
        router = self.app.router
        router.add_post("/v1/rooms", self._create_room)
        router.add_get("/v1/rooms", self._list_rooms)
        router.add_get("/v1/rooms/{name}", self._get_room)
        router.add_delete("/v1/rooms/{name}", self._delete_room)
        router.add_post("/v1/meeting-tokens", self._create_token)
        router.add_route("*", "/{tail:.*}", self._not_found)

    @property
    def api_url(self) -> str:
        """What to give DailyRESTHelper as `daily_api_url` (Daily's is "https://api.daily.co/v1")."""
        return f"{self.http_url}/v1"

    def room_url(self, name: str) -> str:
        return f"https://{self.domain}.daily.co/{name}"

    def now(self) -> float:
        return time.time() + self.clock_offset

    # ---- scripting (any thread) ---------------------------------------------------------------------------

    def fail_next(
        self,
        status: int,
        times: int = 1,
        *,
        endpoint: str | None = None,
        error: str | None = None,
        info: str | None = None,
    ) -> None:
        """The next `times` authenticated requests (to `endpoint`, "rooms" or "meeting-tokens", when given) get
        HTTP `status` with Daily's body for it (`error` / `info` override the defaults)."""
        self._queue(endpoint).add(_Fault("fail", status=status, error=error, info=info), times)

    def rate_limit_next(self, times: int = 1, *, endpoint: str | None = None) -> None:
        """The next `times` requests get Daily's 429 `rate-limit-error`."""
        self.fail_next(429, times, endpoint=endpoint)

    def fail_always(self, status: int, *, endpoint: str | None = None) -> None:
        """Every authenticated request (to `endpoint`, when given) fails with `status` until `clear_faults()`."""
        self._queue(endpoint).set_always(_Fault("fail", status=status))

    def stall_next(self, seconds: float, times: int = 1, *, endpoint: str | None = None) -> None:
        """The next `times` requests are answered only after `seconds` (for client timeouts)."""
        self._queue(endpoint).add(_Fault("stall", seconds=seconds), times)

    def advance(self, seconds: float) -> None:
        """Move the fake's clock forward: rooms whose `exp` is passed then count as deleted."""
        self.clock_offset += seconds

    def _queue(self, endpoint: str | None) -> FaultQueue:
        key = endpoint or "*"
        if key not in self._faults:
            raise ValueError(f"endpoint must be 'rooms' or 'meeting-tokens', not {endpoint!r}")
        return self._faults[key]

    # ---- accessors ----------------------------------------------------------------------------------------

    def room(self, name: str) -> dict[str, Any] | None:
        """The room object for `name` as GET would answer it (None if absent or expired)."""
        with self._lock:
            entry = self.rooms.get(name)
            return None if entry is None or self._expired(entry) else dict(entry["room"])

    def room_properties(self, name: str) -> dict[str, Any]:
        """The properties `name` was created with, as sent (not just those that differ from the defaults)."""
        with self._lock:
            return dict(self.rooms[name]["properties"])

    def decode_token(self, token: str) -> dict[str, Any]:
        """A token's properties under their full names (`room_name`, `is_owner`, ..., plus `domain_id`, `iat`),
        after checking its signature; expiry is not checked (see `advance`)."""
        claims = jwt.decode(
            token,
            self.api_key,
            algorithms=["HS256"],
            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
        )
        out = {_CLAIM_TO_PROPERTY.get(k, k): v for k, v in claims.items()}
        if "d" in out:
            out["domain_id"] = out.pop("d")
        return out

    @property
    def status_counts(self) -> dict[int, int]:
        return dict(Counter(r.status for r in list(self.requests)))

    # ---- HTTP ---------------------------------------------------------------------------------------------

    def _error(self, rec: DailyRequest, err: DailyErrorResponse) -> web.Response:
        rec.status = err.status
        rec.error = err.error
        return web.json_response({"error": err.error, "info": err.info, **err.extra}, status=err.status)

    async def _not_found(self, request: web.Request) -> web.Response:
        rec = self.record(request, await request.text())
        return self._error(rec, DailyErrorResponse(404, "not-found", f"{request.method} {request.path} not found"))

    async def _handle(self, request: web.Request, endpoint: str, handler, *, with_body: bool) -> web.Response:
        raw = await request.text() if with_body else ""
        rec = self.record(request, raw)
        try:
            self._check_auth(request)
            fault = self._faults[endpoint].take() or self._faults["*"].take()
            if fault is not None:
                rec.fault = fault.kind
                if fault.kind == "stall":
                    await self._sleep(request, fault.seconds)
                else:
                    raise DailyErrorResponse(fault.status, fault.error, fault.info)
            body: Any = None
            if with_body:
                body = {} if not raw.strip() else self._parse_json(raw)
                rec.body = body
                if not isinstance(body, dict):
                    raise DailyErrorResponse(400, "invalid-request-error", "the request body must be a JSON object")
            payload = handler(request, body)
        except DailyErrorResponse as e:
            return self._error(rec, e)
        except (ClientGone, ConnectionError):
            rec.events.append("client_disconnected")
            rec.status = 499  # nginx's "client closed request": nobody is left to answer
            return web.Response(status=499)
        rec.status = 200
        return web.json_response(payload)

    def _check_auth(self, request: web.Request) -> None:
        header = request.headers.get("Authorization")
        if not header:
            raise DailyErrorResponse(400, "authorization-header-error", "Authorization header is missing")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise DailyErrorResponse(400, "invalid-request-error", "bad Authorization header format")
        if key.strip() != self.api_key:
            raise DailyErrorResponse(401, "authentication-error", "invalid API key")

    @staticmethod
    def _parse_json(raw: str) -> Any:
        try:
            return json.loads(raw)
        except ValueError:
            raise DailyErrorResponse(
                400, "json-parsing-error", "the request body could not be parsed as JSON"
            ) from None

    def _expired(self, entry: dict[str, Any]) -> bool:
        exp = entry["properties"].get("exp")
        return exp is not None and exp <= self.now()

    # rooms -------------------------------------------------------------------------------------------------

    async def _create_room(self, request: web.Request) -> web.Response:
        return await self._handle(request, "rooms", self._do_create_room, with_body=True)

    async def _list_rooms(self, request: web.Request) -> web.Response:
        return await self._handle(request, "rooms", self._do_list_rooms, with_body=False)

    async def _get_room(self, request: web.Request) -> web.Response:
        return await self._handle(request, "rooms", self._do_get_room, with_body=False)

    async def _delete_room(self, request: web.Request) -> web.Response:
        return await self._handle(request, "rooms", self._do_delete_room, with_body=False)

    def _do_create_room(self, request: web.Request, body: dict) -> dict:
        unknown = sorted(set(body) - {"name", "privacy", "properties"})
        if unknown:
            raise DailyErrorResponse(400, info=f"unknown parameter '{unknown[0]}'")
        name = body.get("name")
        if name is not None and (not isinstance(name, str) or not ROOM_NAME_RE.match(name)):
            raise DailyErrorResponse(
                400, info="name: a room name can include only A-Z, a-z, 0-9, '-' and '_', and at most 128 characters"
            )
        privacy = body.get("privacy", "public")
        if privacy not in ("public", "private"):
            raise DailyErrorResponse(400, info=f"privacy: must be 'public' or 'private', not {privacy!r}")
        properties = body.get("properties", {})
        if not isinstance(properties, dict):
            raise DailyErrorResponse(400, info="properties: must be an object")
        properties = self._check_room_properties(properties)
        with self._lock:
            if name is None:
                name = _random_name()
            existing = self.rooms.get(name)
            if existing is not None and not self._expired(existing):
                raise DailyErrorResponse(400, info=f"a room named {name} already exists")
            room = {
                "id": str(uuid.uuid4()),
                "name": name,
                "api_created": True,
                "privacy": privacy,
                "url": self.room_url(name),
                "created_at": _iso(self.now()),
                "config": {k: v for k, v in properties.items() if ROOM_DEFAULTS.get(k, object()) != v},
            }
            self.rooms[name] = {"room": room, "properties": properties}
            return dict(room)

    def _check_room_properties(self, properties: dict) -> dict:
        out: dict[str, Any] = {}
        for key, value in properties.items():
            kind = ROOM_PROPERTIES.get(key)
            if kind is None:
                raise DailyErrorResponse(400, info=f"unknown room property '{key}'")
            if value is None:
                continue
            _check_type(key, value, kind)
            if key in ("exp", "nbf"):
                if value <= 0:
                    raise DailyErrorResponse(400, info=f"{key}: must be a unix timestamp in seconds")
                value = int(value)
            elif key == "max_participants" and not 1 <= value <= MAX_PARTICIPANTS:
                raise DailyErrorResponse(400, info=f"max_participants: must be between 1 and {MAX_PARTICIPANTS}")
            elif key == "eject_after_elapsed" and value <= 0:
                raise DailyErrorResponse(400, info="eject_after_elapsed: must be a positive number of seconds")
            elif key == "enable_recording" and value not in RECORDING_TYPES:
                raise DailyErrorResponse(400, info=f"enable_recording: must be one of {', '.join(RECORDING_TYPES)}")
            out[key] = value
        return out

    def _do_list_rooms(self, request: web.Request, body: None) -> dict:
        with self._lock:
            live = [dict(e["room"]) for e in self.rooms.values() if not self._expired(e)]
        live.reverse()  # newest first, as Daily lists
        return {"total_count": len(live), "data": live}

    def _do_get_room(self, request: web.Request, body: None) -> dict:
        name = request.match_info["name"]
        room = self.room(name)
        if room is None:
            raise DailyErrorResponse(404, "not-found", f"room {name} was not found")
        return room

    def _do_delete_room(self, request: web.Request, body: None) -> dict:
        name = request.match_info["name"]
        with self._lock:
            entry = self.rooms.get(name)
            if entry is None:
                raise DailyErrorResponse(404, "not-found", f"room {name} was not found")
            del self.rooms[name]
            self.deleted_rooms.append(name)
            if self._expired(entry):  # "expired rooms are treated ... as having been implicitly deleted"
                raise DailyErrorResponse(404, "not-found", f"room {name} was not found", extra={"deleted": True})
        return {"deleted": True, "name": name}

    # meeting tokens ----------------------------------------------------------------------------------------

    async def _create_token(self, request: web.Request) -> web.Response:
        return await self._handle(request, "meeting-tokens", self._do_create_token, with_body=True)

    def _do_create_token(self, request: web.Request, body: dict) -> dict:
        unknown = sorted(set(body) - {"properties"})
        if unknown:
            raise DailyErrorResponse(400, info=f"unknown parameter '{unknown[0]}'")
        properties = body.get("properties", {})
        if not isinstance(properties, dict):
            raise DailyErrorResponse(400, info="properties: must be an object")
        claims: dict[str, Any] = {}
        for key, value in properties.items():
            spec = TOKEN_PROPERTIES.get(key)
            if spec is None:
                raise DailyErrorResponse(400, info=f"unknown meeting token property '{key}'")
            if value is None:
                continue
            kind, claim = spec
            _check_type(key, value, kind)
            if key in ("exp", "nbf"):
                if value <= 0:
                    raise DailyErrorResponse(400, info=f"{key}: must be a unix timestamp in seconds")
                value = int(value)
            elif key == "room_name" and not ROOM_NAME_RE.match(value):
                raise DailyErrorResponse(400, info="room_name: not a valid room name")
            elif key == "user_id" and len(value) > 36:
                raise DailyErrorResponse(400, info="user_id: at most 36 characters")
            elif key == "eject_after_elapsed" and value <= 0:
                raise DailyErrorResponse(400, info="eject_after_elapsed: must be a positive number of seconds")
            elif key == "enable_recording" and value not in RECORDING_TYPES:
                raise DailyErrorResponse(400, info=f"enable_recording: must be one of {', '.join(RECORDING_TYPES)}")
            claims[claim] = value
        room_name = claims.get("r")
        if self.tokens_require_room and (room_name is None or self.room(room_name) is None):
            raise DailyErrorResponse(400, info=f"room {room_name} does not exist")
        claims["d"] = self.domain_id
        claims["iat"] = int(self.now())
        token = jwt.encode(claims, self.api_key, algorithm="HS256")
        with self._lock:
            self.tokens.append({"token": token, "properties": dict(properties), "claims": claims})
        return {"token": token}


def _check_type(key: str, value: Any, kind: str) -> None:
    ok = {
        _BOOL: isinstance(value, bool),
        _INT: isinstance(value, int) and not isinstance(value, bool),
        _NUM: isinstance(value, int | float) and not isinstance(value, bool),
        _STR: isinstance(value, str),
        _OBJ: isinstance(value, dict),
        _LIST: isinstance(value, list),
    }[kind]
    if not ok:
        article = "an" if kind in ("int", "object") else "a"
        raise DailyErrorResponse(400, info=f"{key}: must be {article} {'integer' if kind == _INT else kind}")


def _random_name() -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(20))


def _iso(ts: float) -> str:
    """Daily's `created_at`: "2019-01-26T09:01:22.000Z"."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ts * 1000) % 1000:03d}Z"
