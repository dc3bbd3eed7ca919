"""The admin dashboard: `GET /dashboard` (a self-contained page) and `GET /api/dashboard` (its JSON).

Access:
  * ATLAS_ADMIN_TOKEN unset (the default): both routes answer 404 with
    `{"type": "error", "code": "ADMIN_DISABLED", ...}` -- the dashboard is off until a token is set.
  * ATLAS_ADMIN_TOKEN set: `/api/dashboard` needs `Authorization: Bearer <token>` or `?token=<token>`
    (compared in constant time); a missing or wrong token is 401 `ADMIN_AUTH_FAILED`. After
    ATLAS_ADMIN_FAILURES_PER_MINUTE wrong tokens from one IP address in a minute, that address gets 429
    `ADMIN_RATE_LIMITED` (with Retry-After) whatever it sends, until the window has room again. The page
    itself holds no data and is served without the token; it reads `?token=` once, keeps it in
    sessionStorage, removes it from the address bar and sends it as a Bearer header to the API.
  * The token is never echoed in a response or a log line.

`GET /api/dashboard?since=24h&bucket=hour` returns `monitoring.analytics.summarize` over the rows
read through the store (`since`: 1h/24h/7d/30d-style durations, an ISO 8601 time, or `all`;
`bucket`: hour, day, or empty for automatic). A store that cannot be read is 503 `STORE_UNAVAILABLE`.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from loguru import logger

from app.web_assets import web_dir
from bots.limits import FailureThrottle
from config.settings import Settings, secret
from monitoring.analytics import parse_since, summarize
from storage.sinks import Sink

WEB_DIR = web_dir()
DEFAULT_SINCE = "24h"

# The page loads only its own script and stylesheet and talks only to this server.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
}
API_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"type": "error", "code": code, "message": message},
        status_code=status,
        headers={**API_HEADERS, **(headers or {})},
    )


def _disabled() -> JSONResponse:
    return _error(404, "ADMIN_DISABLED", "the admin dashboard is disabled until ATLAS_ADMIN_TOKEN is set")


def _presented_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.query_params.get("token") or None


def token_ok(presented: str | None, expected: str) -> bool:
    """Constant-time comparison (of UTF-8 bytes, so any token text works)."""
    if not presented or not expected:
        return False
    return hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def throttled(ip: str, throttle: FailureThrottle) -> JSONResponse | None:
    """The 429 for an address past its allowance of wrong tokens (admin API, /metrics, /api/history), else None."""
    wait = throttle.blocked(ip)
    if not wait:
        return None
    return _error(
        429,
        "ADMIN_RATE_LIMITED",
        f"too many wrong tokens from this address; retry in {wait:.0f} s",
        headers={"Retry-After": str(int(wait + 0.999))},
    )


def check_token(
    request: Request, expected: str, throttle: FailureThrottle, code: str, hint: str
) -> JSONResponse | None:
    """None when the request carries `expected`; else the 401 (or, past the throttle, 429) to answer."""
    ip = client_ip(request)
    refused = throttled(ip, throttle)
    if refused is not None:
        return refused
    if token_ok(_presented_token(request), expected):
        return None
    throttle.failed(ip)
    logger.warning(f"{request.url.path}: rejected a request from {ip} (missing or wrong token)")
    return _error(401, code, f"a valid token is required: send {hint}", headers={"WWW-Authenticate": "Bearer"})


def admin_router(
    get_sink: Callable[[], Sink | None], settings: Settings, throttle: FailureThrottle | None = None
) -> APIRouter:
    """The dashboard routes. `get_sink()` returns the store's Sink (or None while it is not ready);
    it is called per request, so the server can pass `lambda: runtime.recorder.sink` before the
    recorder exists. `throttle` counts wrong tokens per IP (shared with /metrics)."""
    router = APIRouter()
    throttle = throttle or FailureThrottle(settings.admin_failures_per_minute)

    def expected_token() -> str:
        return secret(settings.admin_token).strip()

    @router.get("/dashboard", include_in_schema=False)
    async def dashboard_page():
        if not expected_token():
            return _disabled()
        return FileResponse(WEB_DIR / "dashboard.html", media_type="text/html", headers=PAGE_HEADERS)

    @router.get("/api/dashboard")
    async def dashboard_data(request: Request, since: str = DEFAULT_SINCE, bucket: str = ""):
        expected = expected_token()
        if not expected:
            return _disabled()
        refused = check_token(
            request, expected, throttle, "ADMIN_AUTH_FAILED", "'Authorization: Bearer <ATLAS_ADMIN_TOKEN>' or ?token="
        )
        if refused is not None:
            return refused
        try:
            since_iso = parse_since(since)
        except ValueError as e:
            return _error(400, "INVALID_FIELD", str(e))
        chosen = bucket.strip().lower() or None
        if chosen not in (None, "hour", "day"):
            return _error(400, "INVALID_FIELD", "bucket: use 'hour', 'day' or leave it empty for automatic")

        sink = get_sink()
        if sink is None:
            return _error(503, "STORE_UNAVAILABLE", "the session store is not ready yet; try again shortly")
        try:
            sessions = await sink.fetch("voice_sessions", since_iso)
            turns = await sink.fetch("voice_turns", since_iso)
            feedback = await sink.fetch("voice_feedback", since_iso)
        except Exception as e:  # any store failure: the details go to the log, not to the client
            logger.error(f"admin API: reading the session store failed: {type(e).__name__}: {e}")
            return _error(503, "STORE_UNAVAILABLE", "the session store could not be read; see the server log")
        data = summarize(sessions, turns, chosen, feedback=feedback, since=since_iso)
        data["range"] = since.strip() or "all"
        data["store"] = getattr(sink, "name", "sink")
        return JSONResponse(data, headers=API_HEADERS)

    return router
