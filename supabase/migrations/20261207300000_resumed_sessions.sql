-- A client that lost its connection resumes its conversation in a new session (session_start `resume`): the new
-- row names the session it continues and how many times the conversation was resumed before it. A conversation
-- is the chain of its sessions; each keeps its own figures.
ALTER TABLE public.voice_sessions ADD COLUMN IF NOT EXISTS resumed_from uuid;
ALTER TABLE public.voice_sessions ADD COLUMN IF NOT EXISTS reconnects integer NOT NULL DEFAULT 0
  CONSTRAINT voice_sessions_reconnects_nonnegative CHECK (reconnects >= 0);
COMMENT ON COLUMN public.voice_sessions.resumed_from IS
  'The session this one continues after the client reconnected (session_start resume), else NULL.';
COMMENT ON COLUMN public.voice_sessions.reconnects IS 'Times the conversation was resumed before this session.';
CREATE INDEX IF NOT EXISTS idx_voice_sessions_resumed_from ON public.voice_sessions (resumed_from)
  WHERE resumed_from IS NOT NULL;
