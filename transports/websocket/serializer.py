"""Pipecat's serializer for the Atlas protocol: JSON control messages and raw PCM in, JSON out.

Pipecat has no serializer for a JSON-control + raw-PCM protocol, so this module writes one on Pipecat's
`FrameSerializer` interface. Everything a client sends after `session_start` is validated here
(transports/websocket/protocol.py), and every rejection is an `error` message with its code.
"""

from __future__ import annotations

import base64
import json
import time

from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputTransportMessageFrame,
    OutputTransportMessageUrgentFrame,
    TTSTextFrame,
)
from pipecat.serializers.base_serializer import FrameSerializer

from bots.feedback import parse_feedback
from transports.common import AudioBatcher
from transports.websocket.protocol import check_audio, parse_text_message
from vocabulary.audio import CLIENT_SAMPLE_RATE, stamped
from vocabulary.errors import ErrorCode, ProtocolError, error_message
from vocabulary.frames import SentenceStartFrame


class AtlasProtocolSerializer(FrameSerializer):
    """Serializer for one session of the Atlas protocol (it keeps that session's small state).

    In: binary PCM s16le 16 kHz mono -> InputAudioRawFrame; `mute`/`unmute` gate the audio (muted
    audio becomes silence of the same length, so the VAD closes any open turn); `interrupt` ->
    InterruptionFrame; `session_stop` is handed to `on_session_stop`; `feedback` (checked) to
    `on_feedback`, answered `feedback_received`. Bad input becomes an urgent `error` message that travels
    to the output transport; the session goes on. Every `error` sent is reported to `on_error` (the
    session's error count and /metrics).

    Out: audio -> `audio_chunk` (base64 PCM at the session's output rate) stamped with the
    reply sentence it belongs to; spoken text -> `bot_transcript`; an interruption while the client
    may still be playing -> `audio_flush`; transport messages -> their JSON; the end of the
    pipeline (End/Cancel, written just before the transport closes the socket) -> `session_end`
    from the `session_end` callback.
    """

    def __init__(
        self,
        *,
        max_audio_bytes: int,
        max_text_bytes: int,
        on_session_stop=None,
        on_audio=None,
        session_end=None,
        on_error=None,
        audio_batch_ms: int = 40,
        rate=None,
        budget=None,
        on_flood=None,
        on_feedback=None,
    ):
        super().__init__()
        self._batch = AudioBatcher(CLIENT_SAMPLE_RATE, audio_batch_ms)
        self._max_audio = max_audio_bytes
        self._max_text = max_text_bytes
        self._on_session_stop = on_session_stop
        self._on_audio = on_audio
        self._session_end = session_end
        self._on_error = on_error  # called with the code of every `error` message sent
        self._rate = rate  # bots.limits.MessageRate: over it, messages are dropped before parsing
        self._budget = budget  # bots.limits.AudioBudget: audio over real time (+ a burst) is dropped
        self._on_flood = on_flood  # called once when the message rate says the connection is flooding
        self._on_feedback = on_feedback  # called with a `feedback` message's (rating, comment)
        self.muted = False
        self.end_sent = False  # session_end written (the door sends it itself when the pipeline never started)
        self.sentence_index = -1  # the first SentenceStartFrame makes it 0
        # When the client will have played every audio chunk sent so far (monotonic clock).
        self.client_playing_until = 0.0

    # ---- client -> server -------------------------------------------------------------------
    async def deserialize(self, data: str | bytes) -> Frame | None:
        if self._rate is not None and not self._rate.allow():
            if self._on_flood is not None and self._rate.flooding:
                on_flood, self._on_flood = self._on_flood, None
                await on_flood()
                return None
            if self._rate.should_tell():
                return OutputTransportMessageUrgentFrame(message=self._rate.refusal().to_message())
            return None
        try:
            if isinstance(data, (bytes, bytearray)):
                check_audio(data, self._max_audio)
                if not data:
                    return None
                if self._budget is not None and not self._budget.take(len(data) / (2 * CLIENT_SAMPLE_RATE)):
                    if self._budget.should_tell():
                        return OutputTransportMessageUrgentFrame(message=self._budget.refusal().to_message())
                    return None
                if self._on_audio:
                    self._on_audio(len(data))
                audio = self._batch.add(bytes(len(data)) if self.muted else bytes(data))
                if audio is None:
                    return None
                return stamped(InputAudioRawFrame(audio=audio, sample_rate=CLIENT_SAMPLE_RATE, num_channels=1))
            msg = parse_text_message(data, self._max_text)
        except ProtocolError as e:
            return OutputTransportMessageUrgentFrame(message=e.to_message())
        kind = msg["type"]
        if kind == "session_start":
            return OutputTransportMessageUrgentFrame(
                message=error_message(ErrorCode.ALREADY_STARTED, "this connection already has a session")
            )
        if kind == "mute":
            self.muted = True
        elif kind == "unmute":
            self.muted = False
        elif kind == "interrupt":
            return InterruptionFrame()
        elif kind == "session_stop" and self._on_session_stop:
            await self._on_session_stop()
        elif kind == "feedback" and self._on_feedback:
            try:
                rating, comment = parse_feedback(msg)
            except ProtocolError as e:
                return OutputTransportMessageUrgentFrame(message=e.to_message())
            self._on_feedback(rating, comment)
            return OutputTransportMessageUrgentFrame(message={"type": "feedback_received", "rating": rating})
        return None

    # ---- server -> client -------------------------------------------------------------------
    async def serialize(self, frame: Frame) -> str | bytes | None:
        if isinstance(frame, OutputAudioRawFrame):
            now = time.monotonic()
            duration = len(frame.audio) / (2 * frame.sample_rate * frame.num_channels)
            self.client_playing_until = max(now, self.client_playing_until) + duration
            return json.dumps(
                {
                    "type": "audio_chunk",
                    "audio": base64.b64encode(frame.audio).decode("ascii"),
                    "sentenceIndex": max(self.sentence_index, 0),
                }
            )
        if isinstance(frame, SentenceStartFrame):
            self.sentence_index += 1
            return None
        if isinstance(frame, TTSTextFrame):
            # Queued behind its sentence's audio: that sentence has now been sent in full.
            text = frame.text.strip()
            if not text:
                return None
            return json.dumps({"type": "bot_transcript", "text": text, "sentenceIndex": max(self.sentence_index, 0)})
        if isinstance(frame, InterruptionFrame):
            # Pipecat interrupts at every user turn start; only tell the client to drop audio
            # when some may still be queued or playing there.
            playing = time.monotonic() < self.client_playing_until + 0.25
            self.client_playing_until = 0.0  # the client drops its queue
            if playing:
                return json.dumps({"type": "audio_flush", "reason": "interruption"})
            return None
        if isinstance(frame, (OutputTransportMessageFrame, OutputTransportMessageUrgentFrame)):
            if self._on_error is not None and frame.message.get("type") == "error":
                self._on_error(frame.message.get("code", ""))
            return json.dumps(frame.message)
        if isinstance(frame, (EndFrame, CancelFrame)) and self._session_end is not None and not self.end_sent:
            self.end_sent = True
            return json.dumps(self._session_end())
        return None
