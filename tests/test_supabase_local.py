"""The local Supabase stand-in, proven with the real supabase-py async client: a throwaway PostgreSQL 15 with
Supabase's roles/auth schema (bootstrap.sql) and the project's migrations, behind the PostgREST-compatible
endpoint. Rows, RLS per user, API keys, JWT checks, upserts, PostgreSQL errors with their SQLSTATE, and the
database going away and coming back."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import psycopg
import pytest
from postgrest import APIError

from fakes.supabase_local import make_jwt
from fakes.supabase_local.stack import SECRET, Stack, client

SCRATCH = """
create table public.scratch_notes (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references auth.users (id),
  body text not null,
  tokens integer not null default 0,
  cost_usd numeric generated always as (tokens * 0.002) stored,
  created_at timestamptz not null default now()
);
alter table public.scratch_notes enable row level security;
create policy "own rows are visible" on public.scratch_notes for select using (auth.uid() = user_id);
"""


@pytest.fixture(scope="module")
def stack():
    s = Stack().start(SCRATCH)
    yield s
    s.stop()


@pytest.fixture
async def service(stack):
    sb, http = await client(stack, stack.api.service_key)
    yield sb
    await http.aclose()


async def as_user(stack: Stack, user: uuid.UUID):
    return await client(stack, stack.api.anon_key, stack.api.user_token(user))


def last_status(stack: Stack) -> int:
    return stack.api.requests[-1].status


def test_cluster_is_supabase_shaped(stack):
    assert stack.ready_seconds < 10
    roles = {
        r[0]: r[1:]
        for r in stack.pg.execute(
            "select rolname, rolbypassrls, rolcanlogin, rolinherit from pg_roles "
            "where rolname in ('anon', 'authenticated', 'service_role', 'authenticator')"
        )
    }
    assert roles["service_role"][0] is True and roles["anon"][0] is False
    assert roles["authenticator"][1:] == (True, False)  # LOGIN, NOINHERIT
    assert stack.pg.execute("select uuid_generate_v4() is not null, gen_random_uuid() is not null") == [(True, True)]
    with psycopg.connect(stack.pg.dsn_for("authenticator"), autocommit=True) as conn:
        conn.execute("begin")
        conn.execute("set local role authenticated")
        conn.execute(
            "select set_config('request.jwt.claims', %s, true)",
            [f'{{"sub": "{stack.user_a}", "role": "authenticated"}}'],
        )
        row = conn.execute("select auth.uid(), auth.role(), auth.jwt() ->> 'sub'").fetchone()
        conn.execute("rollback")
    assert row == (stack.user_a, "authenticated", str(stack.user_a))


async def test_migrated_tables_are_served(stack, service):
    """Every table the migrations created in `public` answers through the endpoint: the service role reads it,
    and anon gets rows only where a policy lets it (Supabase's default grants, RLS as written)."""
    if not stack.migrations:
        pytest.skip("supabase/migrations holds no migration yet")
    tables = [
        r[0]
        for r in stack.pg.execute(
            "select tablename from pg_tables where schemaname = 'public' and tablename <> 'scratch_notes' "
            "order by tablename"
        )
    ]
    assert tables, "the migrations created no table in public"
    anon, http = await client(stack, stack.api.anon_key)
    try:
        for table in tables:
            res = await service.table(table).select("*", count="exact").limit(1).execute()
            assert res.count is not None, table
            rls = stack.pg.execute("select relrowsecurity from pg_class where oid = %s::regclass", [f"public.{table}"])[
                0
            ][0]
            if rls:
                await anon.table(table).select("*").limit(1).execute()  # allowed to ask, RLS filters
    finally:
        await http.aclose()


async def test_service_role_inserts_and_reads(stack, service):
    rows = [
        {"user_id": str(stack.user_a), "body": "first", "tokens": 10},
        {"user_id": str(stack.user_a), "body": "second", "tokens": 20},
        {"user_id": str(stack.user_b), "body": "theirs", "tokens": 5},
    ]
    res = await service.table("scratch_notes").insert(rows).execute()
    assert [r["body"] for r in res.data] == ["first", "second", "theirs"]
    assert float(res.data[0]["cost_usd"]) == pytest.approx(0.02)  # the generated column, computed by Postgres
    assert stack.api.requests[-1].status == 201

    res = await service.table("scratch_notes").select("*", count="exact").order("created_at").execute()
    assert res.count == 3 and len(res.data) == 3
    res = await (
        service.table("scratch_notes")
        .select("body,tokens")
        .eq("user_id", str(stack.user_a))
        .gte("tokens", 10)
        .lte("tokens", 20)
        .order("tokens", desc=True)
        .limit(1)
        .execute()
    )
    assert res.data == [{"body": "second", "tokens": 20}]
    res = await service.table("scratch_notes").select("body").in_("body", ["first", "theirs"]).order("body").execute()
    assert [r["body"] for r in res.data] == ["first", "theirs"]
    res = await service.table("scratch_notes").select("body").order("body").offset(1).limit(1).execute()
    assert res.data == [{"body": "second"}]
    one = await service.table("scratch_notes").select("id,body").eq("body", "first").single().execute()
    assert one.data["body"] == "first"

    upd = await service.table("scratch_notes").update({"tokens": 11}).eq("body", "first").execute()
    assert upd.data[0]["tokens"] == 11 and float(upd.data[0]["cost_usd"]) == pytest.approx(0.022)
    tmp = await service.table("scratch_notes").insert({"user_id": str(stack.user_b), "body": "tmp"}).execute()
    gone = await service.table("scratch_notes").delete().eq("id", tmp.data[0]["id"]).execute()
    assert [r["body"] for r in gone.data] == ["tmp"]
    res = await service.table("scratch_notes").select("id", count="exact").is_("body", "null").execute()
    assert res.data == [] and res.count == 0


async def test_rls_each_user_sees_only_their_rows(stack, service):
    await (
        service.table("scratch_notes")
        .insert([{"user_id": str(stack.user_a), "body": "rls-a"}, {"user_id": str(stack.user_b), "body": "rls-b"}])
        .execute()
    )
    a, http_a = await as_user(stack, stack.user_a)
    b, http_b = await as_user(stack, stack.user_b)
    anon, http_anon = await client(stack, stack.api.anon_key)
    try:
        rows_a = (await a.table("scratch_notes").select("user_id,body").execute()).data
        rows_b = (await b.table("scratch_notes").select("user_id,body").execute()).data
        assert rows_a and {r["user_id"] for r in rows_a} == {str(stack.user_a)}
        assert rows_b and {r["user_id"] for r in rows_b} == {str(stack.user_b)}
        assert "rls-a" in {r["body"] for r in rows_a} and "rls-a" not in {r["body"] for r in rows_b}
        assert (await anon.table("scratch_notes").select("*").execute()).data == []
        assert stack.api.requests[-1].role == "anon"

        # No INSERT policy: an RLS violation is 42501, 403 for a signed-in user and 401 for anon (as PostgREST).
        with pytest.raises(APIError) as err:
            await (
                a.table("scratch_notes")
                .insert({"user_id": str(stack.user_a), "body": "x"}, returning="minimal")
                .execute()
            )
        assert err.value.code == "42501" and last_status(stack) == 403
        with pytest.raises(APIError) as err:
            await (
                anon.table("scratch_notes")
                .insert({"user_id": str(stack.user_a), "body": "x"}, returning="minimal")
                .execute()
            )
        assert err.value.code == "42501" and last_status(stack) == 401
    finally:
        for http in (http_a, http_b, http_anon):
            await http.aclose()


async def test_bad_or_expired_tokens_get_401(stack):
    forged = make_jwt("not-the-secret-" * 3, "service_role", aud=None)
    sb, http = await client(stack, stack.api.anon_key, forged)
    try:
        with pytest.raises(APIError) as err:
            await sb.table("scratch_notes").select("*").execute()
        assert err.value.code == "PGRST301" and last_status(stack) == 401
    finally:
        await http.aclose()
    expired = make_jwt(SECRET, "authenticated", sub=stack.user_a, exp_in=-120)
    sb, http = await client(stack, stack.api.anon_key, expired)
    try:
        with pytest.raises(APIError) as err:
            await sb.table("scratch_notes").select("*").execute()
        assert err.value.code == "PGRST301" and err.value.message == "JWT expired" and last_status(stack) == 401
    finally:
        await http.aclose()
    sb, http = await client(stack, make_jwt("wrong-secret-" * 3, "anon", aud=None))
    try:
        with pytest.raises(APIError) as err:
            await sb.table("scratch_notes").select("*").execute()
        assert err.value.message == "Invalid API key" and last_status(stack) == 401
    finally:
        await http.aclose()


async def test_upsert_ignore_duplicates_is_idempotent(stack, service):
    row = {"id": str(uuid.uuid4()), "user_id": str(stack.user_a), "body": "once", "tokens": 3}
    for _ in range(2):
        await (
            service.table("scratch_notes")
            .upsert(row, on_conflict="id", ignore_duplicates=True, returning="minimal")
            .execute()
        )
    res = await service.table("scratch_notes").select("body", count="exact").eq("id", row["id"]).execute()
    assert res.count == 1 and res.data == [{"body": "once"}]

    merged = await service.table("scratch_notes").upsert({**row, "body": "merged"}, on_conflict="id").execute()
    assert merged.data[0]["body"] == "merged"
    with pytest.raises(APIError) as err:  # a plain insert of the same id: unique violation
        await service.table("scratch_notes").insert(row).execute()
    assert err.value.code == "23505" and last_status(stack) == 409


async def test_a_timed_out_or_cut_write_may_have_committed(stack, service):
    """The endpoint's fault hooks: the write commits, then the answer is late (client timeout) or never comes
    (connection closed). A client-generated id and an ignore-duplicates upsert make the retry harmless."""
    sb, http = await client(stack, stack.api.service_key, timeout=0.3)
    try:
        for fault in ("stall", "drop"):
            row = {"id": str(uuid.uuid4()), "user_id": str(stack.user_a), "body": f"fault-{fault}"}
            if fault == "stall":
                stack.api.stall_next(1.0)
                expected = httpx.TimeoutException
            else:
                stack.api.drop_next()
                expected = httpx.RemoteProtocolError
            with pytest.raises(expected):
                await (
                    sb.table("scratch_notes")
                    .upsert(row, on_conflict="id", ignore_duplicates=True, returning="minimal")
                    .execute()
                )
            assert stack.api.requests[-1].fault == fault
            await (
                sb.table("scratch_notes")
                .upsert(row, on_conflict="id", ignore_duplicates=True, returning="minimal")
                .execute()
            )
            res = await service.table("scratch_notes").select("body", count="exact").eq("id", row["id"]).execute()
            assert res.count == 1
    finally:
        await http.aclose()


async def test_database_errors_carry_their_sqlstate(stack, service):
    with pytest.raises(APIError) as err:
        await (
            service.table("scratch_notes")
            .insert({"user_id": str(stack.user_a), "body": "x", "cost_usd": 1.5})
            .execute()
        )
    assert err.value.code == "428C9" and last_status(stack) == 400
    with pytest.raises(APIError) as err:  # FK to auth.users
        await service.table("scratch_notes").insert({"user_id": str(uuid.uuid4()), "body": "x"}).execute()
    assert err.value.code == "23503" and last_status(stack) == 409
    with pytest.raises(APIError) as err:
        await service.table("scratch_notes").select("*").eq("id", "not-a-uuid").execute()
    assert err.value.code == "22P02" and last_status(stack) == 400
    with pytest.raises(APIError) as err:
        await service.table("no_such_table").select("*").execute()
    assert err.value.code == "PGRST205" and last_status(stack) == 404


async def test_database_down_then_back(stack, service):
    before = (await service.table("scratch_notes").select("id", count="exact").execute()).count
    # Several pooled connections, all of which the restart will kill.
    await asyncio.gather(*[service.table("scratch_notes").select("id").limit(1).execute() for _ in range(4)])
    assert stack.api.idle_connections >= 2
    dropped = stack.api.stale_connections_dropped
    stack.pg.stop()
    try:
        with pytest.raises(APIError) as err:  # POSTs are never retried by supabase-py
            await service.table("scratch_notes").insert({"user_id": str(stack.user_a), "body": "down"}).execute()
        assert err.value.code == "PGRST000" and last_status(stack) == 503
        sb, http = await client(stack, stack.api.service_key, retry=False)
        try:
            with pytest.raises(APIError):
                await sb.table("scratch_notes").select("id").execute()
        finally:
            await http.aclose()
    finally:
        await asyncio.to_thread(stack.pg.start)
    res = await service.table("scratch_notes").insert({"user_id": str(stack.user_a), "body": "back"}).execute()
    assert res.data[0]["body"] == "back"  # a POST (never retried by the client) succeeds at once
    assert stack.api.stale_connections_dropped > dropped
    after = (await service.table("scratch_notes").select("id", count="exact").execute()).count
    assert after == before + 1


# --- the shipped schema ------------------------------------------------------------------------

USAGES = [
    # (stt, llm, tts, stt seconds, input, output, cache read, cache write, tts characters)
    (
        ("deepgram", "nova-3"),
        ("anthropic", "claude-haiku-4-5"),
        ("elevenlabs", "eleven_flash_v2_5"),
        187.25,
        4210,
        933,
        12000,
        1500,
        3877,
    ),
    (
        ("deepgram", "nova-2"),
        ("anthropic", "claude-3-haiku-20240307"),
        ("playht", "PlayHT2.0-turbo"),
        3600.0,
        1_000_000,
        250_000,
        0,
        0,
        100_000,
    ),
    (("whisper", "tiny.en"), ("llama", "local"), ("piper", "en_US-joe-medium"), 61.5, 900, 300, 0, 0, 700),
]


async def test_generated_cost_equals_the_python_cost_for_every_priced_model(stack, service):
    from config.prices import rates_for, session_cost

    for stt, llm, tts, seconds, tokens_in, tokens_out, cache_read, cache_write, chars in USAGES:
        rates = rates_for(stt, llm, tts)
        sid = str(uuid.uuid4())
        row = {
            "id": sid,
            "user_id": str(stack.user_a),
            "transport": "websocket",
            "stt_provider": stt[0],
            "stt_model": stt[1],
            "llm_provider": llm[0],
            "llm_model": llm[1],
            "tts_provider": tts[0],
            "tts_model": tts[1],
            "stt_duration_seconds": seconds,
            "llm_input_tokens": tokens_in,
            "llm_output_tokens": tokens_out,
            "llm_cache_read_tokens": cache_read,
            "llm_cache_write_tokens": cache_write,
            "tts_characters": chars,
            **rates.columns(),
        }
        await service.table("voice_sessions").insert(row).execute()
        stored = (await service.table("voice_sessions").select("cost_usd").eq("id", sid).execute()).data[0]
        expected = session_cost(
            rates,
            stt_seconds=seconds,
            llm_input_tokens=tokens_in,
            llm_output_tokens=tokens_out,
            llm_cache_read_tokens=cache_read,
            llm_cache_write_tokens=cache_write,
            tts_characters=chars,
        )
        assert abs(float(stored["cost_usd"]) - expected) < 1e-9, (stt, llm, tts, stored, expected)
    # An hour of Deepgram nova-2 + 1M/250k Haiku 3 tokens + 100k PlayHT characters, by hand:
    assert session_cost(
        rates_for(*USAGES[1][:3]),
        stt_seconds=3600,
        llm_input_tokens=1_000_000,
        llm_output_tokens=250_000,
        tts_characters=100_000,
    ) == pytest.approx(60 * 0.0058 + 0.25 + 0.25 * 1.25 + 100 * 0.030)


async def test_users_read_only_their_own_voice_sessions_and_turns(stack, service):
    sessions = {user: str(uuid.uuid4()) for user in (stack.user_a, stack.user_b)}
    for user, sid in sessions.items():
        await service.table("voice_sessions").insert({"id": sid, "user_id": str(user)}).execute()
        await (
            service.table("voice_turns")
            .insert({"session_id": sid, "user_id": str(user), "turn_index": 0, "voice_to_voice_ms": 900})
            .execute()
        )
    for user, sid in sessions.items():
        sb, http = await as_user(stack, user)
        try:
            mine = (await sb.table("voice_sessions").select("id,user_id").execute()).data
            turns = (await sb.table("voice_turns").select("session_id").execute()).data
        finally:
            await http.aclose()
        assert sid in {r["id"] for r in mine} and {r["user_id"] for r in mine} == {str(user)}
        assert {t["session_id"] for t in turns} <= {r["id"] for r in mine} and sid in {t["session_id"] for t in turns}
    anon, http = await client(stack, stack.api.anon_key)
    try:
        assert (await anon.table("voice_sessions").select("id").execute()).data == []
    finally:
        await http.aclose()


async def test_users_rate_only_their_own_sessions(stack, service):
    """voice_feedback's RLS: a user gives, reads and changes the rating of their own session only; anon nothing."""
    sessions = {user: str(uuid.uuid4()) for user in (stack.user_a, stack.user_b)}
    for user, sid in sessions.items():
        await service.table("voice_sessions").insert({"id": sid, "user_id": str(user)}).execute()
    a, b = stack.user_a, stack.user_b
    sb, http = await as_user(stack, a)
    try:
        await sb.table("voice_feedback").insert({"id": sessions[a], "user_id": str(a), "rating": 4}).execute()
        await sb.table("voice_feedback").update({"rating": 5, "comment": "great"}).eq("id", sessions[a]).execute()
        # B's session, even claiming to be B: refused by the policy
        with pytest.raises(APIError):
            await sb.table("voice_feedback").insert({"id": sessions[b], "user_id": str(b), "rating": 1}).execute()
        with pytest.raises(APIError):
            await sb.table("voice_feedback").insert({"id": sessions[b], "user_id": str(a), "rating": 1}).execute()
        with pytest.raises(APIError):  # the rating's bounds hold for everyone
            await sb.table("voice_feedback").upsert({"id": sessions[a], "user_id": str(a), "rating": 6}).execute()
        mine = (await sb.table("voice_feedback").select("id,rating,comment").execute()).data
    finally:
        await http.aclose()
    assert mine == [{"id": sessions[a], "rating": 5, "comment": "great"}]
    await service.table("voice_feedback").insert({"id": sessions[b], "user_id": str(b), "rating": 2}).execute()
    sb, http = await as_user(stack, a)
    try:
        assert {r["id"] for r in (await sb.table("voice_feedback").select("id").execute()).data} == {sessions[a]}
        # B's rating cannot be changed by A: no row of B's is visible to update
        await sb.table("voice_feedback").update({"rating": 5}).eq("id", sessions[b]).execute()
    finally:
        await http.aclose()
    row = (await service.table("voice_feedback").select("rating").eq("id", sessions[b]).execute()).data
    assert row == [{"rating": 2}]
    anon, http = await client(stack, stack.api.anon_key)
    try:
        assert (await anon.table("voice_feedback").select("id").execute()).data == []
    finally:
        await http.aclose()
