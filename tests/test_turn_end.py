"""The turn-end rule and when preemptive requests start, on the strategy itself (processors/turn_end.py):
Pipecat's frames in, the events a user aggregator acts on out, in real time (no server)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from pipecat.clocks.system_clock import SystemClock
from pipecat.frames.frames import TranscriptionFrame, VADUserStartedSpeakingFrame, VADUserStoppedSpeakingFrame
from pipecat.processors.frame_processor import FrameProcessorSetup
from pipecat.utils.asyncio.task_manager import TaskManager

from processors.turn_end import PreemptiveTurnStopStrategy, TurnEndRule, words_verdict

VAD_STOP = 0.2


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("What time is it?", "done"),
        ("Tell me a joke about penguins.", "done"),
        ("Set a timer for,", "open"),
        ("I want to fly from Boston to", "open"),
        ("I need milk and", "open"),
        ("Um,", "open"),
        ("uh", "open"),
        ("Hi Atlas.", "open"),
        ("Okay", "open"),
        ("My number is five five five", "open"),
        ("Book a table for 2", "open"),
        ("So I was thinking", "unsure"),
        ("", "unsure"),
    ],
)
def test_words_verdict(text, verdict):
    assert words_verdict(text) == verdict


def test_rule_waits_longest_on_unfinished_words():
    rule = TurnEndRule(done_secs=0.9, unsure_secs=0.9, open_secs=1.5)
    assert rule.silence("open", True) == 1.5
    assert rule.silence("done", None) == 0.9
    assert rule.silence("done", False) == rule.unsure_secs  # smart-turn hears an unfinished sentence
    assert rule.longest == 1.5


class Harness:
    """The strategy wired as a user aggregator wires it: each event is logged with its time."""

    def __init__(self, **kwargs):
        self.events: list[tuple[float, str, object]] = []
        self.t0 = time.monotonic()
        rule = kwargs.pop("rule", TurnEndRule(done_secs=0.6, unsure_secs=0.6, open_secs=1.2))
        self.strategy = PreemptiveTurnStopStrategy(rule=rule, vad_stop_secs=VAD_STOP, **kwargs)

        def log(name):
            async def handler(_strategy, *args):
                self.events.append((time.monotonic() - self.t0, name, args[0] if args else None))
                if name == "stopped":
                    await self.strategy.handle_user_turn_stopped()

            return handler

        self.strategy.add_event_handler("on_user_turn_inference_triggered", log("inference"))
        self.strategy.add_event_handler("on_user_turn_speculation_cancelled", log("withdrawn"))
        self.strategy.add_event_handler("on_user_turn_stopped", log("stopped"))

    async def start(self):
        clock = SystemClock()
        await self.strategy.setup(
            FrameProcessorSetup(clock=clock, task_manager=TaskManager(), pipeline_worker=None)  # type: ignore[arg-type]
        )

    async def send(self, *frames):
        for frame in frames:
            await self.strategy.process_frame(frame)

    def names(self) -> list[str]:
        return [name for _, name, _ in self.events]

    def at(self, name: str) -> float:
        return next(t for t, n, _ in self.events if n == name)


def final(text: str) -> TranscriptionFrame:
    return TranscriptionFrame(text, "user", "2026-12-05T00:00:00Z", finalized=True)


async def test_a_finished_question_is_speculated_on_and_confirmed():
    h = Harness(lead_secs=0.6)
    await h.start()
    await h.send(
        VADUserStartedSpeakingFrame(), VADUserStoppedSpeakingFrame(stop_secs=VAD_STOP), final("What time is it?")
    )
    await asyncio.sleep(0.8)
    assert h.names() == ["inference", "stopped"]
    speculation = h.events[0][2]
    assert speculation is not None and speculation.text == "What time is it?"
    assert h.events[1][2].confirms_speculation  # no second request: the held reply is released
    # the turn ends 0.6 s after the end of speech: 0.4 s after the VAD stop
    assert 0.3 <= h.at("stopped") <= 0.6, h.events
    await h.strategy.cleanup()


async def test_going_on_after_a_pause_withdraws_and_the_turn_answers_everything():
    h = Harness(lead_secs=5.0)  # speculate as soon as the words are in
    await h.start()
    await h.send(
        VADUserStartedSpeakingFrame(), VADUserStoppedSpeakingFrame(stop_secs=VAD_STOP), final("I need milk and")
    )
    await asyncio.sleep(0.1)
    await h.send(VADUserStartedSpeakingFrame())
    await h.send(VADUserStoppedSpeakingFrame(stop_secs=VAD_STOP), final("some bread please."))
    await asyncio.sleep(0.7)
    assert h.names() == ["inference", "withdrawn", "inference", "stopped"], h.events
    assert h.events[2][2].text == "I need milk and some bread please."
    assert h.events[3][2].confirms_speculation
    assert (h.strategy.speculations, h.strategy.withdrawn) == (2, 1)
    await h.strategy.cleanup()


async def test_a_pause_broken_before_the_lead_starts_no_request():
    """With the default lead (0.6 s), unfinished words (1.2 s) speculate only 0.4 s after the VAD stop."""
    h = Harness(lead_secs=0.6)
    await h.start()
    await h.send(
        VADUserStartedSpeakingFrame(), VADUserStoppedSpeakingFrame(stop_secs=VAD_STOP), final("Set a timer for")
    )
    await asyncio.sleep(0.25)
    await h.send(VADUserStartedSpeakingFrame())
    assert h.names() == []
    await h.send(VADUserStoppedSpeakingFrame(stop_secs=VAD_STOP), final("twenty minutes."))
    await asyncio.sleep(0.7)
    assert h.names() == ["inference", "stopped"], h.events
    await h.strategy.cleanup()


async def test_words_that_arrive_after_the_speculation_withdraw_it():
    h = Harness(lead_secs=5.0)
    await h.start()
    await h.send(
        VADUserStartedSpeakingFrame(), VADUserStoppedSpeakingFrame(stop_secs=VAD_STOP), final("What is the weather")
    )
    await asyncio.sleep(0.05)
    await h.send(final("in Paris?"))
    await asyncio.sleep(0.8)
    assert h.names() == ["inference", "withdrawn", "inference", "stopped"], h.events
    assert h.events[2][2].text == "What is the weather in Paris?"
    await h.strategy.cleanup()


async def test_no_preemption_ends_the_turn_with_one_ordinary_request():
    h = Harness(preempt=False)
    await h.start()
    await h.send(
        VADUserStartedSpeakingFrame(), VADUserStoppedSpeakingFrame(stop_secs=VAD_STOP), final("What time is it?")
    )
    await asyncio.sleep(0.7)
    assert h.names() == ["inference", "stopped"]
    assert h.events[0][2] is None  # an ordinary request, run when the turn ends
    assert not h.events[1][2].confirms_speculation
    await h.strategy.cleanup()


async def test_the_turn_waits_for_the_transcript():
    """No words at the pause: the turn does not end on silence alone, and ends once the words come."""
    h = Harness(stt_wait_secs=0.3)
    await h.start()
    await h.send(VADUserStartedSpeakingFrame(), VADUserStoppedSpeakingFrame(stop_secs=VAD_STOP))
    await asyncio.sleep(1.0)
    assert h.names() == []
    await h.send(final("Hello there, how are you?"))
    await asyncio.sleep(0.1)
    assert h.names() == ["inference", "stopped"], h.events
    await h.strategy.cleanup()


# --- what a turn record says about preemption (processors/turn_metrics.py) ----------------------------


def _pushed(frame, t: float):
    from pipecat.observers.base_observer import FramePushed
    from pipecat.processors.frame_processor import FrameDirection

    return FramePushed(
        source=None, destination=None, frame=frame, direction=FrameDirection.DOWNSTREAM, timestamp=int(t * 1e9)
    )


def _usage(prompt: int, completion: int):
    from pipecat.frames.frames import MetricsFrame
    from pipecat.metrics.metrics import LLMTokenUsage, LLMUsageMetricsData

    usage = LLMTokenUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
    return MetricsFrame(data=[LLMUsageMetricsData(processor="llm", value=usage)])


async def test_turn_record_counts_withdrawn_preemptive_requests_and_keeps_their_usage_with_the_turn():
    from pipecat.frames.frames import EagerEndOfTurnCancelFrame, LLMContextFrame, UserStoppedSpeakingFrame
    from pipecat.processors.aggregators.llm_context import LLMContext

    from processors.turn_metrics import TurnMetricsObserver

    closed = []
    observer = TurnMetricsObserver(on_turn_closed=closed.append)
    history = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi, how can I help?"}]

    def ask(text: str, speculation: bool):
        context = LLMContext(messages=[*history, {"role": "user", "content": text}])
        return LLMContextFrame(context=context, speculation=speculation)

    frames = [
        ask("I need milk and", True),  # withdrawn: the caller went on
        _usage(40, 0),  # what the vendor billed for it before its stream was closed
        EagerEndOfTurnCancelFrame(),
        ask("I need milk and some bread please", True),  # kept: the turn ends while it is in flight
        UserStoppedSpeakingFrame(),
        _usage(45, 12),
    ]
    for i, frame in enumerate(frames):
        await observer.on_push_frame(_pushed(frame, 1.0 + i * 0.1))
    observer.close_turns()
    turn = observer.turns[0]
    assert turn.preempted is True
    assert turn.preempt_cancelled == 1
    # "Hello there" + "Hi, how can I help?" + "I need milk and": 2 + 5 + 4 words, x 1.3
    assert turn.preempt_input_tokens == int(11 * 1.3)
    # both requests' usage belongs to this turn (neither to the turn before, which had no reply)
    assert (turn.llm_input_tokens, turn.llm_output_tokens) == (85, 12)
    assert observer.totals.llm_input_tokens == 85
    record = turn.record()
    assert (record.preempted, record.preempt_cancelled) == (True, 1)


NEWER_TURN_COLUMNS = ("preempted", "preempt_cancelled", "preempt_input_tokens", "llm_cache_read_tokens")


async def test_sqlite_store_adds_the_newer_turn_columns_to_an_older_file(tmp_path):
    import sqlite3

    from storage.sinks import SQLiteSink

    db = tmp_path / "old.sqlite3"
    schema = (Path(__file__).parents[1] / "storage" / "sqlite_schema.sql").read_text()
    # the turn table as it was before those columns (the session table keeps its own llm_cache_read_tokens)
    head, turns = schema.split("CREATE TABLE IF NOT EXISTS voice_turns", 1)
    for column in NEWER_TURN_COLUMNS:
        turns = "\n".join(line for line in turns.splitlines() if not line.strip().startswith(column + " "))
    schema = head + "CREATE TABLE IF NOT EXISTS voice_turns" + turns
    with sqlite3.connect(db) as conn:
        conn.executescript(schema)
        assert "preempted" not in {r[1] for r in conn.execute("pragma table_info(voice_turns)")}
    sink = SQLiteSink(db)
    await sink.fetch("voice_turns")
    await sink.close()
    with sqlite3.connect(db) as conn:
        columns = {r[1] for r in conn.execute("pragma table_info(voice_turns)")}
    assert set(NEWER_TURN_COLUMNS) <= columns


async def test_context_window_trims_the_shared_context_when_a_provisional_copy_passes():
    """A kept preemptive reply writes to the shared context with no request of its own passing the window:
    the shared context is trimmed when the next provisional copy passes, so it stays bounded."""
    from pipecat.frames.frames import LLMContextFrame
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.frame_processor import FrameDirection

    from processors.context_window import ContextWindow

    shared = LLMContext(
        messages=[{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(30)]
    )
    window = ContextWindow(max_messages=10, context=shared)
    pushed = []

    async def push(frame, direction=FrameDirection.DOWNSTREAM):
        pushed.append(frame)

    window.push_frame = push
    provisional = LLMContext(messages=[*shared.get_messages(), {"role": "user", "content": "new"}])
    await window.process_frame(LLMContextFrame(context=provisional, speculation=True), FrameDirection.DOWNSTREAM)
    # 10 of history and the question; the shared context, ending on a reply, keeps its last exchange whole after
    # its 10 of history (the next question then trims it again).
    assert len(provisional.get_messages()) == 11 and provisional.get_messages()[-1]["content"] == "new"
    assert len(shared.get_messages()) == 12 and shared.get_messages()[0]["role"] == "user"
    assert shared.get_messages()[-1]["content"] == "m29"


def test_bench_counts_the_vendors_share_of_a_turn_under_each_turn_end():
    """`atlas-voice bench` subtracts this from voice-to-voice to get the server's overhead."""
    from argparse import Namespace

    from bench.run import FIXED_TURN_END, build_scenarios
    from bench.vendors import VendorScript, turn_end_setting

    script = VendorScript(stt_delay=0.3, llm_delay=0.6, tts_delay=0.2)
    deepgram = {"DEEPGRAM_API_KEY": "test", "ATLAS_STT": "deepgram"}

    def Settings(**env):  # noqa: N802 - the settings a cloud scenario's server reads
        from config.settings import Settings as S

        return S(**deepgram, **env)

    rule = turn_end_setting(Settings(**{"ATLAS_TURN_END": "rule"}))
    assert rule["silence"] == 0.9  # the scripted question is a finished sentence
    # preemptive: the request starts on the final (0.2 + 0.3), its first token (1.1 s) outlasts the turn end
    assert round(script.injected(rule), 3) == 1.3
    no_preempt = turn_end_setting(Settings(**{"ATLAS_TURN_END": "rule", "ATLAS_PREEMPT": "0"}))
    assert round(script.injected(no_preempt), 3) == 1.7  # 0.9 + 0.6 + 0.2
    assert round(script.injected(turn_end_setting(Settings(**FIXED_TURN_END))), 3) == 1.8  # 0.5 + 0.5 + 0.6 + 0.2
    slow = turn_end_setting(Settings(**{"ATLAS_TURN_DONE_SECS": "1.5"}))
    assert round(script.injected(slow), 3) == 1.7  # the held reply waits for the turn end: 1.5 + 0.2
    from config.settings import Settings as Local

    # the local Whisper keeps a cut sentence's context (services/local/engines.py): the same 0.2 s VAD stop
    assert Local(**{"ATLAS_STT": "whisper"}).resolved_vad_stop_secs == 0.2
    assert Local(**{"ATLAS_STT": "whisper", **FIXED_TURN_END}).resolved_vad_stop_secs == 0.5
    assert Settings().resolved_vad_stop_secs == 0.2

    args = Namespace(
        sessions=[1],
        doors=["ws"],
        duration=10.0,
        flood_compare=False,
        workers_compare=[],
        first_clause_compare=False,
        turn_compare=True,
        bare=False,
        offline=True,
        offline_sessions=[1, 6],
        cache_compare=True,
        soak=0,
        soak_sessions=20,
    )
    built = build_scenarios(args)
    slots1, slots6 = {}, {"ATLAS_LLM_SLOTS": "6"}  # past the default 2 slots, one for every caller
    no_reuse = {"ATLAS_LLM_CACHE_REUSE_TOKENS": "0"}
    assert {sc.name: sc.env for sc in built} == {
        "atlas-ws-1": {},
        "atlas-ws-1-fixed": FIXED_TURN_END,
        "atlas-ws-1-no-preempt": {"ATLAS_PREEMPT": "0"},
        "offline-ws-1": slots1,
        "offline-ws-1-no-reuse": {**slots1, **no_reuse},
        "offline-ws-1-fixed": {**slots1, **FIXED_TURN_END},
        "offline-ws-6": slots6,  # a slot for every caller
        "offline-ws-6-no-reuse": {**slots6, **no_reuse},
        "offline-ws-6-fixed": {**slots6, **FIXED_TURN_END},
    }
    # offline scenarios are calls of 12 turns, the cloud ones run for their duration
    assert {sc.turns for sc in built if sc.server == "offline"} == {12}
    assert {sc.turns for sc in built if sc.server == "atlas"} == {None}


async def test_a_caller_who_keeps_pausing_costs_at_most_max_per_turn_requests():
    h = Harness(lead_secs=5.0, max_per_turn=2)
    await h.start()
    await h.send(VADUserStartedSpeakingFrame())
    for words in ("I need milk and", "eggs and", "butter and"):
        await h.send(VADUserStoppedSpeakingFrame(stop_secs=VAD_STOP), final(words))
        await asyncio.sleep(0.05)
        await h.send(VADUserStartedSpeakingFrame())
    await h.send(VADUserStoppedSpeakingFrame(stop_secs=VAD_STOP), final("bread."))
    await asyncio.sleep(0.7)
    # two speculations withdrawn, then the turn is answered by an ordinary request when it ends
    assert h.names() == ["inference", "withdrawn", "inference", "withdrawn", "inference", "stopped"], h.events
    assert h.events[4][2] is None and not h.events[5][2].confirms_speculation
    await h.strategy.cleanup()
