"""Transcripts, opt-in per agent: what each turn's observer keeps (the caller's final transcript, the reply as it
was spoken), the rows that carry it only for agents with `store_transcripts`, both stores (the SQLite file, and
real Postgres with the migrations as they ship behind the PostgREST-compatible endpoint, with RLS), retention
through the Recorder, and `atlas-voice export`. Real stores and a real Pipecat pipeline; no mocks."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import time
import uuid

import pytest
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    InterruptionFrame,
    MetricsFrame,
    TextFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.metrics.metrics import TTSUsageMetricsData
from pipecat.observers.base_observer import FramePushed
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.settings import STTSettings
from pipecat.services.stt_service import STTService
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import TransportParams
from pipecat.workers.runner import WorkerRunner

from compat.pipecat import select_frames
from fakes.supabase_local.stack import Stack
from fakes.supabase_local.stack import client as supabase_client
from processors.turn_metrics import TurnMetricsObserver
from storage.outbox import Recorder
from storage.records import INSERT, SESSIONS, TURNS, SessionInfo, iso, transcript, turn_row
from storage.sinks import PermanentWriteError, SQLiteSink
from storage.supabase import SupabaseSink
from tests.helpers import REPO
from vocabulary.records import TRANSCRIPT_MAX_CHARS, SessionSummary, TurnRecord, Usage

pytestmark = pytest.mark.timeout(300)

DAY = 86400.0
MODELS = {
    "stt_provider": "local",
    "stt_model": "tiny.en",
    "llm_provider": "local",
    "llm_model": "qwen2.5-1.5b-q4",
    "tts_provider": "local",
    "tts_model": "en_US-joe-medium",
}


# --- what the turn observer keeps (processors/turn_metrics.py) -------------------------------------------------


class Passthrough(FrameProcessor):
    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)


class Hearing(STTService):
    """A speech recognizer that hears what it is told: a plain TextFrame becomes its final transcript."""

    def __init__(self):
        super().__init__(settings=STTSettings(model=None, language=None))

    async def run_stt(self, audio: bytes):
        yield None

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        if type(frame) is TextFrame and direction == FrameDirection.DOWNSTREAM:
            await self.push_frame(TranscriptionFrame(frame.text, "caller", "2026-12-06T10:00:00Z"))
            return
        await super().process_frame(frame, direction)


class Speaker(BaseOutputTransport):
    """Pipecat's output transport in front of a speaker that plays audio at real time."""

    async def start(self, frame):
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame) -> bool:
        await asyncio.sleep(len(frame.audio) / 2 / frame.sample_rate)
        return True


def audio(secs: float) -> TTSAudioRawFrame:
    return TTSAudioRawFrame(audio=b"\0\0" * int(16000 * secs), sample_rate=16000, num_channels=1)


def sentence(text: str) -> TTSTextFrame:
    return TTSTextFrame(text, text_type="sentence")


async def test_the_observer_keeps_what_the_caller_said_and_what_was_spoken_of_the_reply():
    """Through a real pipeline (a recognizer, a TTS's frames, Pipecat's output transport at real time): the
    turn keeps the caller's final transcripts and the reply's sentences that were sent; an interruption drops
    the sentence whose audio never went out, from the text as from its length."""
    observer = TurnMetricsObserver()
    worker = PipelineWorker(
        Pipeline([Hearing(), Passthrough(), Speaker(TransportParams(audio_out_enabled=True)), Passthrough()]),
        params=PipelineParams(audio_out_sample_rate=16000),
        observers=[observer],
        enable_rtvi=False,
        enable_turn_tracking=False,
        idle_timeout_secs=None,
    )
    select_frames(worker)  # as every session's worker: observers get only the frame types they watch
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    run = asyncio.create_task(runner.run())
    # (the turn's end is a system frame, which overtakes queued data frames: the words go in first)
    await worker.queue_frames([TextFrame("What should I cook"), TextFrame("for dinner tonight?")])
    await asyncio.sleep(0.2)
    await worker.queue_frames(
        [
            UserStoppedSpeakingFrame(),
            TTSStartedFrame(),
            audio(0.2),
            sentence("Try a mushroom risotto."),
            audio(0.2),
            sentence("It takes thirty minutes."),
            TTSStoppedFrame(),
        ]
    )
    await asyncio.sleep(1.0)  # both sentences played
    await worker.queue_frame(TextFrame("And for dessert?"))
    await asyncio.sleep(0.2)
    await worker.queue_frames(
        [
            UserStoppedSpeakingFrame(),
            TTSStartedFrame(),
            audio(0.3),
            sentence("Poached pears."),
            audio(3.0),
            sentence("Cook them slowly in red wine with cinnamon."),
            TTSStoppedFrame(),
        ]
    )
    await asyncio.sleep(1.0)  # the first sentence played, the second's audio is still going out
    await worker.queue_frame(InterruptionFrame())
    await asyncio.sleep(0.3)
    await worker.queue_frame(EndFrame())
    await asyncio.wait_for(run, 30)
    observer.close_turns()

    first, second = (t.record() for t in observer.turns)
    assert first.user_text == "What should I cook for dinner tonight?"
    assert first.bot_text == "Try a mushroom risotto. It takes thirty minutes."
    assert (first.user_text_chars, first.bot_text_chars) == (len(first.user_text), len(first.bot_text))
    assert second.user_text == "And for dessert?"
    assert second.bot_text == "Poached pears."  # the rest was cut off before it was heard
    assert second.bot_text_chars == len("Poached pears.")
    assert observer._unspoken == {}
    records = observer.summary().turn_records
    assert transcript(observer.summary()) == [
        {"turn": 0, "user": first.user_text, "bot": first.bot_text},
        {"turn": 1, "user": "And for dessert?", "bot": "Poached pears."},
    ]
    assert transcript(records) == transcript(observer.summary())


def pushed(frame: Frame, source=None, *, first: bool = True, t: float = 1.0) -> FramePushed:
    return FramePushed(
        source=source,
        destination=None,
        frame=frame,
        direction=FrameDirection.DOWNSTREAM,
        timestamp=int(t * 1e9),
        first_push=first,
    )


async def test_word_timed_text_is_joined_with_spaces_and_each_text_is_bounded():
    """A voice with word timestamps sends a word at a time (no spaces in them); what the transport releases is
    joined as the context joins it. Each text is cut at TRANSCRIPT_MAX_CHARS; the counts stay whole. The
    observer watches every push now: later pushes of other frames still count once (usage, turn ends)."""
    hearing, speaker = Hearing(), Speaker(TransportParams())
    observer = TurnMetricsObserver()
    said = "word " * 1000  # 5000 characters
    await observer.on_push_frame(pushed(TranscriptionFrame(said, "caller", "t"), hearing))
    await observer.on_push_frame(pushed(UserStoppedSpeakingFrame()))
    words = [TTSTextFrame(w, text_type="word") for w in ["Sure,", "here", "it", "is."]]
    for w in words:
        w.pts = 1
        await observer.on_push_frame(pushed(w))  # the TTS pushes it
    for w in words[:3]:
        await observer.on_push_frame(pushed(w, speaker, first=False))  # released when it plays
    long = TTSTextFrame("x" * 4500, text_type="sentence")
    await observer.on_push_frame(pushed(long))
    await observer.on_push_frame(pushed(long, speaker, first=False))
    usage = MetricsFrame(data=[TTSUsageMetricsData(processor="tts", value=30)])
    end = UserStoppedSpeakingFrame()
    for first in (True, False, False):  # pushed on by two more processors
        await observer.on_push_frame(pushed(usage, first=first, t=1.5))
        await observer.on_push_frame(pushed(end, first=first, t=2.0))
    await observer.on_push_frame(pushed(words[3], speaker, first=False))  # too late: its turn is closed
    assert observer.totals.tts_characters == 30 and len(observer.turns) == 2
    record = observer.turns[0].record()
    assert record.user_text == said.strip()[:TRANSCRIPT_MAX_CHARS] and record.user_text_chars == len(said.strip())
    assert record.bot_text.startswith("Sure, here it xxx") and len(record.bot_text) == TRANSCRIPT_MAX_CHARS
    assert record.bot_text_chars == len("Sure, here it ") + 4500
    assert len(observer.turns) == 2 and observer._unspoken == {}


# --- rows ------------------------------------------------------------------------------------------------------


def session_info(*, store: bool, user_id: str | None = None, started_at: float | None = None) -> SessionInfo:
    return SessionInfo(
        id=str(uuid.uuid4()),
        transport="websocket",
        started_at=started_at if started_at is not None else time.time() - 60,
        user_id=user_id,
        client_user_id="client-1",
        conversation_id=None,
        models=MODELS,
        store_transcripts=store,
    )


def turn_record(index: int, user: str, bot: str, ended_at: float) -> TurnRecord:
    return TurnRecord(
        index=index,
        vad_stop_ms=200.0,
        stt_ms=300.0,
        turn_end_ms=700.0,
        llm_first_token_ms=10.0,
        first_sentence_ms=90.0,
        tts_first_audio_ms=200.0,
        voice_to_voice_ms=1500.0 + index,
        interrupted=False,
        user_text_chars=len(user),
        bot_text_chars=len(bot),
        usage=Usage(100, 20, 0, 0, len(bot)),
        error_code=None,
        user_stopped_at=ended_at - 0.9,
        first_audio_at=ended_at + 0.6,
        ended_at=ended_at,
        user_text=user,
        bot_text=bot,
    )


def conversation(info: SessionInfo, said: list[tuple[str, str]]) -> tuple[dict, list[dict]]:
    """A session's end row and its turn rows, as the session writes them."""
    records = tuple(turn_record(i, user, bot, info.started_at + 5 + 10 * i) for i, (user, bot) in enumerate(said))
    summary = SessionSummary(
        stt_seconds=3.0,
        stt_latency_ms=300.0,
        llm_latency_ms=10.0,
        tts_latency_ms=200.0,
        total_latency_ms=1500.0,
        p50_latency_ms=1500.0,
        p95_latency_ms=1501.0,
        interruptions=0,
        errors=0,
        usage=Usage(100 * len(said), 20 * len(said), 0, 0, 50),
        turn_records=records,
    )
    end = info.end_row(summary, ended_at=info.started_at + 10 * len(said) + 10, end_reason="client_stop")
    return end, [turn_row(info, r) for r in records]


SAID = [("What should I cook for dinner?", "Try a mushroom risotto."), ("And dessert?", "Poached pears.")]


def test_rows_carry_the_text_only_for_agents_that_keep_transcripts():
    assert SessionInfo.__dataclass_fields__["store_transcripts"].default is False  # opt-in
    _, with_text = conversation(session_info(store=True), SAID)
    _, without = conversation(session_info(store=False), SAID)
    assert [(r["user_text"], r["bot_text"]) for r in with_text] == SAID
    assert all("user_text" not in r and "bot_text" not in r for r in without)
    assert [r["user_text_chars"] for r in without] == [len(u) for u, _ in SAID]


# --- the SQLite store ------------------------------------------------------------------------------------------


async def write_conversations(sink, conversations) -> None:
    for end, turns in conversations:
        await sink.write(SESSIONS, INSERT, [end])
        await sink.write(TURNS, INSERT, turns)


async def test_sqlite_stores_the_text_and_retention_clears_only_old_text(tmp_path):
    db = tmp_path / "atlas.sqlite3"
    now = time.time()
    old = session_info(store=True, started_at=now - 40 * DAY)
    new = session_info(store=True, started_at=now - 3600)
    plain = session_info(store=False, started_at=now - 40 * DAY)
    sink = SQLiteSink(db)
    await write_conversations(sink, [conversation(info, SAID) for info in (old, new, plain)])
    turns = await sink.fetch_turns(old.id)
    assert [(t["turn_index"], t["user_text"], t["bot_text"]) for t in turns] == [
        (i, u, b) for i, (u, b) in enumerate(SAID)
    ]
    assert [t["user_text"] for t in await sink.fetch_turns(plain.id)] == [None, None]
    assert (await sink.fetch_session(new.id))["turns_count"] == 2
    assert await sink.fetch_session(str(uuid.uuid4())) is None
    with pytest.raises(PermanentWriteError):  # the column's bound
        await sink.write(
            TURNS, INSERT, [{**turns[0], "id": str(uuid.uuid4()), "turn_index": 9, "bot_text": "x" * 4001}]
        )
    await sink.close()

    recorder = Recorder(
        SQLiteSink(db), tmp_path / "outbox.sqlite3", transcript_retention_secs=30 * DAY, retention_first_secs=0
    )
    await recorder.start()  # a retention pass runs `retention_first_secs` after start (0 here)
    deadline = time.monotonic() + 10
    while recorder.retention_passes < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert (recorder.retention_passes, recorder.transcripts_cleared) == (1, 2)
    assert await recorder.clear_old_transcripts() == 0  # nothing left to clear
    await recorder.close()

    sink = SQLiteSink(db)
    assert [(t["user_text"], t["bot_text"]) for t in await sink.fetch_turns(old.id)] == [(None, None)] * 2
    assert [t["user_text_chars"] for t in await sink.fetch_turns(old.id)] == [len(u) for u, _ in SAID]  # kept
    assert [(t["user_text"], t["bot_text"]) for t in await sink.fetch_turns(new.id)] == SAID
    # any ISO 8601 form of the time is compared as a time
    assert await sink.clear_transcripts(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 60))) == 2
    await sink.close()


async def test_a_failed_retention_pass_is_logged_and_never_raised(tmp_path):
    db = tmp_path / "atlas.sqlite3"
    db.mkdir()  # not a file SQLite can open
    recorder = Recorder(SQLiteSink(db), tmp_path / "outbox.sqlite3", transcript_retention_secs=DAY)
    assert await recorder.clear_old_transcripts() is None
    assert (recorder.retention_failures, recorder.retention_passes) == (1, 0)
    await recorder.close()
    kept = Recorder(SQLiteSink(db), tmp_path / "o2.sqlite3", transcript_retention_secs=0)  # 0: kept forever
    assert await kept.clear_old_transcripts() is None and kept.retention_failures == 0
    await kept.close()


async def test_an_older_sqlite_file_gets_the_text_columns(tmp_path):
    db = tmp_path / "old.sqlite3"
    schema = (REPO / "storage" / "sqlite_schema.sql").read_text()
    old_schema = "\n".join(
        line for line in schema.splitlines() if not line.strip().startswith(("user_text ", "bot_text "))
    )
    with sqlite3.connect(db) as conn:
        conn.executescript(old_schema)
        assert "user_text" not in {r[1] for r in conn.execute("pragma table_info(voice_turns)")}
    info = session_info(store=True)
    sink = SQLiteSink(db)
    await write_conversations(sink, [conversation(info, SAID)])
    assert [t["bot_text"] for t in await sink.fetch_turns(info.id)] == [b for _, b in SAID]
    with pytest.raises(PermanentWriteError):  # the bound holds on an altered file too
        await sink.write(TURNS, INSERT, [turn_row(info, turn_record(5, "x" * 4001, "", time.time()))])
    await sink.close()


# --- Postgres (the migrations as they ship), through the PostgREST-compatible endpoint ------------------------


@pytest.fixture(scope="module")
def stack():
    s = Stack().start()
    yield s
    s.stop()


def test_the_migration_adds_bounded_nullable_text_columns_with_comments(stack):
    columns = dict(
        stack.pg.execute(
            "select column_name, data_type || ':' || is_nullable from information_schema.columns "
            "where table_schema = 'public' and table_name = 'voice_turns' and column_name in ('user_text', 'bot_text')"
        )
    )
    assert columns == {"user_text": "text:YES", "bot_text": "text:YES"}
    comments = stack.pg.execute(
        "select col_description('public.voice_turns'::regclass, attnum) from pg_attribute "
        "where attrelid = 'public.voice_turns'::regclass and attname in ('user_text', 'bot_text')"
    )
    assert len(comments) == 2 and all("store_transcripts" in c[0] for c in comments)


async def test_postgres_keeps_the_text_bounded_and_each_user_reads_only_their_own(stack):
    sink = SupabaseSink(stack.api.url, stack.api.service_key)
    mine = session_info(store=True, user_id=str(stack.user_a))
    theirs = session_info(store=True, user_id=str(stack.user_b))
    await write_conversations(
        sink, [conversation(mine, SAID), conversation(theirs, [("My secret plan", "I will keep it.")])]
    )
    _, turns = conversation(mine, SAID)
    with pytest.raises(PermanentWriteError, match="23514"):  # the CHECK: at most 4000 characters
        await sink.write(
            TURNS, INSERT, [{**turns[0], "id": str(uuid.uuid4()), "turn_index": 7, "user_text": "é" * 4001}]
        )
    assert (await sink.fetch_turns(mine.id))[1]["bot_text"] == "Poached pears."
    await sink.close()

    sb, http = await supabase_client(stack, stack.api.anon_key, stack.api.user_token(stack.user_a))
    try:
        rows = (await sb.table(TURNS).select("session_id,user_id,user_text,bot_text").execute()).data
        assert {r["user_id"] for r in rows} == {str(stack.user_a)}
        assert [(r["user_text"], r["bot_text"]) for r in rows if r["session_id"] == mine.id] == SAID
        for column in ("user_text", "bot_text"):  # B's text is not readable, even by asking for it
            assert (await sb.table(TURNS).select(column).eq("session_id", theirs.id).execute()).data == []
            found = await sb.table(TURNS).select("session_id").ilike(column, "%secret%").execute()
            assert found.data == []
        # nor writable: no update policy, for B's rows or A's own (RLS leaves no row to update)
        for sid in (theirs.id, mine.id):
            assert (await sb.table(TURNS).update({"user_text": "changed"}).eq("session_id", sid).execute()).data == []
    finally:
        await http.aclose()
    anon, http = await supabase_client(stack, stack.api.anon_key)
    try:
        assert (await anon.table(TURNS).select("user_text").execute()).data == []
    finally:
        await http.aclose()
    texts = stack.pg.execute(
        "select user_text, bot_text from voice_turns where session_id in (%s, %s) order by session_id = %s, turn_index",
        [mine.id, theirs.id, mine.id],
    )
    assert texts == [("My secret plan", "I will keep it."), *SAID]


async def test_retention_through_the_supabase_sink_clears_only_old_text(stack, tmp_path):
    now = time.time()
    old = session_info(store=True, user_id=str(stack.user_a), started_at=now - 40 * DAY)
    new = session_info(store=True, user_id=str(stack.user_a), started_at=now - 3600)
    plain = session_info(store=False, started_at=now - 40 * DAY)
    sink = SupabaseSink(stack.api.url, stack.api.service_key)
    await write_conversations(sink, [conversation(info, SAID) for info in (old, new, plain)])
    await sink.close()
    before = iso(now - 30 * DAY)
    expected = stack.pg.execute(
        "select count(*) from voice_turns where created_at < %s and (user_text is not null or bot_text is not null)",
        [before],
    )[0][0]
    assert expected >= 2

    recorder = Recorder(
        SupabaseSink(stack.api.url, stack.api.service_key),
        tmp_path / "outbox.sqlite3",
        transcript_retention_secs=30 * DAY,
        retention_first_secs=0,
    )
    await recorder.start()
    deadline = time.monotonic() + 10
    while recorder.retention_passes < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert recorder.transcripts_cleared == expected
    patch = [r for r in stack.api.requests if r.method == "PATCH" and "/voice_turns" in r.path][-1]
    assert patch.status == 204  # return=minimal: the count came in Content-Range, no row did
    assert await recorder.clear_old_transcripts() == 0
    await recorder.close()

    def texts(sid: str):
        return stack.pg.execute(
            "select user_text, bot_text, user_text_chars from voice_turns where session_id = %s order by turn_index",
            [sid],
        )

    assert texts(old.id) == [(None, None, len(u)) for u, _ in SAID]
    assert texts(new.id) == [(u, b, len(u)) for u, b in SAID]
    assert texts(plain.id) == [(None, None, len(u)) for u, _ in SAID]


# --- atlas-voice export ----------------------------------------------------------------------------------------


def export(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "ATLAS_"))}
    return subprocess.run(
        [str(REPO / ".venv" / "bin" / "atlas-voice"), "export", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **env},
    )


@pytest.fixture
def sqlite_store(tmp_path):
    """A SQLite store with a session that kept its transcript, one that did not, and one past retention."""
    db = tmp_path / "atlas.sqlite3"
    started = time.time() - 3600
    kept = session_info(store=True, started_at=started)
    plain = session_info(store=False, started_at=started)
    expired = session_info(store=True, started_at=time.time() - 40 * DAY)

    async def fill():
        sink = SQLiteSink(db)
        await write_conversations(sink, [conversation(i, SAID) for i in (kept, plain, expired)])
        await sink.clear_transcripts(iso(time.time() - 30 * DAY))
        await sink.close()

    asyncio.run(fill())
    return {"ATLAS_SQLITE_PATH": str(db)}, kept, plain, expired


def test_export_writes_json_and_text(sqlite_store, tmp_path):
    env, kept, _, _ = sqlite_store
    proc = export(env, "--session", kept.id)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["session"]["id"] == kept.id and doc["session"]["transport"] == "websocket"
    assert doc["session"]["turns_count"] == 2 and "ip_address" not in doc["session"]
    assert doc["turns"] == [
        {
            "turn": i,
            "user": u,
            "bot": b,
            "created_at": iso(kept.started_at + 5 + 10 * i),
            "voice_to_voice_ms": 1500 + i,
        }
        for i, (u, b) in enumerate(SAID)
    ]

    out = tmp_path / "dinner.txt"
    proc = export(env, "--session", kept.id.upper(), "--format", "text", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout
    lines = out.read_text().splitlines()
    assert lines[0].startswith(f"# Atlas Voice session {kept.id} (websocket), ") and lines[0].endswith("2 turns")

    # times in UTC: when the caller stopped, when the reply's first audio went out (dates too for a session
    # across midnight UTC)
    span = [kept.started_at, kept.started_at + 30]
    stamp = "%H:%M:%S" if len({time.gmtime(t)[:3] for t in span}) == 1 else "%Y-%m-%d %H:%M:%S"

    def at(ts: float) -> str:
        return time.strftime(stamp, time.gmtime(ts))

    t0 = kept.started_at + 5
    assert lines[1:] == [
        f"[{at(t0 - 0.9)}] User: What should I cook for dinner?",
        f"[{at(t0 + 0.6)}] Atlas: Try a mushroom risotto.",
        f"[{at(t0 + 10 - 0.9)}] User: And dessert?",
        f"[{at(t0 + 10 + 0.6)}] Atlas: Poached pears.",
    ]


def test_export_errors_say_why_with_exit_code_2(sqlite_store, tmp_path):
    env, _, plain, expired = sqlite_store
    unknown = str(uuid.uuid4())
    cases = {
        unknown: f"no session {unknown} in sqlite {env['ATLAS_SQLITE_PATH']}",
        plain.id: f"session {plain.id} has no stored transcript (its agent does not set store_transcripts)",
        expired.id: f"session {expired.id} has no stored transcript (its text was cleared after "
        "ATLAS_TRANSCRIPT_RETENTION_DAYS=30 days)",
        "not-a-session": "invalid session id 'not-a-session'",
    }
    for session_id, message in cases.items():
        proc = export(env, "--session", session_id)
        assert proc.returncode == 2, (session_id, proc.stdout, proc.stderr)
        assert message in proc.stderr and proc.stdout == ""
    # a store that does not exist yet is not created by asking
    missing = tmp_path / "none" / "atlas.sqlite3"
    proc = export({"ATLAS_SQLITE_PATH": str(missing)}, "--session", unknown)
    assert proc.returncode == 2 and f"no session {unknown} in sqlite {missing}" in proc.stderr
    assert not missing.parent.exists()
    assert export(env, "--session", unknown, "--format", "xml").returncode == 2  # argparse's choices


def test_export_reads_supabase_too(stack):
    info = session_info(store=True, user_id=str(stack.user_b))

    async def fill():
        sink = SupabaseSink(stack.api.url, stack.api.service_key)
        await write_conversations(sink, [conversation(info, SAID)])
        await sink.close()

    asyncio.run(fill())
    env = {"SUPABASE_URL": stack.api.url, "SUPABASE_SERVICE_ROLE_KEY": stack.api.service_key}
    proc = export(env, "--session", info.id)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["session"]["user_id"] == str(stack.user_b)
    assert [(t["user"], t["bot"]) for t in doc["turns"]] == SAID
    assert [t["created_at"] for t in doc["turns"]] == [iso(info.started_at + 5 + 10 * i) for i in range(2)]
    unknown = str(uuid.uuid4())
    proc = export(env, "--session", unknown)
    assert proc.returncode == 2 and f"no session {unknown} in supabase 127.0.0.1" in proc.stderr


# --- end to end: a server, an agent that keeps transcripts, the SQLite store, then the export ------------------


async def test_a_conversation_with_an_agent_that_keeps_transcripts(vendors, llm_record, speech, artifacts, tmp_path):
    """Two spoken turns to a server on the fake vendors (ElevenLabs: word-timed text) with an agent that sets
    store_transcripts: each turn row holds what the client was told the caller said and what it was sent of the
    reply, and `atlas-voice export` gives them back."""
    from app.talk import VoiceClient
    from tests.conftest import cloud_env, reset_vendors
    from tests.helpers import recorded, running_server

    reset_vendors(vendors)
    agents = tmp_path / "agents.toml"
    agents.write_text("[agents.keeper]\nstore_transcripts = true\n")
    store = {"ATLAS_SQLITE_PATH": str(tmp_path / "atlas.sqlite3")}
    env = {
        **cloud_env(vendors, llm_record, "elevenlabs"),
        **store,
        "ATLAS_OUTBOX_PATH": str(tmp_path / "outbox.sqlite3"),
        "ATLAS_AGENT_CONFIG": str(agents),
    }
    with running_server(env, artifacts / "server_transcripts.log") as base:
        client = VoiceClient(base.replace("http://", "ws://") + "/ws", user_id="transcripts")
        await client.connect()
        await client.send_silence(0.3)
        for name in ("puppy", "dinner"):
            await client.say(speech[name])
            await client.wait_reply_done(timeout=60)
        end = await client.stop()
        sink = SQLiteSink(tmp_path / "atlas.sqlite3")
        _, rows = await recorded(sink, end["sessionId"], 2)
        await sink.close()

    # what the client was sent, turn by turn: its final transcripts, then the reply's bot_transcript pieces
    heard: list[dict[str, list[str]]] = []
    for event in client.events:
        if event["type"] == "final_transcript":
            if not heard or heard[-1]["bot"]:
                heard.append({"user": [], "bot": []})
            heard[-1]["user"].append(event["text"])
        elif event["type"] == "bot_transcript" and heard:
            heard[-1]["bot"].append(event["text"])
    rows.sort(key=lambda r: r["turn_index"])
    assert len(rows) == len(heard) == 2
    for row, sent in zip(rows, heard, strict=True):
        assert row["user_text"] == " ".join(sent["user"]) and row["user_text_chars"] == len(row["user_text"])
        assert row["bot_text"] == " ".join(sent["bot"]) and len(row["bot_text"]) > 10
        assert row["bot_text_chars"] == len(row["bot_text"])

    proc = export(store, "--session", end["sessionId"])
    assert proc.returncode == 0, proc.stderr
    assert [(t["user"], t["bot"]) for t in json.loads(proc.stdout)["turns"]] == [
        (r["user_text"], r["bot_text"]) for r in rows
    ]
