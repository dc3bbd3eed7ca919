"""A whole local Supabase for a test module: Postgres bootstrapped like Supabase, the migrations as they ship,
two users in auth.users, and the PostgREST-compatible endpoint in front."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
from supabase import AsyncClientOptions, acreate_client

from fakes.supabase_local.postgres import LocalPostgres
from fakes.supabase_local.postgrest import LocalPostgrest

SECRET = "local-test-jwt-secret-at-least-32-characters-long"
MIGRATIONS = Path(__file__).resolve().parents[2] / "supabase" / "migrations"


class Stack:
    def __init__(self) -> None:
        self.pg = LocalPostgres()
        self.api: LocalPostgrest | None = None
        self.migrations: list = []
        self.user_a = uuid.uuid4()
        self.user_b = uuid.uuid4()
        self.ready_seconds = 0.0

    def start(self, extra_sql: str | None = None) -> Stack:
        started = time.monotonic()
        self.pg.start()
        self.pg.bootstrap()
        self.migrations = self.pg.apply_migrations(MIGRATIONS)
        if extra_sql:
            self.pg.execute(extra_sql)
        self.pg.execute(
            "insert into auth.users (id, email, aud, role) values (%s, 'a@example.com', 'authenticated', "
            "'authenticated'), (%s, 'b@example.com', 'authenticated', 'authenticated')",
            [self.user_a, self.user_b],
        )
        self.api = LocalPostgrest(self.pg.dsn_for("authenticator"), SECRET).start()
        self.ready_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        if self.api is not None:
            self.api.stop()
        self.pg.cleanup()


async def client(stack: Stack, key: str, token: str | None = None, *, retry: bool = True, timeout: float = 5.0):
    """The real async supabase client over HTTP/1.1 with a short timeout (the default is 120 s)."""
    http = httpx.AsyncClient(http2=False, timeout=httpx.Timeout(timeout))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    options = AsyncClientOptions(httpx_client=http, postgrest_client_retry=retry, headers=headers)
    sb = await acreate_client(stack.api.url, key, options=options)
    return sb, http
