"""Mark where each spoken sentence's audio begins, so the client can group audio by sentence.

TTS services push a sentence's audio and then its TTSTextFrame. The output transport re-cuts audio
into fixed chunks, so the frames themselves cannot carry a sentence number to the client. This
processor (between TTS and the output transport) puts a `SentenceStartFrame` in front of the first
audio of every sentence; it travels the output transport's audio queue in order, and the
serializer numbers the `audio_chunk`s that follow it.
"""

from __future__ import annotations

from pipecat.frames.frames import (
    Frame,
    InterruptionFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSTextFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from vocabulary.frames import SentenceStartFrame


def _ends_sentence(frame: Frame) -> bool:
    """A sentence's text (Piper: one frame per sentence) or, from a voice with word timestamps
    (ElevenLabs: one timed frame per word), a word that ends a sentence."""
    if not isinstance(frame, TTSTextFrame):
        return False
    return not frame.pts or frame.text.rstrip().endswith((".", "!", "?"))


class SentenceMarker(FrameProcessor):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._new_sentence = True

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            if isinstance(frame, (TTSStartedFrame, InterruptionFrame)) or _ends_sentence(frame):
                self._new_sentence = True
            elif isinstance(frame, TTSAudioRawFrame) and self._new_sentence:
                self._new_sentence = False
                await self.push_frame(SentenceStartFrame(), direction)
        await self.push_frame(frame, direction)
