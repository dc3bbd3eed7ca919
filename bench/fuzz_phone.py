"""Property-based fuzzing of the phone door (`/twilio/ws`, Twilio Media Streams), for `atlas-voice fuzz` and
tests/test_fuzz.py.

- in process: generated `start` messages through `StreamStart` (the checks a stream must pass before it
  gets a session) and, for those accepted, the session row they lead to written to a real SQLite store;
  then generated message sequences (`connected`/`start`/`media`/`mark`/`dtmf`/`stop`, with hostile types
  and sizes, binary frames, bad JSON) through a session's `AtlasTwilioSerializer`. Properties: nothing
  raises; no message takes over a second; a refused start is `TWILIO_STREAM_REFUSED`; every accepted
  start's row can be stored; every dropped message is counted under a documented code; what passes is
  16 kHz audio in whole samples or a DTMF digit.
- on the wire: each sequence is a call placed as Twilio places it (the signed voice webhook, then a signed
  upgrade to the stream URL), whose `start` may be mutated, followed by generated messages and `stop`.
  Properties: the close code is documented and never 1011; a stream closed 1000 had a session, and that
  session's row is in the store (or dead-lettered) once the run ends, never stuck in the outbox; the
  server stays healthy.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import time
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from bench.fuzz import MAX_TEXT, FuzzStats, documented_close_codes, documented_error_codes

ACCOUNT = "AC" + "1" * 32

_hostile = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats()
    | st.text(max_size=40)
    | st.text(min_size=400, max_size=700),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_sid = st.one_of(
    st.from_regex(r"\A(CA|MZ|AC)[0-9a-f]{32}\Z"),
    st.sampled_from(["CA../../Conferences/CF" + "0" * 30, "CA" + "0" * 31, "", "CA" + "0" * 32 + "/x"]),
    _hostile,
)


@st.composite
def _start_mutation(draw) -> dict:
    """Changes to a valid `start` object: fields replaced by hostile values, removed, or extra ones added."""
    changes = {}
    for key in draw(
        st.lists(
            st.sampled_from(
                ["streamSid", "callSid", "accountSid", "customParameters", "tracks", "mediaFormat", "extra"]
            ),
            max_size=3,
            unique=True,
        )
    ):
        changes[key] = draw(st.one_of(_sid, _hostile, st.just(None)))
    if draw(st.booleans()):
        params = draw(
            st.dictionaries(st.sampled_from(["from", "to", "callSid", "atlasToken", "x"]), _hostile, max_size=3)
        )
        changes["customParameters.*"] = params
    return changes


@st.composite
def _payload(draw) -> object:
    kind = draw(st.integers(0, 6))
    if kind <= 2:
        return base64.b64encode(draw(st.binary(min_size=1, max_size=400))).decode()
    if kind == 3:
        return draw(st.text(max_size=60))  # mostly not base64
    if kind == 4:
        return base64.b64encode(bytes(draw(st.integers(7000, 9000)))).decode()  # over the text limit
    return draw(_hostile)


@st.composite
def phone_message(draw) -> str | bytes:
    kind = draw(st.integers(0, 11))
    if kind <= 3:
        media = draw(st.one_of(st.fixed_dictionaries({"payload": _payload()}), _hostile))
        return json.dumps({"event": "media", "streamSid": "MZ" + "0" * 32, "media": media})
    if kind == 4:
        return json.dumps(
            {"event": "mark", "mark": draw(st.one_of(st.fixed_dictionaries({"name": _hostile}), _hostile))}
        )
    if kind == 5:
        return json.dumps(
            {
                "event": "dtmf",
                "dtmf": draw(
                    st.one_of(
                        st.fixed_dictionaries({"digit": st.one_of(st.sampled_from(list("0123456789*#")), _hostile)}),
                        _hostile,
                    )
                ),
            }
        )
    if kind == 6:
        return json.dumps(
            {
                "event": draw(st.one_of(st.sampled_from(["connected", "start", "closed", ""]), _hostile)),
                "x": draw(_hostile),
            }
        )
    if kind == 7:
        return json.dumps(draw(_hostile))
    if kind == 8:
        return draw(st.binary(max_size=500))
    if kind == 9:
        return "{" * draw(st.integers(1, 3000))
    if kind == 10:
        return json.dumps({"event": "media", "media": {"payload": "x" * (MAX_TEXT + 10)}})
    return draw(st.text(max_size=100))


def _apply(start: dict, changes: dict) -> dict:
    start = json.loads(json.dumps(start))
    for key, value in changes.items():
        if key == "customParameters.*":
            if isinstance(start.get("customParameters"), dict):
                start["customParameters"].update(value)
        elif value is None and key in start:
            del start[key]
        else:
            start[key] = value
    return start


def _json_safe(value):
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):
        return None


# --- in process ------------------------------------------------------------------------------------------


class _Runtime:
    """What StreamStart reads of a Runtime: the settings and a token issuer."""

    def __init__(self, settings):
        self.settings = settings
        self.twilio_tokens = None


async def _check_phone_sequence(
    start_changes: dict, messages: list, documented: set[str], stats: FuzzStats, runtime, sink_db: sqlite3.Connection
) -> None:
    from pipecat.frames.frames import InputAudioRawFrame, InputDTMFFrame

    from bots.session import Caller
    from storage.records import SessionInfo, provider_models
    from transports.twilio.door import StreamStart, stream_tokens
    from transports.twilio.serializer import AtlasTwilioSerializer
    from transports.twilio.tokens import TOKEN_PARAMETER
    from vocabulary.errors import ErrorCode, ProtocolError

    stats.sequences += 1
    call_sid = "CA" + format(stats.sequences, "032x")
    token = stream_tokens(runtime).issue(call_sid, "+15550001111")
    start = _apply(
        {
            "streamSid": "MZ" + "2" * 32,
            "callSid": call_sid,
            "accountSid": ACCOUNT,
            "tracks": ["inbound"],
            "customParameters": {"from": "+15550001111", TOKEN_PARAMETER: token},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
        start_changes,
    )
    try:
        accepted = StreamStart(start, runtime)
    except ProtocolError as e:
        assert e.code == ErrorCode.TWILIO_STREAM_REFUSED, e.code
        stats.count(str(e.code))
        return
    stats.sessions_started += 1
    # The session row an accepted start leads to can be stored, whatever the start carried.
    caller = Caller(
        client_user_id=accepted.caller, conversation_id=accepted.call_sid, user_agent="twilio", ip_address="127.0.0.1"
    )
    info = SessionInfo(
        id=f"00000000-0000-4000-8000-{stats.sequences:012d}",
        transport="twilio",
        started_at=time.time(),
        user_id=caller.user_id,
        client_user_id=caller.client_user_id,
        conversation_id=caller.conversation_id,
        models=provider_models(runtime.settings),
        user_agent=caller.user_agent,
        ip_address=caller.ip_address,
    )
    row = info.start_row()
    json.dumps(row, allow_nan=False)
    with sink_db:
        sink_db.execute(
            f"INSERT INTO voice_sessions ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values())
        )

    errors: list[str] = []
    serializer = AtlasTwilioSerializer(
        accepted.stream_sid,
        params=AtlasTwilioSerializer.InputParams(auto_hang_up=False),
        on_error=errors.append,
        max_text_bytes=MAX_TEXT,
    )
    for data in messages:
        stats.messages += 1
        t0 = time.perf_counter()
        out = await serializer.deserialize(data)
        if out is not None:
            assert isinstance(out, (InputAudioRawFrame, InputDTMFFrame)), out
            if isinstance(out, InputAudioRawFrame):
                assert out.sample_rate == 16000 and out.num_channels == 1 and len(out.audio) % 2 == 0
        stats.slowest_ms = max(stats.slowest_ms, (time.perf_counter() - t0) * 1000)
        assert stats.slowest_ms < 1000, f"one message took {stats.slowest_ms:.0f} ms"
    for code in errors:
        assert code in documented, f"undocumented code {code!r}"
        stats.count(code)


def fuzz_phone_in_process(sequences: int, seed_value: int = 0) -> FuzzStats:
    from config.settings import Settings
    from storage.sinks import SCHEMA

    settings_ = Settings(twilio_auth_token="fuzz-auth-token", twilio_account_sid=ACCOUNT)
    runtime = _Runtime(settings_)
    documented = documented_error_codes()
    stats = FuzzStats()
    db = sqlite3.connect(":memory:")
    db.executescript(SCHEMA.read_text())
    loop = asyncio.new_event_loop()
    try:

        @seed(seed_value)
        @settings(max_examples=sequences, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(_start_mutation(), st.lists(phone_message(), max_size=25))
        def run(changes, messages):
            loop.run_until_complete(_check_phone_sequence(changes, messages, documented, stats, runtime, db))

        run()
    finally:
        loop.close()
        db.close()
    return stats


# --- on the wire -----------------------------------------------------------------------------------------


async def _phone_wire_sequence(
    base: str,
    auth_token: str,
    account_sid: str,
    changes: dict,
    messages: list,
    closes: set[int],
    stats: FuzzStats,
    started: dict[str, int],
) -> None:
    import websockets

    from fakes.twilio import TwilioCaller, twilio_signature

    caller = await TwilioCaller.dial(base, auth_token, account_sid=account_sid, from_="+15550001234")
    start = _apply(
        {
            "accountSid": account_sid,
            "streamSid": caller.stream_sid,
            "callSid": caller.call_sid,
            "tracks": ["inbound"],
            "customParameters": caller.custom_parameters,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
        changes,
    )
    headers = {"X-Twilio-Signature": twilio_signature(auth_token, caller.signed_url)}
    async with websockets.connect(caller.url, additional_headers=headers, max_size=None) as ws:

        async def read():
            try:
                async for _ in ws:
                    pass
            except websockets.ConnectionClosed:
                pass

        reader = asyncio.create_task(read())
        try:
            await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            await ws.send(
                json.dumps(
                    {"event": "start", "sequenceNumber": "1", "start": start, "streamSid": caller.stream_sid},
                    default=str,
                )
            )
            for data in messages:
                await ws.send(data)
                stats.messages += 1
            await ws.send(json.dumps({"event": "stop", "streamSid": caller.stream_sid}))
        except websockets.ConnectionClosed:
            pass
        try:
            await asyncio.wait_for(reader, 30)
        except TimeoutError:
            raise AssertionError(f"no close within 30 s after {len(messages)} messages") from None
        close = ws.close_code
    stats.sequences += 1
    stats.close_codes[close] = stats.close_codes.get(close, 0) + 1
    assert close in closes, f"undocumented close code {close}"
    assert close != 1011, "internal error (1011)"
    if close == 1000:
        started[caller.call_sid] = started.get(caller.call_sid, 0) + 1
        stats.sessions_started += 1


def fuzz_phone_wire(
    base: str,
    auth_token: str,
    account_sid: str,
    store: Path,
    outbox: Path,
    count: int,
    seed_value: int = 0,
    on_progress=None,
) -> tuple[FuzzStats, int, int]:
    """`count` generated calls against the server at `base` (http://HOST:PORT, its phone door configured
    with `auth_token` and `account_sid`, recording into the SQLite file `store` through `outbox`).
    Returns the stats, the session rows stored and the rows dead-lettered."""
    import httpx

    closes = documented_close_codes()
    stats = FuzzStats()
    started: dict[str, int] = {}
    loop = asyncio.new_event_loop()
    try:

        @seed(seed_value)
        @settings(max_examples=count, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(_start_mutation(), st.lists(phone_message(), max_size=15))
        def run(changes, messages):
            loop.run_until_complete(
                _phone_wire_sequence(base, auth_token, account_sid, changes, messages, closes, stats, started)
            )
            if on_progress and stats.sequences % 10 == 0:
                on_progress(stats)

        run()
    finally:
        loop.close()
    assert httpx.get(base + "/healthz", timeout=10).status_code == 200, "the server is not healthy after fuzzing"
    # Every call that had a session is recorded (or dead-lettered), never stuck in the outbox.
    deadline = time.monotonic() + 30
    while True:
        with sqlite3.connect(store) as db:
            stored = {r[0] for r in db.execute("SELECT conversation_id FROM voice_sessions WHERE ended_at IS NOT NULL")}
        with sqlite3.connect(outbox) as db:
            pending = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
            dead = [
                json.loads(r[0]).get("conversation_id")
                for r in db.execute("SELECT row FROM dead_letters WHERE keys != '' AND tbl = 'voice_sessions'")
            ]
        missing = set(started) - stored - set(dead)
        if (not missing and pending == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert pending == 0, f"{pending} writes stuck in the outbox"
    assert not missing, f"calls with a session but no row: {sorted(missing)[:5]}"
    return stats, len(set(started) & stored), len(dead)
