"""`atlas-voice bench long`: one call kept open for 30 minutes, turn after turn (issue 7: the spec's socket
stays open 10+ minutes).

One simulated caller on /ws against the scripted vendor fakes (bench/vendors.py) talks for `--minutes`
without hanging up. Reported, first part of the call against the last:
- server RSS (median of the first and the last `--window` minutes): steady memory;
- voice-to-voice at the client (p50 of the first and the last `--window` minutes): no growth per turn;
- what each Claude request carried (messages and bytes): the context window keeps it flat (the system
  prompt plus at most ATLAS_CONTEXT_MESSAGES messages).

Results: bench/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import aiohttp

from bench.run import QUESTIONS, RESULTS, Scenario, Server, Vendors, _stats, machine


async def run(args) -> dict:
    from bench.callers import Caller, frames_for, make_utterances
    from bench.vendors import VendorScript, vendor_env

    script = VendorScript()
    vendors = Vendors(asdict(script))
    workdir = Path(tempfile.mkdtemp(prefix="atlas-long-"))
    env = {**vendor_env(vendors.urls), "ATLAS_LLM_FALLBACK": "apology"}
    server = Server(Scenario("atlas", "ws", 1, args.minutes * 60, label=args.name), env, workdir)
    rss: list[tuple[float, float]] = []
    try:
        await server.wait_ready()
        frames = frames_for(make_utterances(QUESTIONS), "ws")
        async with aiohttp.ClientSession() as http:
            start = time.monotonic()
            until = start + args.minutes * 60
            caller = Caller(0, "ws", server.ws_url("ws"), frames, http, reply_timeout=20)
            task = asyncio.create_task(caller.run(until))
            while not task.done():
                rss.append((time.monotonic() - start, server.sampler.sample()[1]))
                print(
                    f"\r  {rss[-1][0] / 60:5.1f} min  {len(caller.record.turns)} turns  RSS {rss[-1][1]:.1f} MiB",
                    end="",
                    flush=True,
                )
                await asyncio.wait([task], timeout=1.0)
            print(flush=True)
            record = task.result()
    finally:
        server.stop()
        report = vendors.close()
    window = args.window * 60
    total = args.minutes * 60
    turns = [(t.speech_end - record.started, t) for t in record.turns]
    first = [t.v2v_ms for at, t in turns if at < window and t.v2v_ms is not None]
    last = [t.v2v_ms for at, t in turns if at > total - window and t.v2v_ms is not None]
    rss_first = statistics.median(v for at, v in rss if at < window)
    rss_last = statistics.median(v for at, v in rss if at > total - window)
    sizes = report.get("anthropic_request_sizes", [])
    return {
        "name": args.name,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "minutes": args.minutes,
        "window_minutes": args.window,
        "vendors": asdict(script),
        "session_end": record.session_end is not None,
        "client_errors": record.errors,
        "turns": len(record.turns),
        "turns_without_reply": sum(t.first_audio is None for t in record.turns),
        "v2v_ms": _stats([t.v2v_ms for t in record.turns]),
        "v2v_p50_first_ms": round(statistics.median(first), 1) if first else None,
        "v2v_p50_last_ms": round(statistics.median(last), 1) if last else None,
        "rss_first_mib": round(rss_first, 1),
        "rss_last_mib": round(rss_last, 1),
        "rss_growth_pct": round(100 * (rss_last - rss_first) / rss_first, 2),
        "llm_requests": len(sizes),
        "llm_messages_max": max((m for m, _ in sizes), default=0),
        "llm_bytes_first": sizes[0][1] if sizes else 0,
        "llm_bytes_max": max((b for _, b in sizes), default=0),
        "llm_bytes_last": sizes[-1][1] if sizes else 0,
        "llm_messages_by_request": [m for m, _ in sizes],
        "rss_mib_by_second": [round(v, 1) for _, v in rss],
        "v2v_ms_by_turn": [None if t.v2v_ms is None else round(t.v2v_ms, 1) for t in record.turns],
    }


def markdown(r: dict) -> str:
    m = r["machine"]
    w = r["window_minutes"]
    return "\n".join(
        [
            f"# Atlas Voice: one {r['minutes']:g}-minute call ({r['date']})",
            "",
            f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, "
            f"Pipecat {m['pipecat']}. Scripted vendors (bench/vendors.py defaults), one caller on /ws talking "
            f"turn after turn without hanging up.",
            "",
            f"| figure | first {w:g} min | last {w:g} min | whole call |",
            "|---|---|---|---|",
            f"| server RSS (median) | {r['rss_first_mib']} MiB | {r['rss_last_mib']} MiB "
            f"| growth {r['rss_growth_pct']}% |",
            f"| voice-to-voice p50 at the client | {r['v2v_p50_first_ms']} ms | {r['v2v_p50_last_ms']} ms | "
            f"p50 {r['v2v_ms']['p50']} / p95 {r['v2v_ms']['p95']} ms over {r['turns']} turns |",
            f"| Claude request size | {r['llm_bytes_first']} bytes (first) | {r['llm_bytes_last']} bytes (last) | "
            f"at most {r['llm_bytes_max']} bytes, {r['llm_messages_max']} messages, "
            f"over {r['llm_requests']} requests |",
            "",
            f"Turns without a reply: {r['turns_without_reply']}; client errors: {r['client_errors'] or 'none'}; "
            f"session_end received: {r['session_end']}.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="atlas-voice bench long", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--window", type=float, default=3.0, help="minutes compared at the start and the end")
    p.add_argument("--name", default=f"long-call-{time.strftime('%Y-%m-%d')}")
    args = p.parse_args(argv)
    res = asyncio.run(run(args))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (RESULTS / f"{args.name}.md").write_text(md)
    print(md)
    print(f"results: {RESULTS / args.name}.{{json,md}}")
    return 0 if res["turns_without_reply"] == 0 and res["session_end"] else 1


if __name__ == "__main__":
    sys.exit(main())
