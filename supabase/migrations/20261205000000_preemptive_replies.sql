-- Preemptive replies (processors/turn_end.py): whether a turn's reply was asked for before the turn
-- ended, and what the withdrawn ones cost (requests the caller talked over, and their input tokens,
-- estimated from their messages).
ALTER TABLE public.voice_turns ADD COLUMN IF NOT EXISTS preempted boolean NOT NULL DEFAULT false;
ALTER TABLE public.voice_turns ADD COLUMN IF NOT EXISTS preempt_cancelled int NOT NULL DEFAULT 0
  CHECK (preempt_cancelled >= 0);
ALTER TABLE public.voice_turns ADD COLUMN IF NOT EXISTS preempt_input_tokens int NOT NULL DEFAULT 0
  CHECK (preempt_input_tokens >= 0);
