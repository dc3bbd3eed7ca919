-- Supabase's conventions on a bare PostgreSQL, so that migrations written for Supabase apply unchanged and the
-- API roles behave as on Supabase. Run once, as the superuser `postgres`, on the database `postgres`, before the
-- migrations. Modelled on supabase/postgres' initial schema and supabase/auth's first migration; only what a
-- migration or a request through PostgREST can observe is recreated.

-- ---- API roles -------------------------------------------------------------------------------------------------
-- PostgREST connects as `authenticator` (LOGIN, NOINHERIT: it has no rights of its own) and switches, per request,
-- to the role named by the JWT's `role` claim.
create role anon nologin noinherit;
create role authenticated nologin noinherit;
create role service_role nologin noinherit bypassrls;
create role authenticator login noinherit;
grant anon, authenticated, service_role to authenticator;

-- Roles that Supabase-generated migrations (supabase db diff / dump) mention in GRANTs and OWNER TO clauses.
create role supabase_admin login superuser createdb createrole replication bypassrls;
create role supabase_auth_admin login noinherit createrole;
create role supabase_storage_admin login noinherit createrole;
create role dashboard_user nologin createdb createrole replication;
grant anon, authenticated, service_role to postgres;

-- ---- extensions --------------------------------------------------------------------------------------------------
create schema if not exists extensions;
create extension if not exists "uuid-ossp" with schema extensions;
create extension if not exists pgcrypto with schema extensions;
grant usage on schema extensions to postgres, anon, authenticated, service_role;
grant all on all functions in schema extensions to postgres, anon, authenticated, service_role;
alter default privileges in schema extensions grant all on functions to postgres, anon, authenticated, service_role;

-- Everything resolves `public` then `extensions` (uuid_generate_v4(), gen_random_uuid(), crypt(), ...).
do $$
begin
  execute format('alter database %I set search_path to "$user", public, extensions', current_database());
end
$$;
alter role postgres set search_path to "$user", public, extensions;
alter role authenticator set search_path to "$user", public, extensions;
set search_path to "$user", public, extensions;

-- ---- schema public: what the API roles may do by default --------------------------------------------------------
-- Supabase grants the API roles everything on new tables, sequences and functions in `public` (RLS, not GRANT,
-- is what restricts them), so migrations rarely GRANT.
grant usage on schema public to postgres, anon, authenticated, service_role;
alter default privileges in schema public grant all on tables to postgres, anon, authenticated, service_role;
alter default privileges in schema public grant all on sequences to postgres, anon, authenticated, service_role;
alter default privileges in schema public grant all on functions to postgres, anon, authenticated, service_role;
alter default privileges for role supabase_admin in schema public
  grant all on tables to postgres, anon, authenticated, service_role;
alter default privileges for role supabase_admin in schema public
  grant all on sequences to postgres, anon, authenticated, service_role;
alter default privileges for role supabase_admin in schema public
  grant all on functions to postgres, anon, authenticated, service_role;

-- ---- schema auth -------------------------------------------------------------------------------------------------
create schema if not exists auth authorization supabase_auth_admin;

create table auth.users (
  instance_id uuid,
  id uuid not null default extensions.gen_random_uuid() primary key,
  aud varchar(255),
  role varchar(255),
  email varchar(255),
  encrypted_password varchar(255),
  email_confirmed_at timestamptz,
  invited_at timestamptz,
  confirmation_token varchar(255),
  confirmation_sent_at timestamptz,
  recovery_token varchar(255),
  recovery_sent_at timestamptz,
  email_change_token_new varchar(255),
  email_change varchar(255),
  email_change_sent_at timestamptz,
  last_sign_in_at timestamptz,
  raw_app_meta_data jsonb,
  raw_user_meta_data jsonb,
  is_super_admin boolean,
  created_at timestamptz default now(),
  updated_at timestamptz default now(),
  phone text unique default null,
  phone_confirmed_at timestamptz,
  confirmed_at timestamptz generated always as (least(email_confirmed_at, phone_confirmed_at)) stored,
  banned_until timestamptz,
  deleted_at timestamptz,
  is_anonymous boolean not null default false
);
create index users_instance_id_email_idx on auth.users using btree (instance_id, lower(email));
alter table auth.users owner to supabase_auth_admin;

-- The request's JWT claims, as PostgREST sets them (`request.jwt.claims`, a JSON text; the older per-claim
-- settings `request.jwt.claim.<name>` are still read first, as Supabase's functions do).
create or replace function auth.uid() returns uuid
  language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.sub', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
  )::uuid
$$;

create or replace function auth.role() returns text
  language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.role', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
  )::text
$$;

create or replace function auth.email() returns text
  language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.email', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'email')
  )::text
$$;

create or replace function auth.jwt() returns jsonb
  language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim', true), ''),
    nullif(current_setting('request.jwt.claims', true), '')
  )::jsonb
$$;

alter function auth.uid() owner to supabase_auth_admin;
alter function auth.role() owner to supabase_auth_admin;
alter function auth.email() owner to supabase_auth_admin;
alter function auth.jwt() owner to supabase_auth_admin;

grant usage on schema auth to anon, authenticated, service_role, postgres, dashboard_user;
grant execute on function auth.uid(), auth.role(), auth.email(), auth.jwt()
  to public, anon, authenticated, service_role, postgres, dashboard_user;
grant all on all tables in schema auth to postgres, dashboard_user, supabase_auth_admin;
grant references on auth.users to postgres;

-- ---- realtime ----------------------------------------------------------------------------------------------------
-- Migrations often `alter publication supabase_realtime add table ...`.
create publication supabase_realtime;
