"""The HTTP server: the browser page at `/`, `/healthz`, `/metrics` (Prometheus), `/dashboard` (admin), and
the voice doors: `/ws` (browsers, the Atlas protocol), `/twilio/voice` + `/twilio/ws` (phone calls) and
`/daily/start` (a Daily room with the bot in it).

Engines load in the background after the server starts listening, so `/healthz` can say
"loading" (503) and then "ok" (200) rather than the port being closed for a minute.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from loguru import logger

from bots.admin import admin_router
from bots.daily_bot import daily_start
from bots.pipeline import Runtime
from bots.twilio_bot import serve_twilio, twilio_voice
from bots.websocket_bot import serve_websocket
from config.settings import Settings, get_settings

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    runtime = Runtime(settings=settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await runtime.start_recorder()
        task = asyncio.create_task(runtime.load())
        try:
            yield
        finally:
            task.cancel()
            await runtime.close()

    app = FastAPI(title="Atlas Voice", lifespan=lifespan)
    app.state.runtime = runtime

    @app.get("/healthz")
    async def healthz():
        if runtime.ready.is_set():
            return {"status": "ok", "stt": settings.resolved_stt, "llm": settings.resolved_llm,
                    "tts": settings.resolved_tts}
        if runtime.load_error:
            return JSONResponse({"status": "error", "error": runtime.load_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        body, content_type = runtime.monitor.render()
        return Response(body, media_type=content_type)

    @app.get("/")
    async def index():
        return FileResponse(WEB_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    app.include_router(admin_router(lambda: runtime.recorder.sink, settings))

    @app.websocket("/ws")
    async def ws(websocket: WebSocket):
        if settings.allowed_origins:
            origin = websocket.headers.get("origin", "")
            if origin not in settings.allowed_origins:
                logger.warning(f"websocket from origin {origin!r} refused")
                await websocket.close(code=1008)
                return
        await serve_websocket(websocket, runtime)

    @app.post("/daily/start")
    async def daily_start_endpoint(request: Request):
        return await daily_start(request, runtime)

    @app.post("/twilio/voice")
    async def twilio_voice_webhook(request: Request):
        return await twilio_voice(request, runtime)

    @app.websocket("/twilio/ws")
    async def twilio_ws(websocket: WebSocket):
        await serve_twilio(websocket, runtime)

    return app
