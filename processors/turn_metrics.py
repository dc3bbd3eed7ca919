"""Per-turn latency breakdown and per-session totals, from the frames of one session's pipeline.

Pipecat's `UserBotLatencyObserver` gives voice-to-voice only; we need the stages too (the
spec's latency breakdown), and session totals for `session_end`. The observer is created with
`observe_every_push=False` so each frame counts once (a pipeline pushes a frame once per hop),
and only downstream copies of broadcast frames are read. Times are the pipeline clock's.

Turn timeline (seconds on the pipeline clock):
  speech_end  = VAD stop - VAD stop_secs (when the user really went quiet)
  vad_stop    = the last VADUserStoppedSpeakingFrame before the turn ended
  transcript  = the last final TranscriptionFrame before the turn ended
  sttMs       = transcript - speech_end: the STT's own delay, whatever the VAD stop is set to
                (from the VAD stop it shrank to ~0, or below, once the stop outlasted Deepgram)
  turn_end    = UserStoppedSpeakingFrame (after smart-turn and the transcript); a turn record is
                made here, so a turn is one reply's worth of user speech
  llm_token   = the first LLMTextFrame of the reply
  tts_start   = the first TTSStartedFrame (the first sentence reached TTS)
  tts_audio   = the first TTSAudioRawFrame out of TTS
  bot_audio   = BotStartedSpeakingFrame (the first audio chunk leaves the server)

Usage (tokens, TTS characters) and errors (`count_error`, called by the serializer for every
`error` message the client gets) are attributed to the turn being answered when they
arrive. A turn is closed when the next one begins or the session ends; `on_turn_closed` then gets
it once, so the recorder writes each turn row once, with numbers that no longer change.
Wall-clock times (for the database) are the pipeline clock plus an offset taken at the first frame.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    InterruptionFrame,
    LLMTextFrame,
    MetricsFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    UserStoppedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.metrics.metrics import (
    LLMUsageMetricsData,
    STTUsageMetricsData,
    TTSUsageMetricsData,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.stt_service import STTService


def _ms(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return round((b - a) * 1000.0, 1)


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return round(ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo), 1)


@dataclass
class Turn:
    index: int
    vad_stop_secs: float = 0.0
    vad_stop: float | None = None
    transcript: float | None = None
    turn_end: float | None = None
    llm_token: float | None = None
    tts_start: float | None = None
    tts_audio: float | None = None
    bot_audio: float | None = None
    user_text: str = ""
    bot_text_chars: int = 0
    interrupted: bool = False
    llm_input_tokens: int = 0
    llm_output_tokens: int = 0
    llm_cache_read_tokens: int = 0
    llm_cache_write_tokens: int = 0
    tts_characters: int = 0
    error_code: str | None = None
    wall_offset: float = 0.0  # wall clock (Unix s) = pipeline clock + wall_offset

    @property
    def speech_end(self) -> float | None:
        return None if self.vad_stop is None else self.vad_stop - self.vad_stop_secs

    def breakdown(self) -> dict:
        """Milliseconds per stage; None where the turn never reached that stage."""
        return {
            "index": self.index,
            "vadStopMs": round(self.vad_stop_secs * 1000.0, 1) if self.vad_stop is not None else None,
            "sttMs": _ms(self.speech_end, self.transcript),
            "turnEndMs": _ms(self.vad_stop, self.turn_end),
            "llmFirstTokenMs": _ms(self.turn_end, self.llm_token),
            "firstSentenceMs": _ms(self.llm_token, self.tts_start),
            "ttsFirstAudioMs": _ms(self.tts_start, self.tts_audio),
            "voiceToVoiceMs": _ms(self.speech_end, self.bot_audio),
            "interrupted": self.interrupted,
            "userTextChars": len(self.user_text),
            "botTextChars": self.bot_text_chars,
            "llmInputTokens": self.llm_input_tokens,
            "llmOutputTokens": self.llm_output_tokens,
            "llmCacheReadTokens": self.llm_cache_read_tokens,
            "llmCacheWriteTokens": self.llm_cache_write_tokens,
            "ttsCharacters": self.tts_characters,
            "errorCode": self.error_code,
        }

    def wall(self, t: float | None) -> float | None:
        return None if t is None else t + self.wall_offset

    @property
    def worth_recording(self) -> bool:
        """A turn the user said something in, or the bot answered (not a VAD blip with no words)."""
        return bool(self.user_text.strip()) or self.bot_audio is not None or self.llm_token is not None


@dataclass
class SessionTotals:
    stt_audio_seconds: float = 0.0
    llm_input_tokens: int = 0
    llm_output_tokens: int = 0
    llm_cache_read_tokens: int = 0
    llm_cache_write_tokens: int = 0
    tts_characters: int = 0
    interruptions: int = 0
    errors: int = 0
    errors_by_code: Counter = field(default_factory=Counter)


class TurnMetricsObserver(BaseObserver):
    # the frames on_push_frame reads (SelectiveWorkerObserver hands it no others)
    FRAME_TYPES = (MetricsFrame, InterruptionFrame, VADUserStoppedSpeakingFrame, TranscriptionFrame,
                   UserStoppedSpeakingFrame, LLMTextFrame, TTSStartedFrame, TTSAudioRawFrame,
                   BotStartedSpeakingFrame, BotStoppedSpeakingFrame)

    def __init__(self, on_turn_closed: Callable[[Turn], None] | None = None, **kwargs):
        super().__init__(observe_every_push=False, **kwargs)
        self.on_turn_closed = on_turn_closed
        self.turns: list[Turn] = []
        self._wall_offset: float | None = None
        self._closed = 0  # turns[:_closed] have been handed to on_turn_closed
        self.totals = SessionTotals()
        self._responding: Turn | None = None  # the last ended turn, which the bot is answering
        self._last_vad_stop: float | None = None
        self._last_vad_stop_secs = 0.0
        self._last_transcript: float | None = None
        self._user_text = ""
        self._bot_speaking_turn: Turn | None = None

    async def on_push_frame(self, data: FramePushed):
        frame, t = data.frame, data.timestamp / 1e9
        if self._wall_offset is None:
            self._wall_offset = time.time() - t
        if isinstance(frame, MetricsFrame):
            self._usage(frame)
            return
        if data.direction != FrameDirection.DOWNSTREAM:
            return
        if isinstance(frame, InterruptionFrame):
            turn = self._bot_speaking_turn
            if turn is not None and not turn.interrupted:
                turn.interrupted = True
                self.totals.interruptions += 1
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self._last_vad_stop, self._last_vad_stop_secs = t, frame.stop_secs
        elif isinstance(frame, TranscriptionFrame) and isinstance(data.source, STTService):
            self._last_transcript = t
            self._user_text = (self._user_text + " " + frame.text).strip()
        elif isinstance(frame, UserStoppedSpeakingFrame):
            # A turn is measured from the user's last speech before it ended, however Pipecat
            # split that speech into VAD segments and whenever it decided the turn began.
            self.close_turns()
            turn = Turn(index=len(self.turns), vad_stop=self._last_vad_stop, vad_stop_secs=self._last_vad_stop_secs,
                        transcript=self._last_transcript, turn_end=t, user_text=self._user_text,
                        wall_offset=self._wall_offset or 0.0)
            self.turns.append(turn)
            self._responding = turn
            self._user_text = ""
            # The VAD stop is not cleared: when Pipecat ends a turn on speech the VAD already
            # stopped for (a late transcript after a premature turn end), that stop is the user's
            # real end of speech for the next turn too.
        elif isinstance(frame, LLMTextFrame):
            if self._responding:
                if self._responding.llm_token is None:
                    self._responding.llm_token = t
                self._responding.bot_text_chars += len(frame.text)
        elif isinstance(frame, TTSStartedFrame):
            if self._responding and self._responding.tts_start is None:
                self._responding.tts_start = t
        elif isinstance(frame, TTSAudioRawFrame):
            if self._responding and self._responding.tts_audio is None:
                self._responding.tts_audio = t
        elif isinstance(frame, BotStartedSpeakingFrame):
            if self._responding and self._responding.bot_audio is None:
                self._responding.bot_audio = t
            self._bot_speaking_turn = self._responding
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._bot_speaking_turn = None

    def count_error(self, code: str) -> None:
        """An `error` message was sent to the client (the serializer calls this once per message)."""
        self.totals.errors += 1
        self.totals.errors_by_code[code] += 1
        turn = self._responding or (self.turns[-1] if self.turns else None)
        if turn is not None and turn.error_code is None:
            turn.error_code = code

    def _usage(self, frame: MetricsFrame) -> None:
        turn, totals = self._responding, self.totals
        for d in frame.data:
            if isinstance(d, STTUsageMetricsData):
                totals.stt_audio_seconds += d.value.audio_seconds
            elif isinstance(d, LLMUsageMetricsData):
                u = d.value
                usage = (u.prompt_tokens, u.completion_tokens, u.cache_read_input_tokens or 0,
                         u.cache_creation_input_tokens or 0)
                for target in (totals, turn):
                    if target is not None:
                        target.llm_input_tokens += usage[0]
                        target.llm_output_tokens += usage[1]
                        target.llm_cache_read_tokens += usage[2]
                        target.llm_cache_write_tokens += usage[3]
            elif isinstance(d, TTSUsageMetricsData):
                totals.tts_characters += d.value
                if turn is not None:
                    turn.tts_characters += d.value

    def close_turns(self) -> None:
        """Hand every turn not yet closed to `on_turn_closed` (the session end closes the last one)."""
        while self._closed < len(self.turns):
            turn = self.turns[self._closed]
            self._closed += 1
            if turn.worth_recording and self.on_turn_closed is not None:
                self.on_turn_closed(turn)

    def recorded_turns(self) -> list[Turn]:
        return [t for t in self.turns if t.worth_recording]

    def summary(self) -> dict:
        """The `metrics` object of `session_end` (units in docs/PROTOCOL.md); the session row has the same."""
        done = [t.breakdown() for t in self.recorded_turns()]

        def values(key):
            return [t[key] for t in done if t[key] is not None]

        def mean(key):
            v = values(key)
            return round(statistics.fmean(v), 1) if v else None

        v2v = values("voiceToVoiceMs")
        return {
            "sttDuration": round(self.totals.stt_audio_seconds, 3),
            "sttLatency": mean("sttMs"),
            "llmLatency": mean("llmFirstTokenMs"),
            "ttsLatency": mean("ttsFirstAudioMs"),
            "totalLatency": mean("voiceToVoiceMs"),
            "p50Latency": percentile(v2v, 0.5),
            "p95Latency": percentile(v2v, 0.95),
            "turns": len(done),
            "interruptions": self.totals.interruptions,
            "errors": self.totals.errors,
            "llmInputTokens": self.totals.llm_input_tokens,
            "llmOutputTokens": self.totals.llm_output_tokens,
            "llmCacheReadTokens": self.totals.llm_cache_read_tokens,
            "llmCacheWriteTokens": self.totals.llm_cache_write_tokens,
            "ttsCharacters": self.totals.tts_characters,
            "errorsByCode": dict(self.totals.errors_by_code),
            "turnBreakdown": done,
        }
