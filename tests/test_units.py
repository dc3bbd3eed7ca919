"""Fast checks of the pure parts: message validation, sentence numbering, the context window."""

from __future__ import annotations

import json

import pytest
from pipecat.frames.frames import (
    InterruptionFrame,
    LLMContextFrame,
    OutputAudioRawFrame,
    TTSTextFrame,
)
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.tests.utils import run_test
from pipecat.utils.text.base_text_aggregator import TextType

from processors.context_window import ContextWindow, trim_messages
from processors.sentence_marker import SentenceStartFrame
from processors.turn_metrics import percentile
from transports.protocol import (
    AtlasProtocolSerializer,
    ErrorCode,
    ProtocolError,
    check_audio,
    parse_session_start,
    parse_text_message,
)


@pytest.mark.parametrize(
    "text,code",
    [
        ("{", ErrorCode.INVALID_JSON),
        ("[" * 100000, ErrorCode.FRAME_TOO_LARGE),
        ("[" * 5000, ErrorCode.INVALID_JSON),  # nesting past the parser's recursion limit
        ('"str"', ErrorCode.INVALID_MESSAGE),
        ("null", ErrorCode.INVALID_MESSAGE),
        ('{"type": null}', ErrorCode.INVALID_MESSAGE),
        ('{"type": "x' + "y" * 100 + '"}', ErrorCode.UNKNOWN_TYPE),
    ],
)
def test_text_messages_are_rejected_with_stable_codes(text, code):
    with pytest.raises(ProtocolError) as e:
        parse_text_message(text, 8192)
    assert e.value.code == code
    assert len(e.value.message) < 200  # never echoes a huge payload back


def test_session_start_fields():
    ok = parse_session_start({"type": "session_start", "userId": "u", "conversationId": "c"})
    assert ok.user_id == "u" and ok.auth_token is None
    for bad in ({"userId": "u"}, {"userId": "u", "conversationId": 1}, {"userId": "x" * 300, "conversationId": "c"}):
        with pytest.raises(ProtocolError) as e:
            parse_session_start({"type": "session_start", **bad})
        assert e.value.code == ErrorCode.INVALID_FIELD


def test_audio_checks():
    check_audio(b"\x00" * 640, 65536)
    with pytest.raises(ProtocolError) as e:
        check_audio(b"\x00" * 641, 65536)
    assert e.value.code == ErrorCode.ODD_LENGTH_PCM
    with pytest.raises(ProtocolError) as e:
        check_audio(b"\x00" * 65538, 65536)
    assert e.value.code == ErrorCode.FRAME_TOO_LARGE


async def test_serializer_numbers_sentences_and_flushes_only_while_audio_plays():
    s = AtlasProtocolSerializer(max_audio_bytes=65536, max_text_bytes=8192)
    audio = OutputAudioRawFrame(audio=b"\x00" * 1764, sample_rate=22050, num_channels=1)
    out = []
    for frame in [SentenceStartFrame(), audio, audio, TTSTextFrame("One.", text_type=TextType.SENTENCE),
                  SentenceStartFrame(), audio, TTSTextFrame("Two.", text_type=TextType.SENTENCE)]:
        payload = await s.serialize(frame)
        if payload:
            out.append(json.loads(payload))
    assert [(m["type"], m["sentenceIndex"]) for m in out] == [
        ("audio_chunk", 0), ("audio_chunk", 0), ("bot_transcript", 0), ("audio_chunk", 1), ("bot_transcript", 1)]
    assert json.loads(await s.serialize(InterruptionFrame())) == {"type": "audio_flush", "reason": "interruption"}
    assert await s.serialize(InterruptionFrame()) is None  # nothing left playing


async def test_serializer_mute_sends_silence_and_bad_input_becomes_an_error_frame():
    s = AtlasProtocolSerializer(max_audio_bytes=65536, max_text_bytes=8192)
    await s.deserialize('{"type": "mute"}')
    frame = await s.deserialize(b"\x01\x02" * 640)  # 40 ms: a whole frame at once
    assert frame.audio == bytes(1280)
    await s.deserialize('{"type": "unmute"}')
    assert (await s.deserialize(b"\x01\x02" * 640)).audio == b"\x01\x02" * 640
    err = await s.deserialize(b"\x01")
    assert err.message["type"] == "error" and err.message["code"] == "ODD_LENGTH_PCM"
    assert isinstance(await s.deserialize('{"type": "interrupt"}'), InterruptionFrame)


async def test_serializer_joins_20_ms_messages_into_40_ms_frames_and_loses_no_audio():
    s = AtlasProtocolSerializer(max_audio_bytes=65536, max_text_bytes=8192)  # ATLAS_AUDIO_IN_BATCH_MS 40
    sent = [bytes([i]) * 640 for i in range(1, 8)]  # seven 20 ms messages
    frames = [await s.deserialize(m) for m in sent]
    assert [f is None for f in frames] == [True, False] * 3 + [True]
    assert b"".join(f.audio for f in frames if f) == b"".join(sent[:6])  # in order, nothing dropped
    assert all(f.sample_rate == 16000 and len(f.audio) == 1280 for f in frames if f)
    big = await s.deserialize(b"\x09" * 4000)  # the held 20 ms goes out with the next message
    assert big.audio == sent[6] + b"\x09" * 4000
    assert (await s.deserialize(b"\x0a" * 3200)).audio == b"\x0a" * 3200  # long messages pass at once
    s20 = AtlasProtocolSerializer(max_audio_bytes=65536, max_text_bytes=8192, audio_batch_ms=20)
    assert (await s20.deserialize(sent[0])).audio == sent[0]  # 20: one frame per message


def test_trim_keeps_at_most_n_opening_with_the_user_and_never_orphans_a_tool_result():
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": str(i)} for i in range(23)]
    # The 10 newest open with a reply (13): the window starts at the question after it.
    assert [m["content"] for m in trim_messages(msgs, 10)] == [str(i) for i in range(14, 23)]
    assert [m["content"] for m in trim_messages(msgs[:22], 10)] == [str(i) for i in range(12, 22)]
    with_tool = msgs[:12] + [{"role": "assistant", "tool_calls": []}, {"role": "tool", "content": "r"}] + msgs[12:21]
    kept = trim_messages(with_tool, 10)
    assert kept[0] == {"role": "user", "content": "12"} and all(m["role"] != "tool" for m in kept)


async def test_context_window_trims_the_shared_context_in_place():
    context = LLMContext(messages=[{"role": "user", "content": str(i)} for i in range(15)])
    window = ContextWindow(max_messages=10)
    await run_test(window, frames_to_send=[LLMContextFrame(context=context)], expected_down_frames=[LLMContextFrame])
    assert [m["content"] for m in context.get_messages()] == [str(i) for i in range(5, 15)]


def test_percentile():
    assert percentile([], 0.5) is None
    assert percentile([100.0], 0.95) == 100.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
