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
