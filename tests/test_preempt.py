"""Preemptive replies and the turn-end rule over the socket (processors/turn_end.py), on the cloud fakes.

A caller who pauses and goes on, who talks over a preemptive reply, whose preemptive request fails, or
whose transcript grows after the final: each hears exactly one reply, to everything they said, and the
turn row says what the preemption cost.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from app.talk import load_wav
from fakes.anthropic import default_reply, last_user_text
from storage.sinks import SQLiteSink
from tests.conftest import cloud_env, reset_vendors
from tests.helpers import Speaker, connected_client, metric_samples, recorded, running_server

pytestmark = pytest.mark.timeout(600)

# Long enough that a caller's 0.9 s pause after an unfinished phrase is never taken for a turn end on a
# busy machine, and that a late final lands before a finished question's turn ends: these tests are about
# what happens around the pause, not about the tuned waits.
OPEN_SECS = "2.0"
DONE_SECS = "1.0"
# A preemptive request at every pause as soon as its words are in (the default starts one only 0.6 s
# before the turn would end, which a 0.9 s pause after an unfinished phrase never reaches).
LEAD_SECS = "5.0"
PAUSE = 0.9


@pytest.fixture(scope="module")
def phrases(tmp_path_factory) -> dict[str, np.ndarray]:
    speaker = Speaker(tmp_path_factory.mktemp("preempt"))
    texts = {
        "milk": "I need milk and",
        "eggs": "some apples and",
        "bread": "some bread please.",
        "dinner": "What should I cook for dinner tonight?",
        "cats": "Wait, stop. Tell me about cats instead.",
        "weather": "What is the weather like in Paris?",
    }
    return {name: load_wav(speaker.say(name, text, lead_silence=0.0)) for name, text in texts.items()}


@pytest.fixture(scope="module")
def preempt_server(vendors, llm_record, artifacts, tmp_path_factory):
    db = tmp_path_factory.mktemp("preempt-db") / "atlas.sqlite3"
    env = {
        **cloud_env(vendors, llm_record, "elevenlabs"),
        "ATLAS_SQLITE_PATH": str(db),
        "ATLAS_TURN_OPEN_SECS": OPEN_SECS,
        "ATLAS_TURN_DONE_SECS": DONE_SECS,
        "ATLAS_TURN_UNSURE_SECS": DONE_SECS,
        "ATLAS_PREEMPT_LEAD_SECS": LEAD_SECS,
    }
    with running_server(env, artifacts / "server_preempt.log") as base:
        yield base.replace("http://", "ws://") + "/ws", db, base


@pytest.fixture(autouse=True)
def fresh_vendors(vendors):
    reset_vendors(vendors)
    yield
    reset_vendors(vendors)  # the fakes are shared by the whole session: leave no delay or slow reply behind


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(16000 * seconds), np.int16)


def replies(client, since: int = 0) -> list[str]:
    """The replies the caller heard, one string each (the fake's reply always opens "I heard you say")."""
    said = " ".join(e["text"] for e in client.events[since:] if e.get("type") == "bot_transcript")
    return ["I heard you say" + r for r in said.split("I heard you say")[1:]]


def requests_since(claude, n: int) -> list:
    return list(claude.requests)[n:]


async def test_pausing_and_going_on_gets_one_reply_to_everything(preempt_server, vendors, phrases):
    """Two pauses after unfinished phrases: each starts a preemptive request that is withdrawn (its HTTP
    stream closed) when the caller goes on; the reply answers all three phrases, once; the context and
    /metrics keep what happened."""
    url, db, base = preempt_server
    claude = vendors["anthropic"]
    claude.first_token_delay = 1.5  # still thinking when the caller goes on
    n = len(claude.requests)
    client = await connected_client(url)
    audio = np.concatenate([phrases["milk"], silence(PAUSE), phrases["eggs"], silence(PAUSE), phrases["bread"]])
    await client.say("milk-eggs-bread", audio)
    await client.wait_reply_done(timeout=60)
    heard = replies(client)
    assert len(heard) == 1, heard
    assert all(w in heard[0].lower() for w in ("milk", "apples", "bread")), heard
    sent = requests_since(claude, n)
    asked = [last_user_text(r.body["messages"]).lower() for r in sent]
    assert len(sent) >= 2, asked  # at least one withdrawn preemptive request, then the one spoken
    assert "bread" not in asked[0] and "milk" in asked[0], asked
    assert any("client_disconnected" in r.events for r in sent[:-1]), [r.events for r in sent]
    # The next turn's request holds the one reply that was spoken, nothing of the withdrawn ones.
    claude.first_token_delay = 0.0
    await client.say("weather", phrases["weather"])
    await client.wait_reply_done(timeout=60)
    history = list(claude.requests)[-1].body["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"], history
    assert "bread" in last_user_text(history[:1]).lower()
    end = await client.stop()
    assert end["metrics"]["turns"] == 2
    _, rows = await recorded(SQLiteSink(db), client.session_id, 2)
    first = min(rows, key=lambda r: r["turn_index"])
    assert first["preempt_cancelled"] == len(sent) - 1 >= 1
    assert first["preempt_input_tokens"] > 0
    scraped = metric_samples(httpx.get(base + "/metrics").text)
    withdrawn = scraped[("atlas_preempt_requests_total", (("outcome", "withdrawn"), ("transport", "websocket")))]
    assert withdrawn >= first["preempt_cancelled"]
    assert scraped[("atlas_preempt_withdrawn_input_tokens_total", (("transport", "websocket"),))] > 0


async def test_a_finished_question_is_answered_by_its_preemptive_request(preempt_server, vendors, phrases):
    """No second request: the one asked at the pause is the one spoken, and the turn row says so."""
    url, db, _ = preempt_server
    claude = vendors["anthropic"]
    claude.first_token_delay = 0.3
    n = len(claude.requests)
    client = await connected_client(url)
    await client.say("weather", phrases["weather"])
    await client.wait_reply_done(timeout=60)
    assert len(replies(client)) == 1
    assert len(requests_since(claude, n)) == 1
    await client.stop()
    _, rows = await recorded(SQLiteSink(db), client.session_id, 1)
    assert rows[0]["preempted"] is True and rows[0]["preempt_cancelled"] == 0


async def test_barge_in_during_a_preemptive_reply(preempt_server, vendors, phrases):
    """The caller talks over a reply that was asked for at the pause: it stops, and the new turn gets one
    reply of its own."""
    url, db, _ = preempt_server
    claude = vendors["anthropic"]
    claude.tokens_per_second = 8  # a long, slow reply: still speaking when the caller barges in
    claude.reply = lambda body: default_reply(body) + " " + " ".join(["And there is a great deal more to say."] * 6)
    client = await connected_client(url)
    await client.say("dinner", phrases["dinner"])
    await client.wait_for(lambda e: e.get("type") == "audio_chunk" or e.get("type") == "bot_transcript", timeout=30)
    await client.send_silence(0.5)
    mark = len(client.events)
    claude.tokens_per_second = 0
    claude.reply = default_reply
    await client.say("cats", phrases["cats"])
    await client.wait_reply_done(timeout=60)
    after = replies(client, mark)
    assert len(after) == 1 and "cats" in after[0].lower(), after
    end = await client.stop()
    assert end["metrics"]["interruptions"] >= 1
    _, rows = await recorded(SQLiteSink(db), client.session_id, 2)
    rows.sort(key=lambda r: r["turn_index"])
    assert rows[0]["interrupted"] is True
    assert rows[1]["preempted"] is True


async def test_an_error_on_the_preemptive_request_still_gets_one_reply(preempt_server, vendors, phrases):
    """Claude is overloaded (529) for the request asked for at the pause: the retry answers in its place,
    held like the request it replaces, and the caller hears it once."""
    url, db, _ = preempt_server
    claude = vendors["anthropic"]
    claude.fail_next(529)
    n = len(claude.requests)
    client = await connected_client(url)
    await client.say("weather", phrases["weather"])
    await client.wait_reply_done(timeout=60)
    heard = replies(client)
    assert len(heard) == 1 and "paris" in heard[0].lower(), heard
    assert [r.status for r in requests_since(claude, n)] == [529, 200]
    statuses = [e["status"] for e in client.events if e.get("type") == "status"]
    assert statuses.count("speaking") == 1, statuses
    assert [e for e in client.events if e.get("type") == "error"] == []
    await client.stop()
    _, rows = await recorded(SQLiteSink(db), client.session_id, 1)
    assert rows[0]["preempted"] is True


async def test_words_committed_after_the_final_withdraw_and_ask_again(preempt_server, vendors, phrases):
    """Deepgram sends one more final after the one the preemptive request was asked with: that request is
    withdrawn and the reply answers the longer transcript."""
    url, db, _ = preempt_server
    claude, dg = vendors["anthropic"], vendors["deepgram"]
    claude.first_token_delay = 0.8
    dg.late_final_next("in the spring", delay=0.15)
    n = len(claude.requests)
    client = await connected_client(url)
    t0 = time.monotonic()
    await client.say("weather", phrases["weather"])
    await client.wait_reply_done(timeout=60)
    heard = replies(client)
    assert len(heard) == 1 and "spring" in heard[0].lower(), heard
    asked = [last_user_text(r.body["messages"]).lower() for r in requests_since(claude, n)]
    assert "spring" in asked[-1], asked
    assert time.monotonic() - t0 < 30
    await client.stop()
    _, rows = await recorded(SQLiteSink(db), client.session_id, 1)
    assert len(rows) == 1 and rows[0]["preempt_cancelled"] == len(asked) - 1 >= 1, (rows, asked)
