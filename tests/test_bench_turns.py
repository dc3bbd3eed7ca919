"""bench/turns.py on real speech (Piper and a LibriVox clip), the quick sweep: what a user would notice.

"I'd like to book a table for two," <500 ms> "at eight thirty." Without smart-turn, a 0.2 s VAD stop
(which also sets the 0.2 s speech timeout) ends the turn in the pause, cutting the user off; a 0.8 s
stop waits through it, but then every turn ends only ~1.6 s after the user stops.
"""

from __future__ import annotations

import json

import pytest

from bench import turns


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("turns")
    assert turns.main(["--quick", "--out", str(out)]) == 0
    return json.loads((out / "turns.json").read_text()), (out / "turns.md").read_text()


def _run(report, path, utterance, vad_stop, smart_turn=False):
    return next(r for r in report["runs"] if r["path"] == path and r["utterance"] == utterance
                and r["vad_stop_secs"] == vad_stop and r["smart_turn"] == smart_turn)


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


def test_report_has_the_documented_fields(report):
    data, md = report
    assert {"cpu", "cores", "python", "pipecat-ai"} <= data["machine"].keys()
    assert data["timing"]["smart_turn_ms"]["p50"] > 0 and data["timing"]["silero_ms_per_32ms"]["p50"] > 0
    for s in data["summary"]:
        assert {"path", "vad_stop_secs", "smart_turn", "smart_turn_stop_secs", "false_cutoff_rate",
                "delay_p50_ms", "delay_p95_ms", "smart_turn_incomplete_share"} <= s.keys()
        assert (s["smart_turn_incomplete_share"] is None) == (not s["smart_turn"])
    smart = [r for r in data["runs"] if r["smart_turn"]]
    assert smart and all(c["ms"] > 0 for r in smart for c in r["smart_turn_calls"])
    assert "| VAD stop | smart-turn | cut-offs |" in md and data["machine"]["cpu"] in md
