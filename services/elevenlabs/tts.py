"""ElevenLabs streaming TTS: Pipecat's multi-stream-input WebSocket service, plus a Piper safety net.

Pipecat's ElevenLabsTTSService does the protocol (contexts, voice settings, flush/close_context,
word alignment, keepalive, reconnect). What it does not do is finish a reply whose audio never
arrives: when the socket dies mid-context, the text already sent is simply never heard, and when
it cannot reconnect, run_tts yields an error and the sentence is skipped. This subclass:

- counts, per reply (audio context), the words sent to ElevenLabs and the words its alignment
  says were voiced;
- when the receive loop ends while a reply still has unvoiced words, speaks those words with the
  local Piper voice into the same audio context (so they play in order, right after the last
  ElevenLabs audio), and sends every later sentence of that reply to Piper too;
- when ElevenLabs cannot be reached for a sentence, Piper speaks it;
- after a drop, the reply's flush and context close are not sent to the dead socket (Pipecat would
  report each as a second error for the one fault);
- when ElevenLabs stays silent on a reply for 3 s (where Pipecat would end the reply in silence),
  the context is cancelled there and Piper speaks the words not yet voiced.

The client gets one recoverable `TTS_FALLBACK` error per reply that needed the local voice.
"""

from __future__ import annotations

from pipecat.frames.frames import (
    ErrorFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from compat.pipecat import ElevenLabsInternals
from services.fallback import LOCAL_VOICE, PiperFallbackMixin


class FallbackElevenLabsTTSService(PiperFallbackMixin, ElevenLabsInternals):
    def __init__(self, *, fallback_voice=None, **kwargs):
        super().__init__(**kwargs)
        self._init_fallback(fallback_voice)
        self._sent_words: dict[str, list[str]] = {}
        self._voiced_words: dict[str, int] = {}

    async def _open_context(self, context_id: str):
        if not self.audio_context_available(context_id):
            await self.create_audio_context(context_id)
            yield TTSStartedFrame(context_id=context_id)

    async def run_tts(self, text: str, context_id: str):
        if not self._use_fallback(context_id):
            failed = False
            async for frame in super().run_tts(text, context_id):
                if isinstance(frame, ErrorFrame):
                    failed = True
                elif not (failed and isinstance(frame, TTSStoppedFrame)):
                    yield frame
            if not failed:
                self._sent_words.setdefault(context_id, []).extend(text.split())
                return
            await self._start_fallback(context_id, "ElevenLabs could not be reached")
        async for frame in self._open_context(context_id):
            yield frame
        async for frame in self._piper_frames(text, context_id):
            yield frame

    async def append_to_audio_context(self, context_id, frame):
        # Once a reply has gone to the local voice, late ElevenLabs audio for it would say it twice.
        if (
            context_id in self._fallback_contexts
            and isinstance(frame, TTSAudioRawFrame)
            and not frame.metadata.get(LOCAL_VOICE)
        ):
            return
        await super().append_to_audio_context(context_id, frame)

    async def add_word_timestamps(self, word_times, context_id=None, *args, **kwargs):
        if context_id in self._fallback_contexts:
            return  # words of ElevenLabs audio that is no longer played
        if context_id in self._sent_words:
            self._voiced_words[context_id] = self._voiced_words.get(context_id, 0) + len(word_times)
        await super().add_word_timestamps(word_times, context_id, *args, **kwargs)

    async def remove_audio_context(self, context_id):
        self._sent_words.pop(context_id, None)
        self._voiced_words.pop(context_id, None)
        await super().remove_audio_context(context_id)

    async def on_audio_context_interrupted(self, context_id: str):
        self._sent_words.pop(context_id, None)
        self._voiced_words.pop(context_id, None)
        await super().on_audio_context_interrupted(context_id)

    async def next_audio_context_item(self, context_id: str):
        item = await super().next_audio_context_item(context_id)
        if item is None and self._unvoiced(context_id):
            # Pipecat ends a context that stays quiet for `stop_frame_timeout_s` (3 s), silently.
            # With words still unvoiced that is a stalled vendor: cancel the context there (so late
            # audio cannot double the speech) and let Piper say the rest, in this same context.
            await self.close_context(context_id)
            await self._finish_with_piper(context_id, "ElevenLabs sent no audio for 3 s")
            item = await super().next_audio_context_item(context_id)
        return item

    def _unvoiced(self, context_id: str) -> str:
        words = self._sent_words.get(context_id) or []
        return " ".join(words[self._voiced_words.get(context_id, 0) :])

    async def _finish_with_piper(self, context_id: str, reason: str) -> None:
        rest = self._unvoiced(context_id)
        self._sent_words.pop(context_id, None)
        self._voiced_words.pop(context_id, None)
        if not rest or not self.audio_context_available(context_id):
            return
        await self._start_fallback(context_id, reason)
        async for frame in self._piper_frames(rest, context_id):
            await self.append_to_audio_context(context_id, frame)

    def _socket_closed(self) -> bool:
        ws = self.socket
        return ws is None or ws.state is not State.OPEN

    async def flush_audio(self, context_id: str | None = None):
        # After a drop, the flush at the reply's end would fail on the dead socket and reach the client
        # as a second, uncoded error for the one fault (the receive loop's Piper fallback already
        # finishes the reply; the next request reconnects).
        if self._socket_closed():
            return
        try:
            await super().flush_audio(context_id)
        except ConnectionClosed:
            pass

    async def close_context(self, context_id: str) -> None:
        if self._socket_closed():  # nothing left to close at the vendor
            return
        await super().close_context(context_id)

    async def receive_messages(self) -> None:
        try:
            await super().receive_messages()
        finally:
            if not self.disconnecting:
                await self._finish_unvoiced("the ElevenLabs connection dropped mid-reply")

    async def _finish_unvoiced(self, reason: str) -> None:
        for context_id in list(self._sent_words):
            if not self.audio_context_available(context_id):
                self._sent_words.pop(context_id, None)
                continue
            await self._finish_with_piper(context_id, reason)
            if context_id == self.turn_context_id:
                # The reply is still being written: its end closes the context, as for HTTP services.
                self.end_reply_with_its_text()
            else:
                await self.append_to_audio_context(context_id, TTSStoppedFrame(context_id=context_id))
                await super().remove_audio_context(context_id)
