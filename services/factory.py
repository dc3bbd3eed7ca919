"""Build the STT, LLM and TTS services a session uses, from the settings (ATLAS_STT/LLM/TTS).

Cloud providers come from Pipecat (Deepgram, Anthropic, ElevenLabs) with our resilience added,
or from our own service (PlayHT); the local engines are shared process-wide. Every cloud TTS
falls back to the local Piper voice, and Claude to the local LLM (when one is loaded).
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlparse

from config.agents import Agent
from config.settings import Settings, secret
from services.local.engines import LocalEngines

# ElevenLabs models that speak English only; an agent in another language gets the multilingual Flash v2.5.
ELEVENLABS_ENGLISH_ONLY = frozenset({"eleven_monolingual_v1", "eleven_flash_v2", "eleven_turbo_v2"})
ELEVENLABS_MULTILINGUAL = "eleven_flash_v2_5"


def make_stt(s: Settings, engines: LocalEngines, agent: Agent | None = None):
    agent = agent or Agent()
    if s.resolved_stt == "deepgram":
        from pipecat.services.deepgram.stt import DeepgramSTTService

        from services.deepgram.stt import ResilientDeepgramSTTService

        return ResilientDeepgramSTTService(
            api_key=secret(s.deepgram_api_key),
            base_url=s.deepgram_base_url,
            encoding="linear16",
            sample_rate=16000,
            replay_secs=s.stt_replay_secs,
            settings=DeepgramSTTService.Settings(
                model=s.deepgram_model,
                language=agent.language,
                interim_results=True,
                punctuate=True,
                smart_format=False,
                endpointing=s.deepgram_endpointing_ms,
                utterance_end_ms=s.deepgram_utterance_end_ms,
            ),
        )
    from services.local.engines import SharedWhisperSTTService

    return SharedWhisperSTTService(
        engines.whisper, partials=s.whisper_partials, partial_interval=s.whisper_partial_interval_secs
    )


def make_llm(
    s: Settings,
    local_url: str | None,
    local_model: str,
    on_retry: Callable[[str, str], None] | None = None,
    llm_slot: int | None = None,
    agent: Agent | None = None,
):
    """Claude (with `local_url`'s OpenAI-compatible server as its fallback) or that server itself; `llm_slot`:
    the local llama-server's slot that keeps this session's conversation cached (llama.cpp's `id_slot`).

    A server on this machine (llama-server, this process's or the workers' shared one) gets a connection per
    request: llama-server sometimes closes a kept-alive connection just after a streamed reply, and the next
    request sent on it fails ("Server disconnected"; 2 of 30 back-to-back requests here). On loopback a
    connection costs well under a millisecond."""
    loopback = local_url is not None and urlparse(local_url).hostname in ("127.0.0.1", "localhost", "::1")
    headers = {"Connection": "close"} if loopback else None
    agent = agent or Agent()
    if s.resolved_llm == "anthropic":
        from services.anthropic.llm import ResilientAnthropicLLMService

        return ResilientAnthropicLLMService(
            api_key=secret(s.anthropic_api_key),
            base_url=s.anthropic_base_url,
            model=s.anthropic_model,
            system_instruction=agent.system_prompt(local_model=False),
            max_tokens=agent.max_tokens or s.max_tokens,
            retries=s.llm_retries,
            retry_budget=s.llm_retry_budget_secs,
            first_token_timeout=s.llm_timeout_secs,
            fallback_url=local_url,
            fallback_model=local_model,
            fallback_max_tokens=min(agent.max_tokens or s.llm_max_tokens, s.llm_max_tokens),
            fallback_headers=headers,
            fallback_api_key=s.llm_api_key,
            fallback_system=agent.system_prompt(local_model=True),
            on_retry=on_retry,
        )
    from pipecat.services.openai.llm import OpenAILLMService

    from services.local.llm import LocalLLMService

    return LocalLLMService(
        api_key=s.llm_api_key,
        base_url=local_url,
        default_headers=headers,
        settings=OpenAILLMService.Settings(
            model=local_model,
            system_instruction=agent.system_prompt(local_model=True),
            max_tokens=agent.max_tokens or s.llm_max_tokens,
            temperature=s.llm_temperature,
            extra={} if llm_slot is None else {"extra_body": {"id_slot": llm_slot, "cache_prompt": True}},
        ),
    )


def make_tts(s: Settings, engines: LocalEngines, agent: Agent | None = None, speed: float = 1.0):
    """The agent's voice (`voice`: the provider's voice id) in its language, at `speed` (1.0: the voice's own;
    ElevenLabs' `speed` voice setting, PlayHT's speed times PLAYHT_SPEED, Piper's length scale); Piper has the one
    English voice, and is every cloud voice's fallback, at the same speed."""
    agent = agent or Agent()
    voice = engines.piper_voice if speed == 1.0 else VoiceAtSpeed(engines.piper_voice, speed)
    if s.resolved_tts == "elevenlabs":
        from pipecat.transcriptions.language import Language

        from services.elevenlabs.tts import FallbackElevenLabsTTSService

        model = s.elevenlabs_model
        if not agent.english and model in ELEVENLABS_ENGLISH_ONLY:
            model = ELEVENLABS_MULTILINGUAL
        return FallbackElevenLabsTTSService(
            api_key=secret(s.elevenlabs_api_key),
            url=s.elevenlabs_base_url,
            settings=FallbackElevenLabsTTSService.Settings(
                voice=agent.voice or s.elevenlabs_voice_id,
                model=model,
                language=None if agent.english else Language(agent.language),
                speed=None if speed == 1.0 else speed,
            ),
            fallback_voice=voice,
        )
    if s.resolved_tts == "playht":
        from services.playht.tts import PlayHTHttpTTSService

        return PlayHTHttpTTSService(
            api_key=secret(s.playht_api_key),
            user_id=s.playht_user_id or "",
            base_url=s.playht_base_url,
            voice=agent.voice or s.playht_voice,
            voice_engine=s.playht_voice_engine,
            output_format=s.playht_output_format,
            speed=s.playht_speed * speed,
            timeout=s.tts_timeout_secs,
            fallback_voice=voice,
        )
    from services.local.engines import SharedPiperTTSService

    return SharedPiperTTSService(voice)


class VoiceAtSpeed:
    """The process-wide Piper voice, speaking faster or slower for one session: Pipecat's Piper service calls
    `voice.synthesize(text)`, and the shared voice must not change for the other sessions, so each call gets a
    `SynthesisConfig` whose length scale is the voice's own divided by `speed`."""

    def __init__(self, voice, speed: float):
        from piper.config import SynthesisConfig

        self._voice = voice
        self.config = voice.config
        self._syn_config = SynthesisConfig(length_scale=(voice.config.length_scale or 1.0) / speed)

    def synthesize(self, text: str, syn_config=None, **kwargs):
        return self._voice.synthesize(text, syn_config=syn_config or self._syn_config, **kwargs)
