"""`atlas-voice`: serve, doctor, talk, daily, models, report, export, outbox, bench, fuzz."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys


def _configure_logging(level: str, fmt: str = "text") -> None:
    from config.logging import configure_logging

    configure_logging(level, fmt)


def cmd_serve(args) -> int:
    from config.settings import get_settings

    settings = get_settings()
    _configure_logging(settings.log_level, settings.log_format)
    host = args.host or settings.host
    try:
        settings.check_exposure(host)
        from bots.agents import load_agent_config
        from bots.rollout import rollout_from_settings

        agents = load_agent_config(settings)  # a bad agent file or tool module stops here, before anything starts
        rollout_from_settings(settings, agents)  # and so does a rollout naming no agent of it
    except ValueError as e:
        print(f"atlas-voice serve: {e}", file=sys.stderr)
        return 2
    port = args.port or settings.port
    workers = args.workers if args.workers is not None else settings.resolved_workers
    if workers > 1:  # the supervisor imports no engine, Pipecat or app code: each worker does
        from app.workers import serve_workers

        serve_workers(settings, host, port, workers, agents)
    else:
        from app.server import serve

        serve(settings, host, port)
    return 0


def cmd_doctor(args) -> int:
    from app.doctor import run_doctor

    return run_doctor(args.host, args.port)


def cmd_talk(args) -> int:
    from app.talk import run_talk

    return asyncio.run(run_talk(args.url, args.wav, args.repeat, args.out, args.timeout, args.agent, args.speed))


def cmd_models(args) -> int:
    from config.settings import get_settings
    from services.local import models

    settings = get_settings()
    if args.no_llm:
        print("LLM: none (--no-llm: a cloud LLM only)")
    else:
        path = models.resolve_llm_path(settings.llm_model_path, settings.cache_dir, progress=True)
        print(f"LLM: {path} (sha256 ok)")
    print(f"Whisper: {models.verified_whisper_dir(settings.cache_dir)} (sha256 ok)")
    print(f"Piper voice: {models.verified_piper_dir(settings.cache_dir) / (models.PIPER_VOICE + '.onnx')} (sha256 ok)")
    return 0


def cmd_daily(args) -> int:
    """Create a Daily room, print its URL and a user token, and run the bot in it until the session ends."""
    from config.settings import get_settings

    settings = get_settings()
    _configure_logging(settings.log_level, settings.log_format)
    if not settings.daily_api_key:
        print("atlas-voice daily needs DAILY_API_KEY", file=sys.stderr)
        return 2

    async def run() -> int:
        from bots.runtime import Runtime
        from bots.session import Caller
        from services.daily.rooms import DailyAPIError
        from transports.daily.door import start_daily_session

        runtime = await Runtime.start(settings)
        try:
            runtime.admit()
            try:
                room, session = await start_daily_session(
                    runtime, Caller(client_user_id="atlas-voice-daily"), runtime.http()
                )
            except DailyAPIError as e:
                print(f"could not create the room: {e}", file=sys.stderr)
                return 1
            print(
                f"room:  {room.room_url}\ntoken: {room.user_token}\n(open {room.room_url}?t=<token> to talk)",
                flush=True,
            )
            await asyncio.gather(*runtime.tasks, return_exceptions=True)
            return 0
        finally:
            await runtime.close()

    return asyncio.run(run())


def cmd_report(args) -> int:
    # Warnings only: the report is for reading, not the engines' start-up chatter.
    _configure_logging("WARNING")
    from app.report import run_report

    return run_report(args.since, args.png, args.bucket)


def cmd_export(args) -> int:
    """One session's transcript (agents with store_transcripts), from the configured store (app/export.py)."""
    _configure_logging("WARNING")
    from app.export import run_export

    return run_export(args.session, args.format, args.out)


def cmd_rollout(args) -> int:
    """Show the rollout, or set ATLAS_ROLLOUT_FILE's (bots/rollout.py): running servers follow it within a second."""
    _configure_logging("WARNING")
    from bots.agents import load_agent_config
    from bots.rollout import rollout_from_settings, write_rollout_file
    from config.settings import get_settings

    settings = get_settings()
    try:
        agents = load_agent_config(settings)
        if args.action == "show":
            rollout = rollout_from_settings(settings, agents)
            where = settings.rollout_file or ("ATLAS_ROLLOUT" if settings.rollout.strip() else "no rollout set")
            print(f"{rollout.current()} ({where}); the rest: {agents.default} (control)")
            return 0
        if settings.rollout_file is None:
            print(
                "atlas-voice rollout set: set ATLAS_ROLLOUT_FILE (the file the servers read the rollout from) first",
                file=sys.stderr,
            )
            return 2
        split = write_rollout_file(settings.rollout_file, ",".join(args.split), agents)
    except ValueError as e:
        print(f"atlas-voice rollout: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"atlas-voice rollout: {settings.rollout_file}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"{split} written to {settings.rollout_file}; new sessions follow it (running servers look every second)")
    return 0


def cmd_outbox(args) -> int:
    """Dead letters: rows no store took, kept in the outbox file (storage/outbox.py)."""
    import json
    from datetime import UTC, datetime

    from config.settings import get_settings
    from monitoring.analytics import parse_duration
    from storage.outbox import OutboxFile

    settings = get_settings()
    path = settings.resolved_outbox_path
    if args.webhooks:
        from storage.webhooks import webhook_outbox_path

        path = webhook_outbox_path(settings)
    if not path.exists():
        print(f"no outbox at {path} (ATLAS_OUTBOX_PATH)", file=sys.stderr)
        return 1
    outbox = OutboxFile(path)
    try:
        if args.action == "list":
            letters = outbox.dead_letters(args.limit)
            if args.json:
                print(json.dumps([{**vars(d), "row_id": d.row_id} for d in letters], indent=1))
                return 0
            pending, dead = outbox.counts()
            print(f"{path}: {pending} pending writes, {dead} dead letters")
            for d in letters:
                when = datetime.fromtimestamp(d.dead_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
                print(f"  #{d.seq}  {when}  {d.table} {d.mode} row {d.row_id or '(not JSON)'}: {d.reason}")
            return 0
        seqs = None if args.all else [int(x) for x in args.seq]
        if seqs is not None and not seqs and not (args.action == "purge" and args.older_than):
            print(f"atlas-voice outbox {args.action}: name dead letters by number, or --all", file=sys.stderr)
            return 2
        if args.action == "retry":
            n = outbox.request_retry(seqs)
            print(f"{n} dead letters will be sent again (by the running server within seconds, else at its next start)")
            return 0
        older = None
        if args.older_than:
            try:
                older = parse_duration(args.older_than)
            except ValueError as e:
                print(f"--older-than {e}", file=sys.stderr)
                return 2
        n = outbox.purge(older_than_secs=older, seqs=seqs if not args.all and args.seq else None)
        print(f"{n} dead letters deleted")
        return 0
    finally:
        outbox.close()


def cmd_bench(bench_args: list[str]) -> int:
    """The benchmark harness (bench/): simulated callers against the vendor fakes (fakes/)."""
    commands = {"fuzz": "bench.fuzz", "faults": "bench.faults", "long": "bench.long", "turns": "bench.turns"}
    module_name = commands.get(bench_args[0]) if bench_args else None
    args = bench_args[1:] if module_name else bench_args
    try:
        import importlib

        module = importlib.import_module(module_name or "bench.run")
    except ImportError as e:
        print(
            f"atlas-voice {' '.join(bench_args[:1]) or 'bench'} needs the dev extras (pip install -e '.[dev]'): {e}",
            file=sys.stderr,
        )
        return 2
    return module.main(args)


def _version() -> str:
    """`atlas-voice 0.1.0 (Pipecat 1.14.0, Python 3.11.7)`: what a bug report needs first."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return f"atlas-voice {of('atlas-voice')} (Pipecat {of('pipecat-ai')}, Python {platform.python_version()})"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own argument parser (bench/run.py, bench/turns.py)
        return cmd_bench(argv[1:])
    if argv[:1] == ["fuzz"]:  # its own argument parser (bench/fuzz.py)
        return cmd_bench(argv)
    parser = argparse.ArgumentParser(prog="atlas-voice", description="Atlas Voice: a voice agent on Pipecat")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the server (browser page at /, voice at /ws)")
    p.add_argument("--host", default=None, help="default ATLAS_HOST or 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default ATLAS_PORT or 8000")
    p.add_argument(
        "--workers", type=int, default=None, help="worker processes (default ATLAS_WORKERS, or one per CPU core)"
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("doctor", help="check settings, keys, the port, engines and the store; say what to fix")
    p.add_argument("--host", default=None, help="the address serve would listen on (default ATLAS_HOST)")
    p.add_argument("--port", type=int, default=None, help="the port serve would listen on (default ATLAS_PORT)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("talk", help="speak WAV files to a server and measure voice-to-voice latency")
    p.add_argument("--wav", action="append", required=True, help="16-bit WAV to speak (repeatable)")
    p.add_argument("--url", default="ws://127.0.0.1:8000/ws")
    p.add_argument("--out", default=None, help="save all reply audio to this WAV")
    p.add_argument("--repeat", type=int, default=1, help="speak the list this many times")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each reply")
    p.add_argument("--agent", default=None, help="the server's agent to talk to (default: the server's default)")
    p.add_argument("--speed", type=float, default=None, help="the voice's speed, 0.7 to 1.2 (default: 1.0)")
    p.set_defaults(func=cmd_talk)

    p = sub.add_parser("daily", help="create a Daily room and run the bot in it (needs DAILY_API_KEY)")
    p.set_defaults(func=cmd_daily)

    p = sub.add_parser("models", help="assemble and verify the offline models (with progress)")
    p.add_argument(
        "--no-llm", action="store_true", help="leave out the local LLM (installed without it: ATLAS_LOCAL_LLM=0)"
    )
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("report", help="print session, latency, cost and error figures and write a PNG chart")
    p.add_argument("--since", default="24h", help="1h, 24h, 7d, 30d, an ISO 8601 time, or all (default 24h)")
    p.add_argument("--png", default="report.png", help="where to write the chart (default ./report.png)")
    p.add_argument(
        "--bucket",
        choices=["hour", "day"],
        default=None,
        help="time-series bucket (default: hour up to 48 h, else day)",
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="write one session's stored transcript as JSON or text")
    p.add_argument("--session", required=True, help="the session id (session_end's sessionId)")
    p.add_argument("--format", choices=["json", "text"], default="json", help="default json")
    p.add_argument("--out", default=None, help="write to this file (default: standard output)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("rollout", help="show the rollout of variants, or set it (ATLAS_ROLLOUT_FILE) with no restart")
    p.add_argument("action", choices=["show", "set"])
    p.add_argument("split", nargs="*", help='set: variant=percent items, e.g. "v2=50" (none: no variant)')
    p.set_defaults(func=cmd_rollout)

    p = sub.add_parser("outbox", help="rows no store took (dead letters): list, send again, or delete them")
    p.add_argument("action", choices=["list", "retry", "purge"])
    p.add_argument("seq", nargs="*", help="dead letter numbers (from `list`)")
    p.add_argument("--all", action="store_true", help="every dead letter")
    p.add_argument("--older-than", default=None, help="purge: those dead longer than this (e.g. 7d)")
    p.add_argument("--limit", type=int, default=None, help="list: at most this many")
    p.add_argument("--json", action="store_true", help="list: as JSON")
    p.add_argument("--webhooks", action="store_true", help="the session.ended webhooks' outbox, not the rows'")
    p.set_defaults(func=cmd_outbox)

    p = sub.add_parser(
        "bench",
        add_help=False,
        help="benchmark: simulated callers against fake vendors (`bench --help`; `bench turns`)",
    )
    p.set_defaults(func=lambda args: cmd_bench([]))

    p = sub.add_parser(
        "fuzz",
        add_help=False,
        help="property-based fuzzing of the /ws protocol (`fuzz --help`; 100,000 frames by default)",
    )
    p.set_defaults(func=lambda args: cmd_bench(["fuzz"]))

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
