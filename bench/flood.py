"""A flooding client for `atlas-voice bench --flood-compare`: one connection sending loud audio as fast as
the socket takes it, in a process of its own (so its busy loop slows neither the honest callers' pacing
nor their measurements, only the server, which is what the bench measures).

Run: `python -m bench.flood ws|twilio URL SECONDS [TWILIO_TOKEN ACCOUNT_SID]`; prints one JSON line with
what it offered and what the server told it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time

import aiohttp
import numpy as np

from bench.callers import Caller, _mulaw_table
async def flood(door: str, url: str, http: aiohttp.ClientSession, until: float,
                twilio: tuple[str, str] | None = None) -> dict:
    """One connection sending loud audio as fast as the socket takes it until `until`: the largest
    frames a door accepts, no pacing. Returns what it offered and what the server told it."""
    stats = {"door": door, "messages": 0, "audio_offered_s": 0.0, "errors": {}, "closed_by_server": False}
    loud = (np.sin(np.arange(8192) / 5) * 12000).astype(np.int16)
    caller = Caller(-2, door, url, [], http, twilio=twilio)
    caller.record.session_id = None
    if door == "ws":
        caller.ws = await http.ws_connect(url, max_msg_size=0)
        await caller.ws.send_str(json.dumps({"type": "session_start", "userId": "flood", "conversationId": "flood"}))
        started = await caller.ws.receive(timeout=30)
        if started.type != aiohttp.WSMsgType.TEXT or json.loads(started.data).get("type") != "session_started":
            raise ConnectionError(f"the flooder's session was refused: {started.data}")
        message, seconds = loud.tobytes(), len(loud) / 16000
        send = caller.ws.send_bytes
    else:
        await caller._connect()
        ulaw = _mulaw_table()[loud[::2].astype(np.int32) + 32768].tobytes()[:4000]
        message = json.dumps({"event": "media", "streamSid": caller.stream_sid,
                              "media": {"payload": base64.b64encode(ulaw).decode()}})
        seconds = len(ulaw) / 8000
        send = caller.ws.send_str

    ended = asyncio.get_running_loop().create_future()

    async def read():
        async for msg in caller.ws:
            if msg.type == aiohttp.WSMsgType.TEXT and '"error"' in msg.data[:40]:
                code = json.loads(msg.data).get("code", "?")
                stats["errors"][code] = stats["errors"].get(code, 0) + 1
            elif msg.type == aiohttp.WSMsgType.TEXT and '"session_end"' in msg.data[:40] and not ended.done():
                ended.set_result(json.loads(msg.data))
        stats["closed_by_server"] = time.monotonic() < until

    reader = asyncio.create_task(read())
    t0 = time.monotonic()
    try:
        while time.monotonic() < until and not reader.done():
            await send(message)
            stats["messages"] += 1
            stats["audio_offered_s"] += seconds
            if stats["messages"] % 50 == 0:
                await asyncio.sleep(0)  # let the honest callers' tasks run on this loop too
    except (ConnectionError, RuntimeError):
        stats["closed_by_server"] = True
    stats["seconds"] = round(time.monotonic() - t0, 1)
    stats["audio_offered_s"] = round(stats["audio_offered_s"], 1)
    # End the call the normal way (after the message rate's bucket has refilled, or the stop is dropped too)
    # to learn how much audio reached the STT: the ws door's session_end says it; the phone door's row does.
    await asyncio.sleep(2.5)
    try:
        if door == "ws":
            await caller.ws.send_str(json.dumps({"type": "session_stop"}))
            stats["stt_seconds"] = (await asyncio.wait_for(ended, 15))["metrics"]["sttDuration"]
        else:
            await caller.ws.send_str(json.dumps({"event": "stop", "streamSid": caller.stream_sid}))
            stats["call_sid"] = caller.record.session_id
    except (ConnectionError, RuntimeError, asyncio.TimeoutError):
        pass
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    await caller.ws.close()
    return stats


async def _main(door: str, url: str, seconds: float, twilio: tuple[str, str] | None) -> dict:
    async with aiohttp.ClientSession() as http:
        return await flood(door, url, http, time.monotonic() + seconds, twilio)


if __name__ == "__main__":
    door, url, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
    creds = (sys.argv[4], sys.argv[5]) if len(sys.argv) > 5 else None
    print(json.dumps(asyncio.run(_main(door, url, secs, creds))), flush=True)
