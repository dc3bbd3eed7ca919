"""Signed `session.ended` webhooks (storage/webhooks.py) against a real receiver: an aiohttp server on
127.0.0.1 that verifies each POST the way docs/WEBHOOKS.md tells receivers to, and answers what the test
scripts. Nothing is mocked: real sockets, the real outbox file, the real `atlas-voice outbox` command."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from aiohttp import web
from loguru import logger

from config.settings import Settings
from storage.outbox import OutboxFile, Recorder
from storage.records import INSERT, SessionInfo, iso, provider_models
from storage.webhooks import (
    WEBHOOKS,
    WebhookSink,
    make_webhook_recorder,
    session_ended_event,
    sign,
    verify,
    webhook_outbox_path,
)
from tests.helpers import REPO, free_port
from vocabulary.records import SessionSummary, Usage

SECRET = "whsec-test-3f9a1c"


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    verified: bool

    @property
    def event(self) -> dict:
        return json.loads(self.body)


class Receiver:
    """A webhook receiver: answers `statuses` in order (then `then`), after `delay` secs on the first POST."""

    def __init__(self, port: int, statuses: list[int] | None = None, then: int = 200, delay: float = 0.0):
        self.port = port
        self.statuses = list(statuses or [])
        self.then = then
        self.delay = delay
        self.got: list[Received] = []
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.got.append(Received(dict(request.headers), body, verify(SECRET, request.headers["Atlas-Signature"], body)))
        if self.delay:
            delay, self.delay = self.delay, 0.0
            await asyncio.sleep(delay)
        status = self.statuses.pop(0) if self.statuses else self.then
        text = "bad event: missing field 'foo'\n" + "x" * 500 if status == 400 else "ok"
        return web.Response(status=status, text=text)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hooks/atlas", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def ids(self) -> list[str]:
        return [r.headers["Atlas-Event-Id"] for r in self.got]


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}/hooks/atlas"


def settings_for(tmp_path: Path, port: int, **extra) -> Settings:
    fields = dict(
        webhook_url=url(port),
        webhook_secret=SECRET,
        outbox_path=tmp_path / "outbox.sqlite3",
        outbox_max_backoff_secs=0.3,
        webhook_timeout_secs=2.0,
    )
    return Settings(_env_file=None, **{**fields, **extra})


@asynccontextmanager
async def running(settings: Settings):
    recorder = make_webhook_recorder(settings)
    assert recorder is not None
    await recorder.start()
    try:
        yield recorder
    finally:
        await recorder.close(timeout=0.5)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def dead_letters(path: Path) -> list:
    """The outbox's dead letters, read as `atlas-voice outbox` reads them (its own connection)."""
    outbox = OutboxFile(path)
    try:
        return outbox.dead_letters()
    finally:
        outbox.close()


def session_row() -> dict:
    """A final voice_sessions row, as the server builds it (SessionInfo.end_row)."""
    info = SessionInfo(
        id=str(uuid.uuid4()),
        transport="websocket",
        started_at=time.time() - 42.0,
        user_id=None,
        client_user_id="user-7",
        conversation_id=None,
        models=provider_models(Settings(_env_file=None)),
    )
    summary = SessionSummary(
        stt_seconds=12.5,
        stt_latency_ms=150.0,
        llm_latency_ms=300.0,
        tts_latency_ms=120.0,
        total_latency_ms=1500.0,
        p50_latency_ms=1480.0,
        p95_latency_ms=1600.0,
        interruptions=1,
        errors=0,
        usage=Usage(llm_input_tokens=300, llm_output_tokens=80, tts_characters=420),
    )
    return info.end_row(summary, ended_at=time.time(), end_reason="client_stop")


TRANSCRIPT = [
    {"turn": 0, "user": "Hi Atlas, name my puppy.", "bot": "How about Biscuit?"},
    {"turn": 1, "user": "Something shorter — ünïcode ok?", "bot": "Pip."},
]


# --- events and signatures -------------------------------------------------------------------------


def test_the_event_has_a_stable_id_and_omits_a_transcript_not_kept():
    row = session_row()
    event = session_ended_event(row, TRANSCRIPT)
    assert event["type"] == "session.ended"
    assert event["data"] == {"session": row, "transcript": TRANSCRIPT}
    assert uuid.UUID(event["id"]).version == 5
    assert session_ended_event(row, None)["id"] == event["id"]  # the same on every build and attempt
    assert session_ended_event({**row, "id": str(uuid.uuid4())}, None)["id"] != event["id"]
    assert "transcript" not in session_ended_event(row, None)["data"]
    assert abs(datetime.fromisoformat(event["created_at"]).timestamp() - time.time()) < 5


def test_verify_accepts_the_signature_and_rejects_tampering_wrong_secrets_and_stale_times():
    body = json.dumps(session_ended_event(session_row(), TRANSCRIPT)).encode()
    now = time.time()
    header = sign(SECRET, int(now), body)
    assert header.startswith(f"t={int(now)},v1=") and len(header.split("v1=")[1]) == 64
    assert verify(SECRET, header, body)
    assert verify(SECRET, header, body, now=now + 299)
    assert not verify(SECRET, header, body.replace(b"client_stop", b"client_stap"))  # tampered body
    assert not verify(SECRET, header, body + b" ")
    assert not verify("another-secret", header, body)  # wrong secret
    assert not verify(SECRET, header, body, now=now + 301)  # stale: a replay after the tolerance
    assert not verify(SECRET, header, body, now=now - 301)  # from the future
    assert not verify(SECRET, header, body, tolerance_secs=10, now=now + 11)
    stale = sign(SECRET, int(now) - 3600, body)
    assert not verify(SECRET, stale, body)
    # The timestamp is signed: moving it breaks the signature.
    moved = header.replace(f"t={int(now)}", f"t={int(now) + 1}")
    assert not verify(SECRET, moved, body)
    # Malformed headers are rejected, never raise.
    for bad in ["", "t=abc,v1=00", f"t={int(now)}", "v1=" + "0" * 64, "garbage", f"t={int(now)},v1=é"]:
        assert not verify(SECRET, bad, body)
    assert not verify("", header, body)
    # Several v1 signatures (a receiver rotating its secret): any one may match.
    rotated = f"{header},v1={'0' * 64}"
    assert verify(SECRET, rotated, body)


def test_no_url_no_recorder_and_the_outbox_sits_next_to_the_rows_one(tmp_path):
    assert make_webhook_recorder(Settings(_env_file=None, webhook_url=None)) is None
    s = settings_for(tmp_path, 9)
    assert webhook_outbox_path(s) == tmp_path / "outbox.webhooks.sqlite3"
    worker = settings_for(tmp_path, 9, worker_index=1)
    assert webhook_outbox_path(worker) == tmp_path / "outbox.worker1.webhooks.sqlite3"
    recorder = make_webhook_recorder(s)
    assert isinstance(recorder, Recorder) and recorder.path == webhook_outbox_path(s)
    assert SECRET not in repr(recorder.sink) and SECRET not in repr(vars(recorder))
    with pytest.raises(ValueError):
        WebhookSink("ftp://example.com/x", SECRET)


# --- delivery --------------------------------------------------------------------------------------


async def test_an_event_is_delivered_signed_with_its_headers(tmp_path):
    receiver = await Receiver(free_port()).start()
    try:
        async with running(settings_for(tmp_path, receiver.port)) as recorder:
            event = session_ended_event(session_row(), TRANSCRIPT)
            recorder.submit(WEBHOOKS, INSERT, [event])
            await until(lambda: len(receiver.got) == 1)
            assert await recorder.flush(2)
            assert (recorder.pending, recorder.dead, recorder.written) == (0, 0, 1)
        (got,) = receiver.got
        assert got.verified  # the receiver's check, with the shared secret
        assert got.event == event
        assert got.headers["Atlas-Event-Id"] == event["id"]
        assert got.headers["Atlas-Event"] == "session.ended"
        assert got.headers["Content-Type"] == "application/json"
        assert got.headers["User-Agent"] == "atlas-voice"
        t = int(got.headers["Atlas-Signature"].split(",")[0].removeprefix("t="))
        assert abs(t - time.time()) < 5
    finally:
        await receiver.stop()


async def test_a_500_is_retried_with_the_same_event_id_and_a_fresh_signature(tmp_path):
    receiver = await Receiver(free_port(), statuses=[500]).start()
    try:
        async with running(settings_for(tmp_path, receiver.port)) as recorder:
            event = session_ended_event(session_row(), None)
            recorder.submit(WEBHOOKS, INSERT, [event])
            await until(lambda: len(receiver.got) == 2)
            assert await recorder.flush(2)
            assert (recorder.pending, recorder.dead) == (0, 0)
            assert recorder.failures == 1
        assert receiver.ids() == [event["id"], event["id"]]
        assert all(r.verified and r.event == event for r in receiver.got)
    finally:
        await receiver.stop()


async def test_a_retried_batch_does_not_send_again_what_was_delivered(tmp_path):
    """The outbox sends a batch again from its start after a fault; events already accepted are skipped."""
    receiver = await Receiver(free_port(), statuses=[200, 503]).start()
    try:
        async with running(settings_for(tmp_path, receiver.port)) as recorder:
            events = [session_ended_event(session_row(), TRANSCRIPT) for _ in range(3)]
            recorder.submit(WEBHOOKS, INSERT, events)  # one write: one batch
            await until(lambda: recorder.written == 3)
            assert (recorder.pending, recorder.dead) == (0, 0)
        a, b, c = (e["id"] for e in events)
        assert receiver.ids() == [a, b, b, c]  # in order; `a` once
        assert all(r.verified for r in receiver.got)
    finally:
        await receiver.stop()


async def test_a_refused_connection_keeps_the_event_until_a_receiver_listens(tmp_path):
    port = free_port()  # nothing listens here yet
    settings = settings_for(tmp_path, port)
    async with running(settings) as recorder:
        event = session_ended_event(session_row(), TRANSCRIPT)
        started = time.perf_counter()
        recorder.submit(WEBHOOKS, INSERT, [event])
        assert time.perf_counter() - started < 0.05  # never waits on the receiver
        await until(lambda: recorder.failures >= 2)
        assert "ConnectError" in (recorder.last_error or "")
        assert (recorder.pending, recorder.dead) == (1, 0)
        kept = OutboxFile(webhook_outbox_path(settings))  # on disk, not only in memory
        try:
            assert [i.row for i in kept.oldest()] == [event]
        finally:
            kept.close()
        assert all(not t.done() for t in recorder._tasks)  # still running
        receiver = await Receiver(port).start()
        try:
            await until(lambda: recorder.pending == 0)
            assert recorder.dead == 0
            (got,) = receiver.got
            assert got.verified and got.event == event
        finally:
            await receiver.stop()


async def test_a_timeout_is_retried(tmp_path):
    receiver = await Receiver(free_port(), delay=1.5).start()
    try:
        async with running(settings_for(tmp_path, receiver.port, webhook_timeout_secs=0.5)) as recorder:
            event = session_ended_event(session_row(), None)
            recorder.submit(WEBHOOKS, INSERT, [event])
            await until(lambda: recorder.written == 1)
            assert recorder.failures == 1 and recorder.dead == 0
        assert receiver.ids() == [event["id"], event["id"]]
    finally:
        await receiver.stop()


async def test_a_400_dead_letters_the_event_and_later_events_still_land(tmp_path):
    lines: list[str] = []
    sink_id = logger.add(lambda m: lines.append(str(m)), level="DEBUG")
    receiver = await Receiver(free_port(), statuses=[400]).start()
    try:
        settings = settings_for(tmp_path, receiver.port)
        async with running(settings) as recorder:
            bad, good = (session_ended_event(session_row(), None) for _ in range(2))
            recorder.submit(WEBHOOKS, INSERT, [bad])
            await until(lambda: recorder.dead == 1)
            recorder.submit(WEBHOOKS, INSERT, [good])
            await until(lambda: recorder.written == 1)
            assert (recorder.pending, recorder.dead) == (0, 1)
            (letter,) = dead_letters(webhook_outbox_path(settings))
        assert letter.row_id == bad["id"] and json.loads(letter.row) == bad
        assert letter.reason.startswith("HTTP 400: bad event: missing field 'foo' xxx")
        assert len(letter.reason) < 260  # the body's first 200 characters, not all of it
        assert receiver.ids() == [bad["id"], good["id"]]  # the refused event was POSTed once
        assert not any(SECRET in line for line in lines)
        assert any("dead-lettered" in line for line in lines)
    finally:
        logger.remove(sink_id)
        await receiver.stop()


async def test_an_event_past_its_max_age_is_dead_lettered_and_the_cli_sends_it_again(tmp_path):
    receiver = await Receiver(free_port(), then=503).start()
    try:
        settings = settings_for(tmp_path, receiver.port, webhook_max_age_hours=24)
        old = {**session_ended_event(session_row(), None), "created_at": iso(time.time() - 25 * 3600)}
        async with running(settings) as recorder:
            recorder.submit(WEBHOOKS, INSERT, [old])
            await until(lambda: recorder.dead == 1)
            assert recorder.pending == 0
            (letter,) = dead_letters(webhook_outbox_path(settings))
            assert "ATLAS_WEBHOOK_MAX_AGE_HOURS=24" in letter.reason and "HTTP 503" in letter.reason
            assert receiver.ids() == [old["id"]]

            # An operator lists it and sends it again once the receiver is fixed: an old event is
            # still delivered when the receiver takes it (the age only ends retries).
            env = {**os.environ, "ATLAS_OUTBOX_PATH": str(webhook_outbox_path(settings))}
            env.pop("ATLAS_WORKER_INDEX", None)

            def cli(*args: str) -> str:
                done = subprocess.run(
                    [sys.executable, "-m", "app.cli", "outbox", *args],
                    cwd=REPO,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                assert done.returncode == 0, done.stderr
                return done.stdout

            listed = await asyncio.to_thread(cli, "list")
            assert "0 pending writes, 1 dead letters" in listed and old["id"] in listed
            receiver.then = 200
            await asyncio.to_thread(cli, "retry", "--all")
            await until(lambda: recorder.written == 1, timeout=8)
            assert (recorder.pending, recorder.dead) == (0, 0)
        assert receiver.ids() == [old["id"], old["id"]]
        assert receiver.got[-1].verified and receiver.got[-1].event == old
    finally:
        await receiver.stop()
