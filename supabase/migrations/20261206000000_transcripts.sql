-- Transcripts, opt-in per agent (store_transcripts): what the caller said (the final transcript) and what
-- Atlas said (the reply as it was spoken; what an interruption cut off is not in it), at most 4000 characters
-- each. NULL when the session's agent does not keep transcripts, and once the text is older than
-- ATLAS_TRANSCRIPT_RETENTION_DAYS: the server clears it (storage/outbox.py, hourly) and keeps the row's numbers.
--
-- Who reads it: the existing RLS policy "Users can view own turns" (20261121000000_voice_sessions.sql) is per
-- row, so a signed-in user reads the text of their own turns only; anon reads nothing; nobody but the service
-- role writes (there is no insert, update or delete policy).
ALTER TABLE public.voice_turns ADD COLUMN IF NOT EXISTS user_text text
  CONSTRAINT voice_turns_user_text_length CHECK (char_length(user_text) <= 4000);
ALTER TABLE public.voice_turns ADD COLUMN IF NOT EXISTS bot_text text
  CONSTRAINT voice_turns_bot_text_length CHECK (char_length(bot_text) <= 4000);

COMMENT ON COLUMN public.voice_turns.user_text IS
  'What the caller said in this turn (final transcript, <= 4000 chars). Only for agents with store_transcripts; '
  'set to NULL after ATLAS_TRANSCRIPT_RETENTION_DAYS. Readable by the row''s user (RLS).';
COMMENT ON COLUMN public.voice_turns.bot_text IS
  'What Atlas said in this turn, as spoken (<= 4000 chars). Only for agents with store_transcripts; '
  'set to NULL after ATLAS_TRANSCRIPT_RETENTION_DAYS. Readable by the row''s user (RLS).';

-- The hourly retention pass looks for old rows that still hold text.
CREATE INDEX IF NOT EXISTS idx_voice_turns_transcript_created ON public.voice_turns (created_at)
  WHERE user_text IS NOT NULL OR bot_text IS NOT NULL;

-- The agent that answered (config/agents.py; `atlas` without an agent file), for comparing agents side by side.
ALTER TABLE public.voice_sessions ADD COLUMN IF NOT EXISTS agent text
  CONSTRAINT voice_sessions_agent_length CHECK (char_length(agent) <= 64);
COMMENT ON COLUMN public.voice_sessions.agent IS 'The agent that answered (ATLAS_AGENT_CONFIG; atlas = the built-in).';
