"""Pipecat's protobuf serializer (what Pipecat's WebSocket clients speak), with the door's bounds."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from loguru import logger
from pipecat.audio.utils import create_stream_resampler
from pipecat.frames.frames import Frame, InputAudioRawFrame, InputTransportMessageFrame
from pipecat.serializers.protobuf import ProtobufFrameSerializer

from bots.limits import AudioBudget, MessageRate
from vocabulary.audio import CLIENT_SAMPLE_RATE
from vocabulary.errors import ErrorCode

MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 48000
MAX_MESSAGE_BYTES_OVER_AUDIO = 256  # the protobuf envelope around a frame's audio


class BoundedProtobufSerializer(ProtobufFrameSerializer):
    """Pipecat's `ProtobufFrameSerializer`, reading only what a caller may send, within bounds.

    In: binary messages only, each at most ATLAS_MAX_AUDIO_FRAME_BYTES of audio (ATLAS_MAX_TEXT_MESSAGE_BYTES for
    an RTVI message), at most ATLAS_MAX_MESSAGES_PER_SEC (a connection over twice that for seconds is cut off),
    and audio at real time plus a burst (`AudioBudget`). Of the frames the protobuf schema knows, only audio
    (mono, 8-48 kHz, resampled to 16 kHz) and RTVI client messages get in: a text or transcription frame from
    the client would otherwise be spoken or answered as if the pipeline had made it. Garbage is dropped, never
    raised into the transport's receive loop. Each refusal is told (`on_refused`, at most once a second).
    """

    def __init__(
        self,
        *,
        max_audio_bytes: int,
        max_text_bytes: int,
        rate: MessageRate | None,
        budget: AudioBudget,
        on_audio: Callable[[], None],
        on_refused: Callable[[ErrorCode, str], Awaitable[None]],
        on_flood: Callable[[], Awaitable[None]],
    ):
        super().__init__()
        self._max_bytes = max(max_audio_bytes, max_text_bytes) + MAX_MESSAGE_BYTES_OVER_AUDIO
        self._max_audio_bytes = max_audio_bytes
        self._rate = rate
        self._budget = budget
        self._on_audio = on_audio
        self._on_refused = on_refused
        self._on_flood = on_flood
        self._resampler = create_stream_resampler()
        self._flooded = False

    async def deserialize(self, data: str | bytes) -> Frame | None:
        if self._flooded:
            return None
        if self._rate is not None and not self._rate.allow():
            if self._rate.flooding:
                self._flooded = True
                await self._on_flood()
            elif self._rate.should_tell():
                await self._on_refused(ErrorCode.MESSAGE_RATE_EXCEEDED, self._rate.refusal().message)
            return None
        if isinstance(data, str):
            await self._on_refused(ErrorCode.INVALID_MESSAGE, "this door reads binary protobuf frames only")
            return None
        if len(data) > self._max_bytes:
            await self._on_refused(ErrorCode.FRAME_TOO_LARGE, f"a message is limited to {self._max_bytes} bytes")
            return None
        try:
            frame = await super().deserialize(data)
        except Exception as e:  # protobuf's DecodeError, a frame the schema allows but Pipecat cannot build
            logger.debug(f"protobuf frame dropped: {type(e).__name__}")
            frame = None
        if isinstance(frame, InputAudioRawFrame):
            return await self._audio(frame)
        if isinstance(frame, InputTransportMessageFrame):
            return frame
        await self._on_refused(ErrorCode.INVALID_MESSAGE, "only audio frames and RTVI client messages are read")
        return None

    async def _audio(self, frame: InputAudioRawFrame) -> Frame | None:
        if frame.num_channels != 1 or not MIN_SAMPLE_RATE <= frame.sample_rate <= MAX_SAMPLE_RATE:
            await self._on_refused(ErrorCode.INVALID_FIELD, "audio must be mono PCM16 at 8000-48000 Hz")
            return None
        if len(frame.audio) > self._max_audio_bytes:
            await self._on_refused(
                ErrorCode.FRAME_TOO_LARGE, f"audio frames hold at most {self._max_audio_bytes} bytes"
            )
            return None
        if len(frame.audio) % 2:
            await self._on_refused(ErrorCode.ODD_LENGTH_PCM, "audio must be whole 16-bit samples")
            return None
        if not self._budget.take(len(frame.audio) / 2 / frame.sample_rate):
            if self._budget.should_tell():
                await self._on_refused(ErrorCode.AUDIO_RATE_EXCEEDED, self._budget.refusal().message)
            return None
        self._on_audio()
        if frame.sample_rate == CLIENT_SAMPLE_RATE:
            return frame
        audio = await self._resampler.resample(frame.audio, frame.sample_rate, CLIENT_SAMPLE_RATE)
        return InputAudioRawFrame(audio=audio, sample_rate=CLIENT_SAMPLE_RATE, num_channels=1)
