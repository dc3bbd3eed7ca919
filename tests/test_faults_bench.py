"""A short `atlas-voice bench faults` (the long one is 50 callers for 5 minutes, bench/results/faults-*.md):
every fault at a high rate, the database down mid-run, a call vanishing; nothing recorded may be lost."""

from __future__ import annotations

import json

import pytest

from bench.faults import main as faults_main

pytestmark = pytest.mark.timeout(600)


def test_calls_under_faults_complete_and_every_row_lands_once(tmp_path):
    rc = faults_main(
        [
            "--sessions",
            "4",
            "--minutes",
            "0.75",
            "--turns",
            "2",
            "--stt-drop",
            "0.5",
            "--llm-overload",
            "0.25",
            "--llm-stall",
            "0.1",
            "--tts-fail",
            "0.3",
            "--vanish",
            "0.15",
            "--outage",
            "12",
            "--outage-at",
            "4",
            "--seed",
            "5",
            "--name",
            "faults-test",
            "--out",
            str(tmp_path),
        ]
    )
    res = json.loads((tmp_path / "faults-test.json").read_text())
    rows, calls, inj, seen = res["rows"], res["calls"], res["injected"], res["seen"]
    assert calls["total"] >= 4 and calls["kept"] >= 3
    # Nothing recorded is lost or doubled, through the outage and the vanished calls.
    assert rows["sessions_found"] == rows["sessions_expected"] == calls["total"]
    assert rows["sessions_not_ended"] == rows["turns_lost"] == rows["turns_extra"] == rows["turns_twice"] == 0
    assert rows["outbox_pending_at_end"] == 0
    assert seen["outbox_failures"] > 0  # the outage was felt, and retried
    # Each fault the vendors injected shows in /metrics.
    errors = seen["errors_by_code"]
    if inj["elevenlabs"].get("tts_fail"):
        assert errors.get("TTS_FALLBACK", 0) >= 1
    if inj["anthropic"].get("llm_529"):
        assert seen["provider_retries"].get("529", 0) >= 1
    assert "PIPELINE_ERROR" not in errors and "INTERNAL_ERROR" not in errors, errors
    assert calls["complete_pct"] >= 99, calls["failed"]
    assert rc == 0
