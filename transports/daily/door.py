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
import time

import aiohttp
from fastapi import Request
from fastapi.responses import JSONResponse
from loguru import logger

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
from transports.common import admit, error_response, read_start_request, refusal_response
from vocabulary.audio import CLIENT_SAMPLE_RATE
from vocabulary.errors import ErrorCode, ProtocolError

BOT_NAME = "Atlas"


class DailySession(VoiceSession):
    def __init__(self, runtime: Runtime, room: DailyRoomSession, caller: Caller, agent: str | None = None):
        super().__init__(runtime, caller, transport_name="daily", agent=runtime.agents.named(agent))
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
    if not runtime.settings.daily_api_key:
        return error_response(404, "DAILY_DISABLED", "the Daily door is off until DAILY_API_KEY is set")
    start = await read_start_request(request, runtime)
    if isinstance(start, JSONResponse):
        return start
    admission = await admit(runtime, start.caller, "/daily/start")
    if isinstance(admission, ProtocolError):
        return refusal_response(admission)
    try:
        room, session = await start_daily_session(
            runtime, start.caller, runtime.http(), on_end=admission.release_limits, agent=start.agent
        )
    except DailyAPIError as e:
        admission.release()
        runtime.monitor.error("DAILY_API_ERROR")
        logger.warning(f"/daily/start: {e}")
        return error_response(502, "DAILY_API_ERROR", "the room could not be created; retry shortly")
    except Exception:
        admission.release()
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
