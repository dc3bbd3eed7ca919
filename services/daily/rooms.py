"""A Daily room per Atlas session, made through Daily's REST API (https://docs.daily.co/reference/rest-api).

This wraps Pipecat's own `DailyRESTHelper` (pipecat.transports.daily.utils), which already knows the endpoints,
the request models (DailyRoomParams / DailyRoomProperties / DailyMeetingTokenParams) and the room object. What
the wrapper adds, and why it is not just the helper:

- One call, `create_session_room`, makes what `POST /daily/start` needs: a room that expires after the session's
  maximum duration and ejects everyone then (`exp`, `eject_at_room_exp`), private, few participants, no prejoin
  UI; and two meeting tokens for it, the user's (not owner) and the bot's (owner), that expire with the room and
  eject at expiry. The helper's `get_token` takes a duration, not an end time, so the tokens' `exp` is lined up
  with the room's here. If a token cannot be made, the room just created is deleted again, not left behind.
- Errors with a type and fields: the helper raises a bare `Exception("... (status: N): <body>")`; here that
  becomes `DailyAPIError` with the HTTP `status` and Daily's documented `error` / `info` body fields
  (https://docs.daily.co/docs/rest-api/errors), so a caller can tell a bad key (401) from a rate limit (429) or
  an outage (5xx) without parsing text. Messages never carry the API key (it is scrubbed even from `info`).
- `delete_room` says whether there was a room: the helper's `delete_room_by_url` treats 404 as success. Daily
  answers 404 with `deleted: true` for a room whose `exp` had passed (it deletes it then); that counts as deleted.

Daily's Python SDK (`daily-python`) is not used here: this is plain HTTP through the caller's aiohttp session
(give it a timeout). The bot joins the room with Pipecat's DailyTransport, elsewhere, using `bot_token`.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import aiohttp
from pipecat.transports.daily.utils import (
    DailyMeetingTokenParams,
    DailyMeetingTokenProperties,
    DailyRESTHelper,
    DailyRoomParams,
    DailyRoomProperties,
)

DEFAULT_API_URL = "https://api.daily.co/v1"
# The user and the bot, plus headroom for a reconnecting browser tab (its old participant may linger briefly).
DEFAULT_MAX_PARTICIPANTS = 4
MAX_PARTICIPANTS_LIMIT = 200  # Daily's documented ceiling without asking their support
_MAX_INFO_CHARS = 300
_ROOM_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")  # Daily's documented room-name alphabet and length
# The helper's error text: "Unable to create room (status: 401): <body>" / "Failed to create meeting token ...".
_HELPER_STATUS_RE = re.compile(r"\(status: (\d{3})\): (.*)\Z", re.S)

T = TypeVar("T")


class DailyAPIError(Exception):
    """A Daily REST call failed. `status` is the HTTP status (None when no HTTP answer came: connection
    refused, timeout, ...); `error` and `info` are Daily's error body fields (`error` is the stable one:
    "authentication-error", "rate-limit-error", "invalid-request-error", "not-found", "server-error", ...)."""

    def __init__(self, operation: str, status: int | None, error: str | None = None, info: str | None = None):
        self.operation = operation
        self.status = status
        self.error = error
        self.info = info
        what = f"HTTP {status}" if status is not None else "no HTTP response"
        detail = ": ".join(p for p in (error, info) if p)
        super().__init__(f"Daily {operation} failed ({what})" + (f": {detail}" if detail else ""))

    @property
    def retryable(self) -> bool:
        """Worth trying again later: rate limited, Daily-side failure, or no answer at all."""
        return self.status is None or self.status == 429 or self.status >= 500


@dataclass(frozen=True)
class DailyRoomSession:
    """A room made for one session. Both tokens expire (and eject their holder) at `expires_at`, with the
    room. The tokens are secrets: they are kept out of `repr`."""

    room_url: str
    room_name: str
    user_token: str = field(repr=False)  # for the browser: joins the private room, not an owner
    bot_token: str = field(repr=False)  # for the bot's DailyTransport: owner
    expires_at: int  # unix seconds: the room's `exp` and both tokens' `exp`


def make_helper(api_key: str, session: aiohttp.ClientSession, api_url: str = DEFAULT_API_URL) -> DailyRESTHelper:
    """Pipecat's helper for `api_url` (Daily's, or a fake's `<http_url>/v1`) over the caller's session."""
    return DailyRESTHelper(daily_api_key=api_key, daily_api_url=api_url.rstrip("/"), aiohttp_session=session)


async def create_session_room(
    helper: DailyRESTHelper,
    *,
    max_duration_secs: float,
    bot_name: str,
    user_name: str | None = None,
    max_participants: int = DEFAULT_MAX_PARTICIPANTS,
    privacy: Literal["private", "public"] = "private",
) -> DailyRoomSession:
    """Create a room that ends `max_duration_secs` from now (everyone ejected then) and the two tokens for it.

    Raises DailyAPIError when Daily refuses or does not answer (the room is deleted again if only the tokens
    failed), ValueError for arguments Daily would refuse anyway.
    """
    if not (isinstance(max_duration_secs, int | float) and math.isfinite(max_duration_secs) and max_duration_secs > 0):
        raise ValueError(f"max_duration_secs must be a positive number of seconds, not {max_duration_secs!r}")
    if not 2 <= max_participants <= MAX_PARTICIPANTS_LIMIT:
        raise ValueError(f"max_participants must be 2..{MAX_PARTICIPANTS_LIMIT} (the user and the bot at least)")
    expires_at = math.ceil(time.time() + max_duration_secs)
    params = DailyRoomParams(
        privacy=privacy,
        properties=DailyRoomProperties(
            exp=expires_at,
            eject_at_room_exp=True,
            max_participants=max_participants,
            enable_prejoin_ui=False,
            enable_chat=False,
            enable_emoji_reactions=False,
            start_video_off=True,  # a voice agent: nobody's camera starts on
        ),
    )
    room = await _call(helper, "create room", helper.create_room(params))
    try:
        bot_token = await _token(helper, room.url, expires_at, owner=True, user_name=bot_name)
        user_token = await _token(helper, room.url, expires_at, owner=False, user_name=user_name)
    except BaseException:
        # A room without its tokens is of no use to anyone: remove it (best effort; it expires anyway).
        try:
            await delete_room(helper, room.url)
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass
        raise
    return DailyRoomSession(
        room_url=room.url, room_name=room.name, user_token=user_token, bot_token=bot_token, expires_at=expires_at
    )


async def delete_room(helper: DailyRESTHelper, room_url: str, *, missing_ok: bool = True) -> bool:
    """Delete the room at `room_url`. True if Daily deleted it (an expired room counts), False if there was no
    such room (404) and `missing_ok`; otherwise DailyAPIError (404 included when not `missing_ok`)."""
    name = helper.get_name_from_url(room_url)
    if not _ROOM_NAME_RE.fullmatch(name):
        raise ValueError("not a Daily room URL (expected https://<domain>.daily.co/<room name>)")
    headers = {"Authorization": f"Bearer {helper.daily_api_key}"}
    try:
        async with helper.aiohttp_session.delete(f"{helper.daily_api_url}/rooms/{name}", headers=headers) as r:
            status = r.status
            text = await r.text()
    except (TimeoutError, aiohttp.ClientError) as e:
        raise DailyAPIError("delete room", None, "connection-error", _scrub(helper, _describe(e))) from None
    if status == 200:
        return True
    error, info, body = _parse_error_body(helper, text)
    if status == 404:
        if body.get("deleted") is True:
            return True
        if missing_ok:
            return False
    raise DailyAPIError("delete room", status, error, info)


# ---- internals -------------------------------------------------------------------------------------------------


async def _token(helper: DailyRESTHelper, room_url: str, expires_at: int, *, owner: bool, user_name: str | None) -> str:
    # The helper sets exp = int(time.time() + expiry_time) itself; the +0.5 s absorbs the microseconds between
    # here and there (and float rounding) so that its exp comes out exactly `expires_at`.
    expiry_time = expires_at - time.time() + 0.5
    params = DailyMeetingTokenParams(properties=DailyMeetingTokenProperties(user_name=user_name))
    what = "create bot token" if owner else "create user token"
    return await _call(
        helper,
        what,
        helper.get_token(room_url, expiry_time=expiry_time, eject_at_token_exp=True, owner=owner, params=params),
    )


async def _call(helper: DailyRESTHelper, operation: str, call: Awaitable[T]) -> T:
    """Await one of the helper's calls, turning its bare Exceptions into DailyAPIError."""
    try:
        return await call
    except DailyAPIError:
        raise
    except (TimeoutError, aiohttp.ClientError) as e:
        raise DailyAPIError(operation, None, "connection-error", _scrub(helper, _describe(e))) from None
    except Exception as e:  # noqa: BLE001 - the helper raises bare Exception for every API failure
        m = _HELPER_STATUS_RE.search(str(e))
        if m is None:  # e.g. "Invalid response: ..." (a 200 whose body is not a room)
            raise DailyAPIError(operation, None, "unexpected-response", _scrub(helper, str(e))) from None
        error, info, _ = _parse_error_body(helper, m.group(2))
        raise DailyAPIError(operation, int(m.group(1)), error, info) from None


def _parse_error_body(helper: DailyRESTHelper, text: str) -> tuple[str | None, str | None, dict[str, Any]]:
    """Daily's `{"error": ..., "info": ...}`; a body that is not that becomes `info` (shortened)."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return None, _scrub(helper, text.strip()) or None, {}
    error = body.get("error")
    info = body.get("info")
    return (
        _scrub(helper, str(error)) if error is not None else None,
        _scrub(helper, str(info)) if info is not None else None,
        body,
    )


def _scrub(helper: DailyRESTHelper, text: str) -> str:
    key = helper.daily_api_key
    if key:
        text = text.replace(key, "***")
    return text if len(text) <= _MAX_INFO_CHARS else text[: _MAX_INFO_CHARS - 3] + "..."


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
