-- Atlas Voice: one row per voice session and one per turn, with latency, usage and cost.
-- Written for Supabase (auth.users, auth.uid(), the service_role that bypasses RLS) and applied
-- unchanged to a hosted project (`supabase db push`) or to the test suite's local Postgres.
--
-- Differences from the spec's table, and why:
--   * user_id is NULL for sessions opened without auth (SUPABASE_JWT_SECRET unset): the client's
--     unverified userId is kept in client_user_id instead of pretending it is an auth.users id.
--   * conversation_id is the client's text id (the spec's conversations table does not exist).
--   * cost_usd is still GENERATED, but from per-row rates the server copies from config/prices.py
--     for the models that session used, so the cost is right for any model and matches Python's.

CREATE EXTENSION IF NOT EXISTS "uuid-ossp" WITH SCHEMA extensions;

CREATE TABLE IF NOT EXISTS public.voice_sessions (
  id uuid PRIMARY KEY DEFAULT extensions.uuid_generate_v4(),
  user_id uuid REFERENCES auth.users(id) ON DELETE CASCADE,
  client_user_id text,
  conversation_id text,
  transport text NOT NULL DEFAULT 'websocket' CHECK (transport IN ('websocket', 'twilio', 'daily')),

  started_at timestamptz NOT NULL DEFAULT now(),
  ended_at timestamptz,
  end_reason text,

  -- Usage
  stt_duration_seconds numeric NOT NULL DEFAULT 0,
  stt_requests int NOT NULL DEFAULT 0,
  llm_input_tokens int NOT NULL DEFAULT 0,
  llm_output_tokens int NOT NULL DEFAULT 0,
  llm_cache_read_tokens int NOT NULL DEFAULT 0,
  llm_cache_write_tokens int NOT NULL DEFAULT 0,
  llm_latency_ms int NOT NULL DEFAULT 0,
  tts_characters int NOT NULL DEFAULT 0,
  tts_latency_ms int NOT NULL DEFAULT 0,

  -- Providers and models
  stt_provider text, stt_model text,
  llm_provider text, llm_model text,
  tts_provider text, tts_model text,

  -- Rates (USD) in force for this session's models, from config/prices.py
  stt_usd_per_minute numeric NOT NULL DEFAULT 0,
  llm_input_usd_per_mtok numeric NOT NULL DEFAULT 0,
  llm_output_usd_per_mtok numeric NOT NULL DEFAULT 0,
  llm_cache_read_usd_per_mtok numeric NOT NULL DEFAULT 0,
  llm_cache_write_usd_per_mtok numeric NOT NULL DEFAULT 0,
  tts_usd_per_kchar numeric NOT NULL DEFAULT 0,

  cost_usd numeric GENERATED ALWAYS AS (
    stt_duration_seconds / 60.0 * stt_usd_per_minute
    + llm_input_tokens / 1000000.0 * llm_input_usd_per_mtok
    + llm_output_tokens / 1000000.0 * llm_output_usd_per_mtok
    + llm_cache_read_tokens / 1000000.0 * llm_cache_read_usd_per_mtok
    + llm_cache_write_tokens / 1000000.0 * llm_cache_write_usd_per_mtok
    + tts_characters / 1000.0 * tts_usd_per_kchar
  ) STORED,

  -- Performance
  turns_count int NOT NULL DEFAULT 0,
  avg_latency_ms int,
  p95_latency_ms int,
  interruptions_count int NOT NULL DEFAULT 0,
  errors_count int NOT NULL DEFAULT 0,

  -- Metadata
  user_agent text,
  ip_address inet,

  CONSTRAINT voice_sessions_ended_check CHECK (ended_at IS NULL OR ended_at > started_at)
);

CREATE INDEX IF NOT EXISTS idx_voice_sessions_user_date ON public.voice_sessions (user_id, started_at DESC);
CREATE INDEX IF NOT EXISTS idx_voice_sessions_started ON public.voice_sessions (started_at DESC);
CREATE INDEX IF NOT EXISTS idx_voice_sessions_cost ON public.voice_sessions (cost_usd DESC);
CREATE INDEX IF NOT EXISTS idx_voice_sessions_latency ON public.voice_sessions (avg_latency_ms);

CREATE TABLE IF NOT EXISTS public.voice_turns (
  id uuid PRIMARY KEY DEFAULT extensions.uuid_generate_v4(),
  session_id uuid NOT NULL REFERENCES public.voice_sessions(id) ON DELETE CASCADE,
  user_id uuid REFERENCES auth.users(id) ON DELETE CASCADE,
  turn_index int NOT NULL CHECK (turn_index >= 0),

  user_text_chars int NOT NULL DEFAULT 0,
  bot_text_chars int NOT NULL DEFAULT 0,
  user_stopped_at timestamptz,
  first_audio_at timestamptz,

  stt_latency_ms int,        -- user stopped speaking -> final transcript
  llm_ttfb_ms int,           -- LLM request -> first token
  tts_ttfa_ms int,           -- first sentence to TTS -> first audio
  voice_to_voice_ms int,     -- user stopped speaking -> first bot audio leaves the server

  llm_input_tokens int NOT NULL DEFAULT 0,
  llm_output_tokens int NOT NULL DEFAULT 0,
  tts_characters int NOT NULL DEFAULT 0,
  interrupted boolean NOT NULL DEFAULT false,
  error_code text,

  created_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT voice_turns_session_index UNIQUE (session_id, turn_index)
);

CREATE INDEX IF NOT EXISTS idx_voice_turns_session ON public.voice_turns (session_id, turn_index);
CREATE INDEX IF NOT EXISTS idx_voice_turns_user_date ON public.voice_turns (user_id, created_at DESC);

-- Row level security: users read their own rows; the server writes with the service role
-- (which bypasses RLS), so no insert/update policy is granted to end users.
ALTER TABLE public.voice_sessions ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.voice_turns ENABLE ROW LEVEL SECURITY;

DROP POLICY IF EXISTS "Users can view own sessions" ON public.voice_sessions;
CREATE POLICY "Users can view own sessions" ON public.voice_sessions
  FOR SELECT TO authenticated USING (auth.uid() = user_id);

DROP POLICY IF EXISTS "Users can view own turns" ON public.voice_turns;
CREATE POLICY "Users can view own turns" ON public.voice_turns
  FOR SELECT TO authenticated USING (auth.uid() = user_id);
