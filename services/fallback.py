"""The local Piper voice as the safety net of a cloud TTS service.

Pipecat's answer to a failing TTS is `ServiceSwitcher` with a failover strategy: it switches only on
errors that make the service unusable and never re-speaks the sentence that failed, so the user
hears a gap mid-reply. And a TTS service Pipecat marks unusable (a 401, three dead handshakes)
is silently given no more text: silence for the rest of the call. This mixin, shared by our
ElevenLabs and PlayHT services, keeps a reply audible instead:

- `_piper_frames(text, context_id)` speaks text with the process-wide Piper voice, resampled to
  the service's output rate, as ordinary audio frames of the reply's audio context;
- once a request of a reply fails, every later sentence of that reply (`context_id`) goes to
  Piper too (`_start_fallback`), and the client gets one recoverable `TTS_FALLBACK` error;
- a vendor that Pipecat would write off stays "usable": new replies go straight to Piper for
  `cooldown` seconds, then the vendor is tried again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from loguru import logger

from vocabulary.errors import ErrorCode
from vocabulary.frames import coded_error


async def piper_chunks(voice, text: str) -> AsyncIterator[bytes]:
    """Piper's 16-bit PCM for `text`, one sentence chunk at a time, synthesized off the event loop."""
    iterator = iter(voice.synthesize(text))

    def step():
        try:
            return next(iterator).audio_int16_bytes
        except StopIteration:
            return None

    while (chunk := await asyncio.to_thread(step)) is not None:
        yield chunk


LOCAL_VOICE = "atlas_local_voice"  # frame metadata key: this audio is the fallback voice's


if TYPE_CHECKING:  # what the mixin is mixed into (at run time it stands before that class in the bases)
    from compat.pipecat import TTSInternals as _TTSService
else:
    _TTSService = object


class PiperFallbackMixin(_TTSService):
    """Mix into a TTS service built on compat.pipecat's TTSInternals or ElevenLabsInternals (before it in
    the bases, for `audio_frames`); call `_init_fallback` in __init__."""

    def _init_fallback(self, voice, cooldown: float = 30.0) -> None:
        self._fallback_voice = voice
        self._fallback_cooldown = cooldown
        self._fallback_contexts: set[str] = set()
        self._vendor_down_until = 0.0

    def _use_fallback(self, context_id: str) -> bool:
        return context_id in self._fallback_contexts or time.monotonic() < self._vendor_down_until

    async def _start_fallback(self, context_id: str, reason: str) -> None:
        if context_id in self._fallback_contexts:
            return
        self._fallback_contexts.add(context_id)
        logger.warning(f"{self}: {reason}; the local voice speaks the rest of this reply")
        await self.push_error_frame(
            coded_error(
                ErrorCode.TTS_FALLBACK,
                "the voice service failed; the local voice finishes this reply",
                f"TTS: {reason}",
            )
        )

    async def _piper_frames(self, text: str, context_id: str):
        voice = self._fallback_voice
        if voice is None or not text.strip():
            return
        async for frame in self.audio_frames(
            piper_chunks(voice, text), in_sample_rate=voice.config.sample_rate, context_id=context_id
        ):
            frame.metadata[LOCAL_VOICE] = True
            yield frame

    async def set_usable(self, is_usable: bool):
        if not is_usable and self._fallback_voice is not None:
            # Stay in the pipeline: replies go to Piper until the cooldown ends.
            self._vendor_down_until = time.monotonic() + self._fallback_cooldown
            logger.warning(f"{self}: vendor unusable; local voice for {self._fallback_cooldown:.0f}s")
            return
        await super().set_usable(is_usable)
