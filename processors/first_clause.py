"""Answer sooner: the first clause of each reply goes to TTS before its sentence ends.

Pipecat's TTS services cut the LLM's text into whole sentences (`SimpleTextAggregator`) before
synthesis, so nothing is spoken until the first sentence is complete; a long first sentence ("The
best time to visit the harbour, if you ask me, is early.") keeps the user waiting for every one of
its tokens. Pipecat's only other choice is TOKEN mode, which streams every token to the voice:
Piper and PlayHT synthesize per request, so they would speak word by word, and ElevenLabs loses
its auto mode. Pipecat has no clause-level first chunk, so we add one through its own extension
point: a text aggregator (a `SimpleTextAggregator` subclass) in an `LLMTextProcessor` between the
LLM and the TTS. 1.14's TTSService takes no aggregator of its own (it hard-wires
SimpleTextAggregator), while a TTS service speaks `AggregatedTextFrame`s as they come, so every
voice we build (Piper, ElevenLabs, PlayHT, the Piper fallback) gets the clause unchanged.

`FirstClauseAggregator`, while a reply's first chunk has not gone out, yields the text up to a
clause mark (`,` `;` `:` or an em dash) once it holds `min_words` words (0: never), as soon as the next
character shows the mark is a real pause: whitespace (after an em dash, any non-digit), so "1,000"
and "10:30" are never split. Everything else is Pipecat's sentence aggregation unchanged, so a
reply opening with a short sentence ("Sure.") is cut as before. The clause is typed SENTENCE: the
TTS, the sentence marker and the client (`sentenceIndex`, `bot_transcript`) treat it as one
spoken unit, numbered like a sentence. Each reply starts afresh: at the reply's start
(LLMFullResponseStartFrame, see `FirstClauseTextProcessor`), at its end (`flush`) and on an
interruption (`handle_interruption`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from pipecat.frames.frames import Frame, LLMFullResponseStartFrame
from pipecat.processors.aggregators.llm_text_processor import LLMTextProcessor
from pipecat.processors.frame_processor import FrameDirection
from pipecat.utils.text.base_text_aggregator import Aggregation, TextType

from compat.pipecat import SimpleTextAggregatorInternals

CLAUSE_MARKS = frozenset(",;:—")


def _words(text: str) -> int:
    return sum(any(c.isalnum() for c in word) for word in text.split())


class FirstClauseAggregator(SimpleTextAggregatorInternals):
    """Sentence aggregation whose first chunk per reply may end at a clause mark."""

    def __init__(self, min_words: int = 4, **kwargs):
        super().__init__(**kwargs)
        self._min_words = min_words
        self._first = True  # the reply's first chunk has not been yielded yet

    async def aggregate(self, text: str) -> AsyncIterator[Aggregation]:
        for char in text:
            self.buffer += char
            if self._first and self._min_words and (clause := self._take_clause(char)):
                yield clause
            if sentence := await self.sentence_after(char):
                self._first = False
                yield sentence

    def _take_clause(self, char: str) -> Aggregation | None:
        """The buffer before `char` when it ends at a clause mark that `char` confirms."""
        mark = self.buffer[-2:-1]
        if mark not in CLAUSE_MARKS or not (char.isspace() or (mark == "—" and not char.isdigit())):
            return None
        clause = self.buffer[:-1].strip(" ")
        if _words(clause) < self._min_words:
            return None
        self.buffer = char
        self._first = False
        return Aggregation(text=clause, type=TextType.SENTENCE)

    async def flush(self) -> Aggregation | None:
        self._first = True
        return await super().flush()

    async def handle_interruption(self):
        self._first = True
        await super().handle_interruption()

    async def reset(self):
        self._first = True
        await super().reset()


class FirstClauseTextProcessor(LLMTextProcessor):
    """Pipecat's LLMTextProcessor with a `FirstClauseAggregator`, restarted at each reply's start.

    LLMTextProcessor already flushes the aggregator at the reply's end and resets it on an
    interruption; it passes LLMFullResponseStartFrame on without telling the aggregator.
    """

    def __init__(self, min_words: int = 4, text_aggregator: FirstClauseAggregator | None = None, **kwargs):
        super().__init__(text_aggregator=text_aggregator or FirstClauseAggregator(min_words), **kwargs)

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        if isinstance(frame, LLMFullResponseStartFrame):
            await self.reset()
        await super().process_frame(frame, direction)
