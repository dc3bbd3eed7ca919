"""`atlas-voice bench`: N simulated callers against a real server process, vendors faked with scripted latency.

For each scenario (server x door x sessions) it starts a fresh server process (Atlas, or the bare Pipecat
bot of bench/bare_pipecat.py), warms it up with one call, then runs N callers (bench/callers.py) for
`duration` seconds while sampling the server's CPU and RSS from /proc once a second. The vendor fakes
(bench/vendors.py) run in a process of their own for the whole run.

Figures per scenario (turns counted once the last caller has joined, so ramp-up does not flatter them):
- voice-to-voice at the client, p50/p95/p99;
- server overhead = voice-to-voice - (VAD stop + scripted STT final + first token + first audio), the time
  the server itself adds to a turn (with the default exact delays the subtraction is exact);
- per stage p50/p95/p99 as Atlas recorded them (voice_turns in its SQLite file: STT, LLM first token,
  TTS first audio, voice-to-voice leaving the server);
- CPU: % of one core per session in steady state; RSS per added session over the warmed-up idle server;
- audible gaps (the reply's jitter buffer ran dry) per reply and in total; error rate = turns without a
  reply, plus calls refused or dropped, over turns.

The offline scenario runs Atlas with no keys (Whisper, the local LLM, Piper): no scripted delays, so it
reports voice-to-voice and the stages as measured, not an overhead.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
QUESTIONS = [
    "What is the quickest way to the old harbour from the station?",
    "Can you book me a table for two at eight thirty tonight?",
    "How long does the ferry to the island take in the morning?",
    "Is the museum open on Sunday afternoons?",
]
# The phone door's credentials on the Atlas server under test: callers come through its signed webhook.
TWILIO_TOKEN = "bench-twilio-auth-token"
TWILIO_ACCOUNT = "AC" + "b" * 32
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Scenario:
    server: str  # "atlas" | "bare" | "offline"
    door: str  # "ws" | "twilio"
    sessions: int
    duration: float
    env: dict[str, str] = field(default_factory=dict)
    label: str = ""
    flood: bool = False  # a flooding client (bench/flood.py) hammers /ws while the callers talk
    turns: int | None = None  # each caller makes one call of this many turns (duration is then unused)

    @property
    def name(self) -> str:
        return self.label or f"{self.server}-{self.door}-{self.sessions}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values, q) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(np.percentile(values, q)), 1) if values else None


def _stats(values) -> dict:
    values = [v for v in values if v is not None]
    return {
        "n": len(values),
        "p50": _pct(values, 50),
        "p95": _pct(values, 95),
        "p99": _pct(values, 99),
        "mean": round(float(np.mean(values)), 1) if values else None,
    }


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    from importlib.metadata import version

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pipecat": version("pipecat-ai"),
        "note": "server, vendor fakes and callers share these cores",
    }


class ProcSampler:
    """CPU seconds and RSS of one process (and its children), read from /proc."""

    def __init__(self, pid: int):
        self.pid = pid

    def _pids(self) -> list[int]:
        pids = [self.pid]
        try:
            for task in Path(f"/proc/{self.pid}/task").iterdir():
                children = Path(f"/proc/{self.pid}/task/{task.name}/children").read_text().split()
                pids += [int(c) for c in children]
        except OSError:
            pass
        return pids

    def sample(self) -> tuple[float, float]:
        cpu = rss = 0.0
        for pid in self._pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cpu += (int(fields[11]) + int(fields[12])) / TICKS
                rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20
            except (OSError, IndexError, ValueError):
                pass
        return cpu, rss


class Vendors:
    """The fake vendors' process (bench/vendors.py)."""

    def __init__(self, script: dict):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.vendors", json.dumps(script)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the vendor fakes did not start")
        self.urls = json.loads(line)

    def close(self) -> dict:
        """Stop the fakes; returns their closing report (fault counts, connections, requests)."""
        self.proc.stdin.close()
        line = self.proc.stdout.readline()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        try:
            return json.loads(line) if line.strip() else {}
        except ValueError:
            return {}


class Server:
    """A server under test in its own process."""

    def __init__(self, scenario: Scenario, env: dict[str, str], workdir: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.sqlite = workdir / f"{scenario.name}.sqlite"
        self.log = workdir / f"{scenario.name}.log"
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "ATLAS_LOG_LEVEL": "WARNING",
            "ATLAS_PORT": str(self.port),
            "ATLAS_MAX_SESSIONS": str(scenario.sessions + 10),
            "ATLAS_SQLITE_PATH": str(self.sqlite),
            "ATLAS_OUTBOX_PATH": str(workdir / f"{scenario.name}.outbox"),
            "ATLAS_ALERT_ACTIVE_SESSIONS": "100000",
            "ATLAS_WORKERS": "1",  # one process unless the scenario says otherwise (--workers-compare)
            "ATLAS_DRAIN_SECS": "0",
            "SUPABASE_URL": "",
            # every simulated caller comes from 127.0.0.1: the per-IP abuse limits would refuse them
            "ATLAS_MAX_SESSIONS_PER_IP": "0",
            "ATLAS_SESSION_STARTS_PER_MINUTE_PER_IP": "0",
            "ATLAS_MAX_SESSIONS_PER_USER": "0",
            "ATLAS_SESSION_STARTS_PER_MINUTE_PER_USER": "0",
            "ATLAS_MAX_PENDING_PER_IP": "0",
            "TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
            "TWILIO_ACCOUNT_SID": TWILIO_ACCOUNT,
            # hang-ups (only when the bot ends a call) go nowhere: there is no Twilio here
            "TWILIO_API_BASE_URL": "http://127.0.0.1:9",
            **env,
            **scenario.env,
        }
        self.bare = scenario.server == "bare"
        if self.bare:
            cmd = [sys.executable, "-m", "bench.bare_pipecat", "--port", str(self.port)]
        else:
            cmd = [sys.executable, "-m", "app.cli", "serve", "--port", str(self.port)]
        self._logf = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._logf, stderr=subprocess.STDOUT)
        self.sampler = ProcSampler(self.proc.pid)

    async def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited ({self.proc.returncode}); see {self.log}")
                try:
                    # Atlas's /readyz waits for every worker; bare Pipecat has /healthz only.
                    path = "/healthz" if self.bare else "/readyz"
                    async with http.get(self.url + path) as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.25)
        raise TimeoutError(f"the server was not ready in {timeout:.0f}s; see {self.log}")

    def ws_url(self, door: str) -> str:
        return self.url.replace("http://", "ws://") + ("/ws" if door == "ws" else "/twilio/ws")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()


def atlas_stages(path: Path, since: str) -> dict:
    """Per-stage latency as Atlas recorded it (its SQLite voice_turns), for turns created after `since`."""
    if not path.exists():
        return {}
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT stt_latency_ms, llm_ttfb_ms, tts_ttfa_ms, voice_to_voice_ms FROM voice_turns WHERE created_at >= ?",
            (since,),
        ).fetchall()
    cols = list(zip(*rows, strict=False)) if rows else [[], [], [], []]
    return {name: _stats(col) for name, col in zip(("stt", "llm_ttfb", "tts_ttfa", "server_v2v"), cols, strict=False)}


def atlas_preemption(path: Path, since: str) -> dict | None:
    """What preemptive replies did and cost (voice_turns, turns created after `since`): replies asked for
    before the turn ended, withdrawn requests per 100 turns, and their input tokens against the input
    tokens of the replies."""
    if not path.exists():
        return None
    with sqlite3.connect(path) as db:
        turns, kept, withdrawn, extra, tokens = db.execute(
            "SELECT count(*), coalesce(sum(preempted), 0), coalesce(sum(preempt_cancelled), 0), "
            "coalesce(sum(preempt_input_tokens), 0), coalesce(sum(llm_input_tokens), 0) "
            "FROM voice_turns WHERE created_at >= ?",
            (since,),
        ).fetchone()
    if not turns:
        return None
    return {
        "turns": turns,
        "preempted_share": round(kept / turns, 3),
        "withdrawn_per_100_turns": round(100 * withdrawn / turns, 1),
        "withdrawn_input_tokens": extra,
        "input_tokens": tokens,
        "extra_input_tokens_pct": round(100 * extra / tokens, 1) if tokens else None,
    }


def call_parts(sc: Scenario, records, path: Path, since: str) -> dict:
    """For calls of `sc.turns` turns: voice-to-voice of turns 1-5 and of turns 6 on (the window full), and the
    prompt tokens the LLM evaluated per turn, from voice_turns (llama-server's usage: prompt tokens, of which
    `cached_tokens` came from the slot's cache; evaluated = the rest)."""
    parts = {"turns_1_5": (0, 5), f"turns_6_{sc.turns}": (5, sc.turns or 0)}
    out: dict = {
        "v2v_by_part_ms": {
            name: _stats([t.v2v_ms for r in records for t in r.turns if lo <= t.index < hi])
            for name, (lo, hi) in parts.items()
        },
        "calls_completed": sum(1 for r in records if len(r.turns) == sc.turns),
    }
    if not path.exists():
        return out
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT turn_index, llm_input_tokens, llm_cache_read_tokens FROM voice_turns WHERE created_at >= ?",
            (since,),
        ).fetchall()
    out["prompt_tokens_per_turn"] = {
        name: {
            "sent": _mean([sent for i, sent, _ in rows if lo <= i < hi]),
            "evaluated": _mean([sent - cached for i, sent, cached in rows if lo <= i < hi]),
        }
        for name, (lo, hi) in parts.items()
    }
    return out


def _mean(values) -> float | None:
    return round(float(np.mean(values)), 1) if values else None


async def run_scenario(
    sc: Scenario,
    env: dict[str, str],
    utterances,
    workdir: Path,
    script: dict | None,
    turn_wait: dict,
    progress=None,
    profile: bool = False,
    fakes_pid: int | None = None,
) -> dict:
    from bench.callers import Caller, frames_for

    server = Server(sc, env, workdir)
    profiler = None
    try:
        await server.wait_ready()
        frames = frames_for(utterances, sc.door)
        url = server.ws_url(sc.door)
        twilio = (TWILIO_TOKEN, TWILIO_ACCOUNT) if sc.server != "bare" else None
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            # warm-up: one call of two turns (first requests, caches, lazy imports), not counted
            warm = await Caller(-1, sc.door, url, frames, http, reply_timeout=60, twilio=twilio).run(
                time.monotonic() + 120, max_turns=2
            )
            if not warm.turns or warm.turns[0].first_audio is None:
                raise RuntimeError(
                    f"the warm-up call got no reply ({warm.errors}, {warm.turns}, {warm.session_end}); see {server.log}"
                )
            await asyncio.sleep(2)
            idle_cpu, idle_rss = server.sampler.sample()
            since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
            ramp = min(10.0, 0.1 * sc.sessions)
            start = time.monotonic()
            # a call of `sc.turns` turns ends when they are done (a minute a turn bounds a stuck call)
            until = start + ramp + (sc.turns * 60 if sc.turns else sc.duration)
            callers = [Caller(i, sc.door, url, frames, http, twilio=twilio) for i in range(sc.sessions)]
            flooder = None
            if sc.flood:
                flooder = subprocess.Popen(
                    [sys.executable, "-m", "bench.flood", server.ws_url("ws"), str(until - start)],
                    cwd=REPO,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            tasks = []
            for caller in callers:
                tasks.append(asyncio.create_task(caller.run(until, offset=random.uniform(0, 3), max_turns=sc.turns)))
                if sc.sessions > 1:
                    await asyncio.sleep(ramp / sc.sessions)
            steady_from = time.monotonic()
            # The callers (this process) and the vendor fakes share the machine with the server: their CPU too.
            fakes = ProcSampler(fakes_pid) if fakes_pid else None
            others_from = (time.process_time(), fakes.sample()[0] if fakes else 0.0)
            profiler = start_profile(server, workdir / f"{sc.name}.pyspy.txt", until - steady_from) if profile else None
            samples = []  # (t, cpu seconds, rss MiB)
            while not all(t.done() for t in tasks):
                cpu, rss = server.sampler.sample()
                samples.append((time.monotonic(), cpu, rss))
                if progress is not None:
                    progress(sum(len(c.record.turns) for c in callers))
                await asyncio.wait(tasks, timeout=1.0)
            records = [t.result() for t in tasks]
            span = max(1e-6, time.monotonic() - steady_from)
            others = {
                "callers_cpu_pct_of_core": round((time.process_time() - others_from[0]) / span * 100, 1),
                "fakes_cpu_pct_of_core": round((fakes.sample()[0] - others_from[1]) / span * 100, 1) if fakes else None,
            }
            flood_stats = None
            if flooder is not None:
                out, _ = await asyncio.to_thread(flooder.communicate, timeout=60)
                flood_stats = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"error": "no report"}
    finally:
        server.stop()
    result = summarize(
        sc,
        records,
        samples,
        steady_from,
        until,
        idle_rss,
        script,
        turn_wait,
        atlas_stages(server.sqlite, since) if sc.server != "bare" else {},
        atlas_preemption(server.sqlite, since) if sc.server != "bare" else None,
    )
    result.update(others)
    if sc.turns:
        result.update(call_parts(sc, records, server.sqlite, since))
    if profiler is not None:
        profiler.wait(60)
        result["profile"] = profile_summary(workdir / f"{sc.name}.pyspy.txt")
    if sc.flood:
        result["flood"] = flood_stats
    return result


def start_profile(server: Server, out: Path, seconds: float) -> subprocess.Popen | None:
    """py-spy samples the server (all threads, 100 Hz) for the steady part of the scenario."""
    import shutil

    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("  (py-spy is not installed: pip install py-spy; no profile)")
        return None
    return subprocess.Popen(
        [
            spy,
            "record",
            "-p",
            str(server.proc.pid),
            "-d",
            str(max(1, int(seconds))),
            "-r",
            "100",
            "-f",
            "raw",
            "-o",
            str(out),
            "--nonblocking",
            "--subprocesses",  # with --workers: every worker
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def profile_summary(path: Path, top: int = 25) -> dict:
    """Self time by function and inclusive time by package, from py-spy's collapsed stacks."""
    if not path.exists():
        return {}
    own: dict[str, int] = {}
    package: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf = frames[-1]
        own[leaf] = own.get(leaf, 0) + n
        seen = set()
        for f in frames:
            where = f.split("(", 1)[-1].rstrip(")")
            pkg = (
                where.split("site-packages/", 1)[-1].split("/", 1)[0]
                if "site-packages/" in where
                else where.split("/work/", 1)[-1].split("/")[1]
                if "/work/" in where
                else where.split(":")[0]
            )
            if pkg not in seen:
                seen.add(pkg)
                package[pkg] = package.get(pkg, 0) + n

    def pct(d):
        return [(k, round(v * 100 / total, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": total, "self_pct": pct(own), "package_inclusive_pct": pct(package)}


def summarize(
    sc: Scenario,
    records,
    samples,
    steady_from: float,
    until: float,
    idle_rss: float,
    script: dict | None,
    turn_wait: dict,
    stages: dict,
    preemption: dict | None = None,
) -> dict:
    from bench.vendors import VendorScript

    turns = [t for r in records for t in r.turns if t.speech_end >= steady_from]
    v2v = [t.v2v_ms for t in turns]
    injected = None
    if script is not None:
        injected = VendorScript(**script).injected(turn_wait) * 1000
    overhead = [v - injected for v in v2v if v is not None] if injected is not None else []
    steady = [s for s in samples if steady_from <= s[0] <= until]
    cpu_pct = None
    if len(steady) >= 2:
        cpu_pct = (steady[-1][1] - steady[0][1]) / (steady[-1][0] - steady[0][0]) * 100
    peak_rss = max((s[2] for s in samples), default=idle_rss)
    errors: dict[str, int] = {}
    for r in records:
        for code, n in r.errors.items():
            errors[code] = errors.get(code, 0) + n
    for t in turns:
        if t.error:
            errors[t.error] = errors.get(t.error, 0) + 1
    failed_turns = sum(1 for t in turns if t.first_audio is None)
    failed_calls = sum(1 for r in records if not r.turns)
    replied = [t for t in turns if t.first_audio is not None]
    return {
        "scenario": sc.name,
        "server": sc.server,
        "door": sc.door,
        "sessions": sc.sessions,
        "duration_s": sc.duration,
        "env": sc.env,
        "turns": len(turns),
        "turns_all": sum(len(r.turns) for r in records),
        "voice_to_voice_ms": _stats(v2v),
        "injected_ms": injected,
        "overhead_ms": _stats(overhead) if overhead else None,
        "stages_ms": stages,
        "turn_end": turn_wait,
        "preemption": preemption,
        "cpu_pct_of_core": round(cpu_pct, 1) if cpu_pct is not None else None,
        "cpu_pct_per_session": round(cpu_pct / sc.sessions, 2) if cpu_pct is not None else None,
        "rss_idle_mib": round(idle_rss, 1),
        "rss_peak_mib": round(peak_rss, 1),
        "rss_per_session_mib": round((peak_rss - idle_rss) / sc.sessions, 2),
        "replies_with_gaps": sum(1 for t in replied if t.gaps),
        "gaps": sum(t.gaps for t in replied),
        "gap_ms_total": round(sum(t.gap_secs for t in replied) * 1000, 1),
        "gap_ms_max": round(max((t.gap_secs for t in replied), default=0) * 1000, 1),
        "reply_secs_mean": round(float(np.mean([t.reply_secs for t in replied])), 2) if replied else None,
        "errors": errors,
        "error_rate": round((failed_turns + failed_calls) / max(1, len(turns) + failed_calls), 4),
        "rss_growth": rss_growth(steady),
        "rss_series": [(round(s[0] - steady_from, 1), round(s[2], 1)) for s in samples],
    }


def rss_growth(steady: list[tuple[float, float, float]], window: float = 60.0) -> dict | None:
    """Memory growth over a long scenario (the soak): median RSS over the first `window` seconds of the
    steady part against the median over the last `window` seconds. None when the run is shorter than
    three windows (too short to tell growth from the load's own swing)."""
    if len(steady) < 2 or steady[-1][0] - steady[0][0] < 3 * window:
        return None
    t0, t1 = steady[0][0], steady[-1][0]
    first = float(np.median([r for t, _, r in steady if t <= t0 + window]))
    last = float(np.median([r for t, _, r in steady if t >= t1 - window]))
    return {
        "first_minute_mib": round(first, 1),
        "last_minute_mib": round(last, 1),
        "growth_pct": round((last - first) / first * 100, 2),
        "minutes": round((t1 - t0) / 60, 1),
    }


def build_scenarios(args) -> list[Scenario]:
    from config.settings import Settings

    out = []
    for n in args.sessions:
        for door in args.doors:
            out.append(Scenario("atlas", door, n, args.duration))
            if args.flood_compare:
                # The flooder comes from its own address, so the per-IP limits (off for the callers, who all
                # share 127.0.0.1) apply to it at their defaults.
                limits = {
                    "ATLAS_MAX_SESSIONS_PER_IP": "20",
                    "ATLAS_SESSION_STARTS_PER_MINUTE_PER_IP": "60",
                    "ATLAS_MAX_PENDING_PER_IP": "10",
                }
                out.append(
                    Scenario("atlas", door, n, args.duration, env=limits, label=f"atlas-{door}-{n}-flood", flood=True)
                )
            for workers in args.workers_compare:
                out.append(
                    Scenario(
                        "atlas",
                        door,
                        n,
                        args.duration,
                        env={"ATLAS_WORKERS": str(workers)},
                        label=f"atlas-{door}-{n}-w{workers}",
                    )
                )
            if args.turn_compare:
                for env, suffix in ((FIXED_TURN_END, "fixed"), ({"ATLAS_PREEMPT": "0"}, "no-preempt")):
                    out.append(Scenario("atlas", door, n, args.duration, env=env, label=f"atlas-{door}-{n}-{suffix}"))
            if args.first_clause_compare:
                out.append(
                    Scenario(
                        "atlas",
                        door,
                        n,
                        args.duration,
                        env={"ATLAS_FIRST_CLAUSE_WORDS": "0"},
                        label=f"atlas-{door}-{n}-no-first-clause",
                    )
                )
        if args.bare:
            out.append(Scenario("bare", "twilio", n, args.duration))
    if args.offline:
        # Offline calls of OFFLINE_TURNS turns: the window fills at turn 6, so turns 6-12 are counted apart.
        for n in args.offline_sessions:
            # every caller gets a slot (past the default, ATLAS_LLM_SLOTS would refuse the extra callers)
            slots = {"ATLAS_LLM_SLOTS": str(n)} if n > Settings().llm_slots else {}
            out.append(Scenario("offline", "ws", n, 0, env=slots, turns=OFFLINE_TURNS, label=f"offline-ws-{n}"))
            if args.cache_compare:
                env = {**slots, "ATLAS_LLM_CACHE_REUSE_TOKENS": "0"}
                out.append(
                    Scenario("offline", "ws", n, 0, env=env, turns=OFFLINE_TURNS, label=f"offline-ws-{n}-no-reuse")
                )
            if args.turn_compare:
                env = {**slots, **FIXED_TURN_END}
                out.append(Scenario("offline", "ws", n, 0, env=env, turns=OFFLINE_TURNS, label=f"offline-ws-{n}-fixed"))
    if args.soak:
        out.append(Scenario("atlas", "ws", args.soak_sessions, args.soak * 60, label=f"soak-ws-{args.soak_sessions}"))
    return out


# Turns of one offline call: the 10-message window is full from the 6th turn on.
OFFLINE_TURNS = 12

# Today's turn end before preemption (the fixed 1.0 s), for `--turn-compare`.
FIXED_TURN_END = {"ATLAS_TURN_END": "fixed", "ATLAS_PREEMPT": "0"}


async def run(args) -> dict:
    from tqdm import tqdm

    from bench.callers import make_utterances
    from bench.vendors import VendorScript, turn_end_setting, vendor_env
    from config.settings import Settings

    script = VendorScript(
        stt_delay=args.stt_delay,
        llm_delay=args.llm_delay,
        llm_tps=args.llm_tps,
        tts_delay=args.tts_delay,
        jitter=args.jitter,
    )
    # the default turn end as the cloud scenarios run it (Deepgram: the rule's 0.2 s VAD stop)
    turn_wait = turn_end_setting(Settings(**{"ATLAS_STT": "deepgram", "DEEPGRAM_API_KEY": "bench"}))
    scenarios = build_scenarios(args)
    utterances = await asyncio.to_thread(make_utterances, QUESTIONS)
    results = {
        "machine": machine(),
        "script": asdict(script),
        "turn_end": turn_wait,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "scenarios": [],
    }
    vendors = Vendors(asdict(script)) if any(sc.server != "offline" for sc in scenarios) else None
    try:
        with tempfile.TemporaryDirectory(prefix="atlas-bench-") as tmp:
            workdir = Path(args.keep_logs) if args.keep_logs else Path(tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            for sc in scenarios:
                est = (
                    sc.sessions * sc.turns
                    if sc.turns
                    else int(sc.sessions * (sc.duration + min(10, 0.1 * sc.sessions)) / 9)
                )
                bar = tqdm(total=est, desc=f"{sc.name:<34}", unit="turn", leave=True, dynamic_ncols=True)

                def progress(n, bar=bar):
                    bar.n = n
                    bar.refresh()

                offline = sc.server == "offline"
                if offline:
                    env = {"ATLAS_STT": "whisper", "ATLAS_LLM": "llama", "ATLAS_TTS": "piper"}
                else:
                    env = {**vendor_env(vendors.urls), "ATLAS_LLM_FALLBACK": "apology"}
                # the scenario's own turn end (its env may change it), for the vendors' share of each turn
                # (the bare Pipecat bot has Pipecat's own stop strategy: the fixed turn end)
                sc_turn = turn_end_setting(Settings(**env, **(FIXED_TURN_END if sc.server == "bare" else sc.env)))
                res = await run_scenario(
                    sc,
                    env,
                    utterances,
                    workdir,
                    None if offline else asdict(script),
                    sc_turn,
                    progress,
                    args.profile,
                    None if offline else vendors.proc.pid,
                )
                bar.close()
                results["scenarios"].append(res)
                print(_one_line(res), flush=True)
    finally:
        if vendors is not None:
            vendors.close()
    _ratios(results)
    _flood_ratios(results)
    return results


def _flood_ratios(results: dict) -> None:
    """Honest callers' voice-to-voice with a flooding connection beside them, against the same scenario
    without it (the flood scenario runs right after its twin, in the same run)."""
    plain = {r["scenario"]: r for r in results["scenarios"] if not r.get("flood")}
    out = []
    for r in results["scenarios"]:
        base = plain.get(r["scenario"].removesuffix("-flood")) if r.get("flood") else None
        if base is None:
            continue
        v, b = r["voice_to_voice_ms"], base["voice_to_voice_ms"]
        out.append(
            {
                "scenario": r["scenario"],
                "sessions": r["sessions"],
                "p50_ms": [b["p50"], v["p50"]],
                "p95_ms": [b["p95"], v["p95"]],
                "p95_ratio": round(v["p95"] / b["p95"], 3) if v["p95"] and b["p95"] else None,
                "error_rate": [base["error_rate"], r["error_rate"]],
                "flood": r["flood"],
            }
        )
    if out:
        results["flood_vs_plain"] = out


def _ratios(results: dict) -> None:
    """Atlas's overhead, CPU and memory per session against bare Pipecat's, at the same session count."""
    by = {(r["server"], r["door"], r["sessions"], bool(r["env"])): r for r in results["scenarios"]}
    out = []
    for (server, door, n, custom), r in by.items():
        bare = by.get(("bare", "twilio", n, False))
        if server != "atlas" or door != "twilio" or custom or bare is None:
            continue

        def ratio(a, b):
            return round(a / b, 2) if a is not None and b not in (None, 0) else None

        ov, bov = r["overhead_ms"] or {}, bare["overhead_ms"] or {}
        out.append(
            {
                "sessions": n,
                "overhead_p50_ratio": ratio(ov.get("p50"), bov.get("p50")),
                "overhead_p95_ratio": ratio(ov.get("p95"), bov.get("p95")),
                "cpu_per_session_ratio": ratio(r["cpu_pct_per_session"], bare["cpu_pct_per_session"]),
                "rss_per_session_ratio": ratio(r["rss_per_session_mib"], bare["rss_per_session_mib"]),
                "error_rate": [r["error_rate"], bare["error_rate"]],
            }
        )
    results["atlas_vs_bare"] = out


def _one_line(r: dict) -> str:
    v, o = r["voice_to_voice_ms"], r["overhead_ms"] or {}
    return (
        f"  {r['scenario']}: {r['turns']} turns, v2v p50 {v['p50']} p95 {v['p95']} ms, overhead p95 "
        f"{o.get('p95')} ms, cpu {r['cpu_pct_per_session']}%/session, rss {r['rss_per_session_mib']} MiB/session, "
        f"gaps {r['gaps']}, errors {r['error_rate']:.2%}; the callers took {r.get('callers_cpu_pct_of_core')}% and "
        f"the fakes {r.get('fakes_cpu_pct_of_core')}% of a core"
    )


def main(argv: list[str] | None = None) -> int:
    import argparse

    from bench.report import write_reports

    parser = argparse.ArgumentParser(prog="atlas-voice bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sessions",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[1, 25, 100],
        help="comma-separated concurrent session counts (default 1,25,100; '' for none: the offline scenarios only)",
    )
    parser.add_argument(
        "--doors", type=lambda s: s.split(","), default=["ws", "twilio"], help="ws, twilio or both (default ws,twilio)"
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds each scenario runs (default 60)")
    parser.add_argument(
        "--turn-compare",
        action="store_true",
        help="also run each Atlas scenario (and the offline one) with the fixed 1.0 s turn end and no preemptive "
        "replies (`-fixed`), and with the turn-end rule but no preemption (`-no-preempt`)",
    )
    parser.add_argument(
        "--no-bare", dest="bare", action="store_false", help="skip the bare Pipecat comparison (on the Twilio door)"
    )
    parser.add_argument(
        "--no-offline", dest="offline", action="store_false", help="skip the offline default (local engines, 1 session)"
    )
    parser.add_argument(
        "--offline-sessions",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1],
        metavar="N[,N...]",
        help=f"concurrent offline calls of {OFFLINE_TURNS} turns each (default 1; e.g. 1,2,3,4 finds how many keep "
        "p95 under 4 s)",
    )
    parser.add_argument(
        "--cache-compare",
        action="store_true",
        help="also run each offline scenario with llama-server's cache reuse off (ATLAS_LLM_CACHE_REUSE_TOKENS=0)",
    )
    parser.add_argument(
        "--first-clause-compare",
        action="store_true",
        help="also run each Atlas scenario with the first-clause TTS start off",
    )
    parser.add_argument(
        "--flood-compare",
        action="store_true",
        help="also run each Atlas scenario with a client flooding /ws with audio as fast as it can, "
        "reconnecting whenever it is cut off (bench/flood.py), and compare the honest callers' "
        "latency",
    )
    parser.add_argument(
        "--workers-compare",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[],
        metavar="N[,N...]",
        help="also run each Atlas scenario with `serve --workers N` (e.g. 2); the others run one process",
    )
    parser.add_argument(
        "--soak",
        type=float,
        default=0,
        metavar="MINUTES",
        help="also run a soak: --soak-sessions callers on /ws for MINUTES (memory growth reported)",
    )
    parser.add_argument("--soak-sessions", type=int, default=20, help="sessions in the soak (default 20)")
    parser.add_argument("--stt-delay", type=float, default=0.3, help="Deepgram final after finalize (0.3 s)")
    parser.add_argument("--llm-delay", type=float, default=0.6, help="Claude first token (0.6 s)")
    parser.add_argument("--llm-tps", type=float, default=80.0, help="Claude tokens per second (80)")
    parser.add_argument("--tts-delay", type=float, default=0.2, help="ElevenLabs first audio (0.2 s)")
    parser.add_argument(
        "--jitter",
        type=float,
        default=0.0,
        help="log-normal spread of every vendor delay (coefficient of variation; default 0: exact)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample each server with py-spy in steady state; top functions go into the JSON",
    )
    parser.add_argument("--name", default=None, help="results file name (default bench-<UTC time>)")
    parser.add_argument("--out", default=str(RESULTS), help="results folder (default bench/results)")
    parser.add_argument("--keep-logs", default=None, help="keep server logs and databases in this folder")
    args = parser.parse_args(argv)
    for door in args.doors:
        if door not in ("ws", "twilio"):
            parser.error(f"unknown door {door!r} (ws, twilio)")
    results = asyncio.run(run(args))
    name = args.name or "bench-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    paths = write_reports(results, Path(args.out), name)
    print("results: " + ", ".join(str(p) for p in paths))
    bad = [r["scenario"] for r in results["scenarios"] if r["turns"] == 0]
    return 1 if bad else 0
