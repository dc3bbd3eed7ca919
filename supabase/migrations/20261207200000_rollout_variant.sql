-- Rollout by percentage (bots/rollout.py): the variant a session was given (an agent of the agent file, or
-- `control` for the default agent under a rollout); NULL when no rollout was active or the client asked for an
-- agent by name. The dashboard and `atlas-voice report` compare the variants side by side.
ALTER TABLE public.voice_sessions ADD COLUMN IF NOT EXISTS variant text
  CONSTRAINT voice_sessions_variant_length CHECK (char_length(variant) <= 64);
COMMENT ON COLUMN public.voice_sessions.variant IS
  'The rollout variant of the session (ATLAS_ROLLOUT: an agent name, or control); NULL outside a rollout.';
CREATE INDEX IF NOT EXISTS idx_voice_sessions_variant ON public.voice_sessions (variant, started_at DESC)
  WHERE variant IS NOT NULL;
