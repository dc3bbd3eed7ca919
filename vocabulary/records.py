"""The typed record of a turn and of a session, the one stage table and the one percentile.

`processors.turn_metrics` builds them from a session's frames. Three adapters read them and nothing
else: the `session_end` message (transports/websocket/messages.py), the database rows
(storage/records.py) and the Prometheus metrics (monitoring/metrics.py). Renaming a protocol key
therefore touches only the first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation, as `numpy.percentile` does by default;
    None for no values."""
    return sorted_percentile(sorted(float(v) for v in values), q)


def sorted_percentile(xs: list[float], q: float) -> float | None:
    """`percentile` of values already in ascending order (O(1): the alert window keeps its values sorted)."""
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


# A turn's stored transcript text is bounded (each side), here and by the columns' CHECK (supabase/migrations).
TRANSCRIPT_MAX_CHARS = 4000


def bounded_text(text: str, limit: int = TRANSCRIPT_MAX_CHARS) -> str:
    """`text` cut to at most `limit` characters (code points, as Postgres's char_length and SQLite's length)."""
    return text[:limit]


@dataclass(frozen=True)
class Stage:
    """One stage of a turn's latency, by its names in each place it appears."""

    name: str  # the `stage` label in /metrics and the key in the dashboard's JSON
    field: str  # the TurnRecord attribute (milliseconds)
    column: str  # the voice_turns column (milliseconds)
    message_key: str  # the key in session_end's turnBreakdown


STAGES: tuple[Stage, ...] = (
    Stage("stt", "stt_ms", "stt_latency_ms", "sttMs"),
    Stage("llm_ttfb", "llm_first_token_ms", "llm_ttfb_ms", "llmFirstTokenMs"),
    Stage("tts_ttfa", "tts_first_audio_ms", "tts_ttfa_ms", "ttsFirstAudioMs"),
    Stage("voice_to_voice", "voice_to_voice_ms", "voice_to_voice_ms", "voiceToVoiceMs"),
)


@dataclass(frozen=True)
class Usage:
    """What a turn or a session consumed of the providers (what they bill)."""

    llm_input_tokens: int = 0  # Claude's are net of its prompt cache
    llm_output_tokens: int = 0
    llm_cache_read_tokens: int = 0
    llm_cache_write_tokens: int = 0
    tts_characters: int = 0


@dataclass(frozen=True)
class TurnRecord:
    """One closed turn: latency per stage in milliseconds (None where the turn never reached a stage),
    what it used, and when it happened (Unix seconds)."""

    index: int
    vad_stop_ms: float | None
    stt_ms: float | None
    turn_end_ms: float | None
    llm_first_token_ms: float | None
    first_sentence_ms: float | None
    tts_first_audio_ms: float | None
    voice_to_voice_ms: float | None
    interrupted: bool
    user_text_chars: int
    bot_text_chars: int
    usage: Usage
    error_code: str | None
    user_stopped_at: float | None  # the user went quiet
    first_audio_at: float | None  # the reply's first audio left the server
    ended_at: float | None  # the turn ended (the row's created_at)
    preempted: bool = False  # the reply was asked for before the turn ended (processors/turn_end.py)
    preempt_cancelled: int = 0  # preemptive requests withdrawn during the turn (the caller went on)
    preempt_input_tokens: int = 0  # the input tokens they carried (estimated)
    # What was said, each bounded to TRANSCRIPT_MAX_CHARS (the *_chars counts are of the whole text): the
    # user's final transcript, and the reply as it was spoken (sent to the caller; what an interruption cut
    # off is not in it). Stored only for agents that keep transcripts (storage/records.py turn_row).
    user_text: str = ""
    bot_text: str = ""

    def stage(self, stage: Stage) -> float | None:
        return getattr(self, stage.field)


@dataclass(frozen=True)
class SessionSummary:
    """A session's numbers at its end: what `session_end` tells the client and the session row keeps."""

    stt_seconds: float  # audio sent to speech recognition
    stt_latency_ms: float | None  # means over the turns
    llm_latency_ms: float | None
    tts_latency_ms: float | None
    total_latency_ms: float | None
    p50_latency_ms: float | None  # voice-to-voice percentiles over the turns
    p95_latency_ms: float | None
    interruptions: int
    errors: int
    usage: Usage
    errors_by_code: dict[str, int] = field(default_factory=dict)
    turn_records: tuple[TurnRecord, ...] = ()

    @property
    def turns(self) -> int:
        return len(self.turn_records)


@dataclass(frozen=True)
class SessionEnd:
    """How and when a session ended, with its numbers."""

    session_id: str
    reason: str  # client_stop, idle_timeout, max_duration, server_shutdown, ... (docs/PROTOCOL.md)
    duration: float  # seconds
    summary: SessionSummary
