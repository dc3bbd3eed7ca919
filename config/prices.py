"""Vendor prices per model, in USD, and the cost of a session from its usage.

Pipecat reports raw usage only (audio seconds, tokens, characters); money is ours. Each session
row stores the rates in force for the models it used (see supabase/migrations), and its
`cost_usd` column is GENERATED from those rates with exactly the formula of `session_cost`
below; a test proves the two agree.

Rates are list (pay-as-you-go) prices as published by each vendor, checked on PRICES_DATE.
Update them here when a vendor changes its price; old rows keep the rates they were billed at.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

PRICES_DATE = "2025-10-15"


@dataclass(frozen=True)
class Rates:
    stt_usd_per_minute: float = 0.0
    llm_input_usd_per_mtok: float = 0.0
    llm_output_usd_per_mtok: float = 0.0
    llm_cache_read_usd_per_mtok: float = 0.0
    llm_cache_write_usd_per_mtok: float = 0.0
    tts_usd_per_kchar: float = 0.0

    def columns(self) -> dict[str, float]:
        return asdict(self)


# Speech to text, per minute of audio streamed.
STT_USD_PER_MINUTE = {
    ("deepgram", "nova-3"): 0.0077,  # Deepgram streaming, pay-as-you-go
    ("deepgram", "nova-2"): 0.0058,
    ("whisper", "tiny.en"): 0.0,  # local
}

# LLM, per million tokens: (input, output, cache read, cache write 5-minute).
LLM_USD_PER_MTOK = {
    ("anthropic", "claude-haiku-4-5"): (1.00, 5.00, 0.10, 1.25),
    ("anthropic", "claude-3-5-haiku-latest"): (0.80, 4.00, 0.08, 1.00),
    ("anthropic", "claude-3-haiku-20240307"): (0.25, 1.25, 0.03, 0.30),
    ("anthropic", "claude-sonnet-4-5"): (3.00, 15.00, 0.30, 3.75),
}

# Text to speech, per thousand characters.
TTS_USD_PER_KCHAR = {
    ("elevenlabs", "eleven_flash_v2_5"): 0.05,
    ("elevenlabs", "eleven_turbo_v2_5"): 0.05,
    ("elevenlabs", "eleven_multilingual_v2"): 0.10,
    ("playht", "PlayHT2.0-turbo"): 0.030,  # the spec's rate; PlayHT's API shut down on 2025-12-31
    ("piper", "en_US-joe-medium"): 0.0,  # local
}


def rates_for(stt: tuple[str, str], llm: tuple[str, str], tts: tuple[str, str]) -> Rates:
    """The rates for a session's (provider, model) pairs; unknown or local models cost 0."""
    llm_in, llm_out, cache_read, cache_write = LLM_USD_PER_MTOK.get(llm, (0.0, 0.0, 0.0, 0.0))
    return Rates(
        stt_usd_per_minute=STT_USD_PER_MINUTE.get(stt, 0.0),
        llm_input_usd_per_mtok=llm_in,
        llm_output_usd_per_mtok=llm_out,
        llm_cache_read_usd_per_mtok=cache_read,
        llm_cache_write_usd_per_mtok=cache_write,
        tts_usd_per_kchar=TTS_USD_PER_KCHAR.get(tts, 0.0),
    )


def session_cost(
    rates: Rates,
    *,
    stt_seconds: float,
    llm_input_tokens: int,
    llm_output_tokens: int,
    llm_cache_read_tokens: int = 0,
    llm_cache_write_tokens: int = 0,
    tts_characters: int,
) -> float:
    """USD; the same formula as voice_sessions.cost_usd."""
    return (
        stt_seconds / 60.0 * rates.stt_usd_per_minute
        + llm_input_tokens / 1e6 * rates.llm_input_usd_per_mtok
        + llm_output_tokens / 1e6 * rates.llm_output_usd_per_mtok
        + llm_cache_read_tokens / 1e6 * rates.llm_cache_read_usd_per_mtok
        + llm_cache_write_tokens / 1e6 * rates.llm_cache_write_usd_per_mtok
        + tts_characters / 1e3 * rates.tts_usd_per_kchar
    )
