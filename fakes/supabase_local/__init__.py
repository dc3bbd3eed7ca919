"""A local stand-in for Supabase made of real parts: a throwaway PostgreSQL cluster (`postgres.LocalPostgres`),
Supabase's roles, `auth` schema and privileges recreated by `bootstrap.sql`, and a PostgREST-compatible HTTP
endpoint (`postgrest.LocalPostgrest`) that the unmodified supabase-py client talks to."""

from fakes.supabase_local.postgres import BOOTSTRAP_SQL, LocalPostgres
from fakes.supabase_local.postgrest import LocalPostgrest, make_jwt

__all__ = ["BOOTSTRAP_SQL", "LocalPostgres", "LocalPostgrest", "make_jwt"]
