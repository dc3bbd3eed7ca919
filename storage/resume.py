"""Ended conversations a dropped client may resume (session_start `resume`), shared by every process that could
take its reconnection: in Redis when REDIS_URL is set (every worker of every machine), else in a small SQLite
file beside the outbox (every worker of this machine).

Each entry is the conversation's context messages, who it was (the verified user id, or the client's id) and its
agent, kept for ATLAS_RESUME_WINDOW_SECS; taking it removes it (a conversation is resumed once). A store that fails
loses nothing but the resume: the client is told RESUME_FAILED and starts a new conversation.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

from loguru import logger

_SCHEMA = """
CREATE TABLE IF NOT EXISTS resumable (
  id TEXT PRIMARY KEY,
  who TEXT NOT NULL,
  agent TEXT NOT NULL,
  messages TEXT NOT NULL,
  expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_resumable_expires ON resumable (expires);
"""


class ResumeStore:
    def __init__(self, path: Path, redis=None, prefix: str = "atlas"):
        self.path = Path(path)
        self._redis = redis
        self._prefix = f"{prefix}:resume"
        self._made = False  # the file and its table exist

    # --- SQLite (one machine) ------------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if not self._made:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=5, isolation_level=None)
        if not self._made:
            conn.execute("PRAGMA journal_mode=WAL")  # kept by the file
            conn.executescript(_SCHEMA)
            self._made = True
        return conn

    def _keep_sqlite(self, session_id: str, entry: str, who: str, agent: str, expires: float) -> None:
        conn = self._db()
        try:
            conn.execute("DELETE FROM resumable WHERE expires < ?", (time.time(),))
            conn.execute(
                "INSERT OR REPLACE INTO resumable (id, who, agent, messages, expires) VALUES (?, ?, ?, ?, ?)",
                (session_id, who, agent, entry, expires),
            )
        finally:
            conn.close()

    def _take_sqlite(self, session_id: str) -> tuple[str, str, str, float] | None:
        conn = self._db()
        try:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(
                "SELECT who, agent, messages, expires FROM resumable WHERE id = ?", (session_id,)
            ).fetchone()
            conn.execute("DELETE FROM resumable WHERE id = ?", (session_id,))
            conn.execute("COMMIT")
            return row
        finally:
            conn.close()

    # --- the store -----------------------------------------------------------------------------------------

    async def keep(self, session_id: str, who: str, agent: str, messages: list[dict], ttl_secs: float) -> None:
        if ttl_secs <= 0:
            return
        entry = json.dumps(messages, ensure_ascii=False, default=str)
        try:
            if self._redis is not None:
                value = json.dumps({"who": who, "agent": agent, "messages": entry})
                await self._redis.set(f"{self._prefix}:{session_id}", value, ex=max(1, int(ttl_secs)))
            else:
                await asyncio.to_thread(self._keep_sqlite, session_id, entry, who, agent, time.time() + ttl_secs)
        except Exception as e:  # the resume is lost, nothing else
            logger.warning(f"resume store: keeping session {session_id} failed: {type(e).__name__}: {e}")

    async def take(self, session_id: str, who: str) -> tuple[str, list[dict]] | None:
        """The conversation's (agent, messages), removed, if `who` had it and it has not expired; else None."""
        row: tuple[str, str, str, float] | None
        try:
            if self._redis is not None:
                raw = await self._redis.getdel(f"{self._prefix}:{session_id}")
                if raw is None:
                    return None
                value = json.loads(raw)
                row = (value["who"], value["agent"], value["messages"], time.time() + 1)
            else:
                row = await asyncio.to_thread(self._take_sqlite, session_id)
        except Exception as e:
            logger.warning(f"resume store: taking session {session_id} failed: {type(e).__name__}: {e}")
            return None
        if row is None or row[0] != who or row[3] < time.time():
            return None
        return row[1], json.loads(row[2])
