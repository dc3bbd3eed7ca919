"""The rows Atlas writes: one `voice_sessions` row per session and one `voice_turns` row per turn.

Built from the session's typed records (vocabulary/records.py), the same objects `session_end` is
built from, so the client and the database get the same numbers. Column names are the migration's
(supabase/migrations); `storage/sqlite_schema.sql` has the same tables for the embedded store.
Ids are generated here (uuid4), so every write can be repeated without creating a second row.

Transcripts are opt-in per agent: a turn row carries `user_text` and `bot_text` only when its session's
agent keeps them (`SessionInfo.store_transcripts`); otherwise the row has no such keys at all (so a store
without those columns yet takes it), and the columns stay NULL. The Recorder clears the text of rows older
than ATLAS_TRANSCRIPT_RETENTION_DAYS (`Sink.clear_transcripts`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from config.prices import Rates, rates_for, session_cost
from config.settings import Settings
from vocabulary.records import STAGES, SessionSummary, TurnRecord

SESSIONS = "voice_sessions"
TURNS = "voice_turns"
FEEDBACK = "voice_feedback"  # one rating per session, `id` the session's (supabase/migrations/..._feedback.sql)

# A write is (table, mode, rows). "insert" adds rows that are not there yet and leaves existing
# ones alone (ON CONFLICT (id) DO NOTHING); "upsert" inserts or overwrites (DO UPDATE).
INSERT = "insert"
UPSERT = "upsert"


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds")


def _int(value: float | None) -> int | None:
    return None if value is None else int(round(value))


def provider_models(settings: Settings) -> dict[str, str]:
    """(provider, model) names per stage for the session row and the price lookup."""
    stt = settings.resolved_stt
    llm = settings.resolved_llm
    tts = settings.resolved_tts
    return {
        "stt_provider": stt,
        "stt_model": settings.deepgram_model if stt == "deepgram" else "tiny.en",
        "llm_provider": llm,
        "llm_model": {"anthropic": settings.anthropic_model, "openai": settings.llm_model_name}.get(
            llm, "qwen2.5-1.5b-q4"
        ),
        "tts_provider": tts,
        "tts_model": {"elevenlabs": settings.elevenlabs_model, "playht": settings.playht_voice_engine}.get(
            tts, "en_US-joe-medium"
        ),
    }


def session_rates(models: dict[str, str]) -> Rates:
    return rates_for(
        (models["stt_provider"], models["stt_model"]),
        (models["llm_provider"], models["llm_model"]),
        (models["tts_provider"], models["tts_model"]),
    )


@dataclass
class SessionInfo:
    """What is known about a session when it starts."""

    id: str
    transport: str
    started_at: float  # Unix seconds
    user_id: str | None  # verified (auth.users id), else None
    client_user_id: str | None
    conversation_id: str | None
    models: dict[str, str]
    user_agent: str | None = None
    ip_address: str | None = None
    store_transcripts: bool = False  # the agent keeps what was said (turn rows carry user_text, bot_text)
    agent: str | None = None  # the agent that answers (config/agents.py)
    variant: str | None = None  # the rollout's variant (bots/rollout.py); None: no rollout, or the agent was asked for
    resumed_from: str | None = None  # the session this one continues (a client that reconnected), else None
    reconnects: int = 0  # how many times the conversation was resumed before this session
    rates: Rates = field(init=False)

    def __post_init__(self):
        self.rates = session_rates(self.models)

    def start_row(self) -> dict:
        return {
            "id": self.id,
            "user_id": self.user_id,
            "client_user_id": self.client_user_id,
            "conversation_id": self.conversation_id,
            "transport": self.transport,
            "started_at": iso(self.started_at),
            **self.models,
            **self.rates.columns(),
            "user_agent": (self.user_agent or "")[:512] or None,
            "ip_address": self.ip_address,
            "agent": self.agent,
            # only under a rollout: a store not yet migrated takes the rows of every other session
            **({"variant": self.variant} if self.variant is not None else {}),
            **({"resumed_from": self.resumed_from, "reconnects": self.reconnects} if self.resumed_from else {}),
        }

    def end_row(self, summary: SessionSummary, *, ended_at: float, end_reason: str) -> dict:
        """The full row at the end."""
        ended_at = max(ended_at, self.started_at + 1e-3)  # the CHECK: ended_at > started_at
        u = summary.usage
        return {
            **self.start_row(),
            "ended_at": iso(ended_at),
            "end_reason": end_reason,
            "stt_duration_seconds": summary.stt_seconds,
            "stt_requests": summary.turns,
            "llm_input_tokens": u.llm_input_tokens,
            "llm_output_tokens": u.llm_output_tokens,
            "llm_cache_read_tokens": u.llm_cache_read_tokens,
            "llm_cache_write_tokens": u.llm_cache_write_tokens,
            "llm_latency_ms": _int(summary.llm_latency_ms) or 0,
            "tts_characters": u.tts_characters,
            "tts_latency_ms": _int(summary.tts_latency_ms) or 0,
            "turns_count": summary.turns,
            "avg_latency_ms": _int(summary.total_latency_ms),
            "p95_latency_ms": _int(summary.p95_latency_ms),
            "interruptions_count": summary.interruptions,
            "errors_count": summary.errors,
        }

    def cost(self, summary: SessionSummary) -> float:
        """USD, as the database's generated cost_usd will compute it."""
        u = summary.usage
        return session_cost(
            self.rates,
            stt_seconds=summary.stt_seconds,
            llm_input_tokens=u.llm_input_tokens,
            llm_output_tokens=u.llm_output_tokens,
            llm_cache_read_tokens=u.llm_cache_read_tokens,
            llm_cache_write_tokens=u.llm_cache_write_tokens,
            tts_characters=u.tts_characters,
        )


def turn_id(session_id: str, index: int) -> str:
    """A stable id per (session, turn): a replayed write can never make a second row."""
    return str(uuid.uuid5(uuid.UUID(session_id), f"turn-{index}"))


def feedback_row(session_id: str, user_id: str | None, rating: int, comment: str | None) -> dict:
    """A session's rating (1-5) and comment, written (UPSERT) over any earlier one of the same session."""
    return {
        "id": session_id,
        "user_id": user_id,
        "rating": rating,
        "comment": comment,
        "created_at": datetime.now(UTC).isoformat(timespec="microseconds"),
    }


def turn_row(session: SessionInfo, turn: TurnRecord) -> dict:
    u = turn.usage
    text = {"user_text": turn.user_text, "bot_text": turn.bot_text} if session.store_transcripts else {}
    return {
        "id": turn_id(session.id, turn.index),
        "session_id": session.id,
        "user_id": session.user_id,
        "turn_index": turn.index,
        "user_text_chars": turn.user_text_chars,
        "bot_text_chars": turn.bot_text_chars,
        "user_stopped_at": iso(turn.user_stopped_at),
        "first_audio_at": iso(turn.first_audio_at),
        **{stage.column: _int(turn.stage(stage)) for stage in STAGES},
        "llm_input_tokens": u.llm_input_tokens,
        "llm_output_tokens": u.llm_output_tokens,
        "llm_cache_read_tokens": u.llm_cache_read_tokens,
        "tts_characters": u.tts_characters,
        "interrupted": turn.interrupted,
        "error_code": turn.error_code,
        "preempted": turn.preempted,
        "preempt_cancelled": turn.preempt_cancelled,
        "preempt_input_tokens": turn.preempt_input_tokens,
        "created_at": iso(turn.ended_at),
        **text,
    }


def transcript(turns: SessionSummary | Iterable[TurnRecord]) -> list[dict]:
    """What was said, turn by turn (a session's summary, or its turn records): `[{"turn": index, "user":
    text, "bot": text}, ...]`, each text bounded as the turn row's (vocabulary/records.py)."""
    records = turns.turn_records if isinstance(turns, SessionSummary) else turns
    return [{"turn": t.index, "user": t.user_text, "bot": t.bot_text} for t in records]
