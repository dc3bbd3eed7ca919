"""Fast checks of the pure parts: message validation, sentence numbering, the context window."""

from __future__ import annotations

import asyncio
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
from transports.websocket.protocol import check_audio, parse_session_start, parse_text_message
from transports.websocket.serializer import AtlasProtocolSerializer
from vocabulary.errors import ErrorCode, ProtocolError
from vocabulary.frames import SentenceStartFrame
from vocabulary.records import percentile


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


def test_session_start_speed_is_bounded():
    base = {"type": "session_start", "userId": "u", "conversationId": "c"}
    assert parse_session_start(base).speed == 1.0
    assert parse_session_start({**base, "speed": 1.2}).speed == 1.2
    assert parse_session_start({**base, "speed": 0.7}).speed == 0.7
    for bad in (0.69, 1.21, 5, "fast", True, float("nan"), [1]):
        with pytest.raises(ProtocolError) as e:
            parse_session_start({**base, "speed": bad})
        assert e.value.code == ErrorCode.INVALID_FIELD


def test_piper_speaks_a_sessions_speed_without_changing_the_shared_voice():
    """Piper's length scale per session: slower is longer; the process-wide voice stays as it was."""
    from piper import PiperVoice

    from services.factory import VoiceAtSpeed
    from services.local import models

    voice = PiperVoice.load(str(models.verified_piper_dir(None) / f"{models.PIPER_VOICE}.onnx"))
    own_scale = voice.config.length_scale
    text = "The quick brown fox jumps over the lazy dog near the river bank."

    def seconds(v) -> float:
        # Piper draws its phoneme durations with noise (a few % from one synthesis to the next): a mean of three
        runs = [sum(len(c.audio_int16_bytes) for c in v.synthesize(text)) for _ in range(3)]
        return sum(runs) / len(runs) / 2 / voice.config.sample_rate

    normal, slow, fast = seconds(voice), seconds(VoiceAtSpeed(voice, 0.8)), seconds(VoiceAtSpeed(voice, 1.2))
    # Length scale stretches the phonemes (1.5x from 1.2 to 0.8), not the voice's fixed silences: ~1.25x here.
    assert slow / fast > 1.15 and fast < normal * 0.97 and slow > normal * 1.03, (slow, normal, fast)
    assert voice.config.length_scale == own_scale  # the shared voice itself is unchanged


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
    for frame in [
        SentenceStartFrame(),
        audio,
        audio,
        TTSTextFrame("One.", text_type=TextType.SENTENCE),
        SentenceStartFrame(),
        audio,
        TTSTextFrame("Two.", text_type=TextType.SENTENCE),
    ]:
        payload = await s.serialize(frame)
        if payload:
            out.append(json.loads(payload))
    assert [(m["type"], m["sentenceIndex"]) for m in out] == [
        ("audio_chunk", 0),
        ("audio_chunk", 0),
        ("bot_transcript", 0),
        ("audio_chunk", 1),
        ("bot_transcript", 1),
    ]
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


def test_trim_keeps_n_messages_of_history_and_the_question_opening_with_the_user():
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": str(i)} for i in range(23)]
    # Question 22 after 22 messages of history: the last 10 of them (12-21) open on a user message, so the
    # request carries five whole exchanges and the question, as the spec slices it: 11 messages.
    assert [m["content"] for m in trim_messages(msgs, 10)] == [str(i) for i in range(12, 23)]
    # After an interruption (two user messages in a row) the 10 newest of the history open on a reply (13): the
    # window starts at the user message after it.
    interrupted = msgs[:22] + [{"role": "user", "content": "22b"}, {"role": "user", "content": "q"}]
    kept = trim_messages(interrupted, 10)
    assert kept[0] == {"role": "user", "content": "14"} and kept[-1]["content"] == "q" and len(kept) == 10
    # A tool call inside the history: the cut never separates a tool result from its call.
    with_tool = msgs[:13] + [{"role": "assistant", "tool_calls": []}, {"role": "tool", "content": "r"}] + msgs[13:23]
    kept = trim_messages(with_tool, 10)
    assert kept[0]["role"] == "user" and kept[0]["content"] == "14" and all(m["role"] != "tool" for m in kept)
    # The turn being answered is never cut, however many tool calls it holds.
    answering = msgs + [{"role": "assistant", "tool_calls": []}, {"role": "tool", "content": "r"}] * 6
    kept = trim_messages(answering, 10)
    assert kept[-12:] == answering[-12:] and kept[0]["content"] == "12"
    assert trim_messages(msgs[:11], 10) == msgs[:11]  # 10 of history and the question: nothing to trim


async def test_context_window_trims_the_shared_context_in_place():
    context = LLMContext(messages=[{"role": "user", "content": str(i)} for i in range(15)])
    window = ContextWindow(max_messages=10)
    await run_test(window, frames_to_send=[LLMContextFrame(context=context)], expected_down_frames=[LLMContextFrame])
    assert [m["content"] for m in context.get_messages()] == [str(i) for i in range(4, 15)]


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([100.0], 95) == 100.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5


async def test_a_session_that_falls_behind_its_callers_audio_is_reported_once():
    """UserAggregator: a caller frame that reaches it more than ATLAS_MAX_AUDIO_LAG_SECS after it arrived
    calls on_backlog once (the session then ends with AUDIO_BACKLOG); fresh frames do not."""
    import time

    from pipecat.frames.frames import InputAudioRawFrame
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
    from pipecat.tests.utils import run_test

    from bots.pipeline import UserAggregator
    from vocabulary.audio import RECEIVED_AT

    def frame(age: float) -> InputAudioRawFrame:
        f = InputAudioRawFrame(audio=bytes(1280), sample_rate=16000, num_channels=1)
        f.metadata[RECEIVED_AT] = time.monotonic() - age
        return f

    lags = []
    user = LLMContextAggregatorPair(LLMContext()).user()
    user.__class__ = UserAggregator
    user.on_backlog, user.max_lag_secs = lags.append, 5.0
    down, _ = await run_test(user, frames_to_send=[frame(0.01), frame(0.5), frame(7.0), frame(9.0), frame(0.0)])
    assert len(lags) == 1 and 7.0 <= lags[0] < 8.0
    assert not [f for f in down if isinstance(f, InputAudioRawFrame)]  # the caller's audio stops here


async def test_on_backlog_ends_the_session_with_its_code():
    from bots.runtime import Runtime
    from bots.session import Caller, VoiceSession
    from config.settings import Settings

    stops = []

    class Session(VoiceSession):
        async def stop(self, reason, limit=None):
            stops.append((reason, limit))

    session = Session(Runtime(settings=Settings(max_audio_lag_secs=5)), Caller())
    session.on_backlog(6.2)
    await asyncio.gather(*session._side_tasks)
    assert stops == [
        (
            "audio_backlog",
            (ErrorCode.AUDIO_BACKLOG, "the server fell more than 5 s behind your audio; the session ended"),
        )
    ]


def test_audio_budget_allows_real_time_and_a_burst_then_drops_and_tells_once_a_second():
    from bots.limits import AudioBudget

    clock = [100.0]
    budget = AudioBudget(2.0, clock=lambda: clock[0])
    assert all(budget.take(0.02) for _ in range(100))  # the 2 s burst at once
    assert not budget.take(0.02) and budget.should_tell() and not budget.should_tell()
    for _ in range(1000):  # then real time (20 ms every 20 ms) for 20 s: nothing dropped, and the 5% over
        clock[0] += 0.02  # real time refills 1 s of burst meanwhile
        assert budget.take(0.02)
    taken = 0
    for _ in range(500):  # twice real time for 5 s: 5 s x 1.05 + the 1 s refilled get through, 3.75 s dropped
        clock[0] += 0.01
        taken += budget.take(0.02)
    assert 305 <= taken <= 320 and 3.5 < budget.dropped_secs < 4.0, (taken, budget.dropped_secs)
    assert budget.refusal().code == ErrorCode.AUDIO_RATE_EXCEEDED
    assert AudioBudget(0).take(1000.0)  # 0: no budget


def test_caller_fields_are_cleaned_at_the_edge():
    from bots.session import Caller

    c = Caller(
        user_id="not-a-uuid",
        client_user_id={"nested": [1]},
        conversation_id="c\x00\x1fid" + "x" * 500,
        user_agent=12,
        ip_address="999.1.1.1",
    )
    assert (c.user_id, c.client_user_id, c.user_agent, c.ip_address) == (None, None, None, None)
    assert c.conversation_id.startswith("cid") and len(c.conversation_id) == 256
    assert (
        Caller(ip_address="::1", user_id="5E449A5A-6D32-401D-B904-C358A5B78A64").user_id
        == "5e449a5a-6d32-401d-b904-c358a5b78a64"
    )


def test_message_rate_says_flooding_only_when_over_twice_the_rate_is_sustained():
    from bots.limits import MessageRate

    clock = [0.0]
    rate = MessageRate(100, clock=lambda: clock[0])
    for _ in range(2000):  # a 20 s burst at once: 200 pass, 1800 dropped, but over within a moment
        rate.allow()
    assert rate.flooding  # 1800 dropped in a moment is more than 10 s worth (1000)
    rate = MessageRate(100, clock=lambda: clock[0])
    for _ in range(1500):  # 1.5x the rate for 15 s: a fast clock, a greedy client, not a flood
        clock[0] += 1 / 150
        rate.allow()
    assert not rate.flooding
    for _ in range(2100):  # 3x the rate for 7 s: 1400 dropped in the window... then more
        clock[0] += 1 / 300
        rate.allow()
    assert rate.flooding
