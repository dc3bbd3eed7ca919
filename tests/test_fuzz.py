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
from bots.websocket_bot import (
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_TRY_AGAIN,
)
from transports.protocol import ErrorCode

pytestmark = pytest.mark.timeout(600)


def test_every_error_code_and_close_code_is_documented_and_nothing_else():
    assert documented_error_codes() == {str(c) for c in ErrorCode}
    assert {CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_TRY_AGAIN, 1009, 1011} == documented_close_codes()


def test_fuzzed_frames_in_process_never_crash_and_every_rejection_is_documented():
    stats = fuzz_in_process(10000, seed_value=7)
    assert stats.messages >= 10000
    assert stats.sessions_started > 100  # the generator reaches the in-session state often
    # The generator reaches every rejection a client frame can earn.
    for code in ("NOT_STARTED", "ALREADY_STARTED", "INVALID_JSON", "INVALID_MESSAGE", "UNKNOWN_TYPE",
                 "INVALID_FIELD", "FRAME_TOO_LARGE", "ODD_LENGTH_PCM"):
        assert stats.codes.get(code, 0) > 0, (code, stats.codes)


def test_fuzzed_sequences_over_the_wire_end_cleanly(atlas, atlas_ws):
    stats = fuzz_wire(atlas_ws, 60, seed_value=3)
    assert stats.sequences == 60
    assert stats.close_codes.get(1000, 0) >= 50, stats.close_codes  # almost all end with session_end
    assert httpx.get(atlas + "/healthz").status_code == 200
    metrics = httpx.get(atlas + "/metrics").text
    assert 'atlas_errors_total{code="INTERNAL_ERROR"}' not in metrics
