"""The admin dashboard, `atlas-voice report` and the analytics behind both, against a seeded SQLite store.

Every expected figure is computed independently: SQL run directly on the SQLite file (sums,
counts, groupings) and numpy's percentiles, never through monitoring/analytics.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi.testclient import TestClient

from app.admin import admin_router
from config.settings import Settings
from monitoring.analytics import STAGES, parse_since, percentile, summarize
from storage.records import FEEDBACK, SESSIONS, TURNS, iso
from storage.sinks import SQLiteSink
from tests.helpers import REPO, free_port

TOKEN = "test-admin-token-7f3a"
HOUR = 3600.0
ERROR_CODES = ["LLM_UNAVAILABLE", "TTS_FALLBACK", "PIPELINE_ERROR"]


# --- the seeded store ----------------------------------------------------------------------------

# (hours before now, transport, turns, turns with an error, interruptions, rates, ended)
DEEPGRAM_HAIKU_11LABS = {
    "stt_usd_per_minute": 0.0077,
    "llm_input_usd_per_mtok": 1.0,
    "llm_output_usd_per_mtok": 5.0,
    "llm_cache_read_usd_per_mtok": 0.1,
    "llm_cache_write_usd_per_mtok": 1.25,
    "tts_usd_per_kchar": 0.05,
}
DEEPGRAM_ONLY = {
    "stt_usd_per_minute": 0.0077,
    "llm_input_usd_per_mtok": 0.0,
    "llm_output_usd_per_mtok": 0.0,
    "llm_cache_read_usd_per_mtok": 0.0,
    "llm_cache_write_usd_per_mtok": 0.0,
    "tts_usd_per_kchar": 0.0,
}
HAIKU_PLAYHT = {
    "stt_usd_per_minute": 0.0,
    "llm_input_usd_per_mtok": 1.0,
    "llm_output_usd_per_mtok": 5.0,
    "llm_cache_read_usd_per_mtok": 0.0,
    "llm_cache_write_usd_per_mtok": 0.0,
    "tts_usd_per_kchar": 0.03,
}
LOCAL = dict.fromkeys(DEEPGRAM_ONLY, 0.0)
PLAN = [
    (40 * 24.0, "websocket", 2, 0, 0, DEEPGRAM_HAIKU_11LABS, True),  # outside 30d
    (50.0, "websocket", 3, 0, 1, DEEPGRAM_HAIKU_11LABS, True),
    (47.5, "twilio", 4, 1, 0, DEEPGRAM_ONLY, True),
    (30.0, "daily", 6, 0, 2, HAIKU_PLAYHT, True),
    (26.0, "websocket", 2, 0, 0, LOCAL, True),
    (20.0, "websocket", 5, 2, 1, DEEPGRAM_HAIKU_11LABS, True),
    (10.0, "twilio", 3, 1, 0, HAIKU_PLAYHT, True),
    (3.0, "websocket", 4, 0, 1, DEEPGRAM_HAIKU_11LABS, True),
    (1.2, "daily", 2, 0, 0, DEEPGRAM_ONLY, True),
    (0.3, "websocket", 2, 1, 0, DEEPGRAM_HAIKU_11LABS, False),  # in progress: no usage yet
]


# Ratings of the plan's sessions (by index): (rating, comment)
RATINGS = {
    1: (5, "Quick and friendly."),
    2: (2, "It cut me off twice."),
    3: (4, None),
    5: (5, None),
    6: (1, "<b>could not hear me</b>"),  # shown as text, never as HTML
    7: (4, "Good answers."),
    8: (5, None),
}


# The rollout's variant of each session (by index): none for the first two (before the rollout began).
VARIANTS = [None, None, "control", "v2", "control", "v2", "control", "v2", "control", "v2"]


def _feedback_rows(sessions: list[dict]) -> list[dict]:
    return [
        {
            "id": sessions[k]["id"],
            "user_id": None,
            "rating": rating,
            "comment": comment,
            "created_at": sessions[k]["ended_at"],
        }
        for k, (rating, comment) in RATINGS.items()
    ]


def _seed_rows(now: float) -> tuple[list[dict], list[dict]]:
    rng = random.Random(20261121)
    sessions, turns = [], []
    for k, (hours_ago, transport, n_turns, n_errors, n_interrupts, rates, ended) in enumerate(PLAN):
        sid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        start = now - hours_ago * HOUR
        duration = 20.0 * n_turns + 15.0
        usage = {
            "stt_duration_seconds": round(rng.uniform(20, 240), 3) if ended else 0.0,
            "stt_requests": n_turns if ended else 0,
            "llm_input_tokens": rng.randint(2000, 90000) if ended else 0,
            "llm_output_tokens": rng.randint(100, 4000) if ended else 0,
            "llm_cache_read_tokens": rng.randint(0, 5000) if ended else 0,
            "llm_cache_write_tokens": rng.randint(0, 2000) if ended else 0,
            "tts_characters": rng.randint(200, 6000) if ended else 0,
        }
        session_turns = []
        error_at = set(rng.sample(range(n_turns), n_errors))
        interrupt_at = set(rng.sample(range(n_turns), n_interrupts))
        for i in range(n_turns):
            stt = rng.randint(80, 700)
            llm = rng.randint(150, 2500)
            tts = None if i in error_at and k % 2 else rng.randint(60, 900)
            v2v = None if tts is None else stt + llm + tts + rng.randint(5, 60)
            session_turns.append(
                {
                    "id": str(uuid.uuid5(uuid.UUID(sid), f"turn-{i}")),
                    "session_id": sid,
                    "user_id": None,
                    "turn_index": i,
                    "user_text_chars": rng.randint(5, 80),
                    "bot_text_chars": rng.randint(10, 400),
                    "user_stopped_at": iso(start + 20.0 * (i + 1) - 1.5),
                    "first_audio_at": iso(start + 20.0 * (i + 1)),
                    "stt_latency_ms": stt,
                    "llm_ttfb_ms": llm,
                    "tts_ttfa_ms": tts,
                    "voice_to_voice_ms": v2v,
                    "llm_input_tokens": 0,
                    "llm_output_tokens": 0,
                    "tts_characters": 0,
                    "interrupted": i in interrupt_at,
                    "error_code": ERROR_CODES[(k + i) % 3] if i in error_at else None,
                    "created_at": iso(start + 20.0 * (i + 1)),
                }
            )
        turns += session_turns
        v2vs = [t["voice_to_voice_ms"] for t in session_turns if t["voice_to_voice_ms"] is not None]
        sessions.append(
            {
                "id": sid,
                "user_id": None,
                "client_user_id": f"user-{k}",
                "conversation_id": None,
                "transport": transport,
                "started_at": iso(start),
                "ended_at": iso(start + duration) if ended else None,
                "end_reason": "client_stop" if ended else None,
                **usage,
                "llm_latency_ms": 0,
                "tts_latency_ms": 0,
                "stt_provider": "deepgram",
                "stt_model": "nova-3",
                "llm_provider": "anthropic",
                "llm_model": "claude-haiku-4-5",
                "tts_provider": "elevenlabs",
                "tts_model": "eleven_flash_v2_5",
                **rates,
                "turns_count": n_turns if ended else 0,
                "avg_latency_ms": round(sum(v2vs) / len(v2vs)) if ended and v2vs else None,
                "p95_latency_ms": round(float(np.percentile(v2vs, 95))) if ended and v2vs else None,
                "interruptions_count": n_interrupts if ended else 0,
                "errors_count": n_errors if ended else 0,
                "user_agent": "pytest",
                "ip_address": "127.0.0.1",
                **({"variant": VARIANTS[k]} if VARIANTS[k] else {}),
            }
        )
    return sessions, turns


def run(coro):
    """Run a coroutine to completion on its own loop in its own thread: works whether or not this thread
    already runs a loop (Playwright's sync API keeps one running while a browser is open)."""
    result = {}

    def target():
        try:
            result["value"] = asyncio.run(coro)
        except BaseException as e:  # re-raised in the caller
            result["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dashboard") / "atlas.sqlite3"
    sessions, turns = _seed_rows(time.time())

    async def seed():
        sink = SQLiteSink(path)
        for row in sessions:  # a write's rows share their columns (the outbox batches them so): variant or not
            await sink.write(SESSIONS, "upsert", [row])
        await sink.write(TURNS, "insert", turns)
        await sink.write(FEEDBACK, "upsert", _feedback_rows(sessions))
        await sink.close()

    run(seed())
    return path


def sql(path: Path, query: str, *args) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute(query, args).fetchall()


def one(path: Path, query: str, *args):
    return sql(path, query, *args)[0][0]


def expected_totals(path: Path, since: str | None) -> dict:
    """The headline figures straight from SQL (and numpy for percentiles)."""
    s_where, t_where, args = ("WHERE started_at >= ?", "WHERE created_at >= ?", (since,)) if since else ("", "", ())
    turns = one(path, f"SELECT COUNT(*) FROM voice_turns {t_where}", *args)
    errors = one(
        path, f"SELECT COUNT(*) FROM voice_turns {t_where} {'AND' if since else 'WHERE'} error_code IS NOT NULL", *args
    )
    v2v = [r[0] for r in sql(path, f"SELECT voice_to_voice_ms FROM voice_turns {t_where}", *args) if r[0] is not None]
    return {
        "sessions": one(path, f"SELECT COUNT(*) FROM voice_sessions {s_where}", *args),
        "sessions_active": one(
            path, f"SELECT COUNT(*) FROM voice_sessions {s_where} {'AND' if since else 'WHERE'} ended_at IS NULL", *args
        ),
        "turns": turns,
        "total_cost_usd": one(path, f"SELECT COALESCE(SUM(cost_usd), 0) FROM voice_sessions {s_where}", *args),
        "avg_cost_per_session_usd": one(
            path,
            f"SELECT AVG(cost_usd) FROM voice_sessions {s_where} {'AND' if since else 'WHERE'} ended_at IS NOT NULL",
            *args,
        ),
        "errors": errors,
        "error_rate": errors / turns if turns else None,
        "interruptions": one(path, f"SELECT COALESCE(SUM(interrupted), 0) FROM voice_turns {t_where}", *args),
        "audio_minutes": one(
            path, f"SELECT COALESCE(SUM(stt_duration_seconds), 0) / 60.0 FROM voice_sessions {s_where}", *args
        ),
        "v2v_p50": float(np.percentile(v2v, 50)) if v2v else None,
        "v2v_p95": float(np.percentile(v2v, 95)) if v2v else None,
        "ratings": one(path, f"SELECT COUNT(*) FROM voice_feedback {t_where}", *args),
        "satisfaction_rate": one(
            path, f"SELECT AVG(CASE WHEN rating >= 4 THEN 1.0 ELSE 0.0 END) FROM voice_feedback {t_where}", *args
        ),
        "issue_rate": one(
            path, f"SELECT AVG(CASE WHEN rating <= 2 THEN 1.0 ELSE 0.0 END) FROM voice_feedback {t_where}", *args
        ),
    }


def expected_variants(path: Path) -> dict[str, dict]:
    """The rollout comparison straight from SQL (numpy for the percentiles)."""
    out = {}
    for (variant,) in sql(path, "SELECT DISTINCT variant FROM voice_sessions WHERE variant IS NOT NULL"):
        v2v = [
            r[0]
            for r in sql(
                path,
                "SELECT t.voice_to_voice_ms FROM voice_turns t JOIN voice_sessions s ON s.id = t.session_id "
                "WHERE s.variant = ? AND t.voice_to_voice_ms IS NOT NULL",
                variant,
            )
        ]
        turns, errors = sql(
            path,
            "SELECT COUNT(*), SUM(t.error_code IS NOT NULL) FROM voice_turns t JOIN voice_sessions s "
            "ON s.id = t.session_id WHERE s.variant = ?",
            variant,
        )[0]
        ratings, satisfied, issues = sql(
            path,
            "SELECT COUNT(*), SUM(f.rating >= 4), SUM(f.rating <= 2) FROM voice_feedback f "
            "JOIN voice_sessions s ON s.id = f.id WHERE s.variant = ?",
            variant,
        )[0]
        out[variant] = {
            "sessions": one(path, "SELECT COUNT(*) FROM voice_sessions WHERE variant = ?", variant),
            "v2v_p50": float(np.percentile(v2v, 50)),
            "v2v_p95": float(np.percentile(v2v, 95)),
            "error_rate": errors / turns,
            "cost": one(
                path, "SELECT AVG(cost_usd) FROM voice_sessions WHERE variant = ? AND ended_at IS NOT NULL", variant
            ),
            "satisfaction_rate": satisfied / ratings if ratings else None,
            "issue_rate": issues / ratings if ratings else None,
            "ratings": ratings,
        }
    return out


async def _fetch_all(path: Path, since: str | None):
    sink = SQLiteSink(path)
    try:
        return await sink.fetch(SESSIONS, since), await sink.fetch(TURNS, since)
    finally:
        await sink.close()


def fetch_all(path: Path, since: str | None = None):
    return run(_fetch_all(path, since))


# --- 1. analytics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 7, 20, 101])
def test_percentile_matches_numpy(n):
    rng = np.random.default_rng(n)
    values = rng.integers(50, 5000, n).tolist()
    for q in (0, 5, 50, 90, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), abs=1e-9)
    assert percentile([], 50) is None


def test_parse_since():
    now = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    assert parse_since("24h", now) == "2026-11-20T12:00:00.000000+00:00"
    assert parse_since("7d", now) == "2026-11-14T12:00:00.000000+00:00"
    assert parse_since("90m", now) == "2026-11-21T10:30:00.000000+00:00"
    assert parse_since("1w", now) == parse_since("7d", now)
    assert parse_since("all", now) is None and parse_since("", now) is None and parse_since(None, now) is None
    assert parse_since("2026-11-20T08:00:00Z") == "2026-11-20T08:00:00.000000+00:00"
    assert parse_since("2026-11-20T10:00:00+02:00") == "2026-11-20T08:00:00.000000+00:00"
    assert parse_since("2026-11-20") == "2026-11-20T00:00:00.000000+00:00"
    for bad in ("yesterday", "24x", "-3h", "2026-13-01"):
        with pytest.raises(ValueError):
            parse_since(bad, now)


def test_summarize_empty_input():
    s = summarize([], [])
    t = s["totals"]
    assert t["sessions"] == t["turns"] == t["errors"] == t["interruptions"] == 0
    assert t["total_cost_usd"] == 0 and t["audio_minutes"] == 0
    assert t["avg_cost_per_session_usd"] is None and t["error_rate"] is None
    assert all(v == {"count": 0, "mean": None, "p50": None, "p95": None} for v in s["stages"].values())
    assert s["series"] == s["cost_per_day"] == s["errors_by_code"] == s["recent_sessions"] == s["session_costs"] == []
    json.dumps(s)  # JSON-ready


@pytest.mark.parametrize("window", [None, "24h", "7d"])
def test_summary_totals_match_sql(store, window):
    since = parse_since(window)
    sessions, turns = fetch_all(store, since)
    got = summarize(sessions, turns, since=since)
    want = expected_totals(store, since)
    t = got["totals"]
    for key in ("sessions", "sessions_active", "turns", "errors", "interruptions"):
        assert t[key] == want[key], key
    for key in ("total_cost_usd", "avg_cost_per_session_usd", "error_rate", "audio_minutes"):
        assert t[key] == pytest.approx(want[key], rel=1e-9), key
    assert got["stages"]["voice_to_voice"]["p50"] == pytest.approx(want["v2v_p50"])
    assert got["stages"]["voice_to_voice"]["p95"] == pytest.approx(want["v2v_p95"])
    assert t["sessions"] > 0 and t["errors"] > 0 and t["total_cost_usd"] > 0
    json.dumps(got)


def test_summary_stages_days_errors_and_series_match_sql(store):
    sessions, turns = fetch_all(store)
    got = summarize(sessions, turns, bucket="hour")
    for stage, column in STAGES.items():
        values = [r[0] for r in sql(store, f"SELECT {column} FROM voice_turns WHERE {column} IS NOT NULL")]
        assert got["stages"][stage]["count"] == len(values)
        assert got["stages"][stage]["p50"] == pytest.approx(float(np.percentile(values, 50)))
        assert got["stages"][stage]["p95"] == pytest.approx(float(np.percentile(values, 95)))
    assert got["stages"]["tts_ttfa"]["count"] < got["stages"]["stt"]["count"]  # None values are left out

    days = sql(store, "SELECT substr(started_at, 1, 10), COUNT(*), SUM(cost_usd) FROM voice_sessions GROUP BY 1")
    nonzero = [d for d in got["cost_per_day"] if d["sessions"]]
    assert [(d["day"], d["sessions"]) for d in nonzero] == [(d, n) for d, n, _ in days]
    for d, (_, _, cost) in zip(nonzero, days, strict=False):
        assert d["cost_usd"] == pytest.approx(cost, rel=1e-9)
    assert len(got["cost_per_day"]) >= 40  # empty days between the old session and the rest are filled

    codes = sql(
        store, "SELECT error_code, COUNT(*) FROM voice_turns WHERE error_code IS NOT NULL GROUP BY 1 ORDER BY 2 DESC, 1"
    )
    assert [(e["code"], e["count"]) for e in got["errors_by_code"]] == codes

    # Hourly series: every hour with turns has that hour's percentiles, per stage.
    by_hour = {}
    for hour, v2v in sql(store, "SELECT substr(created_at, 1, 13), voice_to_voice_ms FROM voice_turns"):
        by_hour.setdefault(hour, []).append(v2v)
    series = {b["start"][:13]: b for b in got["series"]}
    for hour, values in by_hour.items():
        b = series[hour]
        assert b["turns"] == len(values)
        values = [v for v in values if v is not None]
        assert b["p95"]["voice_to_voice"] == (pytest.approx(float(np.percentile(values, 95))) if values else None)
    session_hours = dict(sql(store, "SELECT substr(started_at, 1, 13), COUNT(*) FROM voice_sessions GROUP BY 1"))
    assert {h: b["sessions"] for h, b in series.items() if b["sessions"]} == session_hours
    assert sum(b["cost_usd"] for b in got["series"]) == pytest.approx(
        one(store, "SELECT SUM(cost_usd) FROM voice_sessions")
    )

    recent = got["recent_sessions"]
    assert [r["id"] for r in recent] == [
        r[0] for r in sql(store, "SELECT id FROM voice_sessions ORDER BY started_at DESC")
    ]
    assert recent[0]["ended_at"] is None and recent[0]["cost_usd"] == 0


def test_bucket_is_chosen_from_the_span(store):
    sessions, turns = fetch_all(store)
    assert summarize(sessions, turns)["bucket"] == "day"  # 40 days of data
    since = parse_since("24h")
    s24, t24 = fetch_all(store, since)
    assert summarize(s24, t24, since=since)["bucket"] == "hour"
    since = parse_since("7d")
    s7, t7 = fetch_all(store, since)
    daily = summarize(s7, t7, since=since)
    assert daily["bucket"] == "day"
    assert all(b["start"].endswith("T00:00:00.000000+00:00") for b in daily["series"])


# --- 2. atlas-voice report -------------------------------------------------------------------------


def _report_env(store: Path, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "ATLAS_"))}
    env.update(ATLAS_SQLITE_PATH=str(store), ATLAS_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    return env


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_prints_the_figures_and_writes_a_png(store, tmp_path):
    png = tmp_path / "out" / "x.png"
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "report", "--since", "7d", "--png", str(png)],
        cwd=REPO,
        env=_report_env(store, tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    # The command's own window; no row is near the 7-day edge, so a since computed here selects the same rows.
    want = expected_totals(store, parse_since("7d"))

    def figure(label: str) -> str:
        m = re.search(rf"^\s+{re.escape(label)}\s+(\S+)", out, re.MULTILINE)
        assert m, f"{label!r} missing from:\n{out}"
        return m.group(1)

    assert int(figure("Sessions")) == want["sessions"]
    assert int(figure("Turns")) == want["turns"]
    assert float(figure("Total cost").lstrip("$")) == pytest.approx(want["total_cost_usd"], abs=5e-7)
    assert float(figure("Avg cost / session").lstrip("$")) == pytest.approx(want["avg_cost_per_session_usd"], abs=5e-7)
    assert int(figure("Errors")) == want["errors"]
    assert float(figure("Error rate").rstrip("%")) == pytest.approx(want["error_rate"] * 100, abs=0.005)
    assert int(figure("Interruptions")) == want["interruptions"]
    assert float(figure("Audio minutes")) == pytest.approx(want["audio_minutes"], abs=0.005)
    assert float(figure("Satisfied").rstrip("%")) == pytest.approx(want["satisfaction_rate"] * 100, abs=0.005)
    assert f"of {want['ratings']} ratings" in out
    for name, v in expected_variants(store).items():
        m = re.search(
            rf"^\s+{name}\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)%\s+\$([\d.]+)\s+(\S+)\s+(\S+)\s+(\d+)$", out, re.M
        )
        assert m, (name, out)
        assert int(m.group(1)) == v["sessions"] and int(m.group(8)) == v["ratings"]
        assert float(m.group(2)) == pytest.approx(v["v2v_p50"], abs=0.05)
        assert float(m.group(3)) == pytest.approx(v["v2v_p95"], abs=0.05)
        assert float(m.group(4)) == pytest.approx(v["error_rate"] * 100, abs=0.005)
        assert float(m.group(5)) == pytest.approx(v["cost"], abs=5e-7)
    assert float(figure("Reported an issue").rstrip("%")) == pytest.approx(want["issue_rate"] * 100, abs=0.005)

    v2v = re.search(r"^\s+voice_to_voice\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", out, re.MULTILINE)
    assert v2v, out
    assert float(v2v.group(2)) == pytest.approx(want["v2v_p50"], abs=0.05)
    assert float(v2v.group(3)) == pytest.approx(want["v2v_p95"], abs=0.05)

    since = parse_since("7d")
    for day, n, cost in sql(
        store,
        "SELECT substr(started_at, 1, 10), COUNT(*), SUM(cost_usd) FROM voice_sessions "
        "WHERE started_at >= ? GROUP BY 1",
        since,
    ):
        m = re.search(rf"^\s+{day}\s+(\d+)\s+\$([\d.]+)$", out, re.MULTILINE)
        assert m, (day, out)
        assert int(m.group(1)) == n and float(m.group(2)) == pytest.approx(cost, abs=5e-7)
    for code, n in sql(
        store,
        "SELECT error_code, COUNT(*) FROM voice_turns WHERE created_at >= ? AND error_code IS NOT NULL GROUP BY 1",
        since,
    ):
        assert re.search(rf"^\s+{code}\s+{n}$", out, re.MULTILINE), (code, out)

    assert f"Chart: {png.resolve()}" in out
    assert _png_size(png) == (1000, 1000)
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[:2] == (1000, 1000)
    assert "Pipecat" not in proc.stderr  # no start-up banner in a report


def test_report_defaults_and_empty_ranges(store, tmp_path):
    env = _report_env(store, tmp_path)
    # Default PNG path: ./report.png in the working directory.
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "report", "--since", "all", "--bucket", "day"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Chart: {tmp_path / 'report.png'}" in proc.stdout
    assert _png_size(tmp_path / "report.png") == (1000, 1000)
    assert re.search(rf"^\s+Sessions\s+{len(PLAN)}\s", proc.stdout, re.MULTILINE)

    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "report", "--since", "2099-01-01", "--png", str(tmp_path / "none.png")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no sessions since 2099-01-01T00:00:00.000000+00:00" in proc.stdout
    assert not (tmp_path / "none.png").exists()

    missing = tmp_path / "never" / "atlas.sqlite3"
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "report"],
        cwd=REPO,
        env={**env, "ATLAS_SQLITE_PATH": str(missing)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no sessions since" in proc.stdout and "does not exist" in proc.stdout
    assert not missing.exists()

    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "report", "--since", "soon"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "since='soon'" in proc.stderr


# --- 3. the HTTP API -------------------------------------------------------------------------------


class BrokenSink:
    name = "broken"

    async def fetch(self, table, since=None):
        raise ConnectionError("db.internal:5432 refused the connection")


def _app(sink_factory, token: str | None) -> FastAPI:
    app = FastAPI()
    app.include_router(admin_router(sink_factory, Settings(admin_token=token)))
    app.mount("/static", StaticFiles(directory=REPO / "web"), name="static")
    return app


@pytest.fixture(scope="module")
def server_sink(store):
    sink = SQLiteSink(store)
    yield sink
    run(sink.close())


def test_api_auth(server_sink):
    client = TestClient(_app(lambda: server_sink, TOKEN))
    for kwargs in (
        {},
        {"params": {"token": "wrong"}},
        {"headers": {"Authorization": "Bearer wrong"}},
        {"headers": {"Authorization": f"Basic {TOKEN}"}},
        {"params": {"token": TOKEN[:-1]}},
    ):
        r = client.get("/api/dashboard", **kwargs)
        assert r.status_code == 401, kwargs
        assert r.json()["type"] == "error" and r.json()["code"] == "ADMIN_AUTH_FAILED"
        assert TOKEN not in r.text and "wrong" not in r.text
        assert r.headers["www-authenticate"] == "Bearer"
    ok_header = client.get("/api/dashboard", headers={"Authorization": f"Bearer {TOKEN}"}, params={"since": "all"})
    ok_query = client.get("/api/dashboard", params={"token": TOKEN, "since": "all"})
    assert ok_header.status_code == ok_query.status_code == 200
    assert ok_header.json()["totals"]["sessions"] == len(PLAN)
    assert TOKEN not in ok_header.text
    assert ok_header.headers["cache-control"] == "no-store"

    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = client.get("/api/dashboard", headers=auth, params={"since": "yesterday"})
    assert r.status_code == 400 and r.json()["code"] == "INVALID_FIELD"
    r = client.get("/api/dashboard", headers=auth, params={"bucket": "week"})
    assert r.status_code == 400 and r.json()["code"] == "INVALID_FIELD"
    r = client.get("/api/dashboard", headers=auth, params={"since": "all", "bucket": "hour"})
    assert r.status_code == 200 and r.json()["bucket"] == "hour"

    page = client.get("/dashboard")
    assert page.status_code == 200 and "/static/dashboard.js" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]


def test_api_disabled_without_admin_token(server_sink):
    client = TestClient(_app(lambda: server_sink, None))
    for path in ("/api/dashboard", "/dashboard"):
        for kwargs in ({}, {"params": {"token": TOKEN}}, {"headers": {"Authorization": f"Bearer {TOKEN}"}}):
            r = client.get(path, **kwargs)
            assert r.status_code == 404
            body = r.json()
            assert body["code"] == "ADMIN_DISABLED" and "ATLAS_ADMIN_TOKEN" in body["message"]
    blank = TestClient(_app(lambda: server_sink, "   "))
    assert blank.get("/api/dashboard", params={"token": "   "}).status_code == 404


def test_api_store_unavailable():
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for factory in (lambda: BrokenSink(), lambda: None):
        r = TestClient(_app(factory, TOKEN)).get("/api/dashboard", headers=auth)
        assert r.status_code == 503
        assert r.json()["code"] == "STORE_UNAVAILABLE"
        assert "5432" not in r.text and TOKEN not in r.text


# --- 4. the page in headless Chromium --------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard_url(server_sink):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            _app(lambda: server_sink, TOKEN), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
        )
    )
    thread = threading.Thread(target=server.run, name="dashboard-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-sync",
                "--disable-background-networking",
                "--disable-component-update",
            ],
        )
        yield b
        b.close()


def _wait(page, expression: str, timeout: float = 10.0) -> None:
    """Poll a JS expression (page.wait_for_function evaluates strings with eval, which the page's CSP forbids)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        page.wait_for_timeout(25)


def _open(browser, url: str):
    context = browser.new_context()
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    api = []
    page.on("response", lambda r: api.append(r.status) if "/api/dashboard" in r.url else None)
    page.goto(url)
    _wait(page, "window.atlasDashboard && window.atlasDashboard.state !== 'loading'")
    return context, page, problems, api


def _value(page, testid: str) -> tuple[float | None, str]:
    loc = page.locator(f'[data-testid="{testid}"]')
    raw = loc.get_attribute("data-value")
    return (float(raw) if raw else None), loc.inner_text().strip()


def _usd_text(v: float) -> str:
    return "$" + (f"{v:.2f}" if abs(v) >= 1 else f"{v:.4f}")


def test_dashboard_page_shows_the_database_figures(browser, dashboard_url, store):
    context, page, problems, api = _open(browser, f"{dashboard_url}/dashboard?token={TOKEN}&range=all")
    try:
        assert page.evaluate("window.atlasDashboard.state") == "ready", page.inner_text("body")
        assert TOKEN not in page.url  # the token leaves the address bar
        want = expected_totals(store, None)

        checks = {
            "tile-sessions": want["sessions"],
            "tile-turns": want["turns"],
            "tile-errors": want["errors"],
            "tile-interruptions": want["interruptions"],
            "tile-sessions-active": want["sessions_active"],
        }
        for testid, n in checks.items():
            value, text = _value(page, testid)
            assert value == n, testid
            assert text.split()[0].replace(",", "") == str(n), (testid, text)
        for testid, key in (("tile-total-cost", "total_cost_usd"), ("tile-avg-cost", "avg_cost_per_session_usd")):
            value, text = _value(page, testid)
            assert value == pytest.approx(want[key], rel=1e-9)
            assert text == _usd_text(want[key])
        value, text = _value(page, "tile-error-rate")
        assert value == pytest.approx(want["error_rate"]) and text == f"{want['error_rate'] * 100:.1f}%"
        value, text = _value(page, "tile-audio-minutes")
        assert value == pytest.approx(want["audio_minutes"]) and text == f"{want['audio_minutes']:.1f}"
        value, text = _value(page, "tile-satisfaction")
        assert value == pytest.approx(want["satisfaction_rate"]) and text == f"{want['satisfaction_rate'] * 100:.1f}%"
        value, text = _value(page, "tile-issues")
        assert value == pytest.approx(want["issue_rate"]) and text == f"{want['issue_rate'] * 100:.1f}%"
        assert _value(page, "tile-ratings")[0] == want["ratings"]
        # Under the plan's targets (85% satisfied, under 5% with an issue): both shown as bad.
        assert "bad" in page.get_attribute('[data-testid="tile-satisfaction"]', "class")
        # The rollout's variants side by side, as SQL computes them.
        for name, v in expected_variants(store).items():
            row = page.locator(f'[data-testid="variants"] tr[data-variant="{name}"]')

            def cell(key, row=row):
                raw = row.locator(f'td[data-key="{key}"]').get_attribute("data-value")
                return float(raw) if raw else None

            assert cell("sessions") == v["sessions"] and cell("ratings") == v["ratings"], name
            assert cell("v2v-p50") == pytest.approx(v["v2v_p50"]) and cell("v2v-p95") == pytest.approx(v["v2v_p95"])
            assert cell("error-rate") == pytest.approx(v["error_rate"]) and cell("cost") == pytest.approx(v["cost"])
            if v["ratings"]:
                assert cell("satisfaction") == pytest.approx(v["satisfaction_rate"])
                assert cell("issues") == pytest.approx(v["issue_rate"])
        order = page.eval_on_selector_all(
            '[data-testid="variants"] tbody tr', "rows => rows.map(r => r.dataset.variant)"
        )
        assert order == ["control", "v2"]
        page.screenshot(path=str(REPO / "tests" / "artifacts" / "dashboard_variants.png"), full_page=True)
        comments = page.locator('[data-testid="feedback-comments"] li').all_inner_texts()
        assert "1/5 <b>could not hear me</b>" in comments and "5/5 Quick and friendly." in comments
        for q in ("p50", "p95"):
            value, text = _value(page, f"tile-v2v-{q}")
            assert value == pytest.approx(want[f"v2v_{q}"])
            assert abs(float(text.removesuffix(" ms").replace(",", "")) - want[f"v2v_{q}"]) <= 0.5001
        for stage, column in STAGES.items():
            values = [r[0] for r in sql(store, f"SELECT {column} FROM voice_turns WHERE {column} IS NOT NULL")]
            assert _value(page, f"stage-{stage}-count")[0] == len(values)
            assert _value(page, f"stage-{stage}-p95")[0] == pytest.approx(float(np.percentile(values, 95)))

        # Cost per day: one bar per day from the first to the last session; non-empty ones match SQL.
        bars = page.eval_on_selector_all(
            '[data-testid="chart-cost-day"] rect[data-day]',
            "els => els.map(e => [e.dataset.day, Number(e.dataset.value)])",
        )
        days = {
            d: c
            for d, c in sql(store, "SELECT substr(started_at, 1, 10), SUM(cost_usd) FROM voice_sessions GROUP BY 1")
        }
        assert bars[0][0] == min(days) and bars[-1][0] == max(days) and len(bars) >= 40
        bar_costs = dict(bars)
        for d, c in days.items():
            assert bar_costs[d] == pytest.approx(c, rel=1e-9)
        assert sum(bar_costs.values()) == pytest.approx(want["total_cost_usd"])

        # Errors by code.
        err = page.eval_on_selector_all(
            '[data-testid="chart-errors"] rect[data-code]',
            "els => els.map(e => [e.dataset.code, Number(e.dataset.value)])",
        )
        assert sorted(map(tuple, err)) == sorted(
            sql(store, "SELECT error_code, COUNT(*) FROM voice_turns WHERE error_code IS NOT NULL GROUP BY 1")
        )

        # Cost per session: one dot per session.
        dots = page.eval_on_selector_all(
            '[data-testid="chart-session-cost"] circle[data-session-id]',
            "els => els.map(e => [e.dataset.sessionId, Number(e.dataset.value)])",
        )
        costs = dict(sql(store, "SELECT id, cost_usd FROM voice_sessions"))
        assert len(dots) == len(costs)
        for sid, c in dots:
            assert c == pytest.approx(costs[sid], rel=1e-9)

        # Sessions over time and the daily voice-to-voice p50/p95 line ("all" spans 40 days: daily buckets).
        assert page.evaluate("window.atlasDashboard.data.bucket") == "day"
        per_day = page.eval_on_selector_all(
            '[data-testid="chart-sessions"] rect[data-bucket]',
            "els => els.map(e => [e.dataset.bucket.slice(0, 10), Number(e.dataset.value)])",
        )
        assert {d: n for d, n in per_day if n} == dict(
            sql(store, "SELECT substr(started_at, 1, 10), COUNT(*) FROM voice_sessions GROUP BY 1")
        )
        points = page.eval_on_selector_all(
            '[data-testid="chart-latency-voice_to_voice"] circle[data-series]',
            "els => els.map(e => [e.dataset.series, e.dataset.bucket.slice(0, 10), Number(e.dataset.value)])",
        )
        by_day = {}
        for day, v in sql(
            store,
            "SELECT substr(created_at, 1, 10), voice_to_voice_ms FROM voice_turns WHERE voice_to_voice_ms IS NOT NULL",
        ):
            by_day.setdefault(day, []).append(v)
        assert len(points) == 2 * len(by_day)
        for series, day, v in points:
            assert v == pytest.approx(float(np.percentile(by_day[day], 50 if series == "p50" else 95))), (series, day)
        for stage in STAGES:
            assert page.locator(f'[data-testid="chart-latency-{stage}"] circle[data-series="p95"]').count() > 0

        # Recent sessions, newest first.
        rows = page.eval_on_selector_all(
            '[data-testid="recent-sessions"] tbody tr[data-session-id]', "els => els.map(e => e.dataset.sessionId)"
        )
        assert rows == [r[0] for r in sql(store, "SELECT id FROM voice_sessions ORDER BY started_at DESC")]

        # Another range: 24h (no seeded row is near the 24-hour edge).
        page.click('[data-testid="range-24h"]')
        _wait(page, "window.atlasDashboard.state === 'ready' && window.atlasDashboard.data.range === '24h'")
        want24 = expected_totals(store, parse_since("24h"))
        assert _value(page, "tile-sessions")[0] == want24["sessions"] < want["sessions"]
        assert _value(page, "tile-turns")[0] == want24["turns"]
        assert _value(page, "tile-total-cost")[0] == pytest.approx(want24["total_cost_usd"], rel=1e-9)
        assert page.evaluate("window.atlasDashboard.data.bucket") == "hour"
        assert "range=24h" in page.url
        page.screenshot(path=str(REPO / "tests" / "artifacts" / "dashboard.png"), full_page=True)
        assert api and all(s == 200 for s in api)
        assert not problems, problems
    finally:
        context.close()


def test_dashboard_page_with_a_wrong_or_missing_token(browser, dashboard_url):
    context, page, problems, api = _open(browser, f"{dashboard_url}/dashboard?token=not-the-token")
    try:
        assert page.evaluate("window.atlasDashboard.state") == "auth-failed"
        assert api == [401]
        message = page.locator('[data-testid="message"]')
        assert message.is_visible()
        assert "admin token was rejected" in message.inner_text() and "401" in message.inner_text()
        assert page.locator("#token-form").is_visible()
        assert page.locator('[data-testid="tile-sessions"]').is_hidden()
        assert not [p for p in problems if "401" not in p], problems

        # Entering the right token in the form loads the data.
        page.fill("#token-input", TOKEN)
        page.click("#token-form button[type=submit]")
        _wait(page, "window.atlasDashboard.state === 'ready'")
        assert page.locator('[data-testid="tile-sessions"]').is_visible()
    finally:
        context.close()

    context, page, problems, api = _open(browser, f"{dashboard_url}/dashboard")
    try:
        assert page.evaluate("window.atlasDashboard.state") == "auth-required"
        assert api == []  # nothing is requested without a token
        assert "ATLAS_ADMIN_TOKEN" in page.locator('[data-testid="message"]').inner_text()
        assert not problems, problems
    finally:
        context.close()

    r = httpx.get(f"{dashboard_url}/api/dashboard", params={"token": "not-the-token"})
    assert r.status_code == 401 and r.json()["code"] == "ADMIN_AUTH_FAILED"
