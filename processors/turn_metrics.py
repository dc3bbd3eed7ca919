"""Per-turn latency breakdown and per-session totals, from the frames of one session's pipeline.

Pipecat's `UserBotLatencyObserver` gives voice-to-voice only; we need the stages too (the
spec's latency breakdown), and session totals for `session_end`. The observer is created with
`observe_every_push=False` so each frame counts once (a pipeline pushes a frame once per hop),
and only downstream copies of broadcast frames are read. Times are the pipeline clock's.

Turn timeline (seconds on the pipeline clock):
  speech_end  = VAD stop - VAD stop_secs (when the user really went quiet)
  vad_stop    = the last VADUserStoppedSpeakingFrame before the turn ended
  transcript  = the last final TranscriptionFrame before the turn ended
  turn_end    = UserStoppedSpeakingFrame (after smart-turn and the transcript); a turn record is
                made here, so a turn is one reply's worth of user speech
  llm_token   = the first LLMTextFrame of the reply
  tts_start   = the first TTSStartedFrame (the first sentence reached TTS)
  tts_audio   = the first TTSAudioRawFrame out of TTS
  bot_audio   = BotStartedSpeakingFrame (the first audio chunk leaves the server)
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    ErrorFrame,
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
    interrupted: bool = False

    @property
    def speech_end(self) -> float | None:
        return None if self.vad_stop is None else self.vad_stop - self.vad_stop_secs

    def breakdown(self) -> dict:
        """Milliseconds per stage; None where the turn never reached that stage."""
        return {
            "index": self.index,
            "vadStopMs": round(self.vad_stop_secs * 1000.0, 1) if self.vad_stop is not None else None,
            "sttMs": _ms(self.vad_stop, self.transcript),
            "turnEndMs": _ms(self.vad_stop, self.turn_end),
            "llmFirstTokenMs": _ms(self.turn_end, self.llm_token),
            "firstSentenceMs": _ms(self.llm_token, self.tts_start),
            "ttsFirstAudioMs": _ms(self.tts_start, self.tts_audio),
            "voiceToVoiceMs": _ms(self.speech_end, self.bot_audio),
            "interrupted": self.interrupted,
        }


@dataclass
class SessionTotals:
    stt_audio_seconds: float = 0.0
    llm_input_tokens: int = 0
    llm_output_tokens: int = 0
    tts_characters: int = 0
    interruptions: int = 0
    errors: int = 0


class TurnMetricsObserver(BaseObserver):
    def __init__(self, **kwargs):
        super().__init__(observe_every_push=False, **kwargs)
        self.turns: list[Turn] = []
        self.totals = SessionTotals()
        self._responding: Turn | None = None  # the last ended turn, which the bot is answering
        self._last_vad_stop: float | None = None
        self._last_vad_stop_secs = 0.0
        self._last_transcript: float | None = None
        self._user_text = ""
        self._bot_speaking_turn: Turn | None = None

    async def on_push_frame(self, data: FramePushed):
        frame, t = data.frame, data.timestamp / 1e9
        if isinstance(frame, MetricsFrame):
            self._usage(frame)
            return
        if isinstance(frame, ErrorFrame):
            self.totals.errors += 1
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
            turn = Turn(index=len(self.turns), vad_stop=self._last_vad_stop, vad_stop_secs=self._last_vad_stop_secs,
                        transcript=self._last_transcript, turn_end=t, user_text=self._user_text)
            self.turns.append(turn)
            self._responding = turn
            self._user_text = ""
            # The VAD stop is not cleared: when Pipecat ends a turn on speech the VAD already
            # stopped for (a late transcript after a premature turn end), that stop is the user's
            # real end of speech for the next turn too.
        elif isinstance(frame, LLMTextFrame):
            if self._responding and self._responding.llm_token is None:
                self._responding.llm_token = t
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

    def _usage(self, frame: MetricsFrame) -> None:
        for d in frame.data:
            if isinstance(d, STTUsageMetricsData):
                self.totals.stt_audio_seconds += d.value.audio_seconds
            elif isinstance(d, LLMUsageMetricsData):
                self.totals.llm_input_tokens += d.value.prompt_tokens
                self.totals.llm_output_tokens += d.value.completion_tokens
            elif isinstance(d, TTSUsageMetricsData):
                self.totals.tts_characters += d.value

    def completed_turns(self) -> list[dict]:
        return [t.breakdown() for t in self.turns if t.bot_audio is not None]

    def summary(self) -> dict:
        """The `metrics` object of `session_end` (units in docs/PROTOCOL.md)."""
        done = self.completed_turns()

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
            "ttsCharacters": self.totals.tts_characters,
            "turnBreakdown": done,
        }

    def totals_dict(self) -> dict:
        return asdict(self.totals)
