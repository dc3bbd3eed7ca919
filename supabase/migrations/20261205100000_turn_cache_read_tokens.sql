-- Per turn, the input tokens the LLM read from its cache: Claude's prompt cache, or the local llama-server's
-- slot (its `cached_tokens`, of the turn's llm_input_tokens). The session row already has the total.
ALTER TABLE public.voice_turns ADD COLUMN IF NOT EXISTS llm_cache_read_tokens int NOT NULL DEFAULT 0
  CHECK (llm_cache_read_tokens >= 0);
