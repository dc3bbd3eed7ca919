"""Test helper: a transparent recording proxy in front of a real OpenAI-compatible LLM server.

Every request body to /v1/chat/completions is appended (one JSON per line) to the record file, and
the upstream response is streamed back unchanged, so the tests can assert exactly what the LLM
received while the real local model answers.

    python tests/llm_recorder.py --upstream http://127.0.0.1:PORT --port P --record FILE
"""

from __future__ import annotations

import argparse
import json

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web


def make_app(upstream: str, record: str) -> web.Application:
    app = web.Application()

    async def startup(app):
        # a connection per request: llama-server sometimes closes a kept-alive one just after a streamed reply
        app["client"] = ClientSession(
            connector=TCPConnector(force_close=True), timeout=ClientTimeout(total=None, sock_read=120)
        )

    async def cleanup(app):
        await app["client"].close()

    async def proxy(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.method == "POST" and request.path.endswith("/chat/completions"):
            with open(record, "a") as f:
                f.write(json.dumps(json.loads(body)) + "\n")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with app["client"].request(request.method, upstream + request.path_qs, data=body, headers=headers) as up:
            response = web.StreamResponse(status=up.status)
            response.content_type = up.content_type
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", required=True)
    args = parser.parse_args()
    web.run_app(make_app(args.upstream.rstrip("/"), args.record), host="127.0.0.1", port=args.port, print=None)
