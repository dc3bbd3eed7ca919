-- The embedded store (SUPABASE_URL unset): the same two tables as
-- supabase/migrations/20261121000000_voice_sessions.sql, in SQLite's types. Timestamps are ISO 8601
-- text in UTC; cost_usd is generated with the same formula. tests/test_recording.py checks that the
-- columns match the Postgres migration's.

CREATE TABLE IF NOT EXISTS voice_sessions (
  id TEXT PRIMARY KEY,
  user_id TEXT,
  client_user_id TEXT,
  conversation_id TEXT,
  transport TEXT NOT NULL DEFAULT 'websocket' CHECK (transport IN ('websocket', 'twilio', 'daily', 'webrtc', 'rtvi_ws')),
  started_at TEXT NOT NULL,
  ended_at TEXT,
  end_reason TEXT,
  stt_duration_seconds REAL NOT NULL DEFAULT 0,
  stt_requests INTEGER NOT NULL DEFAULT 0,
  llm_input_tokens INTEGER NOT NULL DEFAULT 0,
  llm_output_tokens INTEGER NOT NULL DEFAULT 0,
  llm_cache_read_tokens INTEGER NOT NULL DEFAULT 0,
  llm_cache_write_tokens INTEGER NOT NULL DEFAULT 0,
  llm_latency_ms INTEGER NOT NULL DEFAULT 0,
  tts_characters INTEGER NOT NULL DEFAULT 0,
  tts_latency_ms INTEGER NOT NULL DEFAULT 0,
  stt_provider TEXT, stt_model TEXT,
  llm_provider TEXT, llm_model TEXT,
  tts_provider TEXT, tts_model TEXT,
  stt_usd_per_minute REAL NOT NULL DEFAULT 0,
  llm_input_usd_per_mtok REAL NOT NULL DEFAULT 0,
  llm_output_usd_per_mtok REAL NOT NULL DEFAULT 0,
  llm_cache_read_usd_per_mtok REAL NOT NULL DEFAULT 0,
  llm_cache_write_usd_per_mtok REAL NOT NULL DEFAULT 0,
  tts_usd_per_kchar REAL NOT NULL DEFAULT 0,
  cost_usd REAL GENERATED ALWAYS AS (
    stt_duration_seconds / 60.0 * stt_usd_per_minute
    + llm_input_tokens / 1000000.0 * llm_input_usd_per_mtok
    + llm_output_tokens / 1000000.0 * llm_output_usd_per_mtok
    + llm_cache_read_tokens / 1000000.0 * llm_cache_read_usd_per_mtok
    + llm_cache_write_tokens / 1000000.0 * llm_cache_write_usd_per_mtok
    + tts_characters / 1000.0 * tts_usd_per_kchar
  ) STORED,
  turns_count INTEGER NOT NULL DEFAULT 0,
  avg_latency_ms INTEGER,
  p95_latency_ms INTEGER,
  interruptions_count INTEGER NOT NULL DEFAULT 0,
  errors_count INTEGER NOT NULL DEFAULT 0,
  user_agent TEXT,
  ip_address TEXT,
  agent TEXT CHECK (agent IS NULL OR length(agent) <= 64),
  variant TEXT CHECK (variant IS NULL OR length(variant) <= 64),
  resumed_from TEXT,
  reconnects INTEGER NOT NULL DEFAULT 0,
  CHECK (ended_at IS NULL OR ended_at > started_at)
);

CREATE INDEX IF NOT EXISTS idx_voice_sessions_user_date ON voice_sessions (user_id, started_at DESC);
CREATE INDEX IF NOT EXISTS idx_voice_sessions_started ON voice_sessions (started_at DESC);

CREATE TABLE IF NOT EXISTS voice_turns (
  id TEXT PRIMARY KEY,
  session_id TEXT NOT NULL REFERENCES voice_sessions(id) ON DELETE CASCADE,
  user_id TEXT,
  turn_index INTEGER NOT NULL CHECK (turn_index >= 0),
  user_text_chars INTEGER NOT NULL DEFAULT 0,
  bot_text_chars INTEGER NOT NULL DEFAULT 0,
  user_stopped_at TEXT,
  first_audio_at TEXT,
  stt_latency_ms INTEGER,
  llm_ttfb_ms INTEGER,
  tts_ttfa_ms INTEGER,
  voice_to_voice_ms INTEGER,
  llm_input_tokens INTEGER NOT NULL DEFAULT 0,
  llm_output_tokens INTEGER NOT NULL DEFAULT 0,
  tts_characters INTEGER NOT NULL DEFAULT 0,
  interrupted INTEGER NOT NULL DEFAULT 0,
  error_code TEXT,
  preempted INTEGER NOT NULL DEFAULT 0,
  preempt_cancelled INTEGER NOT NULL DEFAULT 0,
  preempt_input_tokens INTEGER NOT NULL DEFAULT 0,
  llm_cache_read_tokens INTEGER NOT NULL DEFAULT 0,
  -- what was said (agents with store_transcripts only; cleared after ATLAS_TRANSCRIPT_RETENTION_DAYS)
  user_text TEXT CHECK (user_text IS NULL OR length(user_text) <= 4000),
  bot_text TEXT CHECK (bot_text IS NULL OR length(bot_text) <= 4000),
  created_at TEXT NOT NULL,
  UNIQUE (session_id, turn_index)
);

CREATE INDEX IF NOT EXISTS idx_voice_turns_session ON voice_turns (session_id, turn_index);
CREATE INDEX IF NOT EXISTS idx_voice_turns_created ON voice_turns (created_at DESC);

-- How the call went (supabase/migrations/20261207100000_feedback.sql): one rating per session, `id` the session's.
CREATE TABLE IF NOT EXISTS voice_feedback (
  id TEXT PRIMARY KEY REFERENCES voice_sessions(id) ON DELETE CASCADE,
  user_id TEXT,
  rating INTEGER NOT NULL CHECK (rating BETWEEN 1 AND 5),
  comment TEXT CHECK (comment IS NULL OR length(comment) <= 1000),
  created_at TEXT NOT NULL
);

CREATE INDEX IF NOT EXISTS idx_voice_feedback_created ON voice_feedback (created_at DESC);
