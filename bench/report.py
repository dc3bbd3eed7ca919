"""The benchmark's outputs: `<name>.json` (everything), `<name>.md` (tables) and `<name>.png` (charts)."""

from __future__ import annotations

import json
from pathlib import Path


def _f(value, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _turn_end(t: dict) -> str:
    if t.get("mode") == "rule":
        preempt = ", reply asked for at the pause (preemptive)" if t.get("preempt") else ", no preemption"
        return (
            f"VAD stop {t['vad_stop']} s, turn-end rule ({t['silence']} s of silence for the scripted question)"
            + preempt
        )
    if t["smart_turn"]:
        return f"VAD stop {t['vad_stop']} s, smart-turn, then the STT final"
    return (
        f"VAD stop {t['vad_stop']} s, then the later of the speech timeout ({t['speech_timeout']} s) and the STT final"
    )


def _under(r: dict, ms: float) -> bool:
    """Every turn answered (no errors) and voice-to-voice p95 under `ms`."""
    p95 = r["voice_to_voice_ms"]["p95"]
    return r["error_rate"] == 0 and p95 is not None and p95 < ms


def markdown(results: dict) -> str:
    m, s = results["machine"], results["script"]
    lines = [
        f"# Atlas Voice benchmark ({results['started']})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}, Pipecat {m['pipecat']} ({m['note']}).",
        "",
        f"Scripted vendors: Deepgram final {s['stt_delay']} s after finalize, Claude first token {s['llm_delay']} s "
        f"then {s['llm_tps']:g} tokens/s, ElevenLabs first audio {s['tts_delay']} s, jitter {s['jitter']:g}. "
        f"Turn end (default): {_turn_end(results['turn_end'])}. Overhead = voice-to-voice - "
        "(the vendors' share of the turn under the scenario's turn end: turn-end wait + first token + first audio, "
        "or with a preemptive reply the later of the turn end and the first token, + first audio).",
        "",
        "| scenario | turns | v2v p50 | v2v p95 | v2v p99 | overhead p50 | overhead p95 | overhead p99 "
        "| CPU %/session | RSS MiB/session | replies with gaps | gap ms max | errors | callers / fakes CPU % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["scenarios"]:
        v, o = r["voice_to_voice_ms"], r["overhead_ms"] or {}
        lines.append(
            f"| {r['scenario']} | {r['turns']} | {_f(v['p50'])} | {_f(v['p95'])} | {_f(v['p99'])} "
            f"| {_f(o.get('p50'))} | {_f(o.get('p95'))} | {_f(o.get('p99'))} | {_f(r['cpu_pct_per_session'], 2)} "
            f"| {_f(r['rss_per_session_mib'], 1)} | {r['replies_with_gaps']} | {_f(r['gap_ms_max'], 0)} "
            f"| {r['error_rate']:.2%} "
            f"| {_f(r.get('callers_cpu_pct_of_core'), 0)} / {_f(r.get('fakes_cpu_pct_of_core'), 0)} |"
        )
    lines += [
        "",
        "Per stage as Atlas recorded it (ms, p50 / p95 / p99):",
        "",
        "| scenario | STT | LLM first token | TTS first audio | v2v leaving the server |",
        "|---|---|---|---|---|",
    ]
    for r in results["scenarios"]:
        st = r.get("stages_ms") or {}
        if not st:
            continue
        cells = [
            " / ".join(_f(st.get(k, {}).get(q)) for q in ("p50", "p95", "p99"))
            for k in ("stt", "llm_ttfb", "tts_ttfa", "server_v2v")
        ]
        lines.append(f"| {r['scenario']} | " + " | ".join(cells) + " |")
    ends = [r for r in results["scenarios"] if r.get("turn_end")]
    if ends:
        lines += [
            "",
            "Turn end and preemptive replies per scenario (preemption figures from Atlas's voice_turns: replies asked "
            "for before the turn ended, withdrawn requests, and their input tokens against the replies'):",
            "",
            "| scenario | turn end | vendors' share ms | preempted | withdrawn per 100 turns | extra input tokens |",
            "|---|---|---|---|---|---|",
        ]
        for r in ends:
            pre = r.get("preemption") or {}
            share = pre.get("preempted_share")
            extra = pre.get("extra_input_tokens_pct")
            lines.append(
                f"| {r['scenario']} | {_turn_end(r['turn_end'])} | {_f(r.get('injected_ms'))} "
                f"| {'-' if share is None else f'{share:.0%}'} | {_f(pre.get('withdrawn_per_100_turns'), 1)} "
                f"| {'-' if extra is None else f'{extra}%'} |"
            )
    calls = [r for r in results["scenarios"] if r.get("v2v_by_part_ms")]
    if calls:
        lines += [
            "",
            "Calls of 12 turns (the offline scenarios): voice-to-voice of turns 1-5 and of turns 6-12 (the 10-message "
            "window full), and the prompt tokens per turn the LLM was sent and evaluated (not taken from its cache):",
            "",
            "| scenario | calls done | v2v p50 / p95, turns 1-5 | v2v p50 / p95, turns 6-12 | tokens sent / evaluated, "
            "turns 1-5 | tokens sent / evaluated, turns 6-12 | CPU % of a core per call |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in calls:
            parts = list(r["v2v_by_part_ms"].values())
            tokens = list((r.get("prompt_tokens_per_turn") or {}).values()) or [{}, {}]
            lines.append(
                f"| {r['scenario']} | {r['calls_completed']} of {r['sessions']} "
                + " ".join(f"| {_f(p['p50'])} / {_f(p['p95'])}" for p in parts)
                + " "
                + " ".join(f"| {_f(t.get('sent'))} / {_f(t.get('evaluated'))}" for t in tokens)
                + f" | {_f(r['cpu_pct_per_session'], 1)} |"
            )
        fit = [r["sessions"] for r in calls if not r["env"].keys() - {"ATLAS_LLM_SLOTS"} and _under(r, 4000)]
        lines += [
            "",
            f"Concurrent offline calls with every turn's p95 under 4 s: {max(fit) if fit else 'none'} "
            f"(of {sorted({r['sessions'] for r in calls})} run).",
        ]
    if results.get("atlas_vs_bare"):
        lines += [
            "",
            "Atlas / bare Pipecat on the Twilio door (below 1 = Atlas smaller):",
            "",
            "| sessions | overhead p50 | overhead p95 | CPU per session | RSS per session | error rates |",
            "|---|---|---|---|---|---|",
        ]
        for c in results["atlas_vs_bare"]:
            lines.append(
                f"| {c['sessions']} | {_f(c['overhead_p50_ratio'], 2)} | {_f(c['overhead_p95_ratio'], 2)} "
                f"| {_f(c['cpu_per_session_ratio'], 2)} | {_f(c['rss_per_session_ratio'], 2)} "
                f"| {c['error_rate'][0]:.2%} / {c['error_rate'][1]:.2%} |"
            )
    if results.get("flood_vs_plain"):
        lines += [
            "",
            "Honest callers with a client flooding /ws with audio as fast as it can beside them, "
            "reconnecting whenever it is cut off (bench/flood.py), against the same run without it:",
            "",
            "| scenario | v2v p50 plain / flood | v2v p95 plain / flood | p95 ratio | errors plain / flood "
            "| the flooder |",
            "|---|---|---|---|---|---|",
        ]
        for c in results["flood_vs_plain"]:
            f = c["flood"] or {}

            def counts(d):
                return ", ".join(f"{k} {v}" for k, v in (d or {}).items()) or "none"

            lines.append(
                f"| {c['scenario']} | {_f(c['p50_ms'][0])} / {_f(c['p50_ms'][1])} "
                f"| {_f(c['p95_ms'][0])} / {_f(c['p95_ms'][1])} | {_f(c['p95_ratio'], 3)} "
                f"| {c['error_rate'][0]:.2%} / {c['error_rate'][1]:.2%} | {f.get('messages')} messages "
                f"({f.get('audio_offered_s')} s of audio) in {f.get('seconds')} s over {f.get('sessions')} "
                f"sessions, {_f(f.get('stt_seconds'), 1)} s of it to the STT; sessions ended: "
                f"{counts(f.get('end_reasons'))}; refused: {counts(f.get('refused'))}; told: "
                f"{counts(f.get('errors'))} |"
            )
    soaks = [r for r in results["scenarios"] if r.get("rss_growth")]
    if soaks:
        lines += [
            "",
            "Memory over long runs (median RSS of the first and the last minute of the steady part):",
            "",
            "| scenario | minutes | first minute MiB | last minute MiB | growth |",
            "|---|---|---|---|---|",
        ]
        for r in soaks:
            g = r["rss_growth"]
            lines.append(
                f"| {r['scenario']} | {g['minutes']} | {g['first_minute_mib']} | {g['last_minute_mib']} "
                f"| {g['growth_pct']:+.2f}% |"
            )
    errors = {r["scenario"]: r["errors"] for r in results["scenarios"] if r["errors"]}
    if errors:
        lines += ["", "Errors by code: " + "; ".join(f"{k}: {v}" for k, v in errors.items())]
    return "\n".join(lines) + "\n"


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["scenarios"]
    names = [r["scenario"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, max(3.5, 0.45 * len(rows) + 1.5)))
    y = range(len(rows))
    ax = axes[0]
    for q, color in (("p99", "#f2b8b5"), ("p95", "#e06c5f"), ("p50", "#8c2d25")):
        ax.barh(y, [r["voice_to_voice_ms"][q] or 0 for r in rows], color=color, label=f"v2v {q}")
    ax.set_yticks(list(y), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("voice-to-voice at the client (ms)")
    ax.legend(fontsize=8)
    ax = axes[1]
    for q, color in (("p99", "#b5d3f2"), ("p95", "#5f8fe0"), ("p50", "#254f8c")):
        ax.barh(y, [(r["overhead_ms"] or {}).get(q) or 0 for r in rows], color=color, label=f"overhead {q}")
    ax.set_yticks(list(y), [])
    ax.invert_yaxis()
    ax.set_xlabel("server overhead (ms)")
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.barh(
        [i - 0.2 for i in y],
        [r["cpu_pct_per_session"] or 0 for r in rows],
        height=0.4,
        color="#6a9f58",
        label="CPU % of a core per session",
    )
    ax.barh(
        [i + 0.2 for i in y],
        [r["rss_per_session_mib"] or 0 for r in rows],
        height=0.4,
        color="#c9a227",
        label="RSS MiB per session",
    )
    ax.set_yticks(list(y), [])
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    fig.suptitle(f"Atlas Voice benchmark, {results['started']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(results: dict, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md", out / f"{name}.png"]
    paths[0].write_text(json.dumps(results, indent=1) + "\n")
    paths[1].write_text(markdown(results))
    chart(results, paths[2])
    return paths
