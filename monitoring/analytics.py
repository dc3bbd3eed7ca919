"""Figures over recorded sessions and turns, shared by the admin dashboard and `atlas-voice report`.

Pure functions over the row lists a Sink's `fetch` returns (`voice_sessions` and `voice_turns`
rows as dicts, oldest first); nothing here touches a database, the clock (except where `now` is
defaulted) or the network.

Where each figure comes from:
  * session figures (sessions, cost, audio minutes, cost per day, the sessions table) come from
    `voice_sessions` rows, placed in time by `started_at`;
  * turn figures (turns, per-stage latency, errors, error rate, interruptions) come from
    `voice_turns` rows, placed in time by `created_at`.
So with a `since` filter a long session that started before `since` contributes its later turns
but not its cost. A session still in progress (`ended_at` NULL) has no usage yet (cost 0): it is
counted in `sessions` and `sessions_active`, and left out of `avg_cost_per_session_usd`.

Percentiles are linear interpolation between closest ranks (numpy's default method); a stage's
None values (a turn that had no such stage) are left out.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from datetime import UTC, date, datetime, timedelta

from vocabulary.records import STAGES as STAGE_TABLE
from vocabulary.records import percentile

# Stage name -> voice_turns column (milliseconds).
STAGES: dict[str, str] = {stage.name: stage.column for stage in STAGE_TABLE}
BUCKETS: dict[str, timedelta] = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
AUTO_HOUR_SPAN = timedelta(hours=48)  # ranges up to this long are bucketed by hour, longer by day
MAX_FILLED_BUCKETS = 2000  # past this, empty buckets are not added to the series
RELATIVE_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)\s*$", re.IGNORECASE)


# --- time ---------------------------------------------------------------------------------------


def iso(dt: datetime) -> str:
    """UTC ISO 8601 with microseconds, the format `storage.records.iso` writes (so that SQLite's
    text comparison `started_at >= since` orders correctly)."""
    return dt.astimezone(UTC).isoformat(timespec="microseconds")


def parse_ts(value) -> datetime | None:
    """A row's timestamp (ISO text from SQLite or PostgREST, or a datetime) as an aware UTC datetime."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        dt = value
    else:
        dt = datetime.fromisoformat(str(value).strip())
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def parse_duration(text: str) -> float:
    """`24h`, `90m`, `7d`, `2w`, `30s` as seconds; ValueError when unreadable."""
    match = _RELATIVE.match(str(text))
    if not match:
        raise ValueError(f"{text!r}: use a duration like 30m, 24h or 7d")
    return float(match.group(1)) * RELATIVE_UNITS[match.group(2).lower()]


def parse_since(text: str | None, now: datetime | None = None) -> str | None:
    """`24h`, `90m`, `7d`, `2w`, `30s` (relative to now), an ISO 8601 date or time, or `all`/empty
    (no limit: None). Returns the ISO string to pass to `Sink.fetch`. ValueError when unreadable."""
    if text is None or not str(text).strip() or str(text).strip().lower() == "all":
        return None
    match = _RELATIVE.match(str(text))
    if match:
        now = now or datetime.now(UTC)
        seconds = float(match.group(1)) * RELATIVE_UNITS[match.group(2).lower()]
        try:
            return iso(now - timedelta(seconds=seconds))
        except (OverflowError, ValueError):  # before year 1: the whole history
            return None
    try:
        dt = parse_ts(str(text).strip().replace("z", "Z"))
    except ValueError:
        dt = None
    if dt is None:
        raise ValueError(f"since={text!r}: use a duration like 1h, 24h, 7d, 30d, an ISO 8601 time, or 'all'")
    return iso(dt)


def choose_bucket(start: datetime | None, end: datetime | None) -> str:
    """`hour` for ranges up to 48 hours, `day` beyond."""
    if start is None or end is None:
        return "hour"
    return "hour" if end - start <= AUTO_HOUR_SPAN else "day"


def floor_time(dt: datetime, bucket: str) -> datetime:
    dt = dt.replace(minute=0, second=0, microsecond=0)
    return dt.replace(hour=0) if bucket == "day" else dt


# --- numbers ------------------------------------------------------------------------------------


def _num(value) -> float:
    """A numeric column (PostgREST may send `numeric` as text) as a float; NULL is 0."""
    return 0.0 if value is None or value == "" else float(value)


def _opt_num(value) -> float | None:
    return None if value is None or value == "" else float(value)


def _truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "t", "1", "yes")
    return bool(value)


def stage_stats(turns: list[dict]) -> dict[str, dict]:
    """Per stage: count, mean, p50, p95 (ms) over the turns that have that stage."""
    out = {}
    for stage, column in STAGES.items():
        values = [float(t[column]) for t in turns if t.get(column) is not None]
        out[stage] = {
            "count": len(values),
            "mean": sum(values) / len(values) if values else None,
            "p50": percentile(values, 50),
            "p95": percentile(values, 95),
        }
    return out


def _cost(session: dict) -> float:
    return _num(session.get("cost_usd"))


# --- the summary --------------------------------------------------------------------------------


def _bucket_range(times: list[datetime], bucket: str) -> list[datetime]:
    """Every bucket from the first to the last time (empty ones included, up to a limit)."""
    if not times:
        return []
    step = BUCKETS[bucket]
    first, last = floor_time(min(times), bucket), floor_time(max(times), bucket)
    if (last - first) / step + 1 > MAX_FILLED_BUCKETS:
        return sorted({floor_time(t, bucket) for t in times})
    out, t = [], first
    while t <= last:
        out.append(t)
        t += step
    return out


def _session_row(s: dict, started: datetime | None) -> dict:
    ended = parse_ts(s.get("ended_at"))
    models = {
        stage: "/".join(p for p in (s.get(f"{stage}_provider"), s.get(f"{stage}_model")) if p) or None
        for stage in ("stt", "llm", "tts")
    }
    return {
        "id": s.get("id"),
        "transport": s.get("transport"),
        "started_at": iso(started) if started else None,
        "ended_at": iso(ended) if ended else None,
        "duration_seconds": (ended - started).total_seconds() if ended and started else None,
        "end_reason": s.get("end_reason"),
        "turns_count": int(_num(s.get("turns_count"))),
        "avg_latency_ms": _opt_num(s.get("avg_latency_ms")),
        "p95_latency_ms": _opt_num(s.get("p95_latency_ms")),
        "interruptions_count": int(_num(s.get("interruptions_count"))),
        "errors_count": int(_num(s.get("errors_count"))),
        "cost_usd": _cost(s),
        "audio_seconds": _num(s.get("stt_duration_seconds")),
        "stt": models["stt"],
        "llm": models["llm"],
        "tts": models["tts"],
    }


def feedback_stats(ratings: list[dict]) -> dict:
    """The plan's two feedback rates over `voice_feedback` rows: satisfied (4-5) and reported an issue (1-2)."""
    values = [int(_num(r.get("rating"))) for r in ratings if r.get("rating") is not None]
    n = len(values)
    return {
        "ratings": n,
        "satisfaction_rate": sum(1 for v in values if v >= 4) / n if n else None,
        "issue_rate": sum(1 for v in values if v <= 2) / n if n else None,
        "avg_rating": sum(values) / n if n else None,
    }


def variant_stats(sessions: list[dict], turns: list[dict], feedback: list[dict]) -> list[dict]:
    """The rollout's variants side by side (`voice_sessions.variant`; sessions outside a rollout are left out):
    sessions, voice-to-voice p50/p95 and error rate over their turns, cost per ended session, and the feedback
    rates. `control` first, then the variants by name."""
    by_variant: dict[str, list[dict]] = defaultdict(list)
    for s in sessions:
        if s.get("variant"):
            by_variant[str(s["variant"])].append(s)
    variant_of = {s.get("id"): str(s["variant"]) for s in sessions if s.get("variant")}
    turns_of: dict[str, list[dict]] = defaultdict(list)
    for t in turns:
        v = variant_of.get(t.get("session_id"))
        if v is not None:
            turns_of[v].append(t)
    ratings_of: dict[str, list[dict]] = defaultdict(list)
    for r in feedback:
        v = variant_of.get(r.get("id"))
        if v is not None:
            ratings_of[v].append(r)
    out = []
    for name in sorted(by_variant, key=lambda v: (v != "control", v)):
        rows, v_turns = by_variant[name], turns_of[name]
        ended = [s for s in rows if s.get("ended_at")]
        v2v = [float(t["voice_to_voice_ms"]) for t in v_turns if t.get("voice_to_voice_ms") is not None]
        errors = sum(1 for t in v_turns if t.get("error_code"))
        out.append(
            {
                "variant": name,
                "sessions": len(rows),
                "turns": len(v_turns),
                "v2v_p50": percentile(v2v, 50),
                "v2v_p95": percentile(v2v, 95),
                "error_rate": errors / len(v_turns) if v_turns else None,
                "avg_cost_per_session_usd": sum(_cost(s) for s in ended) / len(ended) if ended else None,
                **feedback_stats(ratings_of[name]),
            }
        )
    return out


def summarize(
    sessions: list[dict],
    turns: list[dict],
    bucket: str | None = None,
    *,
    feedback: list[dict] | None = None,
    since: str | None = None,
    now: datetime | None = None,
    recent: int = 20,
    max_session_points: int = 500,
) -> dict:
    """Everything the dashboard and the report show, as plain JSON-ready values.

    `bucket` is "hour" or "day" for the time series; None picks by the span: from `since` (or the
    first row) to `now` (or the last row when `since` is None). `since` is only used for that
    choice and echoed back; the rows are expected to be filtered already. `feedback`: the
    `voice_feedback` rows (the sessions' ratings).
    """
    if bucket is not None and bucket not in BUCKETS:
        raise ValueError(f"bucket={bucket!r}: use 'hour' or 'day'")
    now = now or datetime.now(UTC)
    s_times = [parse_ts(s.get("started_at")) for s in sessions]
    t_times = [parse_ts(t.get("created_at")) for t in turns]
    known = [t for t in s_times + t_times if t is not None]
    first, last = (min(known), max(known)) if known else (None, None)
    since_dt = parse_ts(since) if since else None
    if bucket is None:
        bucket = choose_bucket(since_dt or first, now if since_dt else last)

    # Totals.
    ended = [s for s in sessions if s.get("ended_at")]
    total_cost = sum(_cost(s) for s in sessions)
    error_turns = [t for t in turns if t.get("error_code")]
    durations = []
    for s, started in zip(sessions, s_times, strict=False):
        end = parse_ts(s.get("ended_at"))
        if end and started:
            durations.append((end - started).total_seconds())
    totals = {
        "sessions": len(sessions),
        "sessions_ended": len(ended),
        "sessions_active": len(sessions) - len(ended),
        "turns": len(turns),
        "total_cost_usd": total_cost,
        "avg_cost_per_session_usd": (sum(_cost(s) for s in ended) / len(ended)) if ended else None,
        "errors": len(error_turns),
        "error_rate": len(error_turns) / len(turns) if turns else None,
        "error_messages": int(sum(_num(s.get("errors_count")) for s in sessions)),
        "interruptions": sum(1 for t in turns if _truthy(t.get("interrupted"))),
        "audio_minutes": sum(_num(s.get("stt_duration_seconds")) for s in sessions) / 60.0,
        "avg_session_seconds": sum(durations) / len(durations) if durations else None,
        "llm_input_tokens": int(sum(_num(s.get("llm_input_tokens")) for s in sessions)),
        "llm_output_tokens": int(sum(_num(s.get("llm_output_tokens")) for s in sessions)),
        "tts_characters": int(sum(_num(s.get("tts_characters")) for s in sessions)),
        **feedback_stats(feedback or []),
    }

    # Time series per bucket.
    by_bucket_sessions: dict[datetime, list[dict]] = defaultdict(list)
    by_bucket_turns: dict[datetime, list[dict]] = defaultdict(list)
    for s, t in zip(sessions, s_times, strict=False):
        if t is not None:
            by_bucket_sessions[floor_time(t, bucket)].append(s)
    for row, t in zip(turns, t_times, strict=False):
        if t is not None:
            by_bucket_turns[floor_time(t, bucket)].append(row)
    series = []
    for start in _bucket_range(known, bucket):
        b_sessions, b_turns = by_bucket_sessions.get(start, []), by_bucket_turns.get(start, [])
        stats = stage_stats(b_turns)
        series.append(
            {
                "start": iso(start),
                "sessions": len(b_sessions),
                "turns": len(b_turns),
                "errors": sum(1 for t in b_turns if t.get("error_code")),
                "cost_usd": sum(_cost(s) for s in b_sessions),
                "p50": {stage: v["p50"] for stage, v in stats.items()},
                "p95": {stage: v["p95"] for stage, v in stats.items()},
            }
        )

    # Cost per (UTC) day, by the day each session started.
    day_cost: dict[date, float] = defaultdict(float)
    day_sessions: Counter = Counter()
    for s, t in zip(sessions, s_times, strict=False):
        if t is not None:
            day_cost[t.date()] += _cost(s)
            day_sessions[t.date()] += 1
    days = [start.date() for start in _bucket_range([t for t in s_times if t is not None], "day")]
    cost_per_day = [
        {"day": d.isoformat(), "cost_usd": day_cost.get(d, 0.0), "sessions": day_sessions.get(d, 0)} for d in days
    ]

    codes = Counter(str(t["error_code"]) for t in error_turns)
    errors_by_code = [{"code": c, "count": n} for c, n in sorted(codes.items(), key=lambda kv: (-kv[1], kv[0]))]

    dated = [(t, s) for s, t in zip(sessions, s_times, strict=False) if t is not None]
    dated.sort(key=lambda ts: ts[0])
    session_costs = [
        {"id": s.get("id"), "started_at": iso(t), "cost_usd": _cost(s)} for t, s in dated[-max_session_points:]
    ]
    recent_sessions = [_session_row(s, t) for t, s in reversed(dated[-recent:])] if recent > 0 else []

    return {
        "generated_at": iso(now),
        "since": since,
        "bucket": bucket,
        "first": iso(first) if first else None,
        "last": iso(last) if last else None,
        "totals": totals,
        "stages": stage_stats(turns),
        "series": series,
        "cost_per_day": cost_per_day,
        "errors_by_code": errors_by_code,
        "session_costs": session_costs,
        "recent_sessions": recent_sessions,
        "variants": variant_stats(sessions, turns, feedback or []),
        # What people said, newest first: the comments of the latest ratings.
        "feedback_comments": [
            {"session_id": r.get("id"), "rating": int(_num(r.get("rating"))), "comment": r.get("comment")}
            for r in sorted(feedback or [], key=lambda r: str(r.get("created_at") or ""), reverse=True)
            if r.get("comment")
        ][:recent],
    }
