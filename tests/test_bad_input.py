"""Bad input never crashes a session or the server: each gets an `error` with a stable code."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import websockets

from tests.helpers import running_server

START = {"type": "session_start", "userId": "u1", "conversationId": "c1", "authToken": ""}


async def recv_json(ws, timeout=10.0) -> dict:
    while True:
        raw = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(raw, str):
            return json.loads(raw)


async def recv_type(ws, kind: str, timeout=10.0) -> dict:
    while True:
        msg = await recv_json(ws, timeout)
        if msg.get("type") == kind:
            return msg


async def expect_error(ws, code: str) -> dict:
    msg = await recv_type(ws, "error")
    assert msg["code"] == code, msg
    assert isinstance(msg["message"], str) and msg["message"]
    return msg


async def start_session(ws) -> dict:
    await ws.send(json.dumps(START))
    return await recv_type(ws, "session_started")


BEFORE_START = [
    (b"\x00\x01" * 160, "NOT_STARTED"),
    ("hello there", "INVALID_JSON"),
    ("[1, 2, 3]", "INVALID_MESSAGE"),
    ('{"no_type": true}', "INVALID_MESSAGE"),
    ('{"type": 7}', "INVALID_MESSAGE"),
    ('{"type": "dance"}', "UNKNOWN_TYPE"),
    ('{"type": "mute"}', "NOT_STARTED"),
    ('{"type": "session_start", "conversationId": "c"}', "INVALID_FIELD"),
    ('{"type": "session_start", "userId": 42, "conversationId": "c"}', "INVALID_FIELD"),
    ('{"type": "session_start", "userId": "u", "conversationId": ["c"]}', "INVALID_FIELD"),
    ('{"type": "session_start", "userId": "u", "conversationId": "c", "authToken": 5}', "INVALID_FIELD"),
    (b"\x00" * 20000, "FRAME_TOO_LARGE"),
    ("x" * 9000, "FRAME_TOO_LARGE"),
    (json.dumps({"type": "session_start", "userId": "\u20ac" * 3000, "conversationId": "c"}), "FRAME_TOO_LARGE"),
]


async def test_every_bad_message_before_start_gets_its_code_and_the_session_still_starts(atlas_ws):
    async with websockets.connect(atlas_ws) as ws:
        for payload, code in BEFORE_START:
            await ws.send(payload)
            await expect_error(ws, code)
        started = await start_session(ws)
        assert started["sessionId"]


IN_SESSION = [
    ("not json", "INVALID_JSON"),
    ("42", "INVALID_MESSAGE"),
    ('{"type": "explode"}', "UNKNOWN_TYPE"),
    (json.dumps(START), "ALREADY_STARTED"),
    (b"\x01\x02\x03", "ODD_LENGTH_PCM"),
    (b"\x00" * 16386, "FRAME_TOO_LARGE"),
]


async def test_bad_input_during_a_session_is_rejected_and_the_session_goes_on(atlas_ws):
    async with websockets.connect(atlas_ws) as ws:
        await start_session(ws)
        for payload, code in IN_SESSION:
            await ws.send(payload)
            await expect_error(ws, code)
        # Still alive: valid audio of any frame size up to the maximum is accepted...
        for size in (2, 320, 4096, 16384):
            await ws.send(b"\x00" * size)
        # ... the controls work, and a clean stop ends with session_end.
        for control in ("mute", "unmute", "interrupt"):
            await ws.send(json.dumps({"type": control}))
        await ws.send(json.dumps({"type": "session_stop"}))
        end = await recv_type(ws, "session_end")
        assert end["reason"] == "client_stop"
        assert "metrics" in end
        with pytest.raises(websockets.ConnectionClosed):
            await recv_json(ws)
        assert ws.close_code == 1000


async def test_a_frame_over_the_transport_limit_closes_only_that_connection(atlas, atlas_ws):
    async with websockets.connect(atlas_ws) as bystander:
        await start_session(bystander)
        async with websockets.connect(atlas_ws, max_size=None) as ws:
            await start_session(ws)
            await ws.send(b"\x00" * (2 << 20))  # 2 MiB, over the server's 64 KiB WebSocket limit
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await recv_json(ws)
            assert ws.close_code == 1009
        # Everyone else is unaffected.
        await bystander.send(json.dumps({"type": "session_stop"}))
        assert (await recv_type(bystander, "session_end"))["reason"] == "client_stop"
    assert httpx.get(atlas + "/healthz").status_code == 200


async def test_a_client_that_vanishes_mid_session_does_not_hurt_the_server(atlas, atlas_ws):
    ws = await websockets.connect(atlas_ws)
    await start_session(ws)
    await ws.send(b"\x00" * 3200)
    ws.transport.abort()  # no close handshake
    await asyncio.sleep(0.5)
    async with websockets.connect(atlas_ws) as again:
        await start_session(again)
    assert httpx.get(atlas + "/healthz").status_code == 200


@pytest.fixture(scope="module")
def short_timeouts_ws(llm_record, artifacts):
    env = {
        "ATLAS_LLM_URL": llm_record.with_suffix(".url").read_text(),
        "ATLAS_SESSION_IDLE_TIMEOUT_SECS": "2",
        "ATLAS_SESSION_MAX_SECS": "5",
        "ATLAS_SESSION_START_TIMEOUT_SECS": "2",
    }
    with running_server(env, artifacts / "server_short_timeouts.log") as base:
        yield base.replace("http://", "ws://") + "/ws"


async def test_session_start_timeout(short_timeouts_ws):
    async with websockets.connect(short_timeouts_ws) as ws:
        await expect_error(ws, "SESSION_START_TIMEOUT")
        with pytest.raises(websockets.ConnectionClosed):
            await recv_json(ws)
        assert ws.close_code == 1008


async def test_idle_session_times_out_with_session_end(short_timeouts_ws):
    async with websockets.connect(short_timeouts_ws) as ws:
        await start_session(ws)
        await expect_error(ws, "SESSION_IDLE_TIMEOUT")
        end = await recv_type(ws, "session_end")
        assert end["reason"] == "idle_timeout"


async def test_session_has_a_maximum_duration(short_timeouts_ws):
    async with websockets.connect(short_timeouts_ws) as ws:
        await start_session(ws)
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def keep_talking():
            while True:
                await ws.send(b"\x00" * 640)
                await asyncio.sleep(0.02)

        feeder = asyncio.create_task(keep_talking())
        try:
            await expect_error(ws, "SESSION_MAX_DURATION")
            end = await recv_type(ws, "session_end")
        finally:
            feeder.cancel()
        assert end["reason"] == "max_duration"
        assert 4.5 < loop.time() - t0 < 9
