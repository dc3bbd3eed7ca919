-- How the call went, in the user's words: one rating (1-5) and an optional comment per session, asked for by the
-- page at the session's end (POST /feedback with the session's feedbackToken, or a `feedback` message while the
-- session is live). A later rating of the same session replaces the earlier one. `id` is the session's id.
--
-- Satisfied: a rating of 4 or 5; reported an issue: 1 or 2 (the plan's targets: over 85% satisfied, under 5%
-- reporting issues). The server writes with the service role; RLS lets a signed-in user read, give and change
-- the rating of their own sessions only (the session must be theirs), never another's.
CREATE TABLE IF NOT EXISTS public.voice_feedback (
  id uuid PRIMARY KEY REFERENCES public.voice_sessions(id) ON DELETE CASCADE,
  user_id uuid REFERENCES auth.users(id) ON DELETE CASCADE,
  rating smallint NOT NULL CHECK (rating BETWEEN 1 AND 5),
  comment text CONSTRAINT voice_feedback_comment_length CHECK (char_length(comment) <= 1000),
  created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS idx_voice_feedback_created ON public.voice_feedback (created_at DESC);
CREATE INDEX IF NOT EXISTS idx_voice_feedback_user ON public.voice_feedback (user_id, created_at DESC);

ALTER TABLE public.voice_feedback ENABLE ROW LEVEL SECURITY;

DROP POLICY IF EXISTS "Users can view own feedback" ON public.voice_feedback;
CREATE POLICY "Users can view own feedback" ON public.voice_feedback
  FOR SELECT TO authenticated USING (auth.uid() = user_id);

DROP POLICY IF EXISTS "Users can rate own sessions" ON public.voice_feedback;
CREATE POLICY "Users can rate own sessions" ON public.voice_feedback
  FOR INSERT TO authenticated
  WITH CHECK (
    auth.uid() = user_id
    AND EXISTS (SELECT 1 FROM public.voice_sessions s WHERE s.id = voice_feedback.id AND s.user_id = auth.uid())
  );

DROP POLICY IF EXISTS "Users can change own ratings" ON public.voice_feedback;
CREATE POLICY "Users can change own ratings" ON public.voice_feedback
  FOR UPDATE TO authenticated
  USING (auth.uid() = user_id)
  WITH CHECK (
    auth.uid() = user_id
    AND EXISTS (SELECT 1 FROM public.voice_sessions s WHERE s.id = voice_feedback.id AND s.user_id = auth.uid())
  );

GRANT SELECT, INSERT, UPDATE ON public.voice_feedback TO authenticated;

COMMENT ON TABLE public.voice_feedback IS
  'One rating (1-5) and optional comment per session, from its user (POST /feedback). Satisfied: 4-5; issue: 1-2.';
