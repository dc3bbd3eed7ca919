"""What a reply may say out loud: plain speech, at most a few whole sentences.

A voice reply is heard, not read, and the caller hears every word the LLM writes until it stops.
Small local models (and sometimes Claude) write markdown: `**bold**`, bullet lists, `---` rules,
code fences; Piper reads a rule as "dash dash dash" or skips it, and a code model once talked for
28 s. Pipecat gives us the pieces: `LLMTextProcessor` aggregates the LLM's text and runs
`text_transforms` on every aggregation before the TTS (what a transform returns is both spoken
and kept in the context: the TTS's own transforms change only the audio), and `strip_markdown`
removes markdown symbols. What it has no piece for, and this module adds:

- `speakable`: a transform that drops what is still unspeakable after `strip_markdown`: emoji and
  other symbols, box drawing, stray markdown marks, markup tags (`<end_call/>`, `<tool_call>`: a
  small model writing a tool call as text), and an aggregation with no letter or digit at all (a
  rule, a lone bullet) becomes nothing, which `LLMTextProcessor` drops.
- `SpokenReplyAggregator`: the first-clause aggregator that also skips fenced code as it streams
  (a fence spans many sentences, so no per-sentence transform can see both ends), stops after
  `max_sentences` whole sentences (the rest of the reply is neither spoken nor kept), and never
  speaks half a sentence: text left without a sentence end when the reply stops (the token bound
  cut it) is dropped once a whole sentence has been spoken; a reply that is one unfinished
  phrase ("Sure thing") is still spoken.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import AsyncIterator

from loguru import logger
from pipecat.utils.text.base_text_aggregator import Aggregation
from pipecat.utils.text.transforms.strip_markdown import strip_markdown

from processors.first_clause import FirstClauseAggregator, FirstClauseTextProcessor

FENCE = "```"
# A sentence is finished by . ! ? or an ellipsis, possibly inside closing quotes or brackets.
_FINISHED = re.compile(r"[.!?…][\"'”’)\]]*\s*$")
# Markdown marks strip_markdown leaves when a pair is split across aggregations.
_STRAY_MARKS = re.compile(r"\*+|(?<!\w)_{1,3}|_{1,3}(?!\w)|`+|^\s*#{1,6}\s*|^\s*>\s*", re.MULTILINE)
# Categories with no spoken form: other symbols (emoji, box drawing), modifier symbols, private or unassigned
# code points; math symbols beyond ASCII's (arrows, sums) too, while "+" "=" "<" ">" are read out.
_UNSPOKEN_CATEGORIES = {"So", "Sk", "Cs", "Co", "Cn"}
# Markup tags (HTML or XML-like): never meant to be heard. "a < b > c" (spaces after "<") is left alone.
_TAG = re.compile(r"</?[A-Za-z_][\w:.-]*(?:\s[^<>]*)?/?>")


def finished(text: str) -> bool:
    """The text ends a sentence."""
    return bool(_FINISHED.search(text))


def speakable_text(text: str) -> str:
    """`text` without what has no spoken form; empty when nothing in it could be said."""
    text = _TAG.sub("", text)
    text = _STRAY_MARKS.sub("", text)
    text = "".join(
        c
        for c in text
        if (category := unicodedata.category(c)) not in _UNSPOKEN_CATEGORIES
        and not (category == "Sm" and not c.isascii())
        and c not in "\u200d\ufe0f"
    )
    text = re.sub(r"[ \t]{2,}", " ", text)
    if not any(c.isalnum() for c in text):
        return ""
    return text


async def speakable(text: str, _text_type) -> str:
    """An `LLMTextProcessor` text transform (see `speakable_text`)."""
    return speakable_text(text)


class SpokenReplyAggregator(FirstClauseAggregator):
    """`FirstClauseAggregator` that skips code fences, stops after `max_sentences` (0: no bound) whole
    sentences and drops an unfinished tail after a whole sentence."""

    def __init__(self, min_words: int = 4, max_sentences: int = 3, **kwargs):
        super().__init__(min_words, **kwargs)
        self._max_sentences = max_sentences
        self._restart()

    def _restart(self) -> None:
        self._sentences = 0  # whole sentences yielded in this reply
        self._closed = False  # the bound was reached: the rest of the reply is dropped
        self._in_fence = False
        self._fence_tail = ""  # the last characters seen inside a fence, to find its end
        self.dropped_chars = 0  # characters of this reply not spoken (beyond the bound, unfinished, code)

    async def aggregate(self, text: str) -> AsyncIterator[Aggregation]:
        for char in text:
            if self._closed:
                self.dropped_chars += 1
                continue
            if self._in_fence:
                self.dropped_chars += 1
                self._fence_tail = (self._fence_tail + char)[-3:]
                if self._fence_tail == FENCE:
                    self._in_fence, self._fence_tail = False, ""
                continue
            async for aggregation in super().aggregate(char):
                yield aggregation
                if finished(aggregation.text):
                    self._sentences += 1
                    if self._max_sentences and self._sentences >= self._max_sentences:
                        self._close()
                        return
            if self.buffer.endswith(FENCE):
                self.buffer = self.buffer[: -len(FENCE)]
                self._in_fence = True
                self.dropped_chars += len(FENCE)

    def _close(self) -> None:
        self._closed = True
        self.dropped_chars += len(self.buffer)
        self.buffer = ""

    async def flush(self) -> Aggregation | None:
        closed, sentences, dropped = self._closed, self._sentences, self.dropped_chars
        rest = None if closed else await super().flush()
        if rest is not None and sentences and not finished(speakable_text(await strip_markdown(rest.text, rest.type))):
            dropped += len(rest.text)
            rest = None
        if dropped:
            logger.debug(f"spoken reply: {dropped} characters not spoken (bound, unfinished sentence or code)")
        self._restart()
        return rest

    async def handle_interruption(self):
        self._restart()
        await super().handle_interruption()

    async def reset(self):
        self._restart()
        await super().reset()


class SpokenReplyProcessor(FirstClauseTextProcessor):
    """Pipecat's `LLMTextProcessor` with a `SpokenReplyAggregator`, `strip_markdown` and `speakable` on every
    aggregation."""

    def __init__(self, min_words: int = 4, max_sentences: int = 3, **kwargs):
        super().__init__(
            text_aggregator=SpokenReplyAggregator(min_words, max_sentences),
            text_transforms=[("*", strip_markdown), ("*", speakable)],
            **kwargs,
        )
