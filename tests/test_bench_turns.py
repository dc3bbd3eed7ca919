"""bench/turns.py on real speech (Piper and a LibriVox clip), the quick sweep: what a user would notice.

"I'd like to book a table for two," <500 ms> "at eight thirty." Without smart-turn, a 0.2 s VAD stop
(which also sets the 0.2 s speech timeout) ends the turn in the pause, cutting the user off; a 0.8 s
stop waits through it, but then every turn ends only ~1.6 s after the user stops. A 0.2 s VAD stop
with its own 0.6 s speech timeout waits through it too.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from bench import turns


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("turns")
    assert turns.main(["--quick", "--out", str(out)]) == 0
    return json.loads((out / "turns.json").read_text()), (out / "turns.md").read_text()


def _run(report, path, utterance, vad_stop, smart_turn=False, speech_timeout=None):
    return next(
        r
        for r in report["runs"]
        if r["path"] == path
        and r["utterance"] == utterance
        and r["vad_stop_secs"] == vad_stop
        and r["smart_turn"] == smart_turn
        and r["speech_timeout_secs"] == speech_timeout
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", ["browser", "phone"])
def test_a_short_stop_cuts_the_user_off_in_a_pause_and_a_long_one_does_not(report, path):
    data, _ = report
    short, long = _run(data, path, "book_table", 0.2), _run(data, path, "book_table", 0.8)
    assert short["false_cutoffs"] >= 1  # the turn ended in the 500 ms pause
    assert long["false_cutoffs"] == 0
    # After the real end of speech: ~2 x 0.2 s without smart-turn, ~2 x 0.8 s with the long stop.
    assert 300 <= short["delay_ms"] <= 700
    assert 1500 <= long["delay_ms"] <= 1900
    # With no pause at all, nobody is cut off, whatever the setting.
    assert all(r["false_cutoffs"] == 0 for r in data["runs"] if r["utterance"] == "what_time")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", ["browser", "phone"])
def test_a_separate_speech_timeout_waits_through_the_pause_on_the_same_vad_stop(report, path):
    data, _ = report
    split = _run(data, path, "book_table", 0.2, speech_timeout=0.6)
    assert split["false_cutoffs"] == 0
    # Same VAD stop, so the same VAD stop time: the turn ends exactly 0.4 s later than with 0.2 s.
    ends = [_run(data, path, "what_time", 0.2, speech_timeout=t)["delay_ms"] for t in (None, 0.6)]
    assert ends[1] - ends[0] == 400
    survived = {
        s["speech_timeout_secs"]: s["longest_pause_survived_ms"]
        for s in data["summary"]
        if s["path"] == path and s["vad_stop_secs"] == 0.2 and not s["smart_turn"]
    }
    assert (survived[0.6] or 0) > (survived[None] or 0)


def test_an_unset_speech_timeout_is_the_vad_stop():
    """speech_timeout_secs=None behaves as before (timeout = VAD stop_secs); a set one moves the end."""
    frames = [(b"", (i + 1) * 0.02) for i in range(100)]
    events = [None] * 100
    events[10], events[40] = "start", "stop"  # stop at 0.82 s

    def ends(cfg):
        return asyncio.run(turns.simulate(None, frames, events, cfg, turns.SimClock()))["ends"]

    assert turns.Config(0.3, False).user_speech_timeout == 0.3
    assert turns.Config(0.3, True, 1.0, speech_timeout_secs=0.6).user_speech_timeout is None
    assert (
        ends(turns.Config(0.3, False))
        == ends(turns.Config(0.3, False, speech_timeout_secs=0.3))
        == [(1.12, "speech_timeout")]
    )
    assert ends(turns.Config(0.3, False, speech_timeout_secs=0.6)) == [(1.42, "speech_timeout")]


def test_report_has_the_documented_fields(report):
    data, md = report
    assert {"cpu", "cores", "python", "pipecat-ai"} <= data["machine"].keys()
    assert data["timing"]["smart_turn_ms"]["p50"] > 0 and data["timing"]["silero_ms_per_32ms"]["p50"] > 0
    for s in data["summary"]:
        assert {
            "path",
            "vad_stop_secs",
            "smart_turn",
            "smart_turn_stop_secs",
            "false_cutoff_rate",
            "delay_p50_ms",
            "delay_p95_ms",
            "smart_turn_incomplete_share",
        } <= s.keys()
        assert (s["smart_turn_incomplete_share"] is None) == (not s["smart_turn"])
        assert (s["user_speech_timeout_secs"] is None) == s["smart_turn"]
    smart = [r for r in data["runs"] if r["smart_turn"]]
    assert smart and all(c["ms"] > 0 for r in smart for c in r["smart_turn_calls"])
    assert "| VAD stop | smart-turn | speech timeout | cut-offs |" in md and data["machine"]["cpu"] in md


# ---- the adaptive turn-end rule (--rule) --------------------------------------------------------

FRAMES = [(b"", (i + 1) * 0.02) for i in range(200)]  # 20 ms frames: frame i arrives at (i + 1) * 20 ms


def _rule_sim(cfg, events, texts):
    """simulate_rule on scripted VAD events, with `texts[last frame]` as the words at each VAD stop; also
    returns the (first, end) frame ranges it asked to transcribe."""
    asked = []

    def transcribe(a, b):
        asked.append((a, b))
        return texts[b - 1]

    sim = asyncio.run(turns.simulate_rule(None, FRAMES, events, cfg, turns.SimClock(), transcribe))
    return sim, asked


def _events(**at):
    events = [None] * len(FRAMES)
    for kind, frames in at.items():
        for i in frames:
            events[i] = kind
    return events


@pytest.mark.parametrize(
    "words, end, verdict",
    [
        ("I want to fly from Boston to,", 1.82, "open"),  # open_secs 1.2: 1.0 s after the VAD stop
        ("So I was thinking", 1.42, "unsure"),  # unsure_secs 0.8
        ("What time is it?", 1.02, "done"),  # done_secs 0.4
    ],
)
def test_the_rule_waits_for_the_silence_its_verdict_asks_for(words, end, verdict):
    """The VAD stop (0.2 s) comes at 0.82 s: the turn ends the rule's silence minus those 0.2 s later, so an
    unfinished "... to," waits open_secs of silence in all and a finished question only done_secs."""
    sim, asked = _rule_sim(turns.RuleConfig(0.4, 0.8, 1.2, False), _events(start=[10], stop=[40]), {40: words})
    assert sim["ends"] == [(end, f"rule_{verdict}")]
    assert asked == [(0, 41)]  # the words from the start of the utterance up to the VAD stop
    assert sim["speculations"] == 1 and sim["withdrawn"] == 0


def test_a_vad_start_cancels_the_pending_end_and_withdraws_the_speculation():
    """ "... to," at 0.82 s would end the turn at 1.82 s; the caller goes on at 1.42 s, so it does not, the
    speculation made at the pause is withdrawn, and the next pause (2.02 s) decides on all the words."""
    texts = {40: "I want to fly from Boston to,", 100: "I want to fly from Boston to Denver next Monday."}
    sim, asked = _rule_sim(turns.RuleConfig(0.4, 0.8, 1.2, False), _events(start=[10, 70], stop=[40, 100]), texts)
    assert sim["ends"] == [(2.22, "rule_done")]
    assert asked == [(0, 41), (0, 101)]
    assert (sim["speculations"], sim["withdrawn"]) == (2, 1)


def test_a_turn_ended_in_the_pause_is_a_cut_off_and_the_next_turn_hears_only_what_follows():
    """A finished sentence at the pause ends the turn after done_secs (1.02 s), before the caller goes on
    (1.42 s): the next turn's words start 1 s before its VAD start (the segmented STT's buffer)."""
    texts = {40: "Book me a taxi.", 100: "for six tomorrow morning."}
    sim, asked = _rule_sim(turns.RuleConfig(0.4, 0.8, 1.2, False), _events(start=[10, 70], stop=[40, 100]), texts)
    assert sim["ends"] == [(1.02, "rule_done"), (2.22, "rule_done")]
    assert asked == [(0, 41), (20, 101)]  # 1.42 s - 1 s = 0.42 s: frame 20
    assert (sim["speculations"], sim["withdrawn"]) == (2, 0)  # each turn's speculation was kept


ADOPTED = turns.ADOPTED_RULE  # 0.9/0.9/1.5, smart-turn off, lead 0.6 s
EVERY_PAUSE = turns.ADOPTED_EVERY_PAUSE


def test_the_adopted_rule_is_the_product_default():
    """The bench's adopted row is what the app runs: TurnEndRule(), the settings' defaults, the strategy's lead."""
    import inspect

    from config.settings import Settings
    from processors.turn_end import PreemptiveTurnStopStrategy, TurnEndRule

    assert ADOPTED.rule == TurnEndRule() and not ADOPTED.smart_turn and ADOPTED.vad_stop_secs == 0.2
    fields = Settings.model_fields
    assert (fields["turn_done_secs"].default, fields["turn_unsure_secs"].default, fields["turn_open_secs"].default) == (
        ADOPTED.done_secs,
        ADOPTED.unsure_secs,
        ADOPTED.open_secs,
    )
    lead = inspect.signature(PreemptiveTurnStopStrategy.__init__).parameters["lead_secs"].default
    assert ADOPTED.lead_secs == turns.PREEMPT_LEAD_SECS == lead == fields["preempt_lead_secs"].default
    cap = inspect.signature(PreemptiveTurnStopStrategy.__init__).parameters["max_per_turn"].default
    assert ADOPTED.max_per_turn == turns.PREEMPT_MAX_PER_TURN == cap == fields["preempt_max_per_turn"].default
    assert turns.label(ADOPTED) == "rule 0.9/0.9/1.5 smart-turn off"
    assert turns.label(EVERY_PAUSE) == "rule 0.9/0.9/1.5 smart-turn off, speculation at every pause"


def test_with_the_lead_a_finished_sentence_speculates_0_1_s_after_the_vad_stop():
    """done 0.9 s: the turn ends 0.7 s after the VAD stop (0.82 s), and the speculation starts 0.6 s before
    that, at the stop + 0.1 s; without the lead it starts at the stop itself."""
    events = _events(start=[10], stop=[40])
    sim, _ = _rule_sim(ADOPTED, events, {40: "What time is it?"})
    assert sim["ends"] == [(1.52, "rule_done")]
    assert sim["speculation_at"] == [0.92] and (sim["speculations"], sim["withdrawn"]) == (1, 0)
    sim, _ = _rule_sim(EVERY_PAUSE, events, {40: "What time is it?"})
    assert sim["ends"] == [(1.52, "rule_done")] and sim["speculation_at"] == [0.82]


def test_with_the_lead_a_600_ms_pause_after_unfinished_words_starts_no_speculation():
    """ "... to," <600 ms> "Denver next Monday.": the VAD stops 0.2 s into the pause (0.82 s) and reports the
    speech again 0.2 s into it (1.42 s). open 1.5 s would end the turn at 2.12 s and speculate from 1.52 s,
    so the caller is back before any request; the finished sentence then speculates at its stop + 0.1 s.
    Speculating at every pause, the first request is made at 0.82 s and withdrawn at 1.42 s."""
    texts = {40: "I want to fly from Boston to,", 100: "I want to fly from Boston to Denver next Monday."}
    events = _events(start=[10, 70], stop=[40, 100])
    sim, _ = _rule_sim(ADOPTED, events, texts)
    assert sim["ends"] == [(2.72, "rule_done")]
    assert sim["speculation_at"] == [2.12] and (sim["speculations"], sim["withdrawn"]) == (1, 0)
    assert [(s["verdict"], s["speculated"], s["ended_turn"]) for s in sim["stops"]] == [
        ("open", False, False),  # the pause the caller broke: no request
        ("done", True, True),
    ]
    every, _ = _rule_sim(EVERY_PAUSE, events, texts)
    assert every["ends"] == sim["ends"]  # the lead moves the request, never the turn end
    assert every["speculation_at"] == [0.82, 2.02] and (every["speculations"], every["withdrawn"]) == (2, 1)


def test_with_the_lead_a_pause_broken_after_the_speculation_started_still_withdraws_it():
    """A finished sentence, then 600 ms of pause: the speculation started at 0.92 s, the caller is back at
    1.42 s, before the turn end (1.52 s): withdrawn, and the next pause speculates on all the words."""
    texts = {40: "Book me a taxi.", 100: "Book me a taxi for six tomorrow morning."}
    sim, _ = _rule_sim(ADOPTED, _events(start=[10, 70], stop=[40, 100]), texts)
    assert sim["ends"] == [(2.72, "rule_done")]
    assert sim["speculation_at"] == [0.92, 2.12] and (sim["speculations"], sim["withdrawn"]) == (2, 1)


def test_at_most_max_per_turn_speculations_in_one_turn():
    """Four short pauses after finished phrases, speculating at every pause: the first three start a request
    (each withdrawn when the caller goes on), the fourth starts none, and the turn is answered when it ends."""
    texts = {40: "Add apples.", 80: "Add apples, bananas.", 120: "Add apples, bananas, pears.", 160: "And milk."}
    sim, _ = _rule_sim(EVERY_PAUSE, _events(start=[10, 50, 90, 130], stop=[40, 80, 120, 160]), texts)
    assert sim["ends"] == [(3.92, "rule_done")]
    assert sim["speculation_at"] == [0.82, 1.62, 2.42] and (sim["speculations"], sim["withdrawn"]) == (3, 3)
    assert [st["capped"] for st in sim["stops"]] == [False, False, False, True]


def test_no_words_at_the_pause_end_nothing():
    """The strategy's timer ends a turn only with words in hand (Whisper heard nothing in a cough)."""
    sim, _ = _rule_sim(turns.RuleConfig(0.4, 0.8, 1.2, False), _events(start=[10], stop=[40]), {40: ""})
    assert sim["ends"] == [] and sim["speculations"] == 0


def test_the_held_back_set_is_apart_from_the_tuning_set(monkeypatch):
    """No held-back sentence (or its /sep or pause variants) is among the utterances the rule is tuned on."""
    import types

    monkeypatch.setattr(turns, "librivox_utterances", lambda: [])
    monkeypatch.setattr(
        turns,
        "piper_utterance",
        lambda name, parts, joined=True: types.SimpleNamespace(
            name=name if joined else name + "/sep", text=" ".join(p for p in parts if isinstance(p, str))
        ),
    )
    tuning = turns.utterances() + turns.pause_utterances()
    held = turns.holdout_utterances() + turns.pause_utterances(
        False, turns.HOLDOUT_SCRIPTS, turns.HOLDOUT_PAUSE_SCRIPTS
    )
    assert len(held) == 8 + 6 + 2 * len(turns.PAUSE_GRID_MS)  # 8 sentences, 6 with a pause (/sep), 2 swept
    assert not {u.name for u in tuning} & {u.name for u in held}
    assert not {u.name.split("@")[0].split("/")[0] for u in held} & {n for n, _ in turns.SCRIPTS}
    assert not {u.text.lower() for u in tuning} & {u.text.lower() for u in held}


def _row(cfg, path, cut=0, mean=900, pause=800, set_="tuning"):
    return {
        "set": set_,
        "config": turns.label(cfg),
        "path": path,
        "false_cutoff_utterances": cut,
        "no_turn_end": 0,
        "longest_pause_survived_ms": pause,
        "delay_mean_ms": mean,
        "delay_p95_ms": mean + 100,
    }


def test_the_pick_needs_both_paths_safe_and_ignores_the_held_back_set():
    a, b, c, d = (turns.RuleConfig(x, 1.0, 1.2, False) for x in (0.7, 0.4, 0.6, 0.5))
    summary = [
        *(_row(a, p, mean=900) for p in ("browser", "phone")),
        _row(b, "browser", mean=500),
        _row(b, "phone", mean=500, cut=1),  # cuts someone off on the phone
        *(_row(c, p, mean=950) for p in ("browser", "phone")),
        *(_row(c, p, mean=100, set_="holdout") for p in ("browser", "phone")),  # not to be looked at
        *(_row(a, p, cut=3, set_="holdout") for p in ("browser", "phone")),
        _row(d, "browser", mean=600),
        _row(d, "phone", mean=600, pause=650),  # does not survive 700 ms pauses on the phone
    ]
    choice = turns.pick_rule(summary, [a, b, c, d])
    assert choice["picked"] == turns.label(a)
    assert choice["safe"] == [turns.label(a), turns.label(c)]
    # with none safe, the closest: fewest cut-offs, then the longest pause survived (worse path)
    assert turns.pick_rule(summary, [b, d])["picked"] is None
    assert turns.pick_rule(summary, [b, d])["closest"] == [turns.label(d), turns.label(b)]


@pytest.fixture(scope="module")
def rule_report(tmp_path_factory):
    import datetime

    out = tmp_path_factory.mktemp("turn-rule")
    assert turns.main(["--rule", "--quick", "--out", str(out)]) == 0
    stem = f"turn-rule-{datetime.date.today().isoformat()}"
    return json.loads((out / f"{stem}.json").read_text()), (out / f"{stem}.md").read_text()


def _rule_run(data, set_, path, config, utterance):
    return next(
        r
        for r in data["runs"]
        if r["set"] == set_ and r["path"] == path and r["config"] == config and r["utterance"] == utterance
    )


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", ["browser", "phone"])
def test_the_rule_cli_on_real_speech(rule_report, path):
    """The quick --rule run on Piper speech through Whisper: a finished question ends about (1.0 - done_secs)
    sooner than with the fixed 1.0 s, and the held-back "Book me a taxi, <550 ms> for six tomorrow morning."
    is cut off at its pause by a rule that the tuning utterances found safe (the words there are a finished
    sentence), while the fixed default waits through it."""
    data, md = rule_report
    picked, fixed = data["picked"], data["fixed_default"]["config"]
    assert picked["safe"] and data["choice"]["picked"] == picked["config"]
    rule_q = _rule_run(data, "tuning", path, picked["config"], "what_time")
    fixed_q = _rule_run(data, "tuning", path, fixed, "what_time")
    assert rule_q["text"] == "What time is it?" and rule_q["rule_class"] == "done"
    assert abs((fixed_q["delay_ms"] - rule_q["delay_ms"]) - (1.0 - picked["done_secs"]) * 1000) <= 80
    taxi = _rule_run(data, "holdout", path, picked["config"], "book_taxi")
    assert taxi["false_cutoffs"] == 1 and taxi["cut_words"][0].endswith(".")
    assert _rule_run(data, "holdout", path, fixed, "book_taxi")["false_cutoffs"] == 0
    held = {s["config"]: s for s in data["summary"] if s["set"] == "holdout" and s["path"] == path}
    assert held[picked["config"]]["cut_off"] == ["book_taxi"] and held[fixed]["cut_off"] == []
    assert held[fixed]["speculations_per_turn"] is None and held[picked["config"]]["speculations_per_turn"] >= 1


@pytest.mark.timeout(300)
def test_the_rule_report_is_written_and_each_prefix_transcribed_once(rule_report):
    data, md = rule_report
    assert {"cpu", "cores", "python", "pipecat-ai"} <= data["machine"].keys() and data["machine"]["cpu"] in md
    for header in (
        "## Adopted rule (the product default)",
        "## Method",
        "Held-back set",
        "## How the rule was chosen",
        "## Turn-end delay distribution",
        "extra LLM input tokens preemption costs",
    ):
        assert header in md
    assert md.index("## Adopted rule") < md.index("## Method") < md.index("## The grid on the tuning set")
    # Whisper ran once per distinct prefix, though every rule row asked for the words at every VAD stop.
    assert data["timing"]["whisper_ms"]["n"] == len(data["transcripts"])
    assert data["timing"]["whisper_requests"] >= 3 * len(data["transcripts"])  # 4 rule rows share them
    sets = {(s["set"], s["path"], s["config"]) for s in data["summary"]}
    assert len(sets) == len(data["summary"])  # each config run once per set and path
    adopted, every = data["adopted"]["config"], data["adopted"]["every_pause"]
    assert data["compared"][:2] == [adopted, every] and data["compared"][-1] == data["fixed_default"]["config"]
    for config in data["compared"]:
        assert {(st, p, config) for st in ("tuning", "holdout") for p in ("browser", "phone")} <= sets
    # Speculating at every pause moves no turn end, and withdraws at least as often as with the lead.
    for s in data["summary"]:
        if s["config"] == adopted:
            e = next(x for x in data["summary"] if (x["set"], x["path"], x["config"]) == (s["set"], s["path"], every))
            assert (e["delays_ms"], e["cut_off"]) == (s["delays_ms"], s["cut_off"])
            assert e["withdrawn_per_100_turns"] >= s["withdrawn_per_100_turns"]
            assert e["speculations_per_turn"] >= s["speculations_per_turn"] >= 1
