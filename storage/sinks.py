"""Where rows end up: the embedded SQLite file, or Supabase (storage/supabase.py).

A sink writes a batch of rows of one table, idempotently, and reads rows back for the dashboard
and `atlas-voice report` (`fetch`), and one session with its turns for `atlas-voice export`
(`fetch_session`, `fetch_turns`); `clear_transcripts` deletes the transcript text of old turns (the
Recorder's retention, ATLAS_TRANSCRIPT_RETENTION_DAYS). A write raises `TransientWriteError` when
trying again later may work (the database is down, a timeout, a bad key that an operator will fix)
and `PermanentWriteError` when the rows themselves are wrong (a constraint violation, a value of a
type the store cannot take); the outbox retries the first and dead-letters the second.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from loguru import logger

from storage.records import FEEDBACK, INSERT, SESSIONS, TURNS

SCHEMA = Path(__file__).with_name("sqlite_schema.sql")
# Columns added since a store's file may have been made (`CREATE TABLE IF NOT EXISTS` leaves an old table
# as it is): added on open, as supabase/migrations adds them to Postgres.
ADDED_COLUMNS = {
    "voice_sessions": {
        "agent": "TEXT CHECK (agent IS NULL OR length(agent) <= 64)",
        "variant": "TEXT CHECK (variant IS NULL OR length(variant) <= 64)",
        "resumed_from": "TEXT",
        "reconnects": "INTEGER NOT NULL DEFAULT 0",
    },
    "voice_turns": {
        "preempted": "INTEGER NOT NULL DEFAULT 0",
        "preempt_cancelled": "INTEGER NOT NULL DEFAULT 0",
        "preempt_input_tokens": "INTEGER NOT NULL DEFAULT 0",
        "llm_cache_read_tokens": "INTEGER NOT NULL DEFAULT 0",
        "user_text": "TEXT CHECK (user_text IS NULL OR length(user_text) <= 4000)",
        "bot_text": "TEXT CHECK (bot_text IS NULL OR length(bot_text) <= 4000)",
    },
}
# CHECK constraints widened since a store's file may have been made: (table, old text, new text). SQLite cannot
# alter a constraint; its documented shortcut for loosening one (https://sqlite.org/lang_altertable.html, "making
# other kinds of table schema changes") rewrites the table's stored CREATE statement, as done on open.
WIDENED_CHECKS = [
    (
        "voice_sessions",
        "CHECK (transport IN ('websocket', 'twilio', 'daily'))",
        "CHECK (transport IN ('websocket', 'twilio', 'daily', 'webrtc', 'rtvi_ws'))",
    ),
]
TIME_COLUMN = {SESSIONS: "started_at", TURNS: "created_at", FEEDBACK: "created_at"}
# What a user's history shows of each session, and of each turn (the text only where the agent kept it).
HISTORY_COLUMNS = (
    "id",
    "transport",
    "agent",
    "started_at",
    "ended_at",
    "end_reason",
    "turns_count",
    "avg_latency_ms",
    "cost_usd",
)
HISTORY_TURN_COLUMNS = ("turn_index", "created_at", "voice_to_voice_ms", "interrupted", "user_text", "bot_text")
_COLUMN = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def utc_iso(value: str) -> str:
    """An ISO 8601 time as the stores keep it (UTC, microseconds, +00:00: records.iso), so that SQLite's text
    comparison orders it right; a time without a zone is UTC. ValueError when it is not a time."""
    ts = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


class TransientWriteError(Exception):
    pass


class PermanentWriteError(Exception):
    pass


class Sink:
    name = "sink"

    async def write(self, table: str, mode: str, rows: list[dict]) -> None:
        raise NotImplementedError

    async def fetch(self, table: str, since: str | None = None) -> list[dict]:
        """Rows of `table` whose time column (started_at / created_at) is >= `since` (ISO 8601), oldest first."""
        raise NotImplementedError

    async def fetch_session(self, session_id: str) -> dict | None:
        """The `voice_sessions` row of this id, or None."""
        raise NotImplementedError

    async def fetch_turns(self, session_id: str) -> list[dict]:
        """The session's `voice_turns` rows, in turn order."""
        raise NotImplementedError

    async def clear_transcripts(self, before_iso: str) -> int:
        """Set `user_text` and `bot_text` to NULL on the turns created before `before_iso` (ISO 8601) that
        still hold text; returns how many rows were cleared."""
        raise NotImplementedError

    async def fetch_history(self, user_id: str, limit: int, user_token: str | None = None) -> list[dict]:
        """The user's sessions, newest first (at most `limit`): HISTORY_COLUMNS and their `rating`/`comment`.
        `user_token`: the user's own access token, for a store that can read as the user (Supabase's RLS)."""
        raise NotImplementedError

    async def fetch_history_turns(self, user_id: str, session_id: str, user_token: str | None = None) -> list[dict]:
        """One of the user's sessions' turns (HISTORY_TURN_COLUMNS, in order); [] when the session is not theirs."""
        raise NotImplementedError

    def describe(self) -> str:
        """The store, for messages: its kind and where it is."""
        return self.name

    async def close(self) -> None:
        pass


class SQLiteSink(Sink):
    """The embedded default store: one SQLite file with the migration's tables.

    All access goes through one thread (sqlite3 connections are not shared between threads), so
    the event loop never waits on the disk.
    """

    name = "sqlite"

    def __init__(self, path: Path):
        self.path = Path(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="atlas-sqlite")
        self._conn: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=10)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.executescript(SCHEMA.read_text())
            for table, columns in ADDED_COLUMNS.items():
                have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
                for name, decl in columns.items():
                    if name not in have:
                        conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
            _widen_checks(conn)
            self._conn = conn
        return self._conn

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _write(self, table: str, mode: str, rows: list[dict]) -> None:
        db = self._db()
        columns = list(rows[0])
        if table not in TIME_COLUMN or not all(isinstance(c, str) and _COLUMN.fullmatch(c) for c in columns):
            raise PermanentWriteError(f"{table}: not a table or column name of this store")
        names = ", ".join(columns)
        marks = ", ".join("?" for _ in columns)
        if mode == INSERT:
            conflict = "DO NOTHING"
        else:
            conflict = "DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in columns if c != "id")
        sql = f"INSERT INTO {table} ({names}) VALUES ({marks}) ON CONFLICT (id) {conflict}"
        try:
            with db:
                db.executemany(sql, [tuple(r.get(c) for c in columns) for r in rows])
        except (
            sqlite3.IntegrityError,
            sqlite3.InterfaceError,
            sqlite3.ProgrammingError,
            OverflowError,
            TypeError,
            ValueError,
        ) as e:
            # The rows themselves: a constraint, or a value SQLite cannot bind (a nested object, an integer
            # over 64 bits, a row whose columns differ from the batch's). Trying again cannot help.
            raise PermanentWriteError(f"{table}: {type(e).__name__}: {e}") from e
        except sqlite3.OperationalError as e:  # locked, disk full, unreadable file
            if "no such column" in str(e) or "has no column" in str(e):
                raise PermanentWriteError(f"{table}: {e}") from e
            raise TransientWriteError(f"{table}: {e}") from e

    async def write(self, table: str, mode: str, rows: list[dict]) -> None:
        await self._run(self._write, table, mode, rows)

    def _fetch(self, table: str, since: str | None) -> list[dict]:
        column = TIME_COLUMN[table]
        where, args = (f"WHERE {column} >= ?", (since,)) if since else ("", ())
        cursor = self._db().execute(f"SELECT * FROM {table} {where} ORDER BY {column}", args)
        rows = [dict(r) for r in cursor]
        return self._turn_types(rows) if table == TURNS else rows

    async def fetch(self, table: str, since: str | None = None) -> list[dict]:
        return await self._run(self._fetch, table, since)

    @staticmethod
    def _turn_types(rows: list[dict]) -> list[dict]:
        for r in rows:
            for flag in ("interrupted", "preempted"):
                if flag in r:
                    r[flag] = bool(r[flag])
        return rows

    def _fetch_session(self, session_id: str) -> dict | None:
        row = self._db().execute(f"SELECT * FROM {SESSIONS} WHERE id = ?", (session_id,)).fetchone()
        return None if row is None else dict(row)

    async def fetch_session(self, session_id: str) -> dict | None:
        return await self._run(self._fetch_session, session_id)

    def _fetch_turns(self, session_id: str) -> list[dict]:
        cursor = self._db().execute(f"SELECT * FROM {TURNS} WHERE session_id = ? ORDER BY turn_index", (session_id,))
        return self._turn_types([dict(r) for r in cursor])

    async def fetch_turns(self, session_id: str) -> list[dict]:
        return await self._run(self._fetch_turns, session_id)

    def _clear_transcripts(self, before_iso: str) -> int:
        db = self._db()
        with db:
            return db.execute(
                f"UPDATE {TURNS} SET user_text = NULL, bot_text = NULL WHERE created_at < ? "
                "AND (user_text IS NOT NULL OR bot_text IS NOT NULL)",
                (before_iso,),
            ).rowcount

    async def clear_transcripts(self, before_iso: str) -> int:
        return await self._run(self._clear_transcripts, utc_iso(before_iso))

    def _fetch_history(self, user_id: str, limit: int) -> list[dict]:
        columns = ", ".join(f"s.{c}" for c in HISTORY_COLUMNS)
        cursor = self._db().execute(
            f"SELECT {columns}, f.rating, f.comment FROM {SESSIONS} s LEFT JOIN {FEEDBACK} f ON f.id = s.id "
            "WHERE s.user_id = ? ORDER BY s.started_at DESC LIMIT ?",
            (user_id, limit),
        )
        return [dict(r) for r in cursor]

    async def fetch_history(self, user_id: str, limit: int, user_token: str | None = None) -> list[dict]:
        return await self._run(self._fetch_history, user_id, limit)

    def _fetch_history_turns(self, user_id: str, session_id: str) -> list[dict]:
        columns = ", ".join(f"t.{c}" for c in HISTORY_TURN_COLUMNS)
        cursor = self._db().execute(
            f"SELECT {columns} FROM {TURNS} t JOIN {SESSIONS} s ON s.id = t.session_id "
            "WHERE t.session_id = ? AND s.user_id = ? ORDER BY t.turn_index",
            (session_id, user_id),
        )
        return self._turn_types([dict(r) for r in cursor])

    async def fetch_history_turns(self, user_id: str, session_id: str, user_token: str | None = None) -> list[dict]:
        return await self._run(self._fetch_history_turns, user_id, session_id)

    def describe(self) -> str:
        return f"sqlite {self.path}"

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def close(self) -> None:
        await self._run(self._close)
        self._executor.shutdown(wait=False)


def _widen_checks(conn: sqlite3.Connection) -> None:
    """Loosen the CHECK constraints of WIDENED_CHECKS in a file made before they were widened (every row that
    passed the old check passes the new one, so no row needs a look)."""
    for table, old, new in WIDENED_CHECKS:
        (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
        if old not in sql:
            continue
        (version,) = conn.execute("PRAGMA schema_version").fetchone()
        with conn:
            conn.execute("PRAGMA writable_schema = ON")
            conn.execute(
                "UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = ?", (sql.replace(old, new), table)
            )
            conn.execute(f"PRAGMA schema_version = {int(version) + 1}")
            conn.execute("PRAGMA writable_schema = OFF")
        (ok,) = conn.execute("PRAGMA integrity_check").fetchone()
        if ok != "ok":
            raise sqlite3.DatabaseError(f"{table}: integrity check after widening a constraint: {ok}")
        logger.info(f"sqlite store: {table}'s constraint widened ({new})")
