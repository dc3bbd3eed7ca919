"""The first clause of each reply goes to TTS on its own (processors/first_clause.py).

The aggregator is fed text the way an LLM streams it (a word split into pieces, punctuation as its
own token); the pipeline test speaks it with the real Piper voice and numbers it like the client.
"""

from __future__ import annotations

import json
import re

import pytest
from pipecat.frames.frames import (
    AggregatedTextFrame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
    TTSTextFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.tests.utils import SleepFrame, run_test

from config.settings import Settings
from processors.first_clause import FirstClauseAggregator, FirstClauseTextProcessor
from processors.sentence_marker import SentenceMarker
from tests.helpers import TransportEnds
from transports.websocket.serializer import AtlasProtocolSerializer

HARBOUR = "The best time to visit the harbour, if you ask me, is early. Boats come in at six."
HARBOUR_CHUNKS = ["The best time to visit the harbour,", "if you ask me, is early.", "Boats come in at six."]


def deltas(text: str) -> list[str]:
    """LLM-like token deltas: words in pieces of up to 4 letters, numbers in 3 digits, punctuation alone."""
    return re.findall(r"\s*(?:[A-Za-z']{1,4}|\d{1,3}|\S)", text)


async def chunks(aggregator: FirstClauseAggregator, text: str, *, flush: bool = True) -> list[str]:
    out = []
    for token in deltas(text):
        out += [a.text async for a in aggregator.aggregate(token)]
    if flush and (rest := await aggregator.flush()):
        out.append(rest.text)
    return out


def test_deltas_look_like_llm_tokens():
    assert deltas("the harbour, 1,000")[:5] == ["the", " harb", "our", ",", " 1"]
    assert "".join(deltas(HARBOUR)) == HARBOUR


@pytest.mark.parametrize(
    "text,expected",
    [
        (HARBOUR, HARBOUR_CHUNKS),
        # a short first sentence is spoken as before; no clause later in the reply
        (
            "Sure. The best time to visit the harbour, if you ask me, is early.",
            ["Sure.", "The best time to visit the harbour, if you ask me, is early."],
        ),
        # no clause mark: sentences only
        (
            "The harbour is at its best early in the morning. Boats come in at six.",
            ["The harbour is at its best early in the morning.", "Boats come in at six."],
        ),
        # a comma inside a number is no pause
        (
            "About 1,000 boats come in every day, mostly before noon.",
            ["About 1,000 boats come in every day,", "mostly before noon."],
        ),
        (
            "We counted 12,500 boats in total last year. That is a lot.",
            ["We counted 12,500 boats in total last year.", "That is a lot."],
        ),
        # too few words at the first comma: wait for the next mark
        (
            "Well, the harbour is busiest at dawn; boats come in at six, then leave.",
            ["Well, the harbour is busiest at dawn;", "boats come in at six, then leave."],
        ),
        # a colon (not in a time) and an em dash also end a clause
        (
            "Boats arrive at 10:30 every day: the fish market opens then.",
            ["Boats arrive at 10:30 every day:", "the fish market opens then."],
        ),
        (
            "The harbour at dawn is something else—quiet, calm and empty. Go then.",
            ["The harbour at dawn is something else—", "quiet, calm and empty.", "Go then."],
        ),
        # a reply with no sentence end at all
        ("Early morning, before the boats come in", ["Early morning, before the boats come in"]),
    ],
)
async def test_first_chunk_is_a_clause(text, expected):
    assert await chunks(FirstClauseAggregator(min_words=4), text) == expected


async def test_min_words_is_the_reply_so_far():
    text = "Yes, the harbour, if you ask me, is best early."
    assert await chunks(FirstClauseAggregator(min_words=2), text) == [
        "Yes, the harbour,",
        "if you ask me, is best early.",
    ]
    assert await chunks(FirstClauseAggregator(min_words=10), text) == [text]


async def test_every_reply_starts_afresh_after_its_end_or_an_interruption():
    aggregator = FirstClauseAggregator(min_words=4)
    assert await chunks(aggregator, HARBOUR) == HARBOUR_CHUNKS  # the end (flush) resets
    assert await chunks(aggregator, HARBOUR) == HARBOUR_CHUNKS

    # Interrupted after the clause, mid-way through the next sentence: the rest is dropped and the
    # next reply gets a clause again.
    assert await chunks(aggregator, "The best time to visit the harbour, if you", flush=False) == [HARBOUR_CHUNKS[0]]
    await aggregator.handle_interruption()
    assert await chunks(aggregator, HARBOUR) == HARBOUR_CHUNKS

    # Interrupted after a whole first sentence (no clause was sent).
    assert await chunks(aggregator, "Sure thing. The best time to", flush=False) == ["Sure thing."]
    await aggregator.handle_interruption()
    assert await chunks(aggregator, HARBOUR) == HARBOUR_CHUNKS


def llm_reply(text: str) -> list:
    return [LLMFullResponseStartFrame(), *[LLMTextFrame(t) for t in deltas(text)], LLMFullResponseEndFrame()]


async def test_processor_resets_at_each_reply_start_and_on_interruption():
    processor = FirstClauseTextProcessor(min_words=4)
    interrupted = "The best time to visit the harbour, if you ask"
    frames = [
        *llm_reply(HARBOUR),
        # a reply cut off by the user: no end frame, an interruption instead
        LLMFullResponseStartFrame(),
        *[LLMTextFrame(t) for t in deltas(interrupted)],
        SleepFrame(0.2),
        InterruptionFrame(),
        SleepFrame(0.2),
        *llm_reply(HARBOUR),
    ]
    down, _ = await run_test(processor, frames_to_send=frames)
    texts = [f.text for f in down if isinstance(f, AggregatedTextFrame)]
    assert texts == [*HARBOUR_CHUNKS, HARBOUR_CHUNKS[0], *HARBOUR_CHUNKS]
    assert not any(isinstance(f, LLMTextFrame) for f in down)  # the TTS gets aggregations only

    # A reply start also starts afresh when the last reply neither ended nor was interrupted
    # (what that reply left unsent, "The best", is dropped rather than spoken in the new one).
    unfinished = [LLMFullResponseStartFrame(), *[LLMTextFrame(t) for t in deltas("Sure. The best")]]
    down, _ = await run_test(FirstClauseTextProcessor(min_words=4), frames_to_send=[*unfinished, *llm_reply(HARBOUR)])
    assert [f.text for f in down if isinstance(f, AggregatedTextFrame)] == ["Sure.", *HARBOUR_CHUNKS]


def test_setting(monkeypatch):
    assert Settings().first_clause_words == 4
    monkeypatch.setenv("ATLAS_FIRST_CLAUSE_WORDS", "0")
    assert Settings().first_clause_words == 0


@pytest.mark.parametrize("words", [4, 0])
def test_pipeline_has_the_spoken_reply_step_with_or_without_the_first_clause(engines, tmp_path, words):
    from bots.pipeline import build_pipeline
    from bots.runtime import Runtime

    settings = Settings(cache_dir=tmp_path, first_clause_words=words, llm_url="http://127.0.0.1:9/v1")
    runtime = Runtime(settings=settings)
    runtime.engines, runtime.llm_base_url = engines, settings.llm_url
    built = build_pipeline(runtime, TransportEnds())
    steps = [type(p).__name__ for p in built.pipeline.processors]
    after_llm = steps[steps.index(type(built.llm).__name__) + 1 :][:2]
    assert after_llm == ["SpokenReplyProcessor", "SharedPiperTTSService"]


async def test_no_clause_when_turned_off():
    assert await chunks(FirstClauseAggregator(min_words=0), HARBOUR) == [
        "The best time to visit the harbour, if you ask me, is early.",
        "Boats come in at six.",
    ]


async def test_piper_speaks_the_first_clause_on_its_own(engines):
    """The real Piper service gets the clause as its first request, speaks it, and the client sees
    it as sentence 0 (its audio and its transcript), the rest of its sentence as sentence 1."""
    from services.local.engines import SharedPiperTTSService

    tts = SharedPiperTTSService(engines.piper_voice)
    requests = []

    @tts.event_handler("on_tts_request")
    async def _on_request(_tts, _context_id, text):
        requests.append(text)

    down, _ = await run_test(
        Pipeline([FirstClauseTextProcessor(min_words=4), tts, SentenceMarker()]),
        frames_to_send=llm_reply(HARBOUR),
        start_timeout=5.0,
    )
    assert [r.strip() for r in requests] == HARBOUR_CHUNKS

    spoken = [f for f in down if isinstance(f, TTSTextFrame)]
    assert [f.text for f in spoken] == HARBOUR_CHUNKS
    first_text = down.index(spoken[0])
    clause_audio = sum(len(f.audio) for f in down[:first_text] if isinstance(f, TTSAudioRawFrame))
    rate = next(f.sample_rate for f in down if isinstance(f, TTSAudioRawFrame))
    assert clause_audio / (2 * rate) > 1.0  # seven words of speech come before the clause's text

    serializer = AtlasProtocolSerializer(max_audio_bytes=65536, max_text_bytes=8192)
    events = [json.loads(p) for f in down if (p := await serializer.serialize(f))]
    transcripts = [(e["text"], e["sentenceIndex"]) for e in events if e["type"] == "bot_transcript"]
    assert transcripts == [(text, i) for i, text in enumerate(HARBOUR_CHUNKS)]
    audio_indexes = [e["sentenceIndex"] for e in events if e["type"] == "audio_chunk"]
    assert audio_indexes[0] == 0 and sorted(audio_indexes) == audio_indexes and set(audio_indexes) == {0, 1, 2}
