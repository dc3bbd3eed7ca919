"""`atlas-voice report`: the dashboard's figures as a plain-text table and a PNG chart.

Reads the recorded sessions and turns through the configured store (`storage.make_sink`: Supabase
when SUPABASE_URL is set, else the embedded SQLite file), summarizes them with
`monitoring.analytics.summarize` (the same code as the admin dashboard) and prints totals,
per-stage p50/p95 latency, cost per day and errors by code; then draws voice-to-voice p50/p95 and
per-stage p95 over time and cost per day into a PNG (matplotlib, Agg: no display needed).
"""

from __future__ import annotations

import asyncio
import math
import sys
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

from monitoring.analytics import STAGES, parse_since, parse_ts, summarize

STAGE_LABELS = {
    "stt": "STT",
    "llm_ttfb": "LLM first token",
    "tts_ttfa": "TTS first audio",
    "voice_to_voice": "voice-to-voice",
}


BUCKET_WORDS = {"hour": "hourly", "day": "daily"}


def _usd(v: float | None) -> str:
    return "-" if v is None else f"${v:.6f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.2f}%"


def format_report(summary: dict, *, since_label: str, store: str) -> str:
    t = summary["totals"]
    since = summary["since"] or "the first recorded session"
    lines = [
        f"Atlas Voice report: sessions since {since} ({since_label})",
        f"store: {store} | {BUCKET_WORDS[summary['bucket']]} buckets | generated {summary['generated_at']}",
        "",
        "Totals",
        f"  {'Sessions':<20}{t['sessions']:>14}   ({t['sessions_ended']} ended, {t['sessions_active']} in progress)",
        f"  {'Turns':<20}{t['turns']:>14}",
        f"  {'Total cost':<20}{_usd(t['total_cost_usd']):>14}",
        f"  {'Avg cost / session':<20}{_usd(t['avg_cost_per_session_usd']):>14}   (ended sessions)",
        f"  {'Errors':<20}{t['errors']:>14}   (turns with an error code; {t['error_messages']} error messages)",
        f"  {'Error rate':<20}{_pct(t['error_rate']):>14}   (of turns)",
        f"  {'Interruptions':<20}{t['interruptions']:>14}",
        f"  {'Audio minutes':<20}{t['audio_minutes']:>14.2f}",
        f"  {'Satisfied':<20}{_pct(t['satisfaction_rate']):>14}   (rated 4-5, of {t['ratings']} ratings; target > 85%)",
        f"  {'Reported an issue':<20}{_pct(t['issue_rate']):>14}   (rated 1-2; target < 5%)",
        "",
        f"{'Latency (ms)':<22}{'turns':>8}{'p50':>12}{'p95':>12}",
    ]
    for stage in STAGES:
        s = summary["stages"][stage]
        lines.append(f"  {stage:<20}{s['count']:>8}{_ms(s['p50']):>12}{_ms(s['p95']):>12}")
    lines += ["", f"{'Cost per day (UTC)':<22}{'sessions':>8}{'cost':>14}"]
    for day in summary["cost_per_day"]:
        lines.append(f"  {day['day']:<20}{day['sessions']:>8}{_usd(day['cost_usd']):>14}")
    if not summary["cost_per_day"]:
        lines.append("  (no sessions)")
    if summary["variants"]:
        lines += [
            "",
            "Rollout variants (ATLAS_ROLLOUT)",
            f"  {'variant':<14}{'sessions':>9}{'v2v p50':>10}{'v2v p95':>10}{'errors':>9}"
            f"{'cost/session':>14}{'satisfied':>11}{'issues':>9}{'ratings':>9}",
        ]
        for v in summary["variants"]:
            lines.append(
                f"  {v['variant']:<14}{v['sessions']:>9}{_ms(v['v2v_p50']):>10}{_ms(v['v2v_p95']):>10}"
                f"{_pct(v['error_rate']):>9}{_usd(v['avg_cost_per_session_usd']):>14}"
                f"{_pct(v['satisfaction_rate']):>11}{_pct(v['issue_rate']):>9}{v['ratings']:>9}"
            )
    lines += ["", f"{'Errors by code':<22}{'turns':>8}"]
    for e in summary["errors_by_code"]:
        lines.append(f"  {e['code']:<20}{e['count']:>8}")
    if not summary["errors_by_code"]:
        lines.append("  (none)")
    return "\n".join(lines)


def write_chart(summary: dict, path: Path, *, title: str) -> Path:
    """Voice-to-voice p50/p95 and per-stage p95 over time, and cost per day, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    from matplotlib.figure import Figure

    def nan(v):
        return math.nan if v is None else v

    series = summary["series"]
    xs = [parse_ts(b["start"]) for b in series]
    fig = Figure(figsize=(10, 10), dpi=100, layout="constrained")
    ax1, ax2, ax3 = fig.subplots(3, 1)
    fig.suptitle(title)
    marker = "o" if len(xs) < 50 else None

    ax1.plot(xs, [nan(b["p50"]["voice_to_voice"]) for b in series], marker=marker, label="p50", markersize=3)
    ax1.plot(
        xs, [nan(b["p95"]["voice_to_voice"]) for b in series], marker=marker, label="p95", markersize=3, linestyle="--"
    )
    ax1.set_title(f"Voice-to-voice latency per {summary['bucket']} (ms)")
    ax1.set_ylabel("ms")
    ax1.set_ylim(bottom=0)
    ax1.legend(loc="upper left")

    for stage in STAGES:
        ax2.plot(xs, [nan(b["p95"][stage]) for b in series], marker=marker, label=STAGE_LABELS[stage], markersize=3)
    ax2.set_title(f"p95 latency per stage per {summary['bucket']} (ms)")
    ax2.set_ylabel("ms")
    ax2.set_ylim(bottom=0)
    ax2.legend(loc="upper left", ncols=2)
    for ax in (ax1, ax2):
        locator = mdates.AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
        ax.set_xlabel("UTC")
        ax.grid(alpha=0.3)

    days = summary["cost_per_day"]
    labels = [d["day"] for d in days]
    costs = [d["cost_usd"] for d in days]
    ax3.bar(range(len(days)), costs, color="#e8710a")
    ax3.set_xticks(
        range(len(days)), labels, rotation=30 if len(days) > 7 else 0, ha="right" if len(days) > 7 else "center"
    )
    if len(days) > 31:
        for i, label in enumerate(ax3.get_xticklabels()):
            label.set_visible(i % math.ceil(len(days) / 31) == 0)
    ax3.set_title("Cost per day (USD, UTC days)")
    ax3.set_ylabel("USD")
    ax3.grid(alpha=0.3, axis="y")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _store_description(settings) -> str:
    if settings.supabase_url:
        return f"supabase {urlparse(settings.supabase_url).hostname or settings.supabase_url}"
    return f"sqlite {settings.resolved_sqlite_path}"


async def _fetch(settings, since_iso: str | None) -> tuple[list[dict], list[dict], list[dict]]:
    from storage import make_sink

    sink = make_sink(settings)
    try:
        return (
            await sink.fetch("voice_sessions", since_iso),
            await sink.fetch("voice_turns", since_iso),
            await sink.fetch("voice_feedback", since_iso),
        )
    finally:
        await sink.close()


def run_report(since: str = "24h", png: str | Path = "report.png", bucket: str | None = None) -> int:
    from config.settings import Settings

    try:
        since_iso = parse_since(since)
    except ValueError as e:
        print(f"atlas-voice report: {e}", file=sys.stderr)
        return 2
    since_text = since_iso or "the beginning"
    settings = Settings()
    store = _store_description(settings)
    if not settings.supabase_url and not settings.resolved_sqlite_path.exists():
        print(f"no sessions since {since_text}: nothing has been recorded yet ({store} does not exist)")
        return 0
    try:
        sessions, turns, feedback = asyncio.run(_fetch(settings, since_iso))
    except Exception as e:
        print(
            f"atlas-voice report: could not read the session store ({store}): {type(e).__name__}: {e}", file=sys.stderr
        )
        return 1
    if not sessions and not turns:
        print(f"no sessions since {since_text} ({since}) in {store}")
        return 0
    summary = summarize(sessions, turns, bucket, feedback=feedback, since=since_iso, now=datetime.now(UTC))
    print(format_report(summary, since_label=since or "all", store=store))
    start = f"since {parse_ts(since_iso):%Y-%m-%d %H:%M} UTC" if since_iso else "all recorded"
    path = write_chart(
        summary,
        Path(png),
        title=f"Atlas Voice: {summary['totals']['sessions']} sessions, {summary['totals']['turns']} turns, {start}",
    )
    print(f"\nChart: {path.resolve()}")
    return 0
