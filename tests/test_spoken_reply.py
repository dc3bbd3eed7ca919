"""Only plain speech, in whole sentences and at most a few of them, reaches the voice and the transcript
(processors/spoken_reply.py). Text is fed the way an LLM streams it (tests/test_first_clause.py's deltas)."""

from __future__ import annotations

from pipecat.frames.frames import AggregatedTextFrame, LLMFullResponseEndFrame, LLMFullResponseStartFrame, LLMTextFrame
from pipecat.tests.utils import run_test

from processors.spoken_reply import SpokenReplyAggregator, SpokenReplyProcessor, speakable_text
from tests.test_first_clause import chunks, deltas


def llm_reply(text: str) -> list:
    return [LLMFullResponseStartFrame(), *[LLMTextFrame(t) for t in deltas(text)], LLMFullResponseEndFrame()]


async def spoken(text: str, *, min_words: int = 4, max_sentences: int = 3) -> list[str]:
    """What the TTS is handed (and the context keeps) for one streamed reply."""
    down, _ = await run_test(
        SpokenReplyProcessor(min_words=min_words, max_sentences=max_sentences), frames_to_send=llm_reply(text)
    )
    return [f.text.strip() for f in down if isinstance(f, AggregatedTextFrame)]


async def test_the_librivox_reply_loses_its_markdown_and_its_rule():
    """The reply a code model gave to a LibriVox sentence in the browser, rule and all."""
    reply = (
        "Sure, here's a conversation between Mr. John Dashwood and someone else:\n\n---\n\n"
        "**Mr. John Dashwood:** I *really* think we should go.\n\n---\n"
    )
    said = await spoken(reply)
    assert said[0] == "Sure, here's a conversation between Mr. John Dashwood and someone else:"
    assert said[-1].endswith("I really think we should go.")
    assert not any(set(s) <= set("-*_ \n") for s in said)
    assert "".join(said).count("*") == 0 and "---" not in " ".join(said)


async def test_lists_headers_emoji_and_code_are_not_read_out():
    reply = (
        "## Options\n\nHere are two ideas 😊:\n- Walk by the harbour.\n- Visit the **fish market**.\n"
        "```python\nprint('hello')\n```\nEnjoy!"
    )
    said = " ".join(await spoken(reply, max_sentences=0))
    assert "Options" in said and "Walk by the harbour." in said and "Visit the fish market." in said
    assert "Enjoy!" in said
    for unspeakable in ("#", "😊", "- ", "**", "`", "print", "hello"):
        assert unspeakable not in said, (unspeakable, said)


async def test_at_most_max_sentences_are_spoken():
    reply = "One is here. Two is there. Three is everywhere. Four is too many. Five, even more."
    assert await spoken(reply) == ["One is here.", "Two is there.", "Three is everywhere."]
    assert len(await spoken(reply, max_sentences=0)) == 5


async def test_a_sentence_cut_by_the_token_bound_is_not_spoken_in_half():
    assert await spoken("The harbour is lovely at dawn. The boats come in at six and the") == [
        "The harbour is lovely at dawn."
    ]
    # a reply that is one unfinished phrase is still better than silence
    assert await spoken("Sure thing") == ["Sure thing"]


async def test_each_reply_starts_afresh():
    aggregator = SpokenReplyAggregator(min_words=4, max_sentences=2)
    assert await chunks(aggregator, "Boats came. Fish came. Gulls came.") == ["Boats came.", "Fish came."]
    assert await chunks(aggregator, "```\nx = 1\n```Nets dry. Ropes") == ["Nets dry."]
    assert await chunks(aggregator, "Tide turns. Sun sets.") == ["Tide turns.", "Sun sets."]


def test_speakable_text():
    assert speakable_text("---") == "" and speakable_text("* * *") == "" and speakable_text("•") == ""
    assert speakable_text("It costs $5, about 20% off → great 🎉") == "It costs $5, about 20% off great "
    assert speakable_text("**Bold start") == "Bold start"
    assert speakable_text("snake_case stays") == "snake_case stays"
    # A small model's tool call written as markup is never heard; a comparison read out is kept.
    assert speakable_text("<end_call/>") == "" and speakable_text("Sure <b>thing</b>!") == "Sure thing!"
    assert speakable_text("if a < b and b > c") == "if a < b and b > c"
