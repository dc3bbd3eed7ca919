"""Tell the client what the conversation is doing: `status`, `partial_transcript`, `final_transcript`.

An observer, because these moments are spread over the pipeline (STT, the user aggregator, the
output transport) and an observer sees all of them without adding a hop to the audio path. It
sends through `send`, which queues an urgent transport message into the session's pipeline.

Status moves listening -> transcribing (the user is talking) -> thinking (the user's turn ended
with words; the LLM is working) -> speaking (the first reply audio has left the server) ->
listening (the reply is done or was interrupted and the user is quiet).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    InterimTranscriptionFrame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TranscriptionFrame,
    TTSStartedFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.stt_service import STTService

Send = Callable[[dict], Awaitable[None]]

# After a reply's text is complete, how long to wait for its audio before going back to listening
# (a cloud voice may take a second or two; a voice that never answers must not leave "thinking" up).
SETTLE_SECS = 4.0


def transcript_confidence(result) -> float | None:
    """Whisper results carry {"confidence": x}; Deepgram's carry channel.alternatives[0].confidence."""
    if isinstance(result, dict):
        return result.get("confidence")
    try:
        return result.channel.alternatives[0].confidence
    except (AttributeError, IndexError, TypeError):
        return None


def transcript_message(kind: str, frame) -> dict:
    confidence = transcript_confidence(frame.result)
    return {
        "type": kind,
        "text": frame.text.strip(),
        "confidence": float(confidence) if isinstance(confidence, (int, float)) else None,
    }


class ClientEventsObserver(BaseObserver):
    # the frames on_push_frame reads (SelectiveWorkerObserver hands it no others)
    FRAME_TYPES = (
        TranscriptionFrame,
        InterimTranscriptionFrame,
        UserStartedSpeakingFrame,
        UserStoppedSpeakingFrame,
        InterruptionFrame,
        LLMFullResponseStartFrame,
        TTSStartedFrame,
        LLMTextFrame,
        LLMFullResponseEndFrame,
        BotStartedSpeakingFrame,
        BotStoppedSpeakingFrame,
    )

    def __init__(self, send: Send, **kwargs):
        super().__init__(observe_every_push=False, **kwargs)
        self._send = send
        self.status = "listening"
        self._user_speaking = False
        self._turn_has_words = False
        self._bot_speaking = False
        self._response_spoke = False
        self._response_open = False  # the LLM is still producing the current reply

    async def _set(self, status: str) -> None:
        if status != self.status:
            self.status = status
            await self._send({"type": "status", "status": status})

    def _settle(self) -> None:
        if self.status == "thinking" and not (self._bot_speaking or self._user_speaking or self._response_open):
            asyncio.get_running_loop().create_task(self._set("listening"))

    async def on_push_frame(self, data: FramePushed):
        frame = data.frame
        if data.direction != FrameDirection.DOWNSTREAM:
            return
        if isinstance(frame, (TranscriptionFrame, InterimTranscriptionFrame)):
            if not isinstance(data.source, STTService) or not frame.text.strip():
                return
            final = isinstance(frame, TranscriptionFrame)
            if final:
                self._turn_has_words = True
            await self._send(transcript_message("final_transcript" if final else "partial_transcript", frame))
        elif isinstance(frame, UserStartedSpeakingFrame):
            self._user_speaking = True
            self._turn_has_words = False
            await self._set("transcribing")
        elif isinstance(frame, UserStoppedSpeakingFrame):
            self._user_speaking = False
            if not self._bot_speaking:
                await self._set("thinking" if self._turn_has_words else "listening")
        elif isinstance(frame, InterruptionFrame):
            self._response_open = False
        elif isinstance(frame, LLMFullResponseStartFrame):
            self._response_spoke = False
            self._response_open = True
            if not self._user_speaking and not self._bot_speaking:
                await self._set("thinking")
        elif isinstance(frame, TTSStartedFrame) or (isinstance(frame, LLMTextFrame) and frame.text.strip()):
            # Text on its way to TTS: a streaming voice may start its audio only after the LLM ends.
            self._response_spoke = True
        elif isinstance(frame, LLMFullResponseEndFrame):
            self._response_open = False
            if self.status == "thinking" and not self._bot_speaking and not self._user_speaking:
                if not self._response_spoke:
                    await self._set("listening")  # nothing to say (e.g. an empty reply)
                else:
                    # The last sentences may still be in TTS; if no audio follows, we are done.
                    asyncio.get_running_loop().call_later(SETTLE_SECS, self._settle)
        elif isinstance(frame, BotStartedSpeakingFrame):
            self._bot_speaking = True
            await self._set("speaking")
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._bot_speaking = False
            if self._user_speaking:
                await self._set("transcribing")
            elif self._response_open:
                # The audio ran out before the LLM finished the reply: it is still thinking.
                await self._set("thinking")
            else:
                await self._set("listening")
