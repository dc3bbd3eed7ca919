"""The Daily door: `POST /daily/start` (and `atlas-voice daily`) make a room and tokens through Daily's
REST API (services/daily/rooms.py) and start a bot in it with Pipecat's DailyTransport, on the one
shared pipeline.

The bot leaves, and the session ends, when the last participant leaves, when nobody joins within
ATLAS_SESSION_START_TIMEOUT_SECS, when joining fails, or at the maximum duration (the room expires
then too and Daily ejects everyone). Every start creates a billed room, so the door has the same
limits as `/ws`: with auth on, the request needs `Authorization: Bearer <Supabase token>` (checked
first); then sessions at once and starts per minute per IP address and per user (429
`TOO_MANY_SESSIONS` / `RATE_LIMITED`), and the process cap (429 `SERVER_BUSY`). The slots are held
until the bot leaves the room.

Not exercised here (no network to Daily from the test machines): joining a real room, WebRTC media,
and the participant events; the REST flows run against a fake Daily API and the transport is
constructed with daily-python really imported.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
from fastapi import Request
from fastapi.responses import JSONResponse
from loguru import logger

from bots.auth import AuthError
from bots.runtime import Runtime
from bots.session import Caller, VoiceSession
from config.settings import secret
from services.daily.rooms import (
    DailyAPIError,
    DailyRoomSession,
    create_session_room,
    delete_room,
    make_helper,
)
from vocabulary.audio import CLIENT_SAMPLE_RATE
from vocabulary.errors import SHUTTING_DOWN_MESSAGE, ErrorCode, ProtocolError

BOT_NAME = "Atlas"


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"type": "error", "code": code, "message": message}, status_code=status)


class DailySession(VoiceSession):
    def __init__(self, runtime: Runtime, room: DailyRoomSession, caller: Caller, agent: str | None = None):
        super().__init__(runtime, caller, transport_name="daily", agent=runtime.agents.get(agent))
        self.room = room
        self.joined_at: float | None = None

    def make_transport(self):
        from pipecat.transports.daily.transport import DailyParams, DailyTransport

        out_rate = self.runtime.output_sample_rate
        return DailyTransport(
            self.room.room_url,
            self.room.bot_token,
            BOT_NAME,
            params=DailyParams(
                audio_in_enabled=True,
                audio_out_enabled=True,
                audio_in_sample_rate=CLIENT_SAMPLE_RATE,
                audio_out_sample_rate=out_rate,
            ),
        )

    async def _wait_for_participant(self) -> None:
        await asyncio.sleep(self.runtime.settings.session_start_timeout_secs)
        if self.joined_at is None:
            await self.stop("no_participant")

    async def run(self) -> None:
        transport = self.make_transport()
        self.make_worker(transport)

        @transport.event_handler("on_first_participant_joined")
        async def _joined(_transport, participant):
            self.joined_at = time.monotonic()
            self.touch_audio()

        @transport.event_handler("on_participant_left")
        async def _left(_transport, participant, reason):
            counts = transport.participant_counts() or {}
            if counts.get("present", 0) <= 1:  # only the bot is left
                await self.stop("participants_left")

        @transport.event_handler("on_error")
        async def _error_event(_transport, message):
            logger.warning(f"daily session {self.session_id}: {message}")
            if self.joined_at is None:
                self.count_error(str(ErrorCode.PIPELINE_ERROR))
                await self.stop("join_failed")

        waiter = asyncio.create_task(self._wait_for_participant())
        try:
            await super().run()
        finally:
            waiter.cancel()


async def start_daily_session(
    runtime: Runtime, caller: Caller, http: aiohttp.ClientSession, on_end=None, agent: str | None = None
) -> tuple[DailyRoomSession, DailySession]:
    """Create the room and tokens, then run the bot of `agent` (None: the default) in the background (it holds a
    session slot, given back when it ends, with `on_end()` called then)."""
    s = runtime.settings
    helper = make_helper(secret(s.daily_api_key), http, s.daily_api_url)
    room = await create_session_room(helper, max_duration_secs=s.session_max_secs, bot_name=BOT_NAME)
    session = DailySession(runtime, room, caller, agent)

    async def run_bot():
        try:
            await session.run()
        except Exception as e:
            logger.exception(f"daily session {session.session_id} failed: {e}")
        finally:
            runtime.release()
            if on_end is not None:
                on_end()
            try:
                await delete_room(helper, room.room_url)
            except DailyAPIError as e:
                logger.info(f"daily room {room.room_name} not deleted ({e}); it expires at {room.expires_at}")

    runtime.track(asyncio.create_task(run_bot()))
    return room, session


async def daily_start(request: Request, runtime: Runtime) -> JSONResponse:
    s, limits = runtime.settings, runtime.limits
    if not s.daily_api_key:
        return _error(404, "DAILY_DISABLED", "the Daily door is off until DAILY_API_KEY is set")
    if not runtime.ready.is_set():
        return _error(503, str(ErrorCode.SERVER_NOT_READY), "engines are still loading; retry in a few seconds")
    if runtime.shutting_down:
        return _error(503, str(ErrorCode.SERVER_SHUTTING_DOWN), SHUTTING_DOWN_MESSAGE)
    # The agent: `?agent=` or a JSON body's "agent"; none = the default agent.
    agent = request.query_params.get("agent")
    if agent is None and request.headers.get("content-type", "").startswith("application/json"):
        body = await request.body()
        if len(body) > 4096:
            return _error(413, str(ErrorCode.FRAME_TOO_LARGE), "the request body is limited to 4096 bytes")
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            return _error(400, str(ErrorCode.INVALID_JSON), "the body must be a JSON object")
        agent = data.get("agent") if isinstance(data, dict) else None
        if agent is not None and not isinstance(agent, str):
            return _error(400, str(ErrorCode.INVALID_FIELD), "'agent' must be a string")
    if agent is not None and agent not in runtime.agents.by_name:
        runtime.monitor.error(str(ErrorCode.UNKNOWN_AGENT))
        shown = agent if len(agent) <= 64 else agent[:64] + "..."
        return _error(400, str(ErrorCode.UNKNOWN_AGENT), f"no agent named '{shown}' on this server")
    ip = request.client.host if request.client else "unknown"
    caller = Caller(user_agent=request.headers.get("user-agent"), ip_address=ip)
    if runtime.auth.enabled:
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        try:
            caller.user_id = await runtime.auth.verify(token)
        except AuthError as e:
            runtime.monitor.error(str(ErrorCode.AUTH_FAILED))
            return _error(401, str(ErrorCode.AUTH_FAILED), str(e))
    held: list[tuple] = []

    def release_limits() -> None:
        for limit, key in held:
            limit.release(key)
        held.clear()

    for limit, key in ((limits.by_ip, ip), (limits.by_user, caller.user_id or f"anon:{ip}")):
        try:
            await limit.acquire(key)
        except ProtocolError as e:
            release_limits()
            runtime.monitor.error(str(e.code))
            logger.warning(f"/daily/start refused for {limit.what} {key[:64]!r}: {e.code}")
            return JSONResponse(
                {"type": "error", "code": str(e.code), "message": e.message},
                status_code=503 if e.code == ErrorCode.LIMITS_UNAVAILABLE else 429,
                headers={"Retry-After": "60"},
            )
        held.append((limit, key))
    if not runtime.admit():
        release_limits()
        runtime.monitor.error(str(ErrorCode.SERVER_BUSY))
        return JSONResponse(
            {
                "type": "error",
                "code": str(ErrorCode.SERVER_BUSY),
                "message": runtime.busy_message(),
            },
            status_code=429,
            headers={"Retry-After": "30"},
        )
    try:
        room, session = await start_daily_session(runtime, caller, runtime.http(), on_end=release_limits, agent=agent)
    except DailyAPIError as e:
        runtime.release()
        release_limits()
        runtime.monitor.error("DAILY_API_ERROR")
        logger.warning(f"/daily/start: {e}")
        return _error(502, "DAILY_API_ERROR", "the room could not be created; retry shortly")
    except Exception:
        runtime.release()
        release_limits()
        raise
    return JSONResponse(
        {
            "roomUrl": room.room_url,
            "token": room.user_token,
            # The keys Pipecat's client SDKs read from a start endpoint's answer (DailyTransport's connect).
            "dailyRoom": room.room_url,
            "dailyToken": room.user_token,
            "sessionId": session.session_id,
            "expiresAt": room.expires_at,
        }
    )
