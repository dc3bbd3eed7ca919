"""Per-turn latency breakdown and per-session totals, from the frames of one session's pipeline; they
come out as the typed records of vocabulary/records.py (`Turn.record()`, `summary()`).

Pipecat's `UserBotLatencyObserver` gives voice-to-voice only; we need the stages too (the
spec's latency breakdown), and session totals for `session_end`. Each frame counts once: only its
first push is read (a pipeline pushes a frame once per hop), except the reply's text (below), and only
downstream copies of broadcast frames are read. Times are the pipeline clock's.

Turn timeline (seconds on the pipeline clock):
  speech_end  = VAD stop - VAD stop_secs (when the user really went quiet)
  vad_stop    = the last VADUserStoppedSpeakingFrame before the turn ended
  transcript  = the last final TranscriptionFrame before the turn ended
  stt_ms      = transcript - speech_end: the STT's own delay, whatever the VAD stop is set to
                (counted from the VAD stop it would be ~0, or below, whenever the stop outlasts the STT)
  turn_end    = UserStoppedSpeakingFrame (after smart-turn and the transcript); a turn record is
                made here, so a turn is one reply's worth of user speech
  llm_token   = the first LLMTextFrame of the reply
  tts_start   = the first TTSStartedFrame (the first sentence reached TTS)
  tts_audio   = the first TTSAudioRawFrame out of TTS
  bot_audio   = BotStartedSpeakingFrame (the first audio chunk leaves the server)
With a preemptive reply (processors/turn_end.py) the LLM started before the turn ended and its first
token is held until then, so llm_token is ~turn_end: the stage times say what the caller waited for.

Preemptive requests: an `LLMContextFrame` marked `speculation` is a request for a turn not yet ended;
an `EagerEndOfTurnCancelFrame` withdraws it (counted in the next turn's `preempt_cancelled`, with the
input tokens it carried in `preempt_input_tokens`: estimated from its messages as Pipecat estimates
tokens, words x 1.3, since a stream closed early reports no usage; the system prompt, read from the
prompt cache, is left out); a turn that ends while one is in flight keeps it (`preempted`). Usage the
vendor does report for a request of a turn not yet ended is held and goes to that turn.

What was said: the user's text is the turn's final transcripts joined; the bot's is the reply as it was
spoken, the `TTSTextFrame`s (a sentence, or with word timestamps a word) the output transport released once
their audio had been sent (what an interruption cut off never is), joined as Pipecat's assistant aggregator
joins them for the context. Those releases are later pushes of frames the TTS pushed first, so this observer
watches every push, reads those, and reads only the first push of everything else; a piece goes to the turn
that was being answered when the TTS pushed it. `bot_text_chars` is the length of that text.

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
    EagerEndOfTurnCancelFrame,
    InterruptionFrame,
    LLMContextFrame,
    LLMTextFrame,
    MetricsFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSTextFrame,
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
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.utils.string import TextPartForConcatenation, concatenate_aggregated_text

from vocabulary.records import SessionSummary, TurnRecord, Usage, bounded_text, percentile, rounded


def estimate_tokens(messages) -> int:
    """Input tokens of a request's messages, estimated as Pipecat's services estimate (words x 1.3)."""
    words = 0
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
        if isinstance(content, list):
            content = " ".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
        words += len(str(content or "").split())
    return int(words * 1.3)


def _ms(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return round((b - a) * 1000.0, 1)


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
    bot_parts: list[TextPartForConcatenation] = field(default_factory=list)  # the reply's spoken pieces
    interrupted: bool = False
    llm_input_tokens: int = 0
    llm_output_tokens: int = 0
    llm_cache_read_tokens: int = 0
    llm_cache_write_tokens: int = 0
    tts_characters: int = 0
    error_code: str | None = None
    preempted: bool = False
    preempt_cancelled: int = 0
    preempt_input_tokens: int = 0
    wall_offset: float = 0.0  # wall clock (Unix s) = pipeline clock + wall_offset

    @property
    def bot_text(self) -> str:
        """The reply as it was spoken, its pieces joined with the spacing they need."""
        return concatenate_aggregated_text(self.bot_parts).strip()

    @property
    def speech_end(self) -> float | None:
        return None if self.vad_stop is None else self.vad_stop - self.vad_stop_secs

    def record(self) -> TurnRecord:
        """Milliseconds per stage (None where the turn never reached that stage), usage and wall times."""
        bot_text = self.bot_text
        return TurnRecord(
            index=self.index,
            vad_stop_ms=round(self.vad_stop_secs * 1000.0, 1) if self.vad_stop is not None else None,
            stt_ms=_ms(self.speech_end, self.transcript),
            turn_end_ms=_ms(self.vad_stop, self.turn_end),
            llm_first_token_ms=_ms(self.turn_end, self.llm_token),
            first_sentence_ms=_ms(self.llm_token, self.tts_start),
            tts_first_audio_ms=_ms(self.tts_start, self.tts_audio),
            voice_to_voice_ms=_ms(self.speech_end, self.bot_audio),
            interrupted=self.interrupted,
            user_text_chars=len(self.user_text),
            bot_text_chars=len(bot_text),
            usage=Usage(
                self.llm_input_tokens,
                self.llm_output_tokens,
                self.llm_cache_read_tokens,
                self.llm_cache_write_tokens,
                self.tts_characters,
            ),
            error_code=self.error_code,
            preempted=self.preempted,
            preempt_cancelled=self.preempt_cancelled,
            preempt_input_tokens=self.preempt_input_tokens,
            user_stopped_at=self.wall(self.speech_end),
            first_audio_at=self.wall(self.bot_audio),
            ended_at=self.wall(self.turn_end),
            user_text=bounded_text(self.user_text),
            bot_text=bounded_text(bot_text),
        )

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
    FRAME_TYPES = (
        MetricsFrame,
        InterruptionFrame,
        LLMContextFrame,
        EagerEndOfTurnCancelFrame,
        VADUserStoppedSpeakingFrame,
        TranscriptionFrame,
        UserStoppedSpeakingFrame,
        LLMTextFrame,
        TTSStartedFrame,
        TTSAudioRawFrame,
        BotStartedSpeakingFrame,
        BotStoppedSpeakingFrame,
        TTSTextFrame,
    )

    # The output transport's release of a TTSTextFrame is a later push of it; of every other frame only the
    # first push is read (compat.pipecat.SelectiveWorkerObserver delivers no other later push at all).
    EVERY_PUSH_TYPES = (TTSTextFrame,)

    def __init__(
        self,
        on_turn_closed: Callable[[Turn], None] | None = None,
        on_reply_started: Callable[[Turn], None] | None = None,
        **kwargs,
    ):
        """`on_turn_closed(turn)`: the turn is over (the next one began, or the session ended); `on_reply_started
        (turn)`: the turn's reply began to play, every stage up to its first audio is known."""
        super().__init__(observe_every_push=True, **kwargs)
        self.on_turn_closed = on_turn_closed
        self.on_reply_started = on_reply_started
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
        # Whether the bot is speaking now (any reply, the greeting too), and since when (monotonic) it has been
        # quiet: a transfer waits for the reply announcing it to go out (bots/session.py).
        self.bot_speaking = False
        self.bot_quiet_since = time.monotonic()
        # the turn not yet ended: its preemptive request in flight (estimated input tokens), the ones
        # withdrawn, and usage reported for them; usage goes there while `_usage_ahead`
        self._speculation_tokens: int | None = None
        self._ahead = Turn(index=-1)
        self._usage_ahead = False
        # TTSTextFrames the TTS pushed and the output transport has not yet released: frame id -> the index
        # of the turn being answered then
        self._unspoken: dict[int, int] = {}

    async def on_push_frame(self, data: FramePushed):
        frame, t = data.frame, data.timestamp / 1e9
        if isinstance(frame, TTSTextFrame):
            self._text(frame, data)
            return
        if not data.first_push:
            return
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
        elif isinstance(frame, LLMContextFrame):
            if frame.speculation:
                self._speculation_tokens = estimate_tokens(frame.context.get_messages())
            self._usage_ahead = frame.speculation
        elif isinstance(frame, EagerEndOfTurnCancelFrame):
            if self._speculation_tokens is not None:
                self._ahead.preempt_cancelled += 1
                self._ahead.preempt_input_tokens += self._speculation_tokens
                self._speculation_tokens = None
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self._last_vad_stop, self._last_vad_stop_secs = t, frame.stop_secs
        elif isinstance(frame, TranscriptionFrame) and isinstance(data.source, STTService):
            self._last_transcript = t
            self._user_text = (self._user_text + " " + frame.text).strip()
        elif isinstance(frame, UserStoppedSpeakingFrame):
            # A turn is measured from the user's last speech before it ended, however Pipecat
            # split that speech into VAD segments and whenever it decided the turn began.
            self.close_turns()
            turn = Turn(
                index=len(self.turns),
                vad_stop=self._last_vad_stop,
                vad_stop_secs=self._last_vad_stop_secs,
                transcript=self._last_transcript,
                turn_end=t,
                user_text=self._user_text,
                wall_offset=self._wall_offset or 0.0,
                preempted=self._speculation_tokens is not None,
                preempt_cancelled=self._ahead.preempt_cancelled,
                preempt_input_tokens=self._ahead.preempt_input_tokens,
                llm_input_tokens=self._ahead.llm_input_tokens,
                llm_output_tokens=self._ahead.llm_output_tokens,
                llm_cache_read_tokens=self._ahead.llm_cache_read_tokens,
                llm_cache_write_tokens=self._ahead.llm_cache_write_tokens,
            )
            self._speculation_tokens, self._ahead, self._usage_ahead = None, Turn(index=-1), False
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
        elif isinstance(frame, TTSStartedFrame):
            if self._responding and self._responding.tts_start is None:
                self._responding.tts_start = t
        elif isinstance(frame, TTSAudioRawFrame):
            if self._responding and self._responding.tts_audio is None:
                self._responding.tts_audio = t
        elif isinstance(frame, BotStartedSpeakingFrame):
            if self._responding and self._responding.bot_audio is None:
                self._responding.bot_audio = t
                if self.on_reply_started is not None:
                    self.on_reply_started(self._responding)
            self._bot_speaking_turn = self._responding
            self.bot_speaking = True
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._bot_speaking_turn = None
            if self.bot_speaking:
                self.bot_speaking, self.bot_quiet_since = False, time.monotonic()

    def _text(self, frame: TTSTextFrame, data: FramePushed) -> None:
        """A piece of the reply's text: pushed by the TTS (whose turn it is), then released by the output
        transport once its audio has been sent (spoken)."""
        if data.direction != FrameDirection.DOWNSTREAM:
            return
        if data.first_push and self._responding is not None:
            self._unspoken[frame.id] = self._responding.index
        if isinstance(data.source, BaseOutputTransport):
            index = self._unspoken.pop(frame.id, None)
            if index is not None and index >= self._closed and frame.text:
                self.turns[index].bot_parts.append(
                    TextPartForConcatenation(frame.text, includes_inter_part_spaces=frame.includes_inter_frame_spaces)
                )

    def count_error(self, code: str) -> None:
        """An `error` message was sent to the client (the serializer calls this once per message)."""
        self.totals.errors += 1
        self.totals.errors_by_code[code] += 1
        turn = self._responding or (self.turns[-1] if self.turns else None)
        if turn is not None and turn.error_code is None:
            turn.error_code = code

    def _usage(self, frame: MetricsFrame) -> None:
        totals = self.totals
        llm_turn = self._ahead if self._usage_ahead else self._responding
        for d in frame.data:
            if isinstance(d, STTUsageMetricsData):
                totals.stt_audio_seconds += d.value.audio_seconds
            elif isinstance(d, LLMUsageMetricsData):
                u = d.value
                usage = (
                    u.prompt_tokens,
                    u.completion_tokens,
                    u.cache_read_input_tokens or 0,
                    u.cache_creation_input_tokens or 0,
                )
                for target in (totals, llm_turn):
                    if target is not None:
                        target.llm_input_tokens += usage[0]
                        target.llm_output_tokens += usage[1]
                        target.llm_cache_read_tokens += usage[2]
                        target.llm_cache_write_tokens += usage[3]
            elif isinstance(d, TTSUsageMetricsData):
                totals.tts_characters += d.value
                if self._responding is not None:
                    self._responding.tts_characters += d.value

    def close_turns(self) -> None:
        """Hand every turn not yet closed to `on_turn_closed` (the session end closes the last one)."""
        while self._closed < len(self.turns):
            turn = self.turns[self._closed]
            self._closed += 1
            # its row is written now: text its TTS pushed that was never released is not coming
            self._unspoken = {k: i for k, i in self._unspoken.items() if i >= self._closed}
            if turn.worth_recording and self.on_turn_closed is not None:
                self.on_turn_closed(turn)

    def recorded_turns(self) -> list[Turn]:
        return [t for t in self.turns if t.worth_recording]

    def summary(self) -> SessionSummary:
        """The session's numbers (session_end's `metrics`, the session row) from the turns recorded."""
        done = tuple(t.record() for t in self.recorded_turns())

        def mean(name: str) -> float | None:
            v = [getattr(t, name) for t in done if getattr(t, name) is not None]
            return round(statistics.fmean(v), 1) if v else None

        v2v = [t.voice_to_voice_ms for t in done if t.voice_to_voice_ms is not None]
        tot = self.totals
        return SessionSummary(
            stt_seconds=round(tot.stt_audio_seconds, 3),
            stt_latency_ms=mean("stt_ms"),
            llm_latency_ms=mean("llm_first_token_ms"),
            tts_latency_ms=mean("tts_first_audio_ms"),
            total_latency_ms=mean("voice_to_voice_ms"),
            p50_latency_ms=rounded(percentile(v2v, 50)),
            p95_latency_ms=rounded(percentile(v2v, 95)),
            interruptions=tot.interruptions,
            errors=tot.errors,
            usage=Usage(
                tot.llm_input_tokens,
                tot.llm_output_tokens,
                tot.llm_cache_read_tokens,
                tot.llm_cache_write_tokens,
                tot.tts_characters,
            ),
            errors_by_code=dict(tot.errors_by_code),
            turn_records=done,
        )
