"""Property-based fuzzing of the /ws protocol: `atlas-voice fuzz` (the long run) and tests/test_fuzz.py
(a short one). The phone door (`/twilio/ws`) has its own generators in bench/fuzz_phone.py; `main` runs both.

Two layers, both with hypothesis:
- in process, fast: frame sequences (text and binary, valid, almost valid and garbage) through the
  code the server runs on every client frame: `parse_before_start` until a session starts, then a
  session's `AtlasProtocolSerializer`. Properties: nothing raises, no frame takes over a second,
  every rejection is an `error` with a code documented in docs/PROTOCOL.md, audio frames that pass
  are whole 16 kHz samples, muted audio passes as silence, a second `session_start` is refused.
- on the wire: sequences sent to a running server over real WebSockets (the handshake and session
  state machine as deployed). Properties: every `error` code and every close code is documented,
  each sequence ends with `session_end` (or a documented close), and the server stays healthy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent
PROTOCOL_DOC = REPO / "docs" / "PROTOCOL.md"

MAX_AUDIO = 16384  # the server's defaults (docs/PROTOCOL.md)
MAX_TEXT = 8192


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    rest = text[start + len(heading) :]
    end = re.search(r"^#{2,3} ", rest, re.M)
    return rest[: end.start()] if end else rest


def documented_error_codes() -> set[str]:
    """The codes in the `error` table of docs/PROTOCOL.md."""
    return set(re.findall(r"^\| `([A-Z_]+)` \|", _section(PROTOCOL_DOC.read_text(), "### `error`"), re.M))


def documented_close_codes() -> set[int]:
    return {int(c) for c in re.findall(r"^\| (\d{4}) \|", _section(PROTOCOL_DOC.read_text(), "## Close codes"), re.M)}


# --- what a client might send ------------------------------------------------------------------

_ids = st.one_of(
    st.text(max_size=20),
    st.text(min_size=250, max_size=300),
    st.integers(),
    st.none(),
    st.lists(st.text(max_size=3), max_size=2),
)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_types = st.one_of(
    st.sampled_from(["session_start", "mute", "unmute", "interrupt", "session_stop"]),
    st.sampled_from(["", "audio", "SESSION_START", "ping", "session_end"]),
    st.text(max_size=50),
    _json_values,
)
_messages = st.fixed_dictionaries(
    {"type": _types},
    optional={"userId": _ids, "conversationId": _ids, "authToken": _ids, "extra": _json_values},
)
_valid_start = st.builds(
    lambda u, c: {"type": "session_start", "userId": u, "conversationId": c},
    st.text(min_size=1, max_size=30),
    st.text(min_size=1, max_size=30),
)


@st.composite
def _texts(draw) -> str:
    kind = draw(st.integers(0, 9))
    if kind <= 4:
        return json.dumps(draw(_messages))
    if kind == 5:
        return json.dumps(draw(_valid_start))
    if kind == 6:
        return json.dumps(draw(_json_values))
    if kind == 7:  # almost JSON
        text = json.dumps(draw(_messages))
        cut = draw(st.integers(0, len(text)))
        return text[:cut] + draw(st.text(max_size=5))
    if kind == 8:  # over the text limit, or nested past Python's recursion limit
        return draw(
            st.sampled_from(
                [
                    '{"type": "mute", "pad": "' + "x" * MAX_TEXT + '"}',
                    "[" * 3000 + "]" * 3000,
                    '{"a":' * 1300 + "1" + "}" * 1300,
                ]
            )
        )
    return draw(st.text(max_size=200))


def _binaries(max_size: int):
    return st.one_of(
        st.binary(max_size=2000),
        st.integers(0, 1000).map(lambda n: bytes(2 * n + 1)),  # odd length
        st.integers(0, 50).map(lambda n: b"\x01\x02" * (160 * n)),  # whole samples, any length
        st.integers(MAX_AUDIO + 1, max(MAX_AUDIO + 2, min(max_size, MAX_AUDIO + 4000))).map(bytes),  # too large
    )


def frames(max_size: int = MAX_AUDIO + 4000):
    return st.one_of(_texts(), _binaries(max_size))


def sequences(max_frames: int = 30, max_size: int = MAX_AUDIO + 4000):
    return st.lists(frames(max_size), min_size=1, max_size=max_frames)


# --- in process ----------------------------------------------------------------------------------


@dataclass
class FuzzStats:
    messages: int = 0
    sequences: int = 0
    sessions_started: int = 0
    slowest_ms: float = 0.0
    codes: dict[str, int] = field(default_factory=dict)
    close_codes: dict[int, int] = field(default_factory=dict)

    def count(self, code: str) -> None:
        self.codes[code] = self.codes.get(code, 0) + 1


async def _check_sequence(seq: list, documented: set[str], stats: FuzzStats) -> None:
    from pipecat.frames.frames import (
        InputAudioRawFrame,
        InterruptionFrame,
        OutputTransportMessageUrgentFrame,
    )

    from transports.websocket.protocol import parse_before_start
    from transports.websocket.serializer import AtlasProtocolSerializer
    from vocabulary.errors import ErrorCode, ProtocolError

    serializer = None
    stopped = False

    async def on_stop():
        nonlocal stopped
        stopped = True

    def rejected(code: str, message: str) -> None:
        assert code in documented, f"undocumented error code {code!r}"
        assert isinstance(message, str) and message, f"{code} without a message"
        stats.count(code)

    stats.sequences += 1
    for data in seq:
        if stopped:
            return  # the server ends the session here
        stats.messages += 1
        t0 = time.perf_counter()
        if serializer is None:
            try:
                parse_before_start(data, MAX_AUDIO, MAX_TEXT)
                serializer = AtlasProtocolSerializer(
                    max_audio_bytes=MAX_AUDIO, max_text_bytes=MAX_TEXT, on_session_stop=on_stop
                )
                stats.sessions_started += 1
            except ProtocolError as e:
                rejected(str(e.code), e.message)
        else:
            muted = serializer.muted
            out = await serializer.deserialize(data)
            if isinstance(out, OutputTransportMessageUrgentFrame):
                assert out.message["type"] == "error", out.message
                rejected(out.message["code"], out.message["message"])
            elif isinstance(out, InputAudioRawFrame):
                assert isinstance(data, bytes)
                assert out.sample_rate == 16000 and out.num_channels == 1 and len(out.audio) % 2 == 0
                if muted:
                    assert not any(out.audio[-len(data) :]), "muted audio must pass as silence"
            elif isinstance(out, InterruptionFrame):
                assert '"interrupt"' in data
            else:
                assert out is None, out
            if isinstance(data, str):
                try:
                    msg = json.loads(data)
                except (ValueError, RecursionError):
                    msg = None
                if isinstance(msg, dict) and msg.get("type") == "session_start" and len(data) <= MAX_TEXT:
                    assert isinstance(out, OutputTransportMessageUrgentFrame)
                    assert out.message["code"] == ErrorCode.ALREADY_STARTED
        stats.slowest_ms = max(stats.slowest_ms, (time.perf_counter() - t0) * 1000)
        assert stats.slowest_ms < 1000, f"one frame took {stats.slowest_ms:.0f} ms"


def fuzz_in_process(messages: int, seed_value: int = 0, max_frames: int = 30, on_progress=None) -> FuzzStats:
    """Run generated frame sequences through the parser and serializer until `messages` frames went in."""
    documented = documented_error_codes()
    stats = FuzzStats()
    loop = asyncio.new_event_loop()
    chunk = 0
    try:
        while stats.messages < messages:

            @seed(seed_value + chunk)
            @settings(
                max_examples=500,
                deadline=None,
                database=None,
                derandomize=False,
                suppress_health_check=list(HealthCheck),
            )
            @given(sequences(max_frames))
            def run(seq):
                loop.run_until_complete(_check_sequence(seq, documented, stats))

            run()
            chunk += 1
            if on_progress:
                on_progress(stats)
    finally:
        loop.close()
    return stats


# --- on the wire --------------------------------------------------------------------------------


async def _wire_sequence(url: str, seq: list, documented: set[str], closes: set[int], stats: FuzzStats) -> None:
    import websockets

    errors: list[dict] = []
    ended = None
    async with websockets.connect(url, max_size=None) as ws:

        async def read():
            nonlocal ended
            async for raw in ws:
                if isinstance(raw, str):
                    msg = json.loads(raw)
                    if msg.get("type") == "error":
                        errors.append(msg)
                    elif msg.get("type") == "session_end":
                        ended = msg

        reader = asyncio.create_task(read())
        try:
            for data in seq:
                await ws.send(data)
                stats.messages += 1
            # Whatever state the sequence left: make sure a session exists, then end it.
            await ws.send(json.dumps({"type": "session_start", "userId": "fuzz", "conversationId": "fuzz"}))
            await ws.send(json.dumps({"type": "session_stop"}))
        except websockets.ConnectionClosed:
            pass
        try:
            await asyncio.wait_for(reader, 30)
        except TimeoutError:
            raise AssertionError(f"no close within 30 s after {len(seq)} frames") from None
        close = ws.close_code
    stats.sequences += 1
    stats.close_codes[close] = stats.close_codes.get(close, 0) + 1
    for e in errors:
        assert e["code"] in documented, f"undocumented error code {e['code']!r}"
        assert e.get("message"), e
        stats.count(e["code"])
    assert close in closes, f"undocumented close code {close}"
    assert close != 1011, f"internal error (1011) after {errors[-3:]}"
    if close == 1000:
        assert ended is not None and ended["reason"] == "client_stop", "closed 1000 without session_end"
        stats.sessions_started += 1


def fuzz_wire(url: str, count: int, seed_value: int = 0, max_frames: int = 20, on_progress=None) -> FuzzStats:
    """`count` generated sequences against the server at `url` (ws://.../ws), one connection each."""
    import httpx

    documented, closes = documented_error_codes(), documented_close_codes()
    stats = FuzzStats()
    health = url.replace("ws://", "http://").replace("wss://", "https://").removesuffix("/ws") + "/healthz"
    loop = asyncio.new_event_loop()
    try:

        @seed(seed_value)
        @settings(max_examples=count, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(sequences(max_frames, max_size=MAX_AUDIO + 4000))
        def run(seq):
            loop.run_until_complete(_wire_sequence(url, seq, documented, closes, stats))
            if on_progress and stats.sequences % 10 == 0:
                on_progress(stats)

        run()
    finally:
        loop.close()
    assert httpx.get(health, timeout=10).status_code == 200, "the server is not healthy after the fuzzing"
    return stats


def _report(title: str, stats: FuzzStats, secs: float) -> str:
    codes = ", ".join(f"{k} {v}" for k, v in sorted(stats.codes.items(), key=lambda kv: -kv[1]))
    closes = ", ".join(f"{k} {v}" for k, v in sorted(stats.close_codes.items()))
    return (
        f"{title}: {stats.messages} frames in {stats.sequences} sequences, {secs:.0f} s; "
        f"{stats.sessions_started} sessions started"
        + (f"; slowest frame {stats.slowest_ms:.1f} ms" if stats.slowest_ms else "")
        + "\n"
        f"  rejections: {codes or 'none'}" + (f"\n  close codes: {closes}" if closes else "")
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="atlas-voice fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=100_000, help="frames through the parser in process")
    p.add_argument("--sequences", type=int, default=300, help="sequences over real WebSockets (0: none)")
    p.add_argument(
        "--url", default=None, help="a running server's ws://HOST:PORT/ws; default: start one on the offline engines"
    )
    p.add_argument(
        "--phone-starts",
        type=int,
        default=3000,
        help="generated phone-door calls through the stream checks and serializer in process",
    )
    p.add_argument(
        "--phone-calls",
        type=int,
        default=150,
        help="generated phone calls over the webhook and a real media stream (0: none)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    def progress(stats: FuzzStats) -> None:
        print(f"\r  {stats.messages} frames, {stats.sequences} sequences", end="", file=sys.stderr, flush=True)

    t0 = time.monotonic()
    stats = fuzz_in_process(args.messages, args.seed, on_progress=progress)
    print(file=sys.stderr)
    print(_report("in process", stats, time.monotonic() - t0))
    if args.sequences:
        t0 = time.monotonic()
        if args.url:
            stats = fuzz_wire(args.url, args.sequences, args.seed, on_progress=progress)
        else:
            from bench.harness import running_server

            log = Path("fuzz-server.log").resolve()
            print(f"starting a server on the offline engines (log: {log})", file=sys.stderr)
            with running_server({"ATLAS_LOG_LEVEL": "INFO"}, log) as base:
                stats = fuzz_wire(
                    base.replace("http://", "ws://") + "/ws", args.sequences, args.seed, on_progress=progress
                )
        print(file=sys.stderr)
        print(_report("over WebSockets", stats, time.monotonic() - t0))
    from bench.fuzz_phone import fuzz_phone_in_process, fuzz_phone_wire

    t0 = time.monotonic()
    stats = fuzz_phone_in_process(args.phone_starts, args.seed)
    print(_report("phone door in process", stats, time.monotonic() - t0))
    if args.phone_calls:
        from bench.harness import running_server
        from fakes.twilio import FakeTwilioREST, new_sid

        token, account = "fuzz-twilio-auth-token", new_sid("AC")
        log = Path("fuzz-phone-server.log").resolve()
        print(f"starting a server with the phone door on the offline engines (log: {log})", file=sys.stderr)
        t0 = time.monotonic()
        with (
            FakeTwilioREST(auth_token=token, account_sid=account) as rest,
            running_server(
                {
                    "ATLAS_LOG_LEVEL": "INFO",
                    "TWILIO_AUTH_TOKEN": token,
                    "TWILIO_ACCOUNT_SID": account,
                    "TWILIO_API_BASE_URL": rest.http_url,
                },
                log,
            ) as base,
        ):
            stats, stored, dead = fuzz_phone_wire(
                base,
                token,
                account,
                log.with_suffix(".sqlite3"),
                log.with_suffix(".outbox.sqlite3"),
                args.phone_calls,
                args.seed,
                on_progress=progress,
            )
        print(file=sys.stderr)
        print(_report("phone door over the webhook and media streams", stats, time.monotonic() - t0))
        print(f"  session rows: {stored} stored, {dead} dead-lettered, 0 left in the outbox")
    print("no crash, no hang, every rejection a documented error code")
    return 0


if __name__ == "__main__":
    sys.exit(main())
