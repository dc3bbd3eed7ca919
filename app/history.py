"""A signed-in user's past sessions: `GET /api/history` (the list), `GET /api/history/<session id>` (one
session's turns, with what was said when its agent kept transcripts), and the page at `/history`.

Guarded by the user's own Supabase access token (`Authorization: Bearer`), checked as every door checks it
(bots/auth.py); the rows are the token's user's only: filtered by that user id, and, on Supabase with
SUPABASE_ANON_KEY set, read as the user, so the project's RLS policies decide what comes back. With auth off there
are no signed-in users and no history (404 `HISTORY_DISABLED`). Wrong tokens count toward the per-address
throttle of the admin API (429 `ADMIN_RATE_LIMITED`).
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from loguru import logger

from app.admin import client_ip, throttled
from app.web_assets import web_dir
from bots.auth import AuthError
from bots.limits import FailureThrottle
from bots.runtime import Runtime

MAX_SESSIONS = 200
HEADERS = {"Cache-Control": "no-store"}


def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"type": "error", "code": code, "message": message}, status_code=status, headers=headers)


def _seconds(start, end) -> float | None:
    try:
        return round((datetime.fromisoformat(str(end)) - datetime.fromisoformat(str(start))).total_seconds(), 3)
    except (TypeError, ValueError):
        return None


def _session(r: dict) -> dict:
    return {
        "sessionId": r.get("id"),
        "transport": r.get("transport"),
        "agent": r.get("agent"),
        "startedAt": r.get("started_at"),
        "endedAt": r.get("ended_at"),
        "durationSeconds": _seconds(r.get("started_at"), r.get("ended_at")) if r.get("ended_at") else None,
        "endReason": r.get("end_reason"),
        "turns": r.get("turns_count") or 0,
        "avgLatencyMs": r.get("avg_latency_ms"),
        "costUsd": float(r["cost_usd"]) if r.get("cost_usd") is not None else None,
        "rating": r.get("rating"),
        "comment": r.get("comment"),
    }


def _turn(t: dict) -> dict:
    return {
        "index": t.get("turn_index"),
        "at": t.get("created_at"),
        "voiceToVoiceMs": t.get("voice_to_voice_ms"),
        "interrupted": bool(t.get("interrupted")),
        "user": t.get("user_text"),
        "bot": t.get("bot_text"),
    }


def history_router(runtime: Runtime, throttle: FailureThrottle) -> APIRouter:
    router = APIRouter()

    async def user_of(request: Request) -> tuple[str, str] | JSONResponse:
        """(user id, token) of a signed-in request, or the refusal to answer with."""
        if not runtime.auth.enabled:
            return _error(404, "HISTORY_DISABLED", "history needs signed-in users (SUPABASE_JWT_SECRET or JWKS)")
        ip = client_ip(request)
        refused = throttled(ip, throttle)
        if refused is not None:
            return refused
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        try:
            user = await runtime.auth.verify(token)
        except AuthError as e:
            throttle.failed(ip)
            return _error(401, "AUTH_FAILED", str(e), {"WWW-Authenticate": "Bearer"})
        assert user is not None
        return user, token

    @router.get("/history", include_in_schema=False)
    async def page():
        return FileResponse(web_dir() / "history.html", headers=HEADERS)

    @router.get("/api/history")
    async def sessions(request: Request, limit: int = 50):
        who = await user_of(request)
        if isinstance(who, JSONResponse):
            return who
        user, token = who
        limit = max(1, min(limit, MAX_SESSIONS))
        try:
            rows = await runtime.recorder.sink.fetch_history(user, limit, user_token=token)
        except Exception as e:  # the details go to the log, not to the client
            logger.error(f"history: reading the store failed: {type(e).__name__}: {e}")
            return _error(503, "STORE_UNAVAILABLE", "your history could not be read; try again shortly")
        return JSONResponse({"sessions": [_session(r) for r in rows]}, headers=HEADERS)

    @router.get("/api/history/{session_id}")
    async def turns(request: Request, session_id: str):
        who = await user_of(request)
        if isinstance(who, JSONResponse):
            return who
        user, token = who
        if len(session_id) > 64:
            return _error(404, "NOT_FOUND", "no such session in your history")
        try:
            rows = await runtime.recorder.sink.fetch_history_turns(user, session_id, user_token=token)
        except Exception as e:
            logger.error(f"history: reading the store failed: {type(e).__name__}: {e}")
            return _error(503, "STORE_UNAVAILABLE", "your history could not be read; try again shortly")
        if not rows:
            return _error(404, "NOT_FOUND", "no such session in your history")
        turns = [_turn(t) for t in rows]
        stored = any(t["user"] or t["bot"] for t in turns)
        return JSONResponse({"sessionId": session_id, "transcriptStored": stored, "turns": turns}, headers=HEADERS)

    return router
