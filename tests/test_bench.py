"""`atlas-voice bench` end to end, small: 2 callers on each door against Atlas and the bare Pipecat bot, with the
vendor fakes' scripted delays, each Atlas door again beside a flooding client (`--flood-compare`), and the
reports it writes. The full runs (1, 25, 100 sessions) are in bench/results; this proves the harness
measures what it says, in one run."""

from __future__ import annotations

import json

from app.cli import main


def test_bench_measures_both_doors_bare_pipecat_and_a_flood(tmp_path):
    code = main(
        [
            "bench",
            "--sessions",
            "2",
            "--duration",
            "10",
            "--no-offline",
            "--flood-compare",
            "--name",
            "smoke",
            "--out",
            str(tmp_path),
            "--llm-delay",
            "0.5",
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "smoke.json").read_text())
    by = {r["scenario"]: r for r in results["scenarios"]}
    floods = {"atlas-ws-2-flood", "atlas-twilio-2-flood"}
    assert set(by) == {"atlas-ws-2", "atlas-twilio-2", "bare-twilio-2"} | floods
    # Atlas (the default turn-end rule): the VAD stops 0.2 s after the speech, the scripted final follows 0.3 s
    # later and the preemptive request starts on it: first token at 1.0 s, after the rule's 0.9 s of silence
    # for a finished question, then first audio 0.2 s. The bare Pipecat bot: VAD stop 0.5, then the speech
    # timeout 0.5 while the STT's 0.3 runs, then 0.5 + 0.2.
    for r in by.values():
        injected = 1700.0 if r["server"] == "bare" else 1200.0
        assert r["injected_ms"] == injected, r["scenario"]
        assert r["turns"] >= 2 and r["error_rate"] == 0 and not r["errors"].get("NO_REPLY")
        v2v = r["voice_to_voice_ms"]
        assert injected < v2v["p50"] <= v2v["p95"] <= v2v["p99"] < injected + 3000
        assert r["overhead_ms"]["p50"] == round(v2v["p50"] - injected, 1)
        assert r["reply_secs_mean"] > 3  # the whole scripted reply was heard (~6 s of speech)
        assert r["cpu_pct_per_session"] > 0 and r["rss_peak_mib"] > 100
        if r["server"] == "atlas":
            # every reply was the one asked for at the pause, and no caller went on after one
            assert r["preemption"]["preempted_share"] == 1.0 and r["preemption"]["withdrawn_per_100_turns"] == 0
    # Atlas's own per-stage record shows the vendors' scripted delays: STT is counted from the end of
    # speech, so it is the VAD's 0.2 s stop + the scripted 0.3 s final; the first token, asked for at the
    # pause, comes ~0.1 s after the turn ends (at 0.9 s of silence) instead of the scripted 0.5 s
    for name in ("atlas-ws-2", "atlas-twilio-2"):
        st = by[name]["stages_ms"]
        assert 400 <= st["stt"]["p50"] < 1000 and 0 <= st["llm_ttfb"]["p50"] < 400
        assert 200 <= st["tts_ttfa"]["p50"] < 900
        assert st["server_v2v"]["p50"] <= by[name]["voice_to_voice_ms"]["p50"] + 50
    assert by["bare-twilio-2"]["stages_ms"] == {}
    [ratio] = results["atlas_vs_bare"]
    assert ratio["sessions"] == 2 and ratio["overhead_p50_ratio"] > 0 and ratio["rss_per_session_ratio"] > 0
    assert results["machine"]["cores"] >= 1 and results["machine"]["pipecat"] == "1.14.0"
    md = (tmp_path / "smoke.md").read_text()
    assert all(f"| {name} |" in md for name in by) and "Atlas / bare Pipecat" in md
    assert (tmp_path / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Beside a client flooding /ws with audio as fast as it can (reconnecting whenever cut off): the server
    # cut each of its sessions off (message_flood), let at most the audio budget's burst of each reach the
    # STT, and the honest callers were all answered.
    pairs = {c["scenario"]: c for c in results["flood_vs_plain"]}
    assert set(pairs) == floods
    for c in pairs.values():
        flood = c["flood"]
        assert flood["audio_offered_s"] > 60 and flood["sessions"] >= 1, flood
        assert flood["end_reasons"].get("message_flood", 0) >= 1 and flood["errors"]["MESSAGE_RATE_EXCEEDED"] >= 1
        assert flood["stt_seconds"] <= flood["sessions"] * 2.5, flood
        assert c["error_rate"] == [0, 0] and c["p95_ratio"] is not None
    assert "flooding /ws" in md
