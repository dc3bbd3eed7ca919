"""How the call went: a session's rating, live over /ws or afterwards with POST /feedback and the session's token;
stored, counted once, refused for anyone else's session."""

from __future__ import annotations

import sqlite3
import time

import httpx
import pytest

from bots.feedback import parse_feedback
from bots.tokens import FeedbackTokens, SignedTokens
from tests.helpers import connected_client, metric_samples
from vocabulary.errors import ProtocolError


def test_a_rating_is_a_whole_number_from_1_to_5_with_an_optional_bounded_comment():
    assert parse_feedback({"rating": 5}) == (5, None)
    assert parse_feedback({"rating": 1, "comment": "  too slow\nand it cut me off\x07 "}) == (
        1,
        "too slow\nand it cut me off",
    )
    assert parse_feedback({"rating": 3, "comment": "   "}) == (3, None)
    for bad in ({}, {"rating": 0}, {"rating": 6}, {"rating": 4.5}, {"rating": "5"}, {"rating": True}):
        with pytest.raises(ProtocolError, match="rating"):
            parse_feedback(bad)
    with pytest.raises(ProtocolError, match="1000 characters"):
        parse_feedback({"rating": 4, "comment": "x" * 1001})
    with pytest.raises(ProtocolError, match="comment"):
        parse_feedback({"rating": 4, "comment": ["no"]})


def test_a_feedback_token_rates_its_own_session_only():
    tokens = FeedbackTokens("secret")
    token = tokens.issue("s-1", "5b0e8c4e-1c9f-4a57-9d1c-1d7c2b8a3e11", "webrtc")
    assert tokens.check(token, "s-1") == ("5b0e8c4e-1c9f-4a57-9d1c-1d7c2b8a3e11", "webrtc")
    assert tokens.check(token, "s-1") == tokens.check(token, "s-1")  # not single-use: a rating may change
    assert FeedbackTokens("secret").check(tokens.issue("s-2", None, "websocket"), "s-2") == (None, "websocket")
    for session, candidate, why in (
        ("s-2", token, "another session"),
        ("s-1", FeedbackTokens("other").issue("s-1", None, "websocket"), "not valid"),
        ("s-1", None, "no feedback token"),
        ("s-1", SignedTokens("secret", "atlas:start", 60).issue({"sub": "s-1"}), "not valid"),  # another kind
    ):
        with pytest.raises(ProtocolError, match=why):
            tokens.check(candidate, session)


async def test_a_session_is_rated_live_and_afterwards_and_counted_once(atlas, artifacts):
    client = await connected_client(atlas.replace("http://", "ws://") + "/ws")
    await client.ws.send('{"type": "feedback", "rating": 9}')
    await client.ws.send('{"type": "feedback", "rating": 4, "comment": "nice voice"}')
    deadline = time.monotonic() + 10
    while not any(e.get("type") == "feedback_received" for e in client.events) and time.monotonic() < deadline:
        await client.send_silence(0.1)
    received = [e for e in client.events if e.get("type") in ("feedback_received", "error")]
    assert received[0]["type"] == "error" and received[0]["code"] == "INVALID_FIELD"
    assert {k: v for k, v in received[1].items() if k != "_t"} == {"type": "feedback_received", "rating": 4}
    await client.stop()
    end = client.session_end
    assert end and isinstance(end.get("feedbackToken"), str), end
    sid, token = end["sessionId"], end["feedbackToken"]

    async with httpx.AsyncClient(base_url=atlas, timeout=10) as http:
        before = metric_samples((await http.get("/metrics")).text)
        ok = await http.post("/feedback", json={"sessionId": sid, "feedbackToken": token, "rating": 2, "comment": "x"})
        assert ok.status_code == 200 and ok.json() == {"ok": True}
        again = await http.post("/feedback", json={"sessionId": sid, "feedbackToken": token, "rating": 1})
        assert again.status_code == 200
        refusals = [
            ({"sessionId": "another-session", "feedbackToken": token, "rating": 5}, 401, "AUTH_FAILED"),
            ({"sessionId": sid, "rating": 5}, 401, "AUTH_FAILED"),
            ({"sessionId": sid, "feedbackToken": token[:-3] + "abc", "rating": 5}, 401, "AUTH_FAILED"),
            ({"sessionId": sid, "feedbackToken": token, "rating": 0}, 400, "INVALID_FIELD"),
            ({"sessionId": sid, "feedbackToken": token, "rating": 3, "comment": "y" * 1001}, 400, "INVALID_FIELD"),
        ]
        for body, status, code in refusals:
            r = await http.post("/feedback", json=body)
            assert (r.status_code, r.json()["code"]) == (status, code), (body, r.text)
        r = await http.post("/feedback", content=b"[1, 2]")
        assert (r.status_code, r.json()["code"]) == (400, "INVALID_JSON")
        r = await http.post("/feedback", content=b"{" + b" " * 5000 + b"}")
        assert r.status_code == 413
        after = metric_samples((await http.get("/metrics")).text)

    # The last rating is the session's; the live one counted in /metrics, the later posts of it did not.
    row = None
    for _ in range(50):
        db = sqlite3.connect(artifacts / "server.sqlite3")
        row = db.execute("SELECT rating, comment FROM voice_feedback WHERE id = ?", (sid,)).fetchone()
        db.close()
        if row == (1, None):
            break
        time.sleep(0.2)
    assert row == (1, None), row

    def counted(samples, rating):
        return samples.get(("atlas_feedback_total", (("rating", rating), ("transport", "websocket"))), 0)

    assert [counted(after, r) - counted(before, r) for r in ("1", "2", "4")] == [0, 0, 0]
    assert counted(after, "4") >= 1
