"""One typed settings object for the whole server.

Every field reads an environment variable (or a line of `.env` in the working directory). The
README's settings table lists each one with its default; keep the two in step.
"""

from __future__ import annotations

import ipaddress
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "atlas-voice"


def _env(name: str) -> AliasChoices:
    return AliasChoices(name)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    # --- server -------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", validation_alias=_env("ATLAS_HOST"))
    port: int = Field(8000, validation_alias=_env("ATLAS_PORT"))
    # Worker processes serving the port (`serve --workers`): 0 = one per CPU core. Each has its own engines,
    # pipelines and outbox; one local LLM server serves them all.
    workers: int = Field(0, ge=0, le=64, validation_alias=_env("ATLAS_WORKERS"))
    # Set by the supervisor in each worker (0, 1, ...): names the worker's own outbox file. Not for users.
    worker_index: int | None = Field(None, ge=0, validation_alias=_env("ATLAS_WORKER_INDEX"))
    log_level: str = Field("INFO", validation_alias=_env("ATLAS_LOG_LEVEL"))
    # `json`: one JSON object a line, with the session id on every line of a session (config/logging.py).
    log_format: Literal["text", "json"] = Field("text", validation_alias=_env("ATLAS_LOG_FORMAT"))
    # Comma-separated in the environment (NoDecode: pydantic-settings would otherwise demand JSON).
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=_env("ATLAS_ALLOWED_ORIGINS")
    )
    # Auth off (no SUPABASE_JWT_SECRET / SUPABASE_JWKS_URL) is allowed on a loopback address only, unless
    # this says anonymous sessions from the network are intended.
    allow_anonymous: bool = Field(False, validation_alias=_env("ATLAS_ALLOW_ANONYMOUS"))

    # --- engine choice ------------------------------------------------------------------------
    # "auto" picks the cloud provider whose key is set, else the local engine.
    stt: Literal["auto", "whisper", "deepgram"] = Field("auto", validation_alias=_env("ATLAS_STT"))
    llm: Literal["auto", "llama", "openai", "anthropic"] = Field("auto", validation_alias=_env("ATLAS_LLM"))
    tts: Literal["auto", "piper", "elevenlabs", "playht"] = Field("auto", validation_alias=_env("ATLAS_TTS"))

    # --- cloud providers (vendor-standard variable names) ---------------------------------------
    deepgram_api_key: SecretStr | None = Field(None, validation_alias=_env("DEEPGRAM_API_KEY"))
    deepgram_base_url: str = Field("wss://api.deepgram.com", validation_alias=_env("DEEPGRAM_BASE_URL"))
    # nova-3 rather than the spec's nova-2: Deepgram's current streaming model, lower WER on
    # conversational English at the same latency; nova-2 still works through this setting.
    deepgram_model: str = Field("nova-3", validation_alias=_env("DEEPGRAM_MODEL"))
    deepgram_endpointing_ms: int = Field(300, validation_alias=_env("ATLAS_DEEPGRAM_ENDPOINTING_MS"))
    deepgram_utterance_end_ms: int = Field(1000, validation_alias=_env("ATLAS_DEEPGRAM_UTTERANCE_END_MS"))
    stt_replay_secs: float = Field(30.0, validation_alias=_env("ATLAS_STT_REPLAY_SECS"))

    anthropic_api_key: SecretStr | None = Field(None, validation_alias=_env("ANTHROPIC_API_KEY"))
    anthropic_base_url: str = Field("https://api.anthropic.com", validation_alias=_env("ANTHROPIC_BASE_URL"))
    anthropic_model: str = Field("claude-haiku-4-5", validation_alias=_env("ANTHROPIC_MODEL"))
    llm_retries: int = Field(2, validation_alias=_env("ATLAS_LLM_RETRIES"))
    llm_retry_budget_secs: float = Field(3.0, validation_alias=_env("ATLAS_LLM_RETRY_BUDGET_SECS"))
    llm_timeout_secs: float = Field(8.0, validation_alias=_env("ATLAS_LLM_TIMEOUT_SECS"))
    llm_fallback: Literal["local", "apology"] = Field("local", validation_alias=_env("ATLAS_LLM_FALLBACK"))

    elevenlabs_api_key: SecretStr | None = Field(None, validation_alias=_env("ELEVENLABS_API_KEY"))
    elevenlabs_base_url: str = Field("wss://api.elevenlabs.io", validation_alias=_env("ELEVENLABS_BASE_URL"))
    elevenlabs_voice_id: str = Field("21m00Tcm4TlvDq8EAJjs", validation_alias=_env("ELEVENLABS_VOICE_ID"))
    elevenlabs_model: str = Field("eleven_flash_v2_5", validation_alias=_env("ELEVENLABS_MODEL"))

    playht_api_key: SecretStr | None = Field(None, validation_alias=_env("PLAYHT_API_KEY"))
    playht_user_id: str | None = Field(None, validation_alias=_env("PLAYHT_USER_ID"))
    playht_base_url: str = Field("https://api.play.ht", validation_alias=_env("PLAYHT_BASE_URL"))
    playht_voice: str = Field(
        "s3://voice-cloning-zero-shot/d9ff78ba-d016-47f6-b0ef-dd630f59414e/female-cs/manifest.json",
        validation_alias=_env("PLAYHT_VOICE"),
    )
    playht_output_format: Literal["raw", "mp3"] = Field("raw", validation_alias=_env("PLAYHT_OUTPUT_FORMAT"))
    playht_speed: float = Field(1.05, validation_alias=_env("PLAYHT_SPEED"))
    playht_voice_engine: str = Field("PlayHT2.0-turbo", validation_alias=_env("PLAYHT_VOICE_ENGINE"))
    tts_timeout_secs: float = Field(5.0, validation_alias=_env("ATLAS_TTS_TIMEOUT_SECS"))

    # --- local engines --------------------------------------------------------------------------
    cache_dir: Path = Field(default_factory=_default_cache_dir, validation_alias=_env("ATLAS_CACHE_DIR"))
    llm_model_path: Path | None = Field(None, validation_alias=_env("ATLAS_LLM_MODEL_PATH"))
    llm_url: str | None = Field(None, validation_alias=_env("ATLAS_LLM_URL"))
    llm_api_key: str = Field("none", validation_alias=_env("ATLAS_LLM_API_KEY"))
    llm_model_name: str = Field("local", validation_alias=_env("ATLAS_LLM_MODEL_NAME"))
    llm_threads: int = Field(2, validation_alias=_env("ATLAS_LLM_THREADS"))
    llm_context_tokens: int = Field(4096, ge=512, validation_alias=_env("ATLAS_LLM_CONTEXT_TOKENS"))
    # llama.cpp's llama-server (services/local/llama_server.py): unset finds .venv/bin/llama-server, then PATH.
    llama_server: Path | None = Field(None, validation_alias=_env("ATLAS_LLAMA_SERVER"))
    # Sessions the local LLM serves at once, each in a slot that keeps its conversation's KV cache between
    # turns: with the local LLM as the session's LLM, a process admits min(ATLAS_MAX_SESSIONS, this) sessions
    # and refuses the next with SERVER_BUSY. Claude's fallback requests take any free slot. On 2 cores one
    # offline call keeps p95 under 2.5 s and two reach ~5.4 s (bench/results/offline-capacity-2026-12-05.md):
    # 2 lets a second call in, slower; more only on more cores.
    llm_slots: int = Field(2, ge=1, le=64, validation_alias=_env("ATLAS_LLM_SLOTS"))
    # llama-server's --cache-reuse: the shortest run of a slot's cached tokens shifted into place when the
    # window drops the oldest exchange, instead of evaluated again; 0 turns the reuse off.
    llm_cache_reuse_tokens: int = Field(16, ge=0, validation_alias=_env("ATLAS_LLM_CACHE_REUSE_TOKENS"))
    # Tokens a local LLM reply may generate: three spoken sentences are ~60-90, and every token past the
    # spoken ones is CPU taken from the other sessions (ATLAS_MAX_TOKENS bounds Claude's replies).
    llm_max_tokens: int = Field(150, ge=16, validation_alias=_env("ATLAS_LLM_MAX_TOKENS"))
    llm_temperature: float = Field(0.7, validation_alias=_env("ATLAS_LLM_TEMPERATURE"))
    whisper_partials: bool = Field(True, validation_alias=_env("ATLAS_WHISPER_PARTIALS"))
    whisper_partial_interval_secs: float = Field(0.8, validation_alias=_env("ATLAS_WHISPER_PARTIAL_INTERVAL_SECS"))

    # --- conversation -----------------------------------------------------------------------------
    max_tokens: int = Field(300, validation_alias=_env("ATLAS_MAX_TOKENS"))
    # Words a reply needs before its first clause (up to , ; : or an em dash) is spoken on its own,
    # ahead of the rest of its sentence; 0 speaks whole sentences only.
    first_clause_words: int = Field(4, ge=0, validation_alias=_env("ATLAS_FIRST_CLAUSE_WORDS"))
    # Whole sentences a reply may speak (processors/spoken_reply.py): the rest is neither spoken nor kept, and
    # half a sentence (the token bound cut it) is never spoken; 0: no bound. The prompt asks for 2-3.
    reply_max_sentences: int = Field(3, ge=0, validation_alias=_env("ATLAS_REPLY_MAX_SENTENCES"))
    context_messages: int = Field(10, validation_alias=_env("ATLAS_CONTEXT_MESSAGES"))
    # Turn end. "rule" (processors/turn_end.py): the VAD stops after a short pause (0.2 s, see
    # resolved_vad_stop_secs) and the turn ends after the silence TurnEndRule asks for, from the words so
    # far: 1.5 s after unfinished words ("to", "and", "um", a number, a bare "hi Atlas"), else 0.9 s. Tuned in
    # `bench turns --rule` (bench/results/turn-rule-2026-12-05.md): no shorter rule, with or without
    # smart-turn (ATLAS_SMART_TURN adds its verdict to the rule), cut no one off on browser and phone audio;
    # 0.9 s ends a finished sentence ~100 ms sooner than the fixed 1.0 s, and survives a "hmm" the VAD does
    # not hear.
    # "fixed": the VAD stop (0.5 s) then the user-speech timeout (0.5 s), as before (bench/results/turns.md).
    turn_end: Literal["rule", "fixed"] = Field("rule", validation_alias=_env("ATLAS_TURN_END"))
    turn_done_secs: float = Field(0.9, gt=0, validation_alias=_env("ATLAS_TURN_DONE_SECS"))
    turn_unsure_secs: float = Field(0.9, gt=0, validation_alias=_env("ATLAS_TURN_UNSURE_SECS"))
    turn_open_secs: float = Field(1.5, gt=0, validation_alias=_env("ATLAS_TURN_OPEN_SECS"))
    # Preemptive replies (turn end "rule" only): the LLM starts on the transcript at a pause, `lead` seconds
    # before the turn would end (the LLM's usual time to a first token), and its reply is held until the
    # turn ends; a caller who goes on withdraws it (counted in voice_turns.preempt_cancelled /
    # preempt_input_tokens and /metrics).
    preempt: bool = Field(True, validation_alias=_env("ATLAS_PREEMPT"))
    preempt_lead_secs: float = Field(0.6, ge=0, validation_alias=_env("ATLAS_PREEMPT_LEAD_SECS"))
    preempt_max_per_turn: int = Field(3, ge=1, validation_alias=_env("ATLAS_PREEMPT_MAX_PER_TURN"))
    # Unset: 0.2 s with the rule, 0.5 s with the fixed turn end (resolved_vad_stop_secs).
    vad_stop_secs: float | None = Field(None, gt=0, validation_alias=_env("ATLAS_VAD_STOP_SECS"))
    user_speech_timeout_secs: float = Field(0.5, ge=0, validation_alias=_env("ATLAS_USER_SPEECH_TIMEOUT_SECS"))
    vad_start_secs: float = Field(0.2, validation_alias=_env("ATLAS_VAD_START_SECS"))
    # Pipecat's 0.6 volume gate held quiet speech back ~0.5 s past its onset (barge-in at ~750 ms);
    # 0.3 starts the turn ~0.3 s after onset on the same audio. Browsers' echo cancellation keeps
    # the bot's own voice out.
    vad_min_volume: float = Field(0.3, validation_alias=_env("ATLAS_VAD_MIN_VOLUME"))
    # Windows quieter than this (RMS, dBFS) are silence without running Silero: most of a call's input.
    vad_gate_dbfs: float = Field(-60.0, le=0, validation_alias=_env("ATLAS_VAD_GATE_DBFS"))
    # Smart-turn v3 instead of the speech timeout (off: see above; it also costs ~65 ms CPU per VAD stop).
    smart_turn: bool = Field(False, validation_alias=_env("ATLAS_SMART_TURN"))
    smart_turn_stop_secs: float = Field(1.5, validation_alias=_env("ATLAS_SMART_TURN_STOP_SECS"))

    # --- auth ---------------------------------------------------------------------------------
    supabase_jwt_secret: SecretStr | None = Field(None, validation_alias=_env("SUPABASE_JWT_SECRET"))
    supabase_jwks_url: str | None = Field(None, validation_alias=_env("SUPABASE_JWKS_URL"))
    jwt_audience: str = Field("authenticated", validation_alias=_env("ATLAS_JWT_AUDIENCE"))
    # The `iss` a token must carry; unset = `<SUPABASE_URL>/auth/v1` when SUPABASE_URL is set (else unchecked).
    jwt_issuer: str | None = Field(None, validation_alias=_env("ATLAS_JWT_ISSUER"))
    # Supabase's anonymous sign-ins (`is_anonymous: true`) are refused unless this is on.
    jwt_allow_anonymous_users: bool = Field(False, validation_alias=_env("ATLAS_JWT_ALLOW_ANONYMOUS_USERS"))

    # --- phone calls (Twilio) --------------------------------------------------------------------
    twilio_account_sid: str | None = Field(None, validation_alias=_env("TWILIO_ACCOUNT_SID"))
    twilio_auth_token: SecretStr | None = Field(None, validation_alias=_env("TWILIO_AUTH_TOKEN"))
    twilio_api_base_url: str = Field("https://api.twilio.com", validation_alias=_env("TWILIO_API_BASE_URL"))
    # The host name Twilio reaches this server at (TwiML stream URL, signature check behind a proxy).
    public_host: str | None = Field(None, validation_alias=_env("ATLAS_PUBLIC_HOST"))
    # Without TWILIO_AUTH_TOKEN the phone door is off (404); this opens it unsigned, for a local simulator only.
    twilio_allow_unsigned: bool = Field(False, validation_alias=_env("ATLAS_TWILIO_ALLOW_UNSIGNED"))
    # How long the single-use stream token in the webhook's TwiML stays valid (Twilio connects within a second).
    twilio_stream_token_secs: float = Field(60.0, gt=0, validation_alias=_env("ATLAS_TWILIO_STREAM_TOKEN_SECS"))

    # --- Daily rooms -------------------------------------------------------------------------------
    daily_api_key: SecretStr | None = Field(None, validation_alias=_env("DAILY_API_KEY"))
    daily_api_url: str = Field("https://api.daily.co/v1", validation_alias=_env("DAILY_API_URL"))

    # --- Pipecat clients: the RTVI doors (transports/rtvi) -----------------------------------------
    # STUN/TURN servers for the WebRTC door, comma-separated URLs (stun:host:port, turn:host:port); the server
    # uses them to find its own public address and hands them to the client. Empty: host candidates only, which
    # reach clients on the same network (or a server with a public address).
    webrtc_ice_servers: str = Field("", validation_alias=_env("ATLAS_WEBRTC_ICE_SERVERS"))
    # The key that signs the tokens Atlas hands clients (bots/tokens.py): `POST /start`'s tickets, a session's
    # feedback token. Empty: a random key per process; `serve --workers N` makes one for its workers. Several
    # machines behind one balancer: set the same value on each (a token is redeemed wherever a request lands).
    session_token_secret: SecretStr | None = Field(None, validation_alias=_env("ATLAS_SESSION_TOKEN_SECRET"))

    # --- recording (Supabase, or the embedded SQLite file when SUPABASE_URL is unset) -------------
    supabase_url: str | None = Field(None, validation_alias=_env("SUPABASE_URL"))
    supabase_service_role_key: SecretStr | None = Field(None, validation_alias=_env("SUPABASE_SERVICE_ROLE_KEY"))
    # The project's public anon key: with it, a user's history (GET /api/history) is read as that user, so
    # Supabase's RLS decides what they see; without it the service role reads, filtered by the token's user.
    supabase_anon_key: SecretStr | None = Field(None, validation_alias=_env("SUPABASE_ANON_KEY"))
    db_timeout_secs: float = Field(5.0, validation_alias=_env("ATLAS_DB_TIMEOUT_SECS"))
    sqlite_path: Path | None = Field(None, validation_alias=_env("ATLAS_SQLITE_PATH"))
    outbox_path: Path | None = Field(None, validation_alias=_env("ATLAS_OUTBOX_PATH"))
    outbox_max_backoff_secs: float = Field(60.0, validation_alias=_env("ATLAS_OUTBOX_MAX_BACKOFF_SECS"))
    # The outbox file's disk cap (storage/outbox.py: dead letters are pruned first, then new sessions wait).
    outbox_max_mb: float = Field(256.0, gt=0, validation_alias=_env("ATLAS_OUTBOX_MAX_MB"))
    dead_letter_retention_days: float = Field(30.0, gt=0, validation_alias=_env("ATLAS_DEAD_LETTER_RETENTION_DAYS"))
    # Stored transcript text (agents with store_transcripts) is deleted this many days after its turn; 0 = kept.
    transcript_retention_days: float = Field(30.0, ge=0, validation_alias=_env("ATLAS_TRANSCRIPT_RETENTION_DAYS"))

    # --- agents and tools (config/agents.py) ----------------------------------------------------
    # A TOML file of named agents (prompt, greeting, voice, language, tools ...); unset = the built-in Atlas agent.
    agent_config: Path | None = Field(None, validation_alias=_env("ATLAS_AGENT_CONFIG"))
    # The agent the phone door (/twilio/voice) answers with when the request names none; unset = the default.
    twilio_agent: str | None = Field(None, validation_alias=_env("ATLAS_TWILIO_AGENT"))
    # Python modules imported at start-up that register tools (bots.tools.tool); comma-separated.
    tool_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=_env("ATLAS_TOOL_MODULES")
    )
    # A tool call that has not returned in this long is abandoned; the caller hears an apology (TOOL_FAILED).
    tool_timeout_secs: float = Field(10.0, gt=0, le=120, validation_alias=_env("ATLAS_TOOL_TIMEOUT_SECS"))
    # Rollout by percentage (bots/rollout.py): "variant=percent" items, each variant an agent of the agent file
    # (e.g. "v2=10"); the rest of the users get the default agent. Empty: no rollout.
    rollout: str = Field("", validation_alias=_env("ATLAS_ROLLOUT"))
    # A file holding the rollout instead, read again whenever it changes (no restart): `atlas-voice rollout set`.
    rollout_file: Path | None = Field(None, validation_alias=_env("ATLAS_ROLLOUT_FILE"))

    # --- webhooks (storage/webhooks.py) -----------------------------------------------------------
    # Where `session.ended` events are POSTed (signed, retried through their own outbox); unset = none sent.
    webhook_url: str | None = Field(None, validation_alias=_env("ATLAS_WEBHOOK_URL"))
    # The HMAC-SHA256 key that signs each event (required with ATLAS_WEBHOOK_URL).
    webhook_secret: SecretStr | None = Field(None, validation_alias=_env("ATLAS_WEBHOOK_SECRET"))
    webhook_timeout_secs: float = Field(5.0, gt=0, validation_alias=_env("ATLAS_WEBHOOK_TIMEOUT_SECS"))
    # An event the receiver has not accepted this long after the call ended is dead-lettered.
    webhook_max_age_hours: float = Field(24.0, gt=0, validation_alias=_env("ATLAS_WEBHOOK_MAX_AGE_HOURS"))

    # --- monitoring -------------------------------------------------------------------------------
    # Bearer token for /dashboard and /api/dashboard; unset = dashboard disabled (404)
    admin_token: SecretStr | None = Field(None, validation_alias=_env("ATLAS_ADMIN_TOKEN"))
    # Wrong admin tokens one IP address may present in a minute before it gets 429 for the rest of it.
    admin_failures_per_minute: int = Field(10, ge=1, validation_alias=_env("ATLAS_ADMIN_FAILURES_PER_MINUTE"))
    # Bearer token for /metrics; unset = ATLAS_ADMIN_TOKEN, and with neither /metrics answers loopback only.
    metrics_token: SecretStr | None = Field(None, validation_alias=_env("ATLAS_METRICS_TOKEN"))
    alert_p95_ms: float = Field(5000.0, validation_alias=_env("ATLAS_ALERT_P95_MS"))
    alert_error_rate: float = Field(0.05, validation_alias=_env("ATLAS_ALERT_ERROR_RATE"))
    alert_cost_per_session_usd: float = Field(0.50, validation_alias=_env("ATLAS_ALERT_COST_PER_SESSION_USD"))
    alert_active_sessions: int = Field(100, validation_alias=_env("ATLAS_ALERT_ACTIVE_SESSIONS"))
    alert_window_secs: float = Field(300.0, validation_alias=_env("ATLAS_ALERT_WINDOW_SECS"))
    # Satisfaction (ratings of 4-5 among the session ratings of POST /feedback) below this fraction over the last
    # ATLAS_ALERT_SATISFACTION_WINDOW_SECS fires `satisfaction` (the plan's target: over 85% satisfied), once at
    # least ATLAS_ALERT_SATISFACTION_MIN_RATINGS ratings are in the window.
    alert_satisfaction: float = Field(0.85, ge=0, le=1, validation_alias=_env("ATLAS_ALERT_SATISFACTION"))
    alert_satisfaction_window_secs: float = Field(
        3600.0, gt=0, validation_alias=_env("ATLAS_ALERT_SATISFACTION_WINDOW_SECS")
    )
    alert_satisfaction_min_ratings: int = Field(10, ge=1, validation_alias=_env("ATLAS_ALERT_SATISFACTION_MIN_RATINGS"))

    # --- tracing (monitoring/tracing.py) ------------------------------------------------------------
    # OpenTelemetry spans per session and per turn (STT, LLM, TTS, tool calls), through Pipecat's tracing.
    # Off costs nothing: no tracer, and Pipecat's turn-tracking observers stay out of the pipeline.
    tracing: bool = Field(False, validation_alias=_env("ATLAS_TRACING"))
    # Where spans go, over OTLP/HTTP (`<endpoint>/v1/traces`); required with ATLAS_TRACING (or the
    # exporter's own OTEL_EXPORTER_OTLP_TRACES_ENDPOINT). Headers etc.: the exporter's OTEL_EXPORTER_OTLP_* vars.
    otel_exporter_otlp_endpoint: str = Field("", validation_alias=_env("OTEL_EXPORTER_OTLP_ENDPOINT"))
    otel_service_name: str = Field("atlas-voice", min_length=1, validation_alias=_env("OTEL_SERVICE_NAME"))

    # --- sessions -------------------------------------------------------------------------------
    # Sessions one worker process carries at once (its capacity: /readyz says 503 at it). The bench measured
    # ~25 sessions per process at 0% errors on one core (bench/README.md); a machine carries workers x this.
    max_sessions: int = Field(25, ge=1, validation_alias=_env("ATLAS_MAX_SESSIONS"))
    session_idle_timeout_secs: float = Field(600.0, validation_alias=_env("ATLAS_SESSION_IDLE_TIMEOUT_SECS"))
    session_max_secs: float = Field(3600.0, validation_alias=_env("ATLAS_SESSION_MAX_SECS"))
    # How long after a connection dropped its client may resume the conversation (session_start `resume`), with
    # the same context window, in a new session linked to the old one.
    resume_window_secs: float = Field(120.0, ge=0, validation_alias=_env("ATLAS_RESUME_WINDOW_SECS"))
    session_start_timeout_secs: float = Field(30.0, validation_alias=_env("ATLAS_SESSION_START_TIMEOUT_SECS"))
    max_audio_frame_bytes: int = Field(16384, ge=640, validation_alias=_env("ATLAS_MAX_AUDIO_FRAME_BYTES"))
    # Audio budget per connection, every door: real time plus a burst of this many seconds of audio; the
    # excess is dropped (AUDIO_RATE_EXCEEDED). 0 = no budget.
    audio_burst_secs: float = Field(2.0, ge=0, validation_alias=_env("ATLAS_AUDIO_BURST_SECS"))
    # A session whose pipeline has fallen this far behind its caller's audio ends (AUDIO_BACKLOG).
    max_audio_lag_secs: float = Field(5.0, gt=0, validation_alias=_env("ATLAS_MAX_AUDIO_LAG_SECS"))
    # A user turn ends after this much continuous speech, as if the caller had paused.
    max_user_turn_secs: float = Field(30.0, ge=5, validation_alias=_env("ATLAS_MAX_USER_TURN_SECS"))
    # The caller's 20 ms messages join into frames of this length before the pipeline (transports/common.py
    # AudioBatcher): half the per-frame work at 40 ms, for at most 20 ms of delay.
    audio_in_batch_ms: int = Field(40, ge=10, le=200, validation_alias=_env("ATLAS_AUDIO_IN_BATCH_MS"))
    max_text_message_bytes: int = Field(8192, validation_alias=_env("ATLAS_MAX_TEXT_MESSAGE_BYTES"))

    # --- abuse limits, every door (bots/limits.py; 0 turns one off) ---------------------------------------
    max_sessions_per_ip: int = Field(20, ge=0, validation_alias=_env("ATLAS_MAX_SESSIONS_PER_IP"))
    # Connections that have not started a session yet (no valid session_start / Twilio `start`), per IP and in all.
    max_pending_per_ip: int = Field(10, ge=0, validation_alias=_env("ATLAS_MAX_PENDING_PER_IP"))
    max_pending_connections: int = Field(200, ge=0, validation_alias=_env("ATLAS_MAX_PENDING_CONNECTIONS"))
    max_sessions_per_user: int = Field(5, ge=0, validation_alias=_env("ATLAS_MAX_SESSIONS_PER_USER"))
    session_starts_per_minute_per_ip: int = Field(
        60, ge=0, validation_alias=_env("ATLAS_SESSION_STARTS_PER_MINUTE_PER_IP")
    )
    session_starts_per_minute_per_user: int = Field(
        20, ge=0, validation_alias=_env("ATLAS_SESSION_STARTS_PER_MINUTE_PER_USER")
    )
    # A browser sends 50 audio messages a second; 3x that leaves room for controls and batching quirks.
    max_messages_per_sec: int = Field(150, ge=0, validation_alias=_env("ATLAS_MAX_MESSAGES_PER_SEC"))
    # --- shared state across worker processes and machines (bots/limits.py) -------------------------
    # Redis for the per-IP and per-user limits (live sessions and starts per minute), so they hold across every
    # worker and node; unset = each process keeps its own counts (one process, or one machine with sticky IPs).
    redis_url: SecretStr | None = Field(None, validation_alias=_env("REDIS_URL"))
    # When Redis cannot be reached: `open` = each process falls back to its own counts (calls keep coming),
    # `closed` = new sessions are refused with LIMITS_UNAVAILABLE. Live calls go on either way.
    redis_failure: Literal["open", "closed"] = Field("open", validation_alias=_env("ATLAS_REDIS_FAILURE"))
    redis_timeout_secs: float = Field(0.5, gt=0, validation_alias=_env("ATLAS_REDIS_TIMEOUT_SECS"))
    # Key prefix: several Atlas deployments may share one Redis.
    redis_prefix: str = Field("atlas", min_length=1, max_length=64, validation_alias=_env("ATLAS_REDIS_PREFIX"))

    # SIGTERM drains: /readyz answers 503 and no new session is admitted, while live sessions go on until they
    # end by themselves or this many seconds pass (match the orchestrator's termination grace to it). A second
    # SIGTERM (or Ctrl-C) ends them at once.
    drain_secs: float = Field(300.0, ge=0, validation_alias=_env("ATLAS_DRAIN_SECS"))
    # After the drain: the sessions still live are told SERVER_SHUTTING_DOWN and get this long to end
    # (session_end, rows to the outbox) before the exit.
    shutdown_grace_secs: float = Field(10.0, ge=0, validation_alias=_env("ATLAS_SHUTDOWN_GRACE_SECS"))

    @field_validator(
        "deepgram_api_key",
        "anthropic_api_key",
        "elevenlabs_api_key",
        "playht_api_key",
        "playht_user_id",
        "supabase_jwt_secret",
        "supabase_jwks_url",
        "supabase_url",
        "supabase_service_role_key",
        "supabase_anon_key",
        "admin_token",
        "sqlite_path",
        "outbox_path",
        "twilio_account_sid",
        "twilio_auth_token",
        "public_host",
        "daily_api_key",
        "jwt_issuer",
        "metrics_token",
        "redis_url",
        "worker_index",
        "agent_config",
        "twilio_agent",
        "webhook_url",
        "webhook_secret",
        "session_token_secret",
        "rollout_file",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("allowed_origins", "tool_modules", mode="before")
    @classmethod
    def _split_origins(cls, value):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @property
    def resolved_vad_stop_secs(self) -> float:
        """0.2 s with the turn-end rule, on Deepgram and on the local Whisper (which keeps the words of the
        segments just before a short pause as its context, so a sentence cut at its pauses keeps its words:
        services/local/engines.py); 0.5 s with the fixed turn end."""
        if self.vad_stop_secs is not None:
            return self.vad_stop_secs
        return 0.2 if self.turn_end == "rule" else 0.5

    @property
    def resolved_stt(self) -> str:
        if self.stt == "auto":
            return "deepgram" if self.deepgram_api_key else "whisper"
        return self.stt

    @property
    def resolved_llm(self) -> str:
        if self.llm == "auto":
            if self.anthropic_api_key:
                return "anthropic"
            return "openai" if self.llm_url else "llama"
        return self.llm

    @property
    def resolved_tts(self) -> str:
        if self.tts == "auto":
            if self.elevenlabs_api_key:
                return "elevenlabs"
            return "playht" if self.playht_api_key and self.playht_user_id else "piper"
        return self.tts

    @property
    def resolved_sqlite_path(self) -> Path:
        return self.sqlite_path or self.cache_dir / "atlas.sqlite3"

    @property
    def resume_store_path(self) -> Path:
        """Where the conversations a dropped client may resume are kept without Redis: beside the outbox, one file
        for every worker of the machine (storage/resume.py)."""
        return (self.outbox_path or self.cache_dir / "outbox.sqlite3").with_name("resume.sqlite3")

    @property
    def resolved_outbox_path(self) -> Path:
        """The outbox file; each worker process has its own (`outbox.worker1.sqlite3`), which the worker
        restarted in its place drains."""
        path = self.outbox_path or self.cache_dir / "outbox.sqlite3"
        if self.worker_index is None:
            return path
        return path.with_name(f"{path.stem}.worker{self.worker_index}{path.suffix}")

    @property
    def resolved_workers(self) -> int:
        return self.workers or usable_cores()

    def check_providers(self) -> None:
        """Fail at start-up, with the variable to set, when a chosen cloud provider has no key."""
        needs = {
            ("stt", "deepgram"): ["deepgram_api_key"],
            ("llm", "anthropic"): ["anthropic_api_key"],
            ("tts", "elevenlabs"): ["elevenlabs_api_key"],
            ("tts", "playht"): ["playht_api_key", "playht_user_id"],
        }
        chosen = {"stt": self.resolved_stt, "llm": self.resolved_llm, "tts": self.resolved_tts}
        for (kind, provider), fields in needs.items():
            if chosen[kind] != provider:
                continue
            missing = [f.upper() for f in fields if not getattr(self, f)]
            if missing:
                raise ValueError(f"ATLAS_{kind.upper()}={provider} needs {', '.join(missing)}")
        if self.webhook_url and not self.webhook_secret:
            raise ValueError("ATLAS_WEBHOOK_URL needs ATLAS_WEBHOOK_SECRET (the key receivers verify each event with)")
        if self.supabase_url and not self.supabase_service_role_key:
            raise ValueError("SUPABASE_URL needs SUPABASE_SERVICE_ROLE_KEY (the server writes with the service role)")
        if self.twilio_auth_token and not self.twilio_account_sid:
            raise ValueError(
                "TWILIO_AUTH_TOKEN needs TWILIO_ACCOUNT_SID (the account the phone door hangs up calls of)"
            )
        if self.twilio_account_sid and not re.fullmatch(r"AC[0-9a-fA-F]{32}", self.twilio_account_sid):
            raise ValueError("TWILIO_ACCOUNT_SID must look like AC followed by 32 hex digits")
        if self.tracing and not self.traces_endpoint_set:
            raise ValueError(
                "ATLAS_TRACING=true needs OTEL_EXPORTER_OTLP_ENDPOINT, the OTLP/HTTP collector the spans go to "
                "(e.g. http://localhost:4318)"
            )

    @property
    def traces_endpoint_set(self) -> bool:
        """Spans have somewhere to go: OTEL_EXPORTER_OTLP_ENDPOINT, or the exporter's own traces-only variable."""
        return bool(self.otel_exporter_otlp_endpoint.strip() or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))

    @property
    def auth_enabled(self) -> bool:
        return bool(self.supabase_jwt_secret or self.supabase_jwks_url)

    @property
    def resolved_jwt_issuer(self) -> str | None:
        if self.jwt_issuer:
            return self.jwt_issuer
        return self.supabase_url.rstrip("/") + "/auth/v1" if self.supabase_url else None

    def check_exposure(self, host: str) -> None:
        """Refuse to serve anonymous sessions to the network unless ATLAS_ALLOW_ANONYMOUS says so."""
        if self.auth_enabled or self.allow_anonymous or is_loopback(host):
            return
        raise ValueError(
            f"auth is off and the server would listen on {host}: set SUPABASE_JWT_SECRET or SUPABASE_JWKS_URL "
            "to require a Supabase access token, or ATLAS_ALLOW_ANONYMOUS=true to serve anonymous sessions"
        )


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a container's CPU
    limit), not the machine's count that `os.cpu_count()` gives."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(-(-int(quota) // int(period)))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def secret(value: SecretStr | None) -> str:
    """The plain value of a key setting (kept as SecretStr so it never shows in a repr or a log)."""
    return value.get_secret_value() if value is not None else ""
