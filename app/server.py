"""The HTTP server: the browser page at `/`, `/livez`, `/readyz`, `/healthz`, `/metrics` (Prometheus),
`/dashboard` (admin), and the voice doors: `/ws` (browsers, the Atlas protocol), `/twilio/voice` +
`/twilio/ws` (phone calls), `/daily/start` (a Daily room with the bot in it), and Pipecat's clients:
`/start`, `/sessions/<ticket>/api/offer` (RTVI over WebRTC) and `/rtvi/ws` (RTVI over a WebSocket), with
Pipecat's prebuilt page at `/client/`.

Engines load in the background after the server starts listening, so `/healthz` can say
"loading" (503) and then "ok" (200) rather than the port being closed for a minute. `/healthz` names
no internals (a load failure is in the log, not the answer). FastAPI's `/docs` and `/openapi.json`
are off: the voice port serves only what clients need. `/metrics` needs ATLAS_METRICS_TOKEN (or
ATLAS_ADMIN_TOKEN) as a Bearer token, or, with neither set, a client on a loopback address.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from app.admin import admin_router, check_token, client_ip
from app.history import history_router
from app.web_assets import prebuilt_client_dir, web_dir
from bots.limits import FailureThrottle
from bots.runtime import Runtime
from config.logging import configure_logging
from config.settings import Settings, get_settings, is_loopback, secret
from transports.daily.door import daily_start
from transports.feedback import post_feedback
from transports.rtvi.door import WS_PATH as RTVI_WS_PATH
from transports.rtvi.door import RTVIDoors
from transports.twilio.door import serve_twilio, twilio_voice
from transports.websocket.door import serve_websocket

WEB_DIR = web_dir()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_format)
    runtime = Runtime(settings=settings)
    rtvi = RTVIDoors(runtime)
    throttle = FailureThrottle(settings.admin_failures_per_minute)  # wrong admin/metrics tokens per IP

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await runtime.start_recorder()
        task = asyncio.create_task(runtime.load())
        try:
            yield
        finally:
            task.cancel()
            await rtvi.close()
            await runtime.close()

    app = FastAPI(title="Atlas Voice", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runtime = runtime

    @app.get("/livez")
    async def livez():
        """The process is alive and its event loop answers (a liveness probe: restart it when this fails)."""
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        """Whether this process takes a new call now (a readiness probe: route new calls elsewhere on 503).
        503 while loading, draining, at its ATLAS_MAX_SESSIONS capacity or with its outbox over its disk cap;
        live calls go on either way."""
        state, sessions, capacity = runtime.readiness()
        body = {"status": state, "sessions": sessions, "capacity": capacity}
        return JSONResponse(body, status_code=200 if state == "ready" else 503)

    @app.get("/healthz")
    async def healthz():
        if runtime.shutting_down:  # out of the load balancer's rotation while live sessions end
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        if runtime.ready.is_set():
            return {
                "status": "ok",
                "stt": settings.resolved_stt,
                "llm": settings.resolved_llm,
                "tts": settings.resolved_tts,
            }
        if runtime.load_error:  # the cause is in the log; the answer names no internals
            return JSONResponse({"status": "error"}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics")
    async def metrics(request: Request):
        expected = secret(settings.metrics_token or settings.admin_token).strip()
        if expected:
            refused = check_token(
                request, expected, throttle, "METRICS_AUTH_FAILED", "'Authorization: Bearer <ATLAS_METRICS_TOKEN>'"
            )
            if refused is not None:
                return refused
        elif not is_loopback(client_ip(request)):
            return JSONResponse(
                {
                    "type": "error",
                    "code": "METRICS_DISABLED",
                    "message": "set ATLAS_METRICS_TOKEN to scrape /metrics from another host",
                },
                status_code=404,
            )
        body, content_type = runtime.monitor.render()
        return Response(body, media_type=content_type)

    @app.get("/")
    async def index():
        return FileResponse(WEB_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    app.include_router(admin_router(lambda: runtime.recorder.sink, settings, throttle))
    app.include_router(history_router(runtime, throttle))

    @app.websocket("/ws")
    async def ws(websocket: WebSocket):
        await serve_websocket(websocket, runtime)

    @app.post("/daily/start")
    async def daily_start_endpoint(request: Request):
        return await daily_start(request, runtime)

    @app.post("/feedback")
    async def feedback(request: Request):
        return await post_feedback(request, runtime)

    @app.post("/start")
    async def start_endpoint(request: Request):
        return await rtvi.start(request)

    @app.api_route("/sessions/{ticket}/api/offer", methods=["POST", "PATCH"])
    async def webrtc_offer(ticket: str, request: Request):
        return await rtvi.offer(ticket, request)

    @app.websocket(RTVI_WS_PATH)
    async def rtvi_ws(websocket: WebSocket):
        await rtvi.serve_websocket(websocket)

    # Pipecat's prebuilt client, from its PyPI package (pipecat-ai-prebuilt), as Pipecat's runner serves it.
    app.mount("/client", StaticFiles(directory=prebuilt_client_dir(), html=True), name="client")

    @app.post("/twilio/voice")
    async def twilio_voice_webhook(request: Request):
        return await twilio_voice(request, runtime)

    @app.websocket("/twilio/ws")
    async def twilio_ws(websocket: WebSocket):
        await serve_twilio(websocket, runtime)

    return app


class AtlasServer(uvicorn.Server):
    """uvicorn's server with a drain for voice sessions.

    On SIGTERM (or Ctrl-C) uvicorn would close every open WebSocket at once (code 1012) and the
    sessions would end without `session_end`. Instead `Runtime.drain` first takes the process out of
    rotation (/readyz 503, new connections get `SERVER_SHUTTING_DOWN`) and lets the live sessions go on
    until they end or ATLAS_DRAIN_SECS pass; then it ends those still live the normal way
    (`SERVER_SHUTTING_DOWN`, `session_end`, close 1000; rows to the outbox) within ATLAS_SHUTDOWN_GRACE_SECS.
    A second signal cuts the drain short (straight to ending them). Then uvicorn stops, and the app's
    shutdown flushes the outbox (at most ATLAS_DB_TIMEOUT_SECS per store attempt; rows that cannot land
    stay on disk for the next start).
    """

    def __init__(self, config: uvicorn.Config, runtime: Runtime):
        super().__init__(config)
        self.runtime = runtime

    def handle_exit(self, sig, frame) -> None:
        if self.should_exit:
            self.runtime.end_drain_now()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        s = self.runtime.settings
        await self.runtime.drain(s.drain_secs, s.shutdown_grace_secs)
        await super().shutdown(sockets=sockets)


def ws_max_size(settings: Settings) -> int:
    """The largest WebSocket message uvicorn reads at all (close 1009 beyond): the documented frame
    limits are checked per message, with room for a client that overshoots them a little."""
    return max(64 * 1024, 2 * max(settings.max_audio_frame_bytes, settings.max_text_message_bytes))


def make_server(settings: Settings, host: str, port: int) -> AtlasServer:
    """One process's server: the app, its Runtime and uvicorn's server around them."""
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", ws_max_size=ws_max_size(settings), timeout_graceful_shutdown=1
    )
    return AtlasServer(config, app.state.runtime)


def serve(settings: Settings, host: str, port: int) -> None:
    """One process serving the port (`--workers 1`); app/workers.py runs several."""
    settings.check_exposure(host)
    make_server(settings, host, port).run()
