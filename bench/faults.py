"""`atlas-voice bench faults`: calls under load while the vendors, the database and the clients fail.

Defaults (issue 7): 50 concurrent callers on /ws for 5 minutes, each placing calls of 3 turns one after
another; Deepgram drops 10% of its streams (TCP abort, no close frame, 1-20 s of audio in), Claude answers
529 to 5% of requests and stalls 2% (10 s after `message_start`), ElevenLabs cuts 5% of its replies
(connection aborted 0.2-2 s of audio in), the database (Postgres behind the PostgREST-compatible endpoint
of fakes/supabase_local, through the real supabase client) is stopped for 30 s one minute in, and 1% of
calls vanish: their TCP connection is aborted at a random moment, without a WebSocket close.

After the calls it waits for the outbox to drain, scrapes /metrics, stops the server with SIGTERM and
reads the database directly. Reported:
- calls that completed every turn with reply audio (vanished calls apart: they leave on purpose);
- rows: every call has exactly one `voice_sessions` row, ended; every call that got `session_end` has
  exactly the turn rows it was told (`metrics.turns`); a vanished call's rows match its own
  `turns_count`; no (session, turn) twice;
- each injected fault next to where it shows: `atlas_errors_total` by code, `atlas_provider_retries_total`,
  `atlas_outbox_failures_total`, sessions ended by reason.

Needs Debian's postgresql (installed by `scripts/quickstart.sh test`). Results: bench/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import aiohttp

from bench.harness import metric_samples
from bench.run import QUESTIONS, RESULTS, Scenario, Server, Vendors, _stats, machine


def _by_label(samples: dict, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (metric, labels), value in samples.items():
        if metric == name and value:
            key = dict(labels).get(label, "")
            out[key] = out.get(key, 0) + value
    return out


async def _caller_slot(
    index: int, url: str, frames, http, until: float, turns: int, vanish: float, records: list, outcomes: list
) -> None:
    """One line of calls: call after call until `until`; a `vanish` share of them drop off mid-call."""
    from bench.callers import Caller

    n = 0
    while time.monotonic() < until - 5:
        caller = Caller(index * 1000 + n, "ws", url, frames, http, reply_timeout=25)
        n += 1
        vanished = random.random() < vanish
        handle = None
        if vanished:

            def abort(c=caller):
                conn = getattr(c.ws, "_conn", None) if c.ws is not None else None
                if conn is not None and conn.transport is not None:
                    conn.transport.abort()  # the network is gone: no close frame, nothing more

            handle = asyncio.get_running_loop().call_later(random.uniform(3, 25), abort)
        record = await caller.run(until, offset=random.uniform(0, 1), max_turns=turns)
        if handle is not None:
            handle.cancel()
        records.append(record)
        outcomes.append(vanished)


async def run(args) -> dict:
    from bench.callers import frames_for, make_utterances
    from bench.vendors import VendorScript, vendor_env
    from fakes.supabase_local.stack import Stack

    script = VendorScript(
        stt_drop=args.stt_drop, llm_overload=args.llm_overload, llm_stall=args.llm_stall, tts_fail=args.tts_fail
    )
    print("starting Postgres + the PostgREST-compatible endpoint, the vendor fakes, the server ...", flush=True)
    stack = Stack().start()
    vendors = Vendors(asdict(script))
    workdir = Path(tempfile.mkdtemp(prefix="atlas-faults-"))
    env = {
        **vendor_env(vendors.urls),
        "ATLAS_LLM_FALLBACK": "apology",
        "SUPABASE_URL": stack.api.url,
        "SUPABASE_SERVICE_ROLE_KEY": stack.api.service_key,
        "ATLAS_DB_TIMEOUT_SECS": "2",
        "ATLAS_OUTBOX_MAX_BACKOFF_SECS": "5",
        "ATLAS_LOG_LEVEL": "INFO",
    }
    server = Server(Scenario("atlas", "ws", args.sessions, args.minutes * 60, label=args.name), env, workdir)
    vendor_report: dict = {}
    records: list = []
    vanished: list = []
    outage: dict = {}
    try:
        await server.wait_ready()
        frames = frames_for(make_utterances(QUESTIONS), "ws")
        url = server.ws_url("ws")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            start = time.monotonic()
            until = start + args.minutes * 60

            async def database_outage():
                await asyncio.sleep(args.outage_at)
                outage["stopped_at_s"] = round(time.monotonic() - start, 1)
                await asyncio.to_thread(stack.pg.stop)
                await asyncio.sleep(args.outage)
                await asyncio.to_thread(stack.pg.start)
                outage["restarted_at_s"] = round(time.monotonic() - start, 1)

            outage_task = asyncio.create_task(database_outage()) if args.outage else None
            slots = []
            for i in range(args.sessions):
                slots.append(
                    asyncio.create_task(
                        _caller_slot(i, url, frames, http, until, args.turns, args.vanish, records, vanished)
                    )
                )
                await asyncio.sleep(10 / args.sessions)
            while not all(t.done() for t in slots):
                done = sum(len(r.turns) for r in records)
                print(
                    f"\r  {time.monotonic() - start:5.0f} s  {len(records)} calls done, {done} turns",
                    end="",
                    flush=True,
                )
                await asyncio.wait(slots, timeout=5)
            print(flush=True)
            for t in slots:
                t.result()
            if outage_task is not None:
                await outage_task
            # The outbox drains once the database is back: wait for it, then read the server's counters.
            deadline = time.monotonic() + 180
            while True:
                async with http.get(server.url + "/metrics") as r:
                    samples = metric_samples(await r.text())
                pending = sum(_by_label(samples, "atlas_outbox_pending", "sink").values())
                if pending == 0 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(1)
    finally:
        server.stop()
        vendor_report = vendors.close()
    try:
        result = _summarize(args, script, records, vanished, samples, stack, vendor_report, outage, pending)
    finally:
        stack.stop()
    result["server_log"] = str(server.log)
    return result


def _summarize(args, script, records, vanished, samples, stack, vendor_report, outage, pending) -> dict:
    calls = [(r, v) for r, v in zip(records, vanished, strict=False)]
    kept = [r for r, v in calls if not v]
    gone = [r for r, v in calls if v]

    def complete(r) -> bool:
        return (
            r.session_id is not None
            and r.session_end is not None
            and bool(r.turns)
            and all(t.first_audio is not None and t.error is None for t in r.turns)
        )

    ok = [r for r in kept if complete(r)]
    failed = [
        {
            "session": r.session_id,
            "errors": r.errors,
            "turns": [(t.first_audio is not None, t.error) for t in r.turns],
            "session_end": r.session_end is not None,
        }
        for r in kept
        if not complete(r)
    ]

    rows = {
        sid: (ended, turns_count)
        for sid, ended, turns_count in stack.pg.execute(
            "select id::text, ended_at is not null, turns_count from public.voice_sessions"
        )
    }
    turn_rows: dict[str, int] = {
        sid: n
        for sid, n in stack.pg.execute("select session_id::text, count(*) from public.voice_turns group by session_id")
    }
    twice = stack.pg.execute(
        "select count(*) from (select session_id, turn_index from public.voice_turns "
        "group by 1, 2 having count(*) > 1) d"
    )[0][0]
    lost_sessions, lost_turns, extra_turns, not_ended = [], 0, 0, []
    for r, _v in calls:
        if r.session_id is None:
            continue
        if r.session_id not in rows:
            lost_sessions.append(r.session_id)
            continue
        ended, turns_count = rows[r.session_id]
        if not ended:
            not_ended.append(r.session_id)
        expected = r.session_end["metrics"]["turns"] if r.session_end else turns_count
        got = turn_rows.get(r.session_id, 0)
        lost_turns += max(0, expected - got)
        extra_turns += max(0, got - expected)
    all_turns = [t for r in kept for t in r.turns]
    errors = _by_label(samples, "atlas_errors_total", "code")
    return {
        "name": args.name,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "params": {
            "sessions": args.sessions,
            "minutes": args.minutes,
            "turns_per_call": args.turns,
            "vanish": args.vanish,
            "db_outage_s": args.outage,
            "db_outage_at_s": args.outage_at,
            "vendors": asdict(script),
        },
        "calls": {
            "total": len(calls),
            "vanished": len(gone),
            "kept": len(kept),
            "complete": len(ok),
            "complete_pct": round(100 * len(ok) / max(len(kept), 1), 2),
            "failed": failed[:20],
        },
        "turns": {
            "total": len(all_turns),
            "with_audio": sum(t.first_audio is not None for t in all_turns),
            "v2v_ms": _stats([t.v2v_ms for t in all_turns]),
        },
        "rows": {
            "sessions_expected": sum(r.session_id is not None for r, _ in calls),
            "sessions_found": sum(r.session_id in rows for r, _ in calls if r.session_id),
            "sessions_lost": len(lost_sessions),
            "sessions_not_ended": len(not_ended),
            "turns_lost": lost_turns,
            "turns_extra": extra_turns,
            "turns_twice": twice,
            "outbox_pending_at_end": pending,
        },
        "injected": vendor_report,
        "db_outage": outage,
        "seen": {
            "errors_by_code": errors,
            "provider_retries": _by_label(samples, "atlas_provider_retries_total", "reason"),
            "outbox_failures": sum(_by_label(samples, "atlas_outbox_failures_total", "sink").values()),
            "sessions_ended_by_reason": _by_label(samples, "atlas_sessions_ended_total", "end_reason"),
        },
    }


def markdown(res: dict) -> str:
    p, c, t, rows, inj, seen = res["params"], res["calls"], res["turns"], res["rows"], res["injected"], res["seen"]
    m = res["machine"]
    v = p["vendors"]
    dg, an, el = inj.get("deepgram", {}), inj.get("anthropic", {}), inj.get("elevenlabs", {})
    errors = seen["errors_by_code"]
    lines = [
        f"# Atlas Voice under faults ({res['date']})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, "
        f"Pipecat {m['pipecat']} (server, fakes, Postgres and callers share these cores).",
        "",
        f"{p['sessions']} concurrent callers on /ws for {p['minutes']:g} min, calls of {p['turns_per_call']} turns "
        f"back to back. Faults: Deepgram drops {v['stt_drop']:.0%} of streams, Claude 529 on {v['llm_overload']:.0%} "
        f"and stalls {v['llm_stall']:.0%} ({v['llm_stall_secs']:g} s), "
        f"ElevenLabs cuts {v['tts_fail']:.0%} of replies, "
        f"the database is down {p['db_outage_s']:g} s from {p['db_outage_at_s']:g} s, "
        f"{p['vanish']:.0%} of calls vanish.",
        "",
        "| result | value | target |",
        "|---|---|---|",
        f"| calls completing every turn with audio | {c['complete']} of {c['kept']} ({c['complete_pct']}%), "
        f"{c['vanished']} vanished calls apart | >= 99% |",
        f"| turns with reply audio | {t['with_audio']} of {t['total']}; v2v p50 {t['v2v_ms']['p50']} ms, "
        f"p95 {t['v2v_ms']['p95']} ms | |",
        f"| session rows | {rows['sessions_found']} of {rows['sessions_expected']} calls, "
        f"{rows['sessions_not_ended']} not ended | all, once |",
        f"| turn rows | lost {rows['turns_lost']}, extra {rows['turns_extra']}, twice {rows['turns_twice']}; "
        f"outbox pending at the end {rows['outbox_pending_at_end']:g} | 0 |",
        "",
        "| fault injected | times | where it shows |",
        "|---|---|---|",
        f"| Deepgram stream given a drop point (a call may end before it) | {dg.get('stt_drop', 0)} of "
        f"{dg.get('takes', 0)} streams | "
        f"`STT_RECONNECTING` errors: {errors.get('STT_RECONNECTING', 0):g} |",
        f"| Claude 529 | {an.get('llm_529', 0)} of {an.get('takes', 0)} requests | retries by reason: "
        f"{', '.join(f'{k} {v:g}' for k, v in seen['provider_retries'].items()) or 'none'}; "
        f"`LLM_UNAVAILABLE`: {errors.get('LLM_UNAVAILABLE', 0):g} |",
        f"| Claude stall | {an.get('llm_stall', 0)} | (same) |",
        f"| ElevenLabs reply given a cut point | {el.get('tts_fail', 0)} of {el.get('takes', 0)} contexts | "
        f"`TTS_FALLBACK` errors: {errors.get('TTS_FALLBACK', 0):g} |",
        f"| database down {p['db_outage_s']:g} s | {res['db_outage']} | `atlas_outbox_failures_total` "
        f"{seen['outbox_failures']:g} |",
        f"| calls vanished | {c['vanished']} | sessions ended by reason: "
        f"{', '.join(f'{k} {v:g}' for k, v in seen['sessions_ended_by_reason'].items())} |",
        "",
        f"All `error` codes sent: {', '.join(f'{k} {v:g}' for k, v in sorted(errors.items())) or 'none'}.",
    ]
    if c["failed"]:
        lines += ["", "Calls that did not complete (first 20):", ""]
        lines += [
            f"- `{f['session']}`: errors {f['errors']}, turns (audio, error) {f['turns']}, "
            f"session_end {f['session_end']}"
            for f in c["failed"]
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="atlas-voice bench faults", description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=50)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--turns", type=int, default=3, help="turns per call")
    p.add_argument("--stt-drop", type=float, default=0.10)
    p.add_argument("--llm-overload", type=float, default=0.05)
    p.add_argument("--llm-stall", type=float, default=0.02)
    p.add_argument("--tts-fail", type=float, default=0.05)
    p.add_argument("--vanish", type=float, default=0.01, help="share of calls whose connection is aborted")
    p.add_argument("--outage", type=float, default=30.0, help="seconds the database is down (0: never)")
    p.add_argument("--outage-at", type=float, default=60.0, help="when the outage starts (s)")
    p.add_argument("--name", default=f"faults-{time.strftime('%Y-%m-%d')}")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS, help="where the results go (default bench/results)")
    args = p.parse_args(argv)
    random.seed(args.seed)
    res = asyncio.run(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(res, indent=2, default=str))
    md = markdown(res)
    (args.out / f"{args.name}.md").write_text(md)
    print(md)
    print(f"results: {args.out / args.name}.{{json,md}}; server log: {res['server_log']}")
    rows = res["rows"]
    good = (
        res["calls"]["complete_pct"] >= 99
        and not rows["sessions_lost"]
        and not rows["turns_lost"]
        and not rows["turns_extra"]
        and not rows["turns_twice"]
    )
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
