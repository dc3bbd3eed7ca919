"""One typed settings object for the whole server.

Every field reads an environment variable (or a line of `.env` in the working directory). The
README's settings table lists each one with its default; keep the two in step.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    log_level: str = Field("INFO", validation_alias=_env("ATLAS_LOG_LEVEL"))
    allowed_origins: list[str] = Field(default_factory=list, validation_alias=_env("ATLAS_ALLOWED_ORIGINS"))

    # --- engine choice ------------------------------------------------------------------------
    stt: Literal["auto", "whisper"] = Field("auto", validation_alias=_env("ATLAS_STT"))
    llm: Literal["auto", "llama", "openai"] = Field("auto", validation_alias=_env("ATLAS_LLM"))
    tts: Literal["auto", "piper"] = Field("auto", validation_alias=_env("ATLAS_TTS"))

    # --- local engines --------------------------------------------------------------------------
    cache_dir: Path = Field(default_factory=_default_cache_dir, validation_alias=_env("ATLAS_CACHE_DIR"))
    llm_model_path: Path | None = Field(None, validation_alias=_env("ATLAS_LLM_MODEL_PATH"))
    llm_url: str | None = Field(None, validation_alias=_env("ATLAS_LLM_URL"))
    llm_api_key: str = Field("none", validation_alias=_env("ATLAS_LLM_API_KEY"))
    llm_model_name: str = Field("local", validation_alias=_env("ATLAS_LLM_MODEL_NAME"))
    llm_threads: int = Field(2, validation_alias=_env("ATLAS_LLM_THREADS"))
    llm_context_tokens: int = Field(4096, validation_alias=_env("ATLAS_LLM_CONTEXT_TOKENS"))
    llm_temperature: float = Field(0.7, validation_alias=_env("ATLAS_LLM_TEMPERATURE"))
    whisper_partials: bool = Field(True, validation_alias=_env("ATLAS_WHISPER_PARTIALS"))
    whisper_partial_interval_secs: float = Field(0.8, validation_alias=_env("ATLAS_WHISPER_PARTIAL_INTERVAL_SECS"))

    # --- conversation -----------------------------------------------------------------------------
    max_tokens: int = Field(300, validation_alias=_env("ATLAS_MAX_TOKENS"))
    context_messages: int = Field(10, validation_alias=_env("ATLAS_CONTEXT_MESSAGES"))
    vad_stop_secs: float = Field(0.2, validation_alias=_env("ATLAS_VAD_STOP_SECS"))
    vad_start_secs: float = Field(0.2, validation_alias=_env("ATLAS_VAD_START_SECS"))
    # Pipecat's 0.6 volume gate held quiet speech back ~0.5 s past its onset (barge-in at ~750 ms);
    # 0.3 starts the turn ~0.3 s after onset on the same audio. Browsers' echo cancellation keeps
    # the bot's own voice out.
    vad_min_volume: float = Field(0.3, validation_alias=_env("ATLAS_VAD_MIN_VOLUME"))
    smart_turn: bool = Field(True, validation_alias=_env("ATLAS_SMART_TURN"))
    smart_turn_stop_secs: float = Field(1.5, validation_alias=_env("ATLAS_SMART_TURN_STOP_SECS"))

    # --- sessions -------------------------------------------------------------------------------
    session_idle_timeout_secs: float = Field(600.0, validation_alias=_env("ATLAS_SESSION_IDLE_TIMEOUT_SECS"))
    session_max_secs: float = Field(3600.0, validation_alias=_env("ATLAS_SESSION_MAX_SECS"))
    session_start_timeout_secs: float = Field(30.0, validation_alias=_env("ATLAS_SESSION_START_TIMEOUT_SECS"))
    max_audio_frame_bytes: int = Field(65536, validation_alias=_env("ATLAS_MAX_AUDIO_FRAME_BYTES"))
    max_text_message_bytes: int = Field(8192, validation_alias=_env("ATLAS_MAX_TEXT_MESSAGE_BYTES"))

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @property
    def resolved_stt(self) -> str:
        return "whisper" if self.stt == "auto" else self.stt

    @property
    def resolved_llm(self) -> str:
        if self.llm == "auto":
            return "openai" if self.llm_url else "llama"
        return self.llm

    @property
    def resolved_tts(self) -> str:
        return "piper" if self.tts == "auto" else self.tts


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
