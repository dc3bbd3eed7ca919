"""The short version of `atlas-voice fuzz` (bench/fuzz.py): generated frame sequences through the protocol
parser and serializer in process, and over real WebSockets against the server on the local engines."""

from __future__ import annotations

import httpx
import pytest

from bench.fuzz import (
    documented_close_codes,
    documented_error_codes,
    fuzz_in_process,
    fuzz_wire,
)
from transports.websocket.door import (
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_TRY_AGAIN,
)
from vocabulary.errors import ErrorCode

pytestmark = pytest.mark.timeout(600)


def test_every_error_code_and_close_code_is_documented_and_nothing_else():
    assert documented_error_codes() == {str(c) for c in ErrorCode}
    assert {CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_TRY_AGAIN, 1009, 1011} == documented_close_codes()


def test_fuzzed_frames_in_process_never_crash_and_every_rejection_is_documented():
    stats = fuzz_in_process(10000, seed_value=7)
    assert stats.messages >= 10000
    assert stats.sessions_started > 100  # the generator reaches the in-session state often
    # The generator reaches every rejection a client frame can earn.
    for code in (
        "NOT_STARTED",
        "ALREADY_STARTED",
        "INVALID_JSON",
        "INVALID_MESSAGE",
        "UNKNOWN_TYPE",
        "INVALID_FIELD",
        "FRAME_TOO_LARGE",
        "ODD_LENGTH_PCM",
    ):
        assert stats.codes.get(code, 0) > 0, (code, stats.codes)


def test_fuzzed_sequences_over_the_wire_end_cleanly(atlas, atlas_ws):
    stats = fuzz_wire(atlas_ws, 60, seed_value=3)
    assert stats.sequences == 60
    assert stats.close_codes.get(1000, 0) >= 50, stats.close_codes  # almost all end with session_end
    assert httpx.get(atlas + "/healthz").status_code == 200
    metrics = httpx.get(atlas + "/metrics").text
    assert 'atlas_errors_total{code="INTERNAL_ERROR"}' not in metrics


def test_fuzzed_phone_starts_and_messages_in_process_never_crash_and_every_row_can_be_stored():
    from bench.fuzz_phone import fuzz_phone_in_process

    stats = fuzz_phone_in_process(600, seed_value=5)
    assert stats.sequences == 600
    assert stats.sessions_started > 50  # the mutations leave many starts valid
    assert stats.codes.get("TWILIO_STREAM_REFUSED", 0) > 100
    assert stats.codes.get("INVALID_MESSAGE", 0) > 0 and stats.codes.get("FRAME_TOO_LARGE", 0) > 0


@pytest.fixture(scope="module")
def phone_door(vendors, artifacts):
    from fakes.twilio import FakeTwilioREST, new_sid
    from tests.helpers import running_server

    token, account = "fuzz-twilio-auth-token", new_sid("AC")
    log = artifacts / "server_fuzz_phone.log"
    env = {
        "TWILIO_AUTH_TOKEN": token,
        "TWILIO_ACCOUNT_SID": account,
        "ATLAS_STT": "whisper",
        "ATLAS_TTS": "piper",
        "ATLAS_LLM": "anthropic",
        "ATLAS_LLM_FALLBACK": "apology",
        "ANTHROPIC_API_KEY": "test-anthropic-key",
        "ANTHROPIC_BASE_URL": vendors["anthropic"].http_url,
        "ATLAS_SESSION_START_TIMEOUT_SECS": "5",
    }
    with FakeTwilioREST(auth_token=token, account_sid=account) as rest:
        env["TWILIO_API_BASE_URL"] = rest.http_url
        with running_server(env, log) as base:
            yield base, token, account, log


def test_fuzzed_phone_calls_over_the_wire_end_cleanly_and_every_session_is_recorded(phone_door):
    from bench.fuzz_phone import fuzz_phone_wire

    base, token, account, log = phone_door
    stats, stored, dead = fuzz_phone_wire(
        base, token, account, log.with_suffix(".sqlite3"), log.with_suffix(".outbox.sqlite3"), 40, seed_value=11
    )
    assert stats.sequences == 40
    assert stats.sessions_started >= 5 and stored + dead >= stats.sessions_started, (stats, stored, dead)
    assert set(stats.close_codes) <= {1000, 1008, 1013}, stats.close_codes
    assert httpx.get(base + "/healthz").status_code == 200
