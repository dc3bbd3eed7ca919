"""The session's records as the protocol's messages (docs/PROTOCOL.md): the only place that knows the
camelCase keys of `session_end`."""

from __future__ import annotations

from typing import Any

from vocabulary.records import SessionEnd, SessionSummary, TurnRecord


def turn_breakdown(t: TurnRecord) -> dict[str, Any]:
    u = t.usage
    return {
        "index": t.index,
        "vadStopMs": t.vad_stop_ms,
        "sttMs": t.stt_ms,
        "turnEndMs": t.turn_end_ms,
        "llmFirstTokenMs": t.llm_first_token_ms,
        "firstSentenceMs": t.first_sentence_ms,
        "ttsFirstAudioMs": t.tts_first_audio_ms,
        "voiceToVoiceMs": t.voice_to_voice_ms,
        "interrupted": t.interrupted,
        "userTextChars": t.user_text_chars,
        "botTextChars": t.bot_text_chars,
        "llmInputTokens": u.llm_input_tokens,
        "llmOutputTokens": u.llm_output_tokens,
        "llmCacheReadTokens": u.llm_cache_read_tokens,
        "llmCacheWriteTokens": u.llm_cache_write_tokens,
        "ttsCharacters": u.tts_characters,
        "errorCode": t.error_code,
    }


def turn_metrics_message(t: TurnRecord) -> dict[str, Any]:
    """`turn_metrics`: a turn's latency as it closes (the page shows the last turn's)."""
    return {
        "type": "turn_metrics",
        "turn": t.index,
        "voiceToVoiceMs": t.voice_to_voice_ms,
        "sttMs": t.stt_ms,
        "llmMs": t.llm_first_token_ms,
        "ttsMs": t.tts_first_audio_ms,
        "interrupted": t.interrupted,
    }


def session_metrics(s: SessionSummary) -> dict[str, Any]:
    """The `metrics` object of `session_end`."""
    u = s.usage
    return {
        "sttDuration": s.stt_seconds,
        "sttLatency": s.stt_latency_ms,
        "llmLatency": s.llm_latency_ms,
        "ttsLatency": s.tts_latency_ms,
        "totalLatency": s.total_latency_ms,
        "p50Latency": s.p50_latency_ms,
        "p95Latency": s.p95_latency_ms,
        "turns": s.turns,
        "interruptions": s.interruptions,
        "errors": s.errors,
        "llmInputTokens": u.llm_input_tokens,
        "llmOutputTokens": u.llm_output_tokens,
        "llmCacheReadTokens": u.llm_cache_read_tokens,
        "llmCacheWriteTokens": u.llm_cache_write_tokens,
        "ttsCharacters": u.tts_characters,
        "errorsByCode": dict(s.errors_by_code),
        "turnBreakdown": [turn_breakdown(t) for t in s.turn_records],
    }


def session_end_message(end: SessionEnd) -> dict[str, Any]:
    return {
        "type": "session_end",
        "sessionId": end.session_id,
        "reason": end.reason,
        "duration": end.duration,
        "metrics": session_metrics(end.summary),
    }
