"""When a caller's turn ends, and answering before it has: the turn-end rule and preemptive replies.

Pipecat's stop strategies end a turn after one fixed wait (the speech timeout) or on smart-turn's verdict
alone, and its preemptive machinery (`EagerUserTurnStopStrategy`, the `SpeculationGate` every LLM
service holds) starts only on an STT service's own "eager end of turn" (Deepgram Flux); nothing
speculates at a pause for Nova, Whisper or any STT without one. `PreemptiveTurnStopStrategy` is a stop
strategy that does both, on Pipecat's own speculation path:

- At the pause (the VAD's stop, which also makes Pipecat ask Deepgram to finalize), once the
  transcript for the speech so far is in and no earlier than `lead_secs` before the turn would end (so
  the reply is ready as the turn ends, and a pause broken sooner costs no request), it starts a
  speculative inference on it
  (`trigger_user_turn_inference_triggered(speculation=...)`): the user aggregator runs the LLM on a
  provisional copy of the context, and the LLM service's gate holds everything the reply produces.
- The turn ends after the silence `TurnEndRule.wait` asks for, chosen from what is known at the pause:
  the words so far (`words_verdict`: a finished sentence or question, or a trailing "and", "to", "um",
  a number being read out, a bare "hi Atlas"), smart-turn's verdict on the audio, and the pause itself
  (the timer, cancelled when the caller speaks again).
- At the turn end, if the transcript is the one the speculation answered (Pipecat's
  `NormalizedMatch`), the turn is finalized with `confirms_speculation`: the held reply is released
  and no second request is made. Otherwise the speculation is withdrawn (the LLM service closes its
  stream) and the turn runs as usual on the full transcript.
- When the caller speaks again, or a later transcript changes the words, the speculation is withdrawn
  at once (`trigger_user_turn_speculation_cancelled`, broadcast ahead of anything queued) and the next
  pause speculates again on the longer transcript.
- A speculative reply that wants a tool call is withdrawn by the LLM service itself (a tool's side effects
  cannot be undone); the turn then ends as usual and its own request runs the call.

Only the reply to the turn as it ended is ever spoken or written to the context: a withdrawn reply is
dropped by the gate before it reaches TTS, the assistant aggregator or the transcript.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import Literal

from loguru import logger
from pipecat.audio.turn.base_turn_analyzer import BaseTurnAnalyzer, EndOfTurnState
from pipecat.frames.frames import (
    EagerEndOfTurnCancelFrame,
    Frame,
    InputAudioRawFrame,
    MetricsFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameProcessorSetup
from pipecat.turns.types import ProcessFrameResult, UserTurnSpeculation
from pipecat.turns.user_stop.base_user_turn_stop_strategy import BaseUserTurnStopStrategy
from pipecat.turns.user_stop.eager_match_policy import NormalizedMatch

Verdict = Literal["open", "done", "unsure"]

# A turn whose words end on one of these is not over: a conjunction, preposition, article, possessive or
# filler leaves its phrase unfinished ("a timer for", "from Boston to", "so", "um").
_CONTINUERS = frozenset(
    """and or but so because cause if than then that which who whose where when while as
    to for of from with without at in on into onto by about like until till via per between
    the a an my your his her its our their this these those some any every each no
    is are was were be been am i'm it's there's what's um uh er erm ah hmm mm uh-huh you know i mean""".split()
)
# A turn made only of these is a preamble ("Hi Atlas", "Okay", "So"): the question comes next.
_PREAMBLE = frozenset("hi hey hello hiya yo okay ok alright right so well um uh er erm ah hmm atlas yeah yes".split())
_NUMBER_WORDS = frozenset(
    """zero oh one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen
    sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred
    thousand double triple""".split()
)
_WORD = re.compile(r"[\w'-]+")


def words_verdict(text: str) -> Verdict:
    """What the words so far say about the turn: "open" (it cannot end here), "done" (a finished
    sentence or question: the STT punctuated its end) or "unsure"."""
    stripped = text.strip()
    words = [w.lower().strip("'-") for w in _WORD.findall(stripped)]
    words = [w for w in words if w]
    if not words:
        return "unsure"
    last = words[-1]
    if stripped[-1] in ",;:-\u2014\u2026" or stripped.endswith("..."):
        return "open"
    if last in _CONTINUERS or " ".join(words[-2:]) in _CONTINUERS:
        return "open"
    if last in _NUMBER_WORDS or last.isdigit():
        # a number being read out: digits come in groups with pauses between them
        return "open"
    if all(w in _PREAMBLE for w in words):
        return "open"
    if stripped[-1] in ".?!":
        return "done"
    return "unsure"


@dataclass(frozen=True)
class TurnEndRule:
    """Seconds of silence (from the end of speech) before a turn ends, by what is known at the pause.

    `done_secs`: the words are finished and smart-turn (when it runs) calls the audio complete;
    `unsure_secs`: anything else; `open_secs`: the words are unfinished (see `words_verdict`), whatever
    smart-turn says. Tuned on the recorded-speech set (bench/turns.py, `atlas-voice bench turns`).
    """

    done_secs: float = 0.9
    unsure_secs: float = 0.9
    open_secs: float = 1.5

    @classmethod
    def from_settings(cls, settings) -> TurnEndRule:
        """The rule ATLAS_TURN_DONE_SECS / _UNSURE_SECS / _OPEN_SECS describe."""
        return cls(settings.turn_done_secs, settings.turn_unsure_secs, settings.turn_open_secs)

    def silence(self, verdict: Verdict, smart_complete: bool | None) -> float:
        if verdict == "open":
            return self.open_secs
        if verdict == "done" and smart_complete is not False:
            return self.done_secs
        return self.unsure_secs

    @property
    def longest(self) -> float:
        return max(self.done_secs, self.unsure_secs, self.open_secs)


class PreemptiveTurnStopStrategy(BaseUserTurnStopStrategy):
    """Ends a turn by `TurnEndRule` and, with `preempt`, speculates on the transcript at each pause.

    `lead_secs`: how long before the turn would end the speculation starts (the LLM's time to a first
    token: the reply is ready as the turn ends); `max_per_turn` bounds the speculations of one turn (a
    caller who keeps pausing costs at most that many withdrawn requests; past it the turn is answered
    when it ends, as LiveKit's `max_retries` does); `vad_stop_secs` is the VAD's stop (the silence already
    behind a VAD stop event); `turn_analyzer` (smart-turn) is optional; `stt_wait_secs` bounds the wait for
    the transcript after a pause (the turn then goes on with the words in hand, as Pipecat's STT timeout
    does).
    """

    def __init__(
        self,
        *,
        rule: TurnEndRule,
        vad_stop_secs: float,
        preempt: bool = True,
        lead_secs: float = 0.6,
        max_per_turn: int = 3,
        turn_analyzer: BaseTurnAnalyzer | None = None,
        stt_wait_secs: float = 1.5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.rule = rule
        self.preempt = preempt
        self.lead_secs = lead_secs
        self.max_per_turn = max_per_turn
        self._this_turn = 0  # speculations started in the current turn
        self._vad_stop_secs = vad_stop_secs
        self._analyzer = turn_analyzer
        self._stt_wait_secs = stt_wait_secs
        self._match = NormalizedMatch()
        self._text = ""  # final transcripts of this turn
        self._speaking = False
        self._stopped_at: float | None = None  # monotonic time of the VAD stop of the current pause
        self._heard = False  # a final transcript arrived since that stop
        self._smart: bool | None = None  # smart-turn's verdict at that stop
        self._timer: asyncio.Task | None = None
        self._speculation: UserTurnSpeculation | None = None
        self.speculations = 0  # started, for tests and logs
        self.withdrawn = 0

    # --- lifecycle -------------------------------------------------------------------------------

    async def setup(self, setup: FrameProcessorSetup):  # type: ignore[override]  # as Pipecat's stop strategies
        await super().setup(setup)
        if self._analyzer is not None:
            self._analyzer.set_sample_rate(setup.audio_in_sample_rate)

    async def cleanup(self):
        await super().cleanup()
        await self._cancel_timer()
        if self._analyzer is not None:
            await self._analyzer.cleanup()

    async def handle_user_turn_started(self):
        await self._reset()

    async def handle_user_turn_stopped(self):
        await self._reset()
        if self._analyzer is not None:
            self._analyzer.clear()

    async def _reset(self):
        self._text = ""
        self._this_turn = 0
        self._stopped_at, self._heard, self._smart = None, False, None
        await self._cancel_timer()
        await self._withdraw("the turn ended without it")

    # --- frames ----------------------------------------------------------------------------------

    async def process_frame(self, frame: Frame) -> ProcessFrameResult:
        if isinstance(frame, InputAudioRawFrame):
            if self._analyzer is not None:
                self._analyzer.append_audio(frame.audio, self._speaking)
        elif isinstance(frame, VADUserStartedSpeakingFrame):
            self._speaking = True
            self._stopped_at, self._heard, self._smart = None, False, None
            if self._analyzer is not None:
                self._analyzer.update_vad_start_secs(frame.start_secs)
            await self._cancel_timer()
            await self._withdraw("the caller went on")
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self._speaking = False
            self._stopped_at, self._heard = time.monotonic(), False
            self._smart = await self._smart_turn()
            await self._decide()
        elif isinstance(frame, EagerEndOfTurnCancelFrame):
            # The LLM service withdrew the speculation itself (its reply wants a tool call, which cannot run on
            # a guess; Pipecat's frame reaches every consumer on its own): the turn then ends as usual, and its
            # inference runs the call. No second speculation this turn: it would want the same call.
            if self._speculation is not None:
                self._speculation = None
                self.withdrawn += 1
                self._this_turn = self.max_per_turn
        elif isinstance(frame, TranscriptionFrame):
            self._text = f"{self._text} {frame.text}".strip()
            if self._speculation is not None and not self._match.matches(self._speculation.text, self._text):
                await self._withdraw("the transcript changed")
            if not self._speaking:
                self._heard = True
                if self._stopped_at is None:
                    # a transcript with no VAD stop (the VAD missed quiet speech): time the pause from now
                    self._stopped_at = time.monotonic() - self._vad_stop_secs
                await self._decide()
        return ProcessFrameResult.CONTINUE

    async def _smart_turn(self) -> bool | None:
        if self._analyzer is None:
            return None
        state, prediction = await self._analyzer.analyze_end_of_turn()
        if prediction is not None:
            await self.push_frame(MetricsFrame(data=[prediction]))
        return state == EndOfTurnState.COMPLETE

    # --- the decision ----------------------------------------------------------------------------

    def silence_needed(self) -> float:
        return self.rule.silence(words_verdict(self._text), self._smart)

    async def _decide(self):
        """At a pause: (re)arm the timers for the speculation and the turn end, counted from the pause."""
        if self._speaking or self._stopped_at is None:
            return
        await self._cancel_timer()
        # Seconds from the VAD stop; without the transcript yet, no earlier than the STT wait allows.
        end = self.silence_needed() - self._vad_stop_secs
        if not self._heard:
            end = max(end, min(self._stt_wait_secs, self.rule.longest))
        waited = time.monotonic() - self._stopped_at
        # The speculation starts `lead_secs` (the LLM's usual time to a first token) before the turn would
        # end: its reply is ready as the turn ends, and a pause the caller breaks sooner costs nothing.
        speculate = None
        if (
            self._heard
            and self._text
            and self.preempt
            and self._speculation is None
            and self._this_turn < self.max_per_turn
        ):
            speculate = max(0.0, end - self.lead_secs - waited)
        self._timer = self.task_manager.create_task(
            self._run_pause(speculate, max(0.0, end - waited)), f"{self}::turn_end"
        )

    async def _run_pause(self, speculate: float | None, end: float):
        try:
            if speculate is not None:
                await asyncio.sleep(speculate)
                end -= speculate
                self._speculation = UserTurnSpeculation(text=self._text)
                self.speculations += 1
                self._this_turn += 1
                logger.debug(f"{self}: speculating at the pause on [{self._text}]")
                await self.trigger_user_turn_inference_triggered(speculation=self._speculation)
            await asyncio.sleep(max(0.0, end))
        except asyncio.CancelledError:
            return
        self._timer = None
        if self._speaking or not self._text:
            return  # nothing said yet: a transcript arriving later decides again
        await self._end_turn()

    async def _end_turn(self):
        speculation, self._speculation = self._speculation, None
        verdict = words_verdict(self._text)
        logger.debug(
            f"{self}: turn ends after {self.rule.silence(verdict, self._smart)} s of silence (words {verdict}, "
            f"smart-turn {self._smart}, {'preempted' if speculation is not None else 'not preempted'})"
        )
        if speculation is not None and self._match.matches(speculation.text, self._text):
            await self.trigger_user_turn_finalized(confirms_speculation=True)
            return
        if speculation is not None:
            self.withdrawn += 1
            await self.trigger_user_turn_speculation_cancelled()
        await self.trigger_user_turn_stopped()

    async def _withdraw(self, reason: str):
        if self._speculation is None:
            return
        self._speculation = None
        self.withdrawn += 1
        logger.debug(f"{self}: withdrawing the speculative reply ({reason})")
        await self.trigger_user_turn_speculation_cancelled()

    async def _cancel_timer(self):
        if self._timer is not None:
            task, self._timer = self._timer, None
            await self.task_manager.cancel_task(task)
