"""A flooding client for `atlas-voice bench --flood-compare`, in a process of its own (so its busy loop slows
neither the honest callers' pacing nor their measurements, only the server, which is what the bench
measures).

It opens a `/ws` session from its own address (127.0.0.2) and sends loud audio in the largest frames the
door accepts, as fast as the socket takes them. The server drops what is over the message rate and the
audio budget, and ends the session once the flood goes on (MESSAGE_RATE_EXCEEDED, `message_flood`); the
flooder then connects again at once, as an attacker would, until the per-IP limits refuse it too. It
reports what it offered, how often it got in, and how much of its audio reached the STT (the `sttDuration`
of each of its sessions' `session_end`).

Run: `python -m bench.flood URL SECONDS`; prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aiohttp
import numpy as np

FLOOD_IP = "127.0.0.2"


async def _session(http: aiohttp.ClientSession, url: str, until: float, stats: dict) -> None:
    loud = (np.sin(np.arange(8192) / 5) * 12000).astype(np.int16).tobytes()  # 0.512 s, the largest frame
    seconds = len(loud) / 32000
    ws = await http.ws_connect(url, max_msg_size=0)
    try:
        await ws.send_str(json.dumps({"type": "session_start", "userId": "flood", "conversationId": "flood"}))
        first = await ws.receive(timeout=30)
        if first.type != aiohttp.WSMsgType.TEXT or json.loads(first.data).get("type") != "session_started":
            code = json.loads(first.data).get("code") if first.type == aiohttp.WSMsgType.TEXT else first.type.name
            stats["refused"][code] = stats["refused"].get(code, 0) + 1
            await asyncio.sleep(0.2)
            return
        stats["sessions"] += 1
        ended = asyncio.get_running_loop().create_future()

        async def read():
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                if data.get("type") == "error":
                    stats["errors"][data["code"]] = stats["errors"].get(data["code"], 0) + 1
                elif data.get("type") == "session_end" and not ended.done():
                    ended.set_result(data)

        reader = asyncio.create_task(read())
        try:
            while time.monotonic() < until and not reader.done() and not ws.closed:
                await ws.send_bytes(loud)
                stats["messages"] += 1
                stats["audio_offered_s"] += seconds
        except (ConnectionError, RuntimeError):
            pass
        if time.monotonic() < until:
            stats["ended_by_server"] += 1
        else:  # the run is over: end the session the normal way, once the message rate has room again
            await asyncio.sleep(2.5)
            try:
                await ws.send_str(json.dumps({"type": "session_stop"}))
            except (ConnectionError, RuntimeError):
                pass
        try:
            end = await asyncio.wait_for(ended, 15)
            stats["stt_seconds"] += end["metrics"]["sttDuration"]
            stats["end_reasons"][end["reason"]] = stats["end_reasons"].get(end["reason"], 0) + 1
        except TimeoutError:
            stats["no_session_end"] += 1
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    finally:
        await ws.close()


async def flood(url: str, seconds: float) -> dict:
    stats = {
        "door": "ws",
        "sessions": 0,
        "refused": {},
        "ended_by_server": 0,
        "end_reasons": {},
        "messages": 0,
        "audio_offered_s": 0.0,
        "stt_seconds": 0.0,
        "errors": {},
        "no_session_end": 0,
    }
    t0 = time.monotonic()
    until = t0 + seconds
    connector = aiohttp.TCPConnector(local_addr=(FLOOD_IP, 0), limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        while time.monotonic() < until:
            try:
                await _session(http, url, until, stats)
            except (TimeoutError, aiohttp.ClientError, ConnectionError) as e:
                name = type(e).__name__
                stats["refused"][name] = stats["refused"].get(name, 0) + 1
                await asyncio.sleep(0.2)
    stats["seconds"] = round(time.monotonic() - t0, 1)
    stats["audio_offered_s"] = round(stats["audio_offered_s"], 1)
    stats["stt_seconds"] = round(stats["stt_seconds"], 1)
    return stats


if __name__ == "__main__":
    print(json.dumps(asyncio.run(flood(sys.argv[1], float(sys.argv[2])))), flush=True)
