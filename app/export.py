"""`atlas-voice export --session ID`: one session's transcript, as JSON or as plain text.

Reads the session's row and its turns from the configured store (`storage.make_sink`: Supabase when
SUPABASE_URL is set, else the embedded SQLite file). Only sessions whose agent keeps transcripts
(`store_transcripts`) have any text, and only until ATLAS_TRANSCRIPT_RETENTION_DAYS have passed (the server
then clears it, keeping the rows' numbers).

JSON: `{"session": {...}, "turns": [{"turn", "user", "bot", "created_at", "voice_to_voice_ms"}, ...]}` (a side
whose text was not kept is null). Text: a header line, then `[time] User: ...` and `[time] Atlas: ...` lines,
times in UTC (when the caller stopped speaking, when the reply's first audio was sent).

Exit codes: 0 written; 2 an id that is not a session id, no such session, or a session with no stored
transcript; 1 the store could not be read.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

SESSION_FIELDS = (
    "id",
    "user_id",
    "client_user_id",
    "conversation_id",
    "transport",
    "started_at",
    "ended_at",
    "end_reason",
    "turns_count",
    "stt_provider",
    "stt_model",
    "llm_provider",
    "llm_model",
    "tts_provider",
    "tts_model",
    "avg_latency_ms",
    "p95_latency_ms",
    "interruptions_count",
    "errors_count",
    "cost_usd",
)
TIME_FIELDS = ("started_at", "ended_at", "created_at", "user_stopped_at", "first_audio_at")


class ExportError(Exception):
    """Why a session cannot be exported, with the command's exit code."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def session_id_of(text: str) -> str:
    """The session id in its canonical form (a UUID, as `session_end`'s sessionId); ExportError if not one."""
    try:
        return str(uuid.UUID(text.strip()))
    except (ValueError, AttributeError):
        raise ExportError(f"invalid session id {text!r}: a session id is a UUID (session_end's sessionId)") from None


def _utc(value) -> str | None:
    """A stored time as ISO 8601 UTC, the same from either store."""
    from storage.sinks import utc_iso

    if value is None:
        return None
    try:
        return utc_iso(str(value))
    except ValueError:
        return str(value)


def _number(value):
    """Postgres numerics may come back as strings; SQLite's as floats."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def build_export(session: dict, turns: list[dict]) -> dict:
    """The JSON document of a session and its turns as read from a store."""
    head = {k: _utc(session.get(k)) if k in TIME_FIELDS else session.get(k) for k in SESSION_FIELDS}
    head["cost_usd"] = _number(head["cost_usd"])
    return {
        "session": head,
        "turns": [
            {
                "turn": t["turn_index"],
                "user": t.get("user_text"),
                "bot": t.get("bot_text"),
                "created_at": _utc(t.get("created_at")),
                "voice_to_voice_ms": t.get("voice_to_voice_ms"),
            }
            for t in sorted(turns, key=lambda t: t["turn_index"])
        ],
    }


def _when(value: str | None) -> datetime | None:
    try:
        return None if value is None else datetime.fromisoformat(value).astimezone(UTC)
    except ValueError:
        return None


def format_text(session: dict, turns: list[dict]) -> str:
    """`[time] User: ...` / `[time] Atlas: ...`, after a header line with the session's date and transport."""
    s = {k: _utc(session.get(k)) if k in TIME_FIELDS else session.get(k) for k in SESSION_FIELDS}
    start, end = _when(s["started_at"]), _when(s["ended_at"])
    turns = [{k: _utc(t.get(k)) if k in TIME_FIELDS else v for k, v in t.items()} for t in turns]
    turns.sort(key=lambda t: t["turn_index"])
    moments = [_when(t.get(k)) for t in turns for k in ("user_stopped_at", "first_audio_at", "created_at")]
    days = {m.date() for m in [start, end, *moments] if m is not None}
    stamp = "%H:%M:%S" if len(days) <= 1 else "%Y-%m-%d %H:%M:%S"
    span = f"{start:%Y-%m-%d %H:%M:%S} UTC" if start else "start unknown"
    if end:
        span += f" to {end:{stamp}} UTC"
    lines = [f"# Atlas Voice session {s['id']} ({s['transport']}), {span}, {len(turns)} turns"]

    def line(at: str | None, fallback: str | None, who: str, text: str | None) -> None:
        if text is None:
            return
        moment = _when(at or fallback)
        when = f"[{moment:{stamp}}] " if moment else ""
        lines.append(f"{when}{who}: {' '.join(text.split())}")

    for t in turns:
        line(t.get("user_stopped_at"), t.get("created_at"), "User", t.get("user_text"))
        line(t.get("first_audio_at"), t.get("created_at"), "Atlas", t.get("bot_text"))
    return "\n".join(lines) + "\n"


async def _read(sink, session_id: str) -> tuple[dict | None, list[dict]]:
    try:
        session = await sink.fetch_session(session_id)
        turns = await sink.fetch_turns(session_id) if session is not None else []
        return session, turns
    finally:
        await sink.close()


def load_export(settings, session_id: str) -> tuple[dict, list[dict]]:
    """A session's row and its turn rows from the configured store; ExportError when it has no transcript to
    give."""
    from storage import make_sink

    session_id = session_id_of(session_id)
    sink = make_sink(settings)
    store = sink.describe()
    if not settings.supabase_url and not settings.resolved_sqlite_path.exists():
        raise ExportError(f"no session {session_id} in {store} (nothing has been recorded there yet)")
    try:
        session, turns = asyncio.run(_read(sink, session_id))
    except Exception as e:
        raise ExportError(f"could not read the session store ({store}): {type(e).__name__}: {e}", 1) from e
    if session is None:
        raise ExportError(f"no session {session_id} in {store}")
    if not any(t.get("user_text") is not None or t.get("bot_text") is not None for t in turns):
        days = settings.transcript_retention_days
        cutoff = datetime.now(UTC).timestamp() - days * 86400
        created = [_when(_utc(t.get("created_at"))) for t in turns]
        if turns and days and all(c is not None and c.timestamp() < cutoff for c in created):
            why = f"its text was cleared after ATLAS_TRANSCRIPT_RETENTION_DAYS={days:g} days"
        else:
            why = "its agent does not set store_transcripts"
        raise ExportError(f"session {session_id} has no stored transcript ({why})")
    return session, turns


def run_export(session_id: str, fmt: str = "json", out: str | None = None) -> int:
    from config.settings import Settings

    try:
        session, turns = load_export(Settings(), session_id)
    except ExportError as e:
        print(f"atlas-voice export: {e}", file=sys.stderr)
        return e.code
    if fmt == "json":
        body = json.dumps(build_export(session, turns), indent=2, ensure_ascii=False) + "\n"
    else:
        body = format_text(session, turns)
    if out:
        try:
            Path(out).write_text(body, encoding="utf-8")
        except OSError as e:
            print(f"atlas-voice export: cannot write {out}: {e}", file=sys.stderr)
            return 1
        print(f"{out}: session {session['id']}, {len(turns)} turns ({fmt})")
    else:
        sys.stdout.write(body)
    return 0
