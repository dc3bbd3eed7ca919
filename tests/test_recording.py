"""Sessions and turns recorded in Supabase through the real supabase-py client (local Postgres with the
migrations as they ship, behind the PostgREST-compatible endpoint), with auth and RLS; and the outbox: a
database outage mid-session plus a server restart lose nothing and duplicate nothing.

The Atlas servers run as subprocesses on the fake cloud vendors (fakes/), exactly as in production.
"""

from __future__ import annotations

import asyncio
import sqlite3

import httpx
import psycopg
import pytest

from app.talk import VoiceClient
from config.prices import rates_for
from fakes.supabase_local.stack import SECRET, Stack
from fakes.supabase_local.stack import client as supabase_client
from storage.outbox import OutboxFile, Recorder
from storage.records import FEEDBACK, INSERT, SESSIONS, TURNS, UPSERT
from storage.sinks import SQLiteSink
from storage.supabase import SupabaseSink
from tests.conftest import cloud_env, reset_vendors
from tests.helpers import metric_samples, recorded, running_server
from tests.recording_checks import check_recorded

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def stack():
    s = Stack().start()
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def fresh(vendors, stack):
    reset_vendors(vendors)
    stack.api.clear_faults()
    yield
    if not stack.pg.running:
        stack.pg.start()


def supabase_env(stack: Stack, outbox) -> dict[str, str]:
    return {
        "SUPABASE_URL": stack.api.url,
        "SUPABASE_SERVICE_ROLE_KEY": stack.api.service_key,
        "SUPABASE_JWT_SECRET": SECRET,
        "ATLAS_DB_TIMEOUT_SECS": "1",
        "ATLAS_OUTBOX_PATH": str(outbox),
        "ATLAS_OUTBOX_MAX_BACKOFF_SECS": "1",
    }


async def converse(ws_url: str, token: str, speech, names=("puppy", "dinner"), *, between=None):
    client = VoiceClient(ws_url, user_id="client-claims-to-be-someone-else", auth_token=token)
    await client.connect()
    await client.send_silence(0.3)
    for i, name in enumerate(names):
        if between and i:
            between()
        await client.say(speech[name])
        await client.wait_reply_done(timeout=60)
    end = await client.stop()
    return client, end


async def select_as(stack: Stack, key: str, token: str | None, table: str, session_id: str) -> list[dict]:
    sb, http = await supabase_client(stack, key, token)
    try:
        return (
            await sb.table(table).select("*").eq("session_id" if table == TURNS else "id", session_id).execute()
        ).data
    finally:
        await http.aclose()


async def test_conversation_recorded_in_supabase_with_rls(stack, vendors, llm_record, speech, artifacts, tmp_path):
    claude, dg = vendors["anthropic"], vendors["deepgram"]
    n_claude, n_dg = len(claude.requests), len(dg.connections)
    env = {**cloud_env(vendors, llm_record, "elevenlabs"), **supabase_env(stack, tmp_path / "outbox.sqlite3")}
    with running_server(env, artifacts / "server_supabase.log") as base:
        client, end = await converse(
            base.replace("http://", "ws://") + "/ws", stack.api.user_token(stack.user_a), speech
        )
        sink = SupabaseSink(stack.api.url, stack.api.service_key)
        session, turns = await recorded(sink, end["sessionId"], 2)
        await sink.close()
        scraped = metric_samples(httpx.get(base + "/metrics").text)

    check_recorded(session, turns, end, client.turns)
    # /metrics counted the same session and turns, and the same cost.
    assert scraped[("atlas_turns_total", (("transport", "websocket"),))] == 2
    assert scraped[("atlas_active_sessions", (("transport", "websocket"),))] == 0
    assert (
        scraped[("atlas_stage_latency_seconds_count", (("stage", "voice_to_voice"), ("transport", "websocket")))] == 2
    )
    assert abs(scraped[("atlas_cost_usd_total", ())] - float(session["cost_usd"])) < 1e-9
    assert scraped[("atlas_outbox_pending", (("sink", "supabase"),))] == 0
    # The verified user from the token's `sub`, never the client's claim (kept apart, for support).
    assert session["user_id"] == str(stack.user_a)
    assert session["client_user_id"] == "client-claims-to-be-someone-else"
    models = ("deepgram", "nova-3", "anthropic", "claude-haiku-4-5", "elevenlabs", "eleven_flash_v2_5")
    assert (
        tuple(
            session[k] for k in ("stt_provider", "stt_model", "llm_provider", "llm_model", "tts_provider", "tts_model")
        )
        == models
    )
    rates = rates_for(models[0:2], models[2:4], models[4:6])
    assert {k: float(session[k]) for k in rates.columns()} == rates.columns()
    assert float(session["cost_usd"]) > 0

    # Tokens are what Claude reported (net input, cache writes and reads apart), counted once.
    usage = [r.usage for r in claude.requests[n_claude:]]
    assert len(usage) == 2
    assert session["llm_input_tokens"] == sum(u["input_tokens"] for u in usage)
    assert session["llm_output_tokens"] == sum(u["output_tokens"] for u in usage)
    assert session["llm_cache_write_tokens"] == sum(u.get("cache_creation_input_tokens", 0) for u in usage)
    assert session["llm_cache_read_tokens"] == sum(u.get("cache_read_input_tokens", 0) for u in usage)
    assert session["llm_cache_read_tokens"] > 0  # the second request read the cached system prompt
    # STT seconds are the audio Deepgram was sent (what it bills).
    assert abs(float(session["stt_duration_seconds"]) - dg.connections[n_dg].audio_seconds) < 0.5

    # RLS through the real client: user A reads the session and its turns; user B and anon read nothing.
    a = stack.api.user_token(stack.user_a)
    b = stack.api.user_token(stack.user_b)
    assert [r["id"] for r in await select_as(stack, stack.api.anon_key, a, SESSIONS, session["id"])] == [session["id"]]
    assert len(await select_as(stack, stack.api.anon_key, a, TURNS, session["id"])) == 2
    assert await select_as(stack, stack.api.anon_key, b, SESSIONS, session["id"]) == []
    assert await select_as(stack, stack.api.anon_key, b, TURNS, session["id"]) == []
    assert await select_as(stack, stack.api.anon_key, None, SESSIONS, session["id"]) == []


def outbox_counts(path) -> dict[str, int]:
    """{"pending": writes not yet in the store, "dead": dead letters}, leaving out what is 0."""
    with sqlite3.connect(path) as db:
        counts = {
            "pending": db.execute("select count(*) from outbox").fetchone()[0],
            "dead": db.execute("select count(*) from dead_letters").fetchone()[0],
        }
    return {k: v for k, v in counts.items() if v}


async def test_database_outage_and_restart_lose_nothing(stack, vendors, llm_record, speech, artifacts, tmp_path):
    """A write times out after committing; then the database stops mid-session; the session finishes; the
    server restarts; the database comes back: every row arrives, exactly once."""
    outbox = tmp_path / "outbox.sqlite3"
    env = {**cloud_env(vendors, llm_record, "elevenlabs"), **supabase_env(stack, outbox)}
    # The session's first row commits, but its answer comes after the 1 s client timeout: the
    # outbox keeps it and sends it again, which must not make a second row.
    stack.api.stall_next(1.5)
    with running_server(env, artifacts / "server_outbox.log") as base:
        client, end = await converse(
            base.replace("http://", "ws://") + "/ws", stack.api.user_token(stack.user_b), speech, between=stack.pg.stop
        )
        assert not stack.pg.running
    # The stalled write timed out (and was sent again); then the outage. What the stopped server
    # could not write is on disk.
    log1 = (artifacts / "server_outbox.log").read_text()
    assert "voice_sessions: ReadTimeout" in log1, log1[-3000:]
    left = outbox_counts(outbox)
    assert left.get("pending", 0) >= 2 and "dead" not in left, left
    assert "writes kept" in log1

    with running_server(env, artifacts / "server_outbox2.log"):
        stack.pg.start()
        sink = SupabaseSink(stack.api.url, stack.api.service_key)
        session, turns = await recorded(sink, end["sessionId"], 2, timeout=30)
        await sink.close()
        log = (artifacts / "server_outbox2.log").read_text()
        assert "left from a previous run" in log
    assert outbox_counts(outbox) == {}

    check_recorded(session, turns, end, client.turns)
    assert session["user_id"] == str(stack.user_b)
    with psycopg.connect(stack.pg.dsn) as conn:
        n_sessions = conn.execute("select count(*) from voice_sessions where id = %s", [session["id"]]).fetchone()[0]
        n_turns = conn.execute("select count(*) from voice_turns where session_id = %s", [session["id"]]).fetchone()[0]
    assert (n_sessions, n_turns) == (1, 2)


def pg_columns(stack: Stack, table: str) -> set[str]:
    return {
        r[0]
        for r in stack.pg.execute(
            "select column_name from information_schema.columns where table_schema = 'public' and table_name = %s",
            [table],
        )
    }


async def test_sqlite_store_has_the_migration_tables(stack, tmp_path):
    sink = SQLiteSink(tmp_path / "atlas.sqlite3")
    await sink.fetch(SESSIONS)  # creates the file
    await sink.close()
    with sqlite3.connect(tmp_path / "atlas.sqlite3") as db:
        for table in (SESSIONS, TURNS, FEEDBACK):
            columns = {r[1] for r in db.execute(f"select * from pragma_table_xinfo('{table}')")}
            assert columns == pg_columns(stack, table), table


def session_row(sid: str, **extra) -> dict:
    return {"id": sid, "transport": "websocket", "started_at": "2026-11-22T10:00:00.000000+00:00", **extra}


def turn(sid: str, index: int) -> dict:
    from storage.records import turn_id

    return {
        "id": turn_id(sid, index),
        "session_id": sid,
        "turn_index": index,
        "created_at": f"2026-11-22T10:00:0{index + 1}.000000+00:00",
    }


async def test_outbox_keeps_order_sets_bad_rows_aside_and_replays(tmp_path):
    """A row the store rejects (a turn of an unknown session) is kept as dead and never blocks the rest;
    writes are sent in order (the end row is not overwritten by the start row); a new Recorder on the
    same outbox sends what an earlier one left."""
    import uuid

    db = tmp_path / "atlas.sqlite3"
    sid, ghost = str(uuid.uuid4()), str(uuid.uuid4())
    recorder = Recorder(SQLiteSink(db), tmp_path / "outbox.sqlite3")
    await recorder.start()
    recorder.submit(SESSIONS, INSERT, [session_row(sid)])
    recorder.submit(TURNS, INSERT, [turn(sid, 0), turn(ghost, 0), turn(sid, 1)])
    recorder.submit(SESSIONS, UPSERT, [session_row(sid, ended_at="2026-11-22T10:05:00.000000+00:00", turns_count=2)])
    recorder.submit(SESSIONS, INSERT, [session_row(sid)])  # a late duplicate of the start row changes nothing
    assert await recorder.flush(10)
    assert (recorder.dead, recorder.pending) == (1, 0)
    await recorder.close()

    sink = SQLiteSink(db)
    sessions = await sink.fetch(SESSIONS)
    assert [(s["id"], s["turns_count"], s["ended_at"]) for s in sessions] == [
        (sid, 2, "2026-11-22T10:05:00.000000+00:00")
    ]
    assert sorted(t["turn_index"] for t in await sink.fetch(TURNS)) == [0, 1]
    await sink.close()
    assert outbox_counts(tmp_path / "outbox.sqlite3") == {"dead": 1}

    # Writes queued but not yet sent survive a restart: append straight to the outbox, then start anew.
    later = str(uuid.uuid4())
    recorder = Recorder(SQLiteSink(db), tmp_path / "outbox.sqlite3")
    await recorder._run(recorder.file.append, [(SESSIONS, INSERT, [session_row(later)])])
    await recorder.start()
    assert recorder.dead == 1
    assert await recorder.flush(10)
    await recorder.close()
    sink = SQLiteSink(db)
    assert {s["id"] for s in await sink.fetch(SESSIONS)} == {sid, later}
    await sink.close()


# --- rows no store takes: dead letters, on both sinks ---------------------------------------------------------


def poison_rows() -> list[tuple[str, dict]]:
    """Session rows as a careless door could have built them from a hostile Twilio `start`, each with why
    no store takes it."""
    import uuid

    def row(**extra):
        return session_row(str(uuid.uuid4()), **extra)

    return [
        ("a 71-bit integer", row(turns_count=2**70)),
        ("an object in a number column", row(turns_count={"a": {"b": [1, 2]}})),
        ("NaN", row(avg_latency_ms=float("nan"))),
        ("a set (not JSON)", row(client_user_id={"+1555"})),
    ]


def outbox_cli(outbox, *args) -> str:
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "outbox", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "ATLAS_OUTBOX_PATH": str(outbox)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


async def test_rows_sqlite_cannot_store_are_dead_lettered_and_never_block_later_rows(tmp_path):
    import json
    import uuid

    db, outbox = tmp_path / "atlas.sqlite3", tmp_path / "outbox.sqlite3"
    before, after, orphan_session = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    recorder = Recorder(SQLiteSink(db), outbox)
    await recorder.start()
    recorder.submit(SESSIONS, INSERT, [session_row(before)])
    poison = poison_rows()
    for _, row in poison:
        recorder.submit(SESSIONS, INSERT, [row])
    recorder.submit(TURNS, INSERT, [turn(orphan_session, 0)])  # its session row is not there (yet)
    recorder.submit(SESSIONS, INSERT, [session_row(after)])
    assert await recorder.flush(20)
    assert recorder.dead == len(poison) + 1 and recorder.dead_lettered == len(poison) + 1
    await recorder.close()
    sink = SQLiteSink(db)
    assert {s["id"] for s in await sink.fetch(SESSIONS)} == {before, after}  # the rows behind got through
    await sink.close()

    # Listed with their reasons; kept across a restart, still not in the way.
    listed = json.loads(outbox_cli(outbox, "list", "--json"))
    assert len(listed) == len(poison) + 1
    reasons = " | ".join(d["reason"] for d in listed)
    assert "OverflowError" in reasons or "too large" in reasons, reasons
    assert "not storable" in reasons and "FOREIGN KEY" in reasons, reasons
    assert outbox_counts(outbox) == {"dead": len(poison) + 1}

    # The operator fixes the cause (the missing session row lands) and sends that one dead letter again.
    sink = SQLiteSink(db)
    await sink.write(SESSIONS, INSERT, [session_row(orphan_session)])
    await sink.close()
    orphan = [d for d in listed if d["table"] == TURNS][0]
    assert "1 dead letters will be sent again" in outbox_cli(outbox, "retry", str(orphan["seq"]))
    recorder = Recorder(SQLiteSink(db), outbox)
    await recorder.start()
    assert await recorder.flush(10)
    assert recorder.dead == len(poison)
    await recorder.close()
    sink = SQLiteSink(db)
    assert [t["session_id"] for t in await sink.fetch(TURNS)] == [orphan_session]
    await sink.close()
    assert "4 dead letters deleted" in outbox_cli(outbox, "purge", "--all")
    assert outbox_counts(outbox) == {}


async def test_rows_postgres_rejects_are_dead_lettered_and_never_block_later_rows(stack, tmp_path):
    import uuid

    outbox = tmp_path / "outbox.sqlite3"
    before, after = str(uuid.uuid4()), str(uuid.uuid4())
    bad_ip = session_row(str(uuid.uuid4()), ip_address="not-an-ip")  # inet
    bad_int = session_row(str(uuid.uuid4()), turns_count=2**40)  # int
    bad_type = session_row(str(uuid.uuid4()), turns_count={"a": 1})
    recorder = Recorder(SupabaseSink(stack.api.url, stack.api.service_key, timeout_secs=2), outbox)
    await recorder.start()
    recorder.submit(SESSIONS, INSERT, [session_row(before)])
    recorder.submit(SESSIONS, INSERT, [bad_ip, bad_int, bad_type])  # one batch: isolated row by row
    recorder.submit(SESSIONS, INSERT, [session_row(after)])
    assert await recorder.flush(30)
    assert recorder.dead == 3
    await recorder.close()
    with psycopg.connect(stack.pg.dsn) as conn:
        ids = {
            str(r[0])
            for r in conn.execute(
                "select id from voice_sessions where id = any(%s)",
                [[before, after, bad_ip["id"], bad_int["id"], bad_type["id"]]],
            )
        }
    assert ids == {before, after}
    reasons = [d.reason for d in OutboxFile(outbox).dead_letters()]
    assert len(reasons) == 3 and all(r.startswith("voice_sessions: 22") for r in reasons), reasons


async def test_the_outbox_disk_cap_prunes_dead_letters_first_then_holds_new_sessions(tmp_path):
    from bots.runtime import Runtime
    from config.settings import Settings
    from storage.sinks import Sink, TransientWriteError

    class Down(Sink):
        name = "down"

        async def write(self, table, mode, rows):
            raise TransientWriteError("the database is down")

    outbox = tmp_path / "outbox.sqlite3"
    file = OutboxFile(outbox)
    file.append([(SESSIONS, INSERT, [{"id": i, "bad": {1, 2}, "pad": "x" * 1000} for i in range(60)])])
    file.close()
    recorder = Recorder(Down(), outbox, max_bytes=256 << 10, max_backoff_secs=0.2)
    await recorder.start()
    assert recorder.dead == 60 and not recorder.full
    runtime = Runtime(settings=Settings(outbox_path=outbox, sqlite_path=tmp_path / "s.sqlite3"), recorder=recorder)
    assert runtime.admit()
    runtime.release()
    for i in range(200):  # ~400 KB of pending writes against a 256 KiB cap, while the store is down
        recorder.submit(SESSIONS, INSERT, [session_row(f"s-{i}", user_agent="y" * 2000)])
    deadline = asyncio.get_running_loop().time() + 20
    while not recorder.full and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.2)
    assert recorder.full and recorder.dead == 0 and recorder.pruned == 60  # dead letters went first
    assert not runtime.admit()  # no new session while the backlog is over the cap...
    assert recorder.pending == 200  # ... and not one pending write was dropped
    await recorder.close(timeout=0.1)
    assert outbox_counts(outbox) == {"pending": 200}


async def test_dead_letters_past_their_retention_are_deleted(tmp_path):
    outbox = tmp_path / "outbox.sqlite3"
    file = OutboxFile(outbox)
    file.append([(SESSIONS, INSERT, [{"id": 1, "bad": float("inf")}, {"id": 2, "bad": float("nan")}])])
    file.db().execute(
        "update dead_letters set dead_at = dead_at - 40 * 86400 where seq = (select min(seq) from dead_letters)"
    ).connection.commit()
    file.close()
    recorder = Recorder(SQLiteSink(tmp_path / "atlas.sqlite3"), outbox, dead_retention_secs=30 * 86400)
    await recorder.start()
    assert (recorder.dead, recorder.pruned) == (1, 1)
    await recorder.close()
