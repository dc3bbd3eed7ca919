"""Scaling out: readiness and liveness, the drain a rolling deploy needs, and the limits shared through Redis,
each against real server subprocesses (and a real `redis-server`).

The servers run Deepgram's and Claude's fakes and Piper: fast, scripted replies, no local LLM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time

import httpx
import pytest
import websockets

from tests.helpers import connected_client, server_process

pytestmark = pytest.mark.timeout(600)


def cloud_fakes_env(vendors) -> dict[str, str]:
    return {
        "DEEPGRAM_API_KEY": "test-deepgram-key",
        "DEEPGRAM_BASE_URL": vendors["deepgram"].ws_url,
        "ANTHROPIC_API_KEY": "test-anthropic-key",
        "ANTHROPIC_BASE_URL": vendors["anthropic"].http_url,
        "ATLAS_LLM_FALLBACK": "apology",
        "ATLAS_TTS": "piper",
    }


def ended_rows(db) -> dict[str, str]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("select id, end_reason from voice_sessions where ended_at is not null"))


async def start_raw(ws_url: str, user: str) -> tuple[websockets.ClientConnection, dict]:
    ws = await websockets.connect(ws_url)
    await ws.send(json.dumps({"type": "session_start", "userId": user, "conversationId": "c"}))
    return ws, json.loads(await asyncio.wait_for(ws.recv(), 30))


async def test_readyz_says_full_at_capacity_and_ready_again_when_a_call_ends(vendors, artifacts):
    env = {**cloud_fakes_env(vendors), "ATLAS_MAX_SESSIONS": "2"}
    with server_process(env, artifacts / "server_capacity.log") as (base, _proc):
        ws_url = base.replace("http://", "ws://") + "/ws"
        ready = httpx.get(base + "/readyz")
        assert ready.status_code == 200 and ready.json() == {"status": "ready", "sessions": 0, "capacity": 2}
        first = await connected_client(ws_url)
        second = await connected_client(ws_url)
        full = httpx.get(base + "/readyz")
        assert full.status_code == 503 and full.json()["status"] == "full"
        assert httpx.get(base + "/livez").status_code == 200  # full is not dead: no restart
        ws, refused = await start_raw(ws_url, "third")
        assert refused["type"] == "error" and refused["code"] == "SERVER_BUSY"
        await ws.close()
        await first.stop()
        deadline = time.monotonic() + 10
        while httpx.get(base + "/readyz").status_code != 200:
            assert time.monotonic() < deadline, "never back in rotation"
            await asyncio.sleep(0.1)
        await second.stop()


async def test_sigterm_drains_live_calls_go_on_new_ones_are_refused(vendors, speech, artifacts):
    """SIGTERM: out of rotation at once; a live call keeps talking and ends by itself; a call still live at
    ATLAS_DRAIN_SECS is ended with session_end; no row is lost."""
    log = artifacts / "server_drain.log"
    drain = 12.0
    env = {**cloud_fakes_env(vendors), "ATLAS_DRAIN_SECS": str(drain), "ATLAS_SHUTDOWN_GRACE_SECS": "10"}
    with server_process(env, log) as (base, proc):
        ws_url = base.replace("http://", "ws://") + "/ws"
        talker = await connected_client(ws_url)
        lingerer = await connected_client(ws_url)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        ready = httpx.get(base + "/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        assert httpx.get(base + "/livez").status_code == 200
        assert httpx.get(base + "/healthz").status_code == 503
        async with websockets.connect(ws_url) as ws:  # refused as it connects, before any session_start
            refused = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert refused["code"] == "SERVER_SHUTTING_DOWN"
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 1001
        # The live call goes on: a whole turn, heard and answered, during the drain.
        turn = await talker.say(speech["dinner"])
        await talker.wait_reply_done(timeout=drain - 3)
        assert turn.reply_bytes > talker.out_rate  # over half a second of reply audio
        end = await talker.stop()
        assert end is not None and end["reason"] == "client_stop"
        # The other stays until the drain's deadline, and is then ended the normal way.
        told = await lingerer.wait_for(lambda e: e.get("type") == "error", timeout=drain + 10)
        assert told["code"] == "SERVER_SHUTTING_DOWN"
        assert time.monotonic() - t0 >= drain - 0.5
        end = await lingerer.wait_for(lambda e: e.get("type") == "session_end", timeout=10)
        assert end["reason"] == "server_shutdown"
        rc = await asyncio.to_thread(proc.wait, 40)
        assert rc in (0, -signal.SIGTERM), log.read_text()[-3000:]
    rows = ended_rows(log.with_suffix(".sqlite3"))
    assert rows.get(talker.session_id) == "client_stop" and rows.get(lingerer.session_id) == "server_shutdown"


async def test_a_drain_with_no_live_call_exits_at_once(vendors, artifacts):
    log = artifacts / "server_drain_empty.log"
    with server_process({**cloud_fakes_env(vendors), "ATLAS_DRAIN_SECS": "300"}, log) as (base, proc):
        ws_url = base.replace("http://", "ws://") + "/ws"
        client = await connected_client(ws_url)
        await client.stop()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 40)
        assert time.monotonic() - t0 < 15  # not the 300 s bound: nothing was live
    assert "shutdown complete" in log.read_text()


# --- limits shared through Redis ---------------------------------------------------------------------------


class RedisServer:
    """A real `redis-server` (Debian's) on a private port, no persistence; stop() and start() again at will."""

    def __init__(self, workdir):
        from tests.helpers import free_port

        self.port = free_port()
        self.workdir = workdir
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        import shutil
        import subprocess

        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (scripts/quickstart.sh installs it)"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        client.close()
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def shared_settings(redis_url: str, **over):
    from config.settings import Settings

    values = {
        "REDIS_URL": redis_url,
        "ATLAS_MAX_SESSIONS_PER_USER": "2",
        "ATLAS_SESSION_STARTS_PER_MINUTE_PER_USER": "4",
        "ATLAS_MAX_SESSIONS_PER_IP": "0",
        "ATLAS_SESSION_STARTS_PER_MINUTE_PER_IP": "0",
        **over,
    }
    return Settings(_env_file=None, **{k: v for k, v in values.items()})


async def test_two_processes_share_live_sessions_and_starts_per_minute_through_redis(redis_server):
    from bots.limits import AbuseLimits
    from vocabulary.errors import ProtocolError

    settings = shared_settings(redis_server.url)
    a, b = AbuseLimits(settings), AbuseLimits(settings)  # as two workers, or two nodes
    try:
        await a.by_user.acquire("ann")
        await b.by_user.acquire("ann")
        with pytest.raises(ProtocolError) as e:
            await a.by_user.acquire("ann")  # two live on the other worker already
        assert e.value.code == "TOO_MANY_SESSIONS"
        await b.by_user.acquire("bob")  # another user has their own
        a.by_user.release("ann")
        await asyncio.sleep(0.2)  # Redis hears about the release in the background
        await b.by_user.acquire("ann")  # the third start of the minute
        b.by_user.release("ann")
        b.by_user.release("ann")
        await asyncio.sleep(0.2)
        await a.by_user.acquire("ann")  # the fourth
        with pytest.raises(ProtocolError) as e:
            await b.by_user.acquire("ann")  # a fifth start within the minute, from either worker
        assert e.value.code == "RATE_LIMITED" and "retry in" in e.value.message
    finally:
        await a.close()
        await b.close()


async def test_a_killed_workers_slots_come_free_and_a_live_workers_are_kept(redis_server):
    from bots.limits import AbuseLimits, SharedKeyedLimit
    from vocabulary.errors import ProtocolError

    settings = shared_settings(redis_server.url, ATLAS_SESSION_STARTS_PER_MINUTE_PER_USER="0")
    killed, alive = AbuseLimits(settings), AbuseLimits(settings)
    for limits in (killed, alive):
        assert isinstance(limits.by_user, SharedKeyedLimit)
        limits.by_user.LEASE_SECS = 1.5  # the instance's lease, short for the test
    try:
        await killed.by_user.acquire("cy")  # then the worker dies: never released, never renewed
        await alive.by_user.acquire("cy")
        with pytest.raises(ProtocolError):
            await alive.by_user.acquire("cy")
        for _ in range(4):  # the live worker renews its lease; the dead one's runs out
            await asyncio.sleep(0.5)
            await alive.by_user.renew()
        await alive.by_user.acquire("cy")  # the dead worker's slot is free again
        with pytest.raises(ProtocolError):
            await alive.by_user.acquire("cy")  # and the live worker's two are still counted
    finally:
        await killed.close()
        await alive.close()


@pytest.mark.parametrize("failure", ["open", "closed"])
async def test_redis_down_fails_open_to_local_counts_or_closed_and_is_counted(redis_server, failure):
    from bots.limits import AbuseLimits
    from monitoring.metrics import Monitor
    from tests.helpers import metric_samples
    from vocabulary.errors import ProtocolError

    settings = shared_settings(redis_server.url, ATLAS_REDIS_FAILURE=failure, ATLAS_REDIS_TIMEOUT_SECS="0.3")
    monitor = Monitor(settings)
    limits = AbuseLimits(settings, monitor=monitor)
    try:
        await limits.by_user.acquire("dee")  # shared, while Redis is up
        redis_server.stop()
        t0 = time.monotonic()
        if failure == "open":
            await limits.by_user.acquire("dee")  # counted by this process alone
            with pytest.raises(ProtocolError) as e:
                await limits.by_user.acquire("dee")
                await limits.by_user.acquire("dee")
            assert e.value.code == "TOO_MANY_SESSIONS"  # the local counts still bound it
        else:
            with pytest.raises(ProtocolError) as e:
                await limits.by_user.acquire("dee")
            assert e.value.code == "LIMITS_UNAVAILABLE"
        assert time.monotonic() - t0 < 5  # a dead Redis costs a timeout, not a hang
        limits.by_user.release("dee")  # releasing while Redis is down is harmless
        await asyncio.sleep(0.5)
        samples = metric_samples(monitor.render()[0].decode())
        assert samples[("atlas_redis_errors_total", (("op", "acquire"),))] >= 1
        assert samples[("atlas_limits_shared", ())] == 0
    finally:
        await limits.close()
