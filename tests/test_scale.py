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
from pathlib import Path

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


async def refused_at_connect(ws_url: str) -> tuple[str, int | None]:
    """A connection the server refuses as it opens, before any session_start: (error code, close code)."""
    async with websockets.connect(ws_url) as ws:
        refused = json.loads(await asyncio.wait_for(ws.recv(), 10))
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        return refused["code"], ws.close_code


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
        assert await refused_at_connect(ws_url) == ("SERVER_BUSY", 1013)
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
    drain = 20.0
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
        assert await refused_at_connect(ws_url) == ("SERVER_SHUTTING_DOWN", 1001)
        # The live call goes on: a whole turn, heard and answered, during the drain.
        turn = await talker.say(speech["dinner"])
        await talker.wait_reply_done(timeout=drain - 6)
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


async def test_a_twilio_stream_token_opens_one_stream_on_any_worker_or_node(redis_server):
    """The stream token's jti is remembered in Redis: a replay on another worker or node is refused (the
    door calls `first_use` after its own per-process check)."""
    from bots.limits import AbuseLimits

    settings = shared_settings(redis_server.url)
    a, b = AbuseLimits(settings), AbuseLimits(settings)
    try:
        assert await a.first_use("twilio-token:jti-1")
        assert not await b.first_use("twilio-token:jti-1")  # the replay, on another worker
        assert not await a.first_use("twilio-token:jti-1")
        assert await b.first_use("twilio-token:jti-2")
        redis_server.stop()
        assert await a.first_use("twilio-token:jti-3")  # Redis down, failing open: the door's own check holds
        closed = AbuseLimits(shared_settings(redis_server.url, ATLAS_REDIS_FAILURE="closed"))
        assert not await closed.first_use("twilio-token:jti-4")  # failing closed: refused
        await closed.close()
    finally:
        await a.close()
        await b.close()
    assert await AbuseLimits(shared_settings("")).first_use("x")  # without Redis: the per-process check only


@pytest.mark.parametrize("failure", ["open", "closed"])
async def test_redis_down_fails_open_to_local_counts_or_closed_and_is_counted(redis_server, failure):
    from bots.limits import AbuseLimits
    from monitoring.metrics import Monitor
    from tests.helpers import metric_samples
    from vocabulary.errors import ProtocolError

    settings = shared_settings(redis_server.url, ATLAS_REDIS_FAILURE=failure, ATLAS_REDIS_TIMEOUT_SECS="1.0")
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


# --- two nodes behind a real load balancer ----------------------------------------------------------------


class HAProxy:
    """Debian's HAProxy in front of Atlas nodes, as a deployment would run it: least connections (calls are
    long-lived), a health check on /readyz every 300 ms (a node draining or at capacity leaves rotation at its
    first 503 and comes back at its first 200) and WebSocket tunnels kept for an hour."""

    def __init__(self, workdir, backends: dict[str, int]):
        from tests.helpers import free_port

        self.port = free_port()
        servers = "\n".join(
            f"  server {name} 127.0.0.1:{port} check inter 300ms fall 1 rise 1" for name, port in backends.items()
        )
        self.config = workdir / "haproxy.cfg"
        self.config.write_text(
            f"""global
  maxconn 2000
defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  timeout tunnel 1h
frontend atlas
  bind 127.0.0.1:{self.port}
  default_backend nodes
backend nodes
  balance leastconn
  option httpchk GET /readyz
  http-check expect status 200
{servers}
"""
        )
        self.proc = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def __enter__(self) -> HAProxy:
        import shutil
        import subprocess

        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        check = subprocess.run([binary, "-c", "-f", str(self.config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.proc = subprocess.Popen(
            [binary, "-db", "-f", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/livez", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "haproxy did not come up"
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


def node_sessions(base: str) -> int:
    return httpx.get(base + "/readyz").json()["sessions"]


async def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_two_nodes_behind_haproxy_spread_share_limits_leave_rotation_and_drain(
    vendors, speech, artifacts, tmp_path, redis_server
):
    from contextlib import ExitStack

    common = {
        **cloud_fakes_env(vendors),
        "REDIS_URL": redis_server.url,
        "ATLAS_MAX_SESSIONS_PER_USER": "1",
        "ATLAS_DRAIN_SECS": "120",
    }
    with ExitStack() as stack:
        a_base, _ = stack.enter_context(
            server_process({**common, "ATLAS_MAX_SESSIONS": "3"}, artifacts / "server_node_a.log")
        )
        b_base, b_proc = stack.enter_context(
            server_process({**common, "ATLAS_MAX_SESSIONS": "8"}, artifacts / "server_node_b.log")
        )
        lb = stack.enter_context(
            HAProxy(tmp_path, {"a": int(a_base.rsplit(":", 1)[1]), "b": int(b_base.rsplit(":", 1)[1])})
        )
        await asyncio.sleep(1.0)  # both nodes seen healthy
        on = {"a": [], "b": []}
        users = iter(f"caller-{i}" for i in range(100))

        async def call() -> str:
            """A new call through the load balancer; returns the node it landed on."""
            before = (node_sessions(a_base), node_sessions(b_base))
            client = await connected_client_as(lb.ws_url, next(users))
            after = (node_sessions(a_base), node_sessions(b_base))
            node = "a" if after[0] > before[0] else "b"
            assert after[0] + after[1] == before[0] + before[1] + 1
            on[node].append(client)
            return node

        # Calls spread over both nodes.
        landed = [await call() for _ in range(4)]
        assert set(landed) == {"a", "b"}, landed

        # A per-user limit holds across nodes: caller-0 is live on one node; neither node takes a second call.
        for base in (a_base, b_base):
            ws, refused = await start_raw(base.replace("http://", "ws://") + "/ws", "caller-0")
            assert refused["type"] == "error" and refused["code"] == "TOO_MANY_SESSIONS", refused
            await ws.close()

        # Node a at capacity leaves rotation: new calls go to b and none is refused.
        while node_sessions(a_base) < 3:
            await call()
        assert httpx.get(a_base + "/readyz").json()["status"] == "full"
        await asyncio.sleep(1.0)
        assert [await call() for _ in range(2)] == ["b", "b"]
        # One of a's calls ends: a is back in rotation and takes the next call.
        await on["a"].pop().stop()
        await wait_until(lambda: httpx.get(a_base + "/readyz").status_code == 200, what="a ready again")
        await asyncio.sleep(1.0)
        assert await call() == "a"
        await on["a"].pop().stop()  # room for one more on a

        # SIGTERM to b while its calls are live: out of rotation, new calls go to a, b's calls talk to the end.
        b_proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.0)
        assert httpx.get(b_base + "/readyz").json()["status"] == "draining"
        assert await call() == "a"
        talker = on["b"][0]
        turn = await talker.say(speech["dinner"])
        await talker.wait_reply_done(timeout=30)
        assert turn.reply_bytes > talker.out_rate
        b_ids = [c.session_id for c in on["b"]]
        for client in on["b"]:
            end = await client.stop()
            assert end is not None and end["reason"] == "client_stop"
        # Its last call over, b exits by itself, long before its 120 s drain bound.
        rc = await asyncio.to_thread(b_proc.wait, 30)
        assert rc in (0, -signal.SIGTERM)
        for client in on["a"]:
            await client.stop()
    rows = ended_rows(artifacts / "server_node_b.sqlite3")
    assert all(rows.get(sid) == "client_stop" for sid in b_ids), rows


async def connected_client_as(url: str, user: str):
    from app.talk import VoiceClient

    client = VoiceClient(url, user_id=user)
    await client.connect()
    await client.send_silence(0.3)
    return client


# --- several workers on one port ---------------------------------------------------------------------------


def scrape(base: str) -> dict[tuple, float]:
    from tests.helpers import metric_samples

    return metric_samples(httpx.get(base + "/metrics").text)


def per_worker(samples: dict[tuple, float], name: str) -> dict[str, float]:
    return {dict(labels)["pid"]: value for (n, labels), value in samples.items() if n == name}


async def test_two_workers_share_one_port_report_machine_totals_and_survive_a_killed_worker(vendors, artifacts):
    import os

    log = artifacts / "server_workers.log"
    env = {**cloud_fakes_env(vendors), "ATLAS_WORKERS": "2", "ATLAS_MAX_SESSIONS": "8", "ATLAS_DRAIN_SECS": "300"}
    with server_process(env, log) as (base, proc):
        ws_url = base.replace("http://", "ws://") + "/ws"
        await wait_until(lambda: httpx.get(base + "/readyz").status_code == 200, 120, "both workers ready")
        ready = httpx.get(base + "/readyz").json()
        assert ready["capacity"] == 16  # 2 workers x 8
        samples = scrape(base)
        workers = per_worker(samples, "atlas_worker_ready")
        assert len(workers) == 2 and set(workers.values()) == {1.0}, workers
        assert str(proc.pid) not in workers  # the supervisor runs no calls itself

        # Calls spread over both workers (the kernel hands each connection to one of them).
        clients = []
        while len(clients) < 12:
            clients.append(await connected_client_as(ws_url, f"w-{len(clients)}"))
            on = per_worker(scrape(base), "atlas_worker_sessions")
            if len(clients) >= 4 and all(v >= 1 for v in on.values()):
                break
        assert all(v >= 1 for v in on.values()), on
        # Whichever worker answers, /metrics and /readyz give the machine's totals.
        for _ in range(6):
            samples = scrape(base)
            assert samples[("atlas_active_sessions", (("transport", "websocket"),))] == len(clients)
            assert samples[("atlas_capacity_sessions", ())] == 16
            assert httpx.get(base + "/readyz").json()["sessions"] == len(clients)

        # SIGKILL one worker mid-call: its callers are cut off, the other worker's go on, and the supervisor
        # starts another worker in its place (same index, same outbox).
        victim = max(on, key=lambda pid: on[pid])
        os.kill(int(victim), signal.SIGKILL)
        await asyncio.sleep(1.0)
        cut = [c for c in clients if c._reader is not None and c._reader.done()]
        alive = [c for c in clients if c not in cut]
        assert len(cut) == int(on[victim]) and alive, (len(cut), on)
        await wait_until(
            lambda: (
                httpx.get(base + "/readyz").status_code == 200
                and victim not in per_worker(scrape(base), "atlas_worker_ready")
            ),
            120,
            "the replacement worker ready",
        )
        samples = scrape(base)
        assert len(per_worker(samples, "atlas_worker_ready")) == 2
        assert samples[("atlas_worker_starts_total", ())] == 3  # two, and one restart
        assert samples[("atlas_active_sessions", (("transport", "websocket"),))] == len(alive)
        for client in alive:  # the surviving worker's calls were never touched
            end = await client.stop()
            assert end is not None and end["reason"] == "client_stop"
        last = await connected_client_as(ws_url, "after")  # and new calls are taken

        # SIGTERM to the supervisor: every worker drains; the live call goes on to its own end.
        proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: httpx.get(base + "/readyz").json()["status"] == "draining", 10, "draining")
        await last.send_silence(1.0)
        end = await last.stop()
        assert end is not None and end["reason"] == "client_stop"
        rc = await asyncio.to_thread(proc.wait, 30)  # long before the 300 s drain bound
        assert rc in (0, -signal.SIGTERM)
        clients.append(last)
    text = log.read_text()
    assert "died (exit code -9); restarting it" in text
    # Every call left its row, the killed worker's too (its start was stored before the kill).
    with sqlite3.connect(log.with_suffix(".sqlite3")) as conn:
        stored = {row[0] for row in conn.execute("select id from voice_sessions")}
    assert {c.session_id for c in clients} <= stored


async def test_redis_going_away_mid_call_leaves_live_calls_talking_and_new_ones_counted_locally(
    vendors, speech, artifacts, redis_server
):
    env = {**cloud_fakes_env(vendors), "REDIS_URL": redis_server.url, "ATLAS_MAX_SESSIONS_PER_USER": "1"}
    with server_process(env, artifacts / "server_redis_down.log") as (base, _proc):
        ws_url = base.replace("http://", "ws://") + "/ws"
        talker = await connected_client_as(ws_url, "rita")
        assert scrape(base)[("atlas_limits_shared", ())] == 1
        redis_server.stop()
        turn = await talker.say(speech["dinner"])  # the live call goes on
        await talker.wait_reply_done(timeout=30)
        assert turn.reply_bytes > talker.out_rate
        other = await connected_client_as(ws_url, "sam")  # fails open: counted by this process alone
        assert await refused_at_session_start(ws_url, "sam") == "TOO_MANY_SESSIONS"  # and still bounded
        samples = scrape(base)
        assert samples[("atlas_redis_errors_total", (("op", "acquire"),))] >= 2
        assert samples[("atlas_limits_shared", ())] == 0
        for client in (talker, other):
            end = await client.stop()
            assert end is not None and end["reason"] == "client_stop"


async def refused_at_session_start(ws_url: str, user: str) -> str:
    ws, answer = await start_raw(ws_url, user)
    await ws.close()
    assert answer["type"] == "error", answer
    return answer["code"]


async def test_a_dropped_conversation_is_resumable_on_any_worker_or_node_through_redis(redis_server):
    from redis.asyncio import Redis

    from storage.resume import ResumeStore

    clients = [Redis.from_url(redis_server.url), Redis.from_url(redis_server.url)]
    node_a, node_b = (ResumeStore(Path("/nonexistent/unused.sqlite3"), c, "atlas-test") for c in clients)
    messages = [{"role": "user", "content": "what should I cook?"}]
    await node_a.keep("s-1", "user-1", "atlas", messages, ttl_secs=30)
    assert await node_b.take("s-1", "user-1") == ("atlas", messages)
    assert await node_a.take("s-1", "user-1") is None  # resumed once
    redis_server.stop()  # Redis down: no resume, no exception
    await node_a.keep("s-2", "user-1", "atlas", messages, ttl_secs=30)
    assert await node_b.take("s-2", "user-1") is None
    for c in clients:
        await c.aclose()
