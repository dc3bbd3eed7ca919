"""The Supabase store: rows written through supabase-py's async client with the service role.

- Short timeouts (ATLAS_DB_TIMEOUT_SECS) and HTTP/1.1: supabase-py's default is a 120 s timeout,
  and its HTTP/2 connection reuse is known to fail with RemoteProtocolError (supabase-py #1064).
- Every write is an upsert keyed by the server-generated `id`, so a write that timed out after it
  committed can be sent again without making a second row: `insert` mode ignores duplicates,
  `upsert` mode merges.
- Errors are classified for the outbox: network faults, 5xx/503 (PGRST000-003: database
  unreachable), 401/403 (a key an operator will fix) and undefined tables/columns (a migration not
  yet applied) are transient; data and constraint errors (SQLSTATE classes 22 and 23) and bodies
  PostgREST cannot read (PGRST102) are permanent: the outbox dead-letters those rows.
- Transcript retention is one PostgREST `PATCH /rest/v1/voice_turns?created_at=lt.<time>&or=(user_text.not.is.null,
  bot_text.not.is.null)` with `{"user_text": null, "bot_text": null}`, `Prefer: return=minimal, count=exact`: the
  count of rows cleared comes back in `Content-Range`, no row does.
"""

from __future__ import annotations

from typing import cast
from urllib.parse import urlparse

import httpx
from loguru import logger
from postgrest import APIError
from postgrest.types import CountMethod, ReturnMethod
from supabase import AsyncClient, AsyncClientOptions, acreate_client

from storage.records import FEEDBACK, INSERT, SESSIONS, TURNS
from storage.sinks import (
    HISTORY_COLUMNS,
    HISTORY_TURN_COLUMNS,
    TIME_COLUMN,
    PermanentWriteError,
    Sink,
    TransientWriteError,
    utc_iso,
)

PAGE = 1000


def _is_permanent(e: APIError) -> bool:
    """Data errors (SQLSTATE classes 22 and 23) and a body PostgREST cannot read (PGRST102): the rows."""
    code = str(e.code or "")
    return code[:2] in ("22", "23") or code == "PGRST102"


class SupabaseSink(Sink):
    name = "supabase"

    def __init__(self, url: str, service_key: str, timeout_secs: float = 5.0, anon_key: str = ""):
        self.url = url
        self._key = service_key
        self._anon_key = anon_key  # with it, a user's history is read as that user: Supabase's RLS applies
        self._timeout = timeout_secs
        self._client: AsyncClient | None = None
        self._http: httpx.AsyncClient | None = None

    async def _sb(self) -> AsyncClient:
        if self._client is None:
            self._http = httpx.AsyncClient(http2=False, timeout=httpx.Timeout(self._timeout))
            options = AsyncClientOptions(
                httpx_client=self._http, postgrest_client_timeout=self._timeout, postgrest_client_retry=False
            )
            self._client = await acreate_client(self.url, self._key, options=options)
        return self._client

    async def write(self, table: str, mode: str, rows: list[dict]) -> None:
        try:
            sb = await self._sb()
            await (
                sb.table(table)
                .upsert(rows, on_conflict="id", ignore_duplicates=mode == INSERT, returning=ReturnMethod.minimal)
                .execute()
            )
        except APIError as e:
            message = f"{table}: {e.code} {e.message}"
            if _is_permanent(e):
                raise PermanentWriteError(message) from e
            raise TransientWriteError(message) from e
        except (httpx.HTTPError, OSError) as e:
            raise TransientWriteError(f"{table}: {type(e).__name__}: {e}") from e

    async def fetch(self, table: str, since: str | None = None) -> list[dict]:
        sb = await self._sb()
        column = TIME_COLUMN[table]
        rows: list[dict] = []
        while True:
            query = sb.table(table).select("*")
            if since:
                query = query.gte(column, since)
            page = await query.order(column).order("id").range(len(rows), len(rows) + PAGE - 1).execute()
            rows.extend(cast(list[dict], page.data))
            if len(page.data) < PAGE:
                return rows

    async def fetch_session(self, session_id: str) -> dict | None:
        sb = await self._sb()
        rows = cast(list[dict], (await sb.table(SESSIONS).select("*").eq("id", session_id).execute()).data)
        return rows[0] if rows else None

    async def fetch_turns(self, session_id: str) -> list[dict]:
        sb = await self._sb()
        rows: list[dict] = []
        while True:
            query = sb.table(TURNS).select("*").eq("session_id", session_id).order("turn_index")
            page = await query.range(len(rows), len(rows) + PAGE - 1).execute()
            rows.extend(cast(list[dict], page.data))
            if len(page.data) < PAGE:
                return rows

    async def _reader(self, user_token: str | None) -> tuple[AsyncClient, httpx.AsyncClient | None]:
        """The client a user's history is read with: as the user (the anon key and their token: RLS decides
        what they see) when SUPABASE_ANON_KEY is set and the user's token is at hand; else the service role."""
        if not (self._anon_key and user_token):
            return await self._sb(), None
        http = httpx.AsyncClient(http2=False, timeout=httpx.Timeout(self._timeout))
        options = AsyncClientOptions(
            httpx_client=http,
            postgrest_client_timeout=self._timeout,
            postgrest_client_retry=False,
            headers={"Authorization": f"Bearer {user_token}"},
        )
        return await acreate_client(self.url, self._anon_key, options=options), http

    async def fetch_history(self, user_id: str, limit: int, user_token: str | None = None) -> list[dict]:
        sb, http = await self._reader(user_token)
        try:
            query = sb.table(SESSIONS).select(",".join(HISTORY_COLUMNS)).eq("user_id", user_id)
            rows = cast(list[dict], (await query.order("started_at", desc=True).limit(limit).execute()).data)
            ids = [r["id"] for r in rows]
            ratings: dict[str, dict] = {}
            if ids:
                found = await sb.table(FEEDBACK).select("id,rating,comment").in_("id", ids).execute()
                ratings = {r["id"]: r for r in cast(list[dict], found.data)}
            for r in rows:
                given = ratings.get(r["id"], {})
                r["rating"], r["comment"] = given.get("rating"), given.get("comment")
            return rows
        finally:
            if http is not None:
                await http.aclose()

    async def fetch_history_turns(self, user_id: str, session_id: str, user_token: str | None = None) -> list[dict]:
        sb, http = await self._reader(user_token)
        try:
            mine = await sb.table(SESSIONS).select("id").eq("id", session_id).eq("user_id", user_id).execute()
            if not mine.data:
                return []
            query = sb.table(TURNS).select(",".join(HISTORY_TURN_COLUMNS)).eq("session_id", session_id)
            return cast(list[dict], (await query.order("turn_index").execute()).data)
        finally:
            if http is not None:
                await http.aclose()

    async def clear_transcripts(self, before_iso: str) -> int:
        before = utc_iso(before_iso)
        sb = await self._sb()
        response = await (
            sb.table(TURNS)
            .update({"user_text": None, "bot_text": None}, count=CountMethod.exact, returning=ReturnMethod.minimal)
            .lt("created_at", before)
            .or_("user_text.not.is.null,bot_text.not.is.null")
            .execute()
        )
        return response.count or 0

    def describe(self) -> str:
        return f"supabase {urlparse(self.url).hostname or self.url}"

    async def close(self) -> None:
        if self._http is not None:
            try:
                await self._http.aclose()
            except Exception as e:
                logger.debug(f"closing the Supabase client: {e}")
