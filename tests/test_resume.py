"""A client whose connection drops mid-call comes back and goes on with the same conversation: a TCP proxy between
client and server cuts every connection mid-reply; `atlas-voice talk`'s client and the page reconnect with backoff
and resume with the session's token; the server restores the context window in a new session linked to the old."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from bots.tokens import ResumeTokens
from tests.helpers import chromium_with_microphone, free_port, read_records, read_wav, write_wav
from vocabulary.errors import ProtocolError


class CuttingProxy:
    """A TCP proxy to `target_port` whose `cut()` drops every connection it carries (as a network would), while it
    keeps accepting new ones."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self._pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._pairs.append((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> int:
        n = len(self._pairs)
        for down, up in self._pairs:
            for w in (down, up):
                transport = w.transport
                if transport is not None:
                    transport.abort()  # no close handshake: the peers see the connection drop
        self._pairs.clear()
        return n

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()


def test_a_resume_token_is_its_sessions_and_its_users_and_works_once():
    tokens = ResumeTokens("secret", 600)
    token = tokens.issue("s-1", "client:browser-1", 0)
    with pytest.raises(ProtocolError, match="another user's"):
        tokens.redeem(token, "s-1", "client:browser-2")
    with pytest.raises(ProtocolError, match="another session"):
        tokens.redeem(token, "s-2", "client:browser-1")
    assert tokens.redeem(token, "s-1", "client:browser-1") == 0
    with pytest.raises(ProtocolError, match="used already") as e:
        tokens.redeem(token, "s-1", "client:browser-1")
    assert e.value.code == "RESUME_FAILED"
    assert tokens.redeem(tokens.issue("s-3", "u", 2), "s-3", "u") == 2
    with pytest.raises(ProtocolError, match="expired"):
        ResumeTokens("secret", -10).redeem(ResumeTokens("secret", -10).issue("s", "u", 0), "s", "u")


async def test_two_workers_share_the_conversations_a_client_may_resume(tmp_path):
    """Without Redis, a machine's workers share one SQLite file: kept by one, taken by the other, once, by its user."""
    from storage.resume import ResumeStore

    one, two = ResumeStore(tmp_path / "resume.sqlite3"), ResumeStore(tmp_path / "resume.sqlite3")
    messages = [{"role": "user", "content": "name my puppy"}, {"role": "assistant", "content": "Biscuit!"}]
    await one.keep("s-1", "client:a", "atlas", messages, ttl_secs=60)
    assert await two.take("s-1", "client:b") is None  # not theirs: and it is gone for everyone (taken once)
    await one.keep("s-2", "client:a", "v2", messages, ttl_secs=60)
    assert await two.take("s-2", "client:a") == ("v2", messages)
    assert await one.take("s-2", "client:a") is None
    await one.keep("s-3", "client:a", "atlas", messages, ttl_secs=0.05)
    await asyncio.sleep(0.1)
    assert await two.take("s-3", "client:a") is None  # the window closed


def _session_rows(db: Path, ids: list[str]) -> dict[str, dict]:
    deadline = time.monotonic() + 20
    while True:
        with sqlite3.connect(db) as conn:
            conn.row_factory = sqlite3.Row
            rows = {
                r["id"]: dict(r)
                for r in conn.execute(f"SELECT * FROM voice_sessions WHERE id IN ({','.join('?' * len(ids))})", ids)
            }
        if len(rows) == len(ids) and all(r["ended_at"] for r in rows.values()) or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


async def test_talk_client_resumes_the_conversation_after_the_connection_drops_mid_reply(
    atlas, speech, llm_record, artifacts
):
    from app.talk import VoiceClient

    port = int(atlas.rsplit(":", 1)[1])
    proxy = await CuttingProxy(port).start()
    try:
        client = VoiceClient(f"ws://127.0.0.1:{proxy.port}/ws", reconnect=True, user_id=f"resume-{time.time()}")
        started = await client.connect()
        assert started["resumed"] is False and started["resumeToken"]
        first_session = client.session_id
        await client.send_silence(0.3)
        await client.say(speech["puppy"])
        await client.wait_for(lambda e: e.get("type") == "audio_chunk", timeout=60)
        assert proxy.cut() >= 1  # mid-reply: the network drops
        resumed = await client.wait_for(lambda e: e.get("type") == "session_started" and e.get("resumed"), 30)
        assert resumed["resumedFrom"] == first_session and resumed["sessionId"] != first_session
        assert client.reconnects == 1
        n_before = len(read_records(llm_record))
        await client.send_silence(0.3)
        await client.say(speech["dinner"])
        await client.wait_reply_done(timeout=90)
        await client.stop()
    finally:
        await proxy.stop()
    # The resumed session's LLM request carries the conversation before the drop: the puppy question.
    request = json.dumps(read_records(llm_record)[n_before:])
    assert "puppy" in request.lower() and "dinner" in request.lower()
    rows = _session_rows(artifacts / "server.sqlite3", [first_session, resumed["sessionId"]])
    assert rows[first_session]["end_reason"] == "client_disconnected"
    new = rows[resumed["sessionId"]]
    assert new["resumed_from"] == first_session and new["reconnects"] == 1 and new["turns_count"] >= 1


async def test_a_forged_or_replayed_resume_is_refused_and_the_connection_may_start_afresh(atlas):
    import websockets

    url = atlas.replace("http://", "ws://") + "/ws"
    async with websockets.connect(url) as ws:
        await ws.send(
            json.dumps(
                {
                    "type": "session_start",
                    "userId": "u",
                    "conversationId": "c",
                    "resume": {"sessionId": "0f9c5d1e-0000-4000-8000-000000000000", "token": "forged"},
                }
            )
        )
        refused = json.loads(await ws.recv())
        assert refused["type"] == "error" and refused["code"] == "RESUME_FAILED"
        await ws.send(json.dumps({"type": "session_start", "userId": "u", "conversationId": "c"}))
        started = json.loads(await ws.recv())
        assert started["type"] == "session_started" and started["resumed"] is False
        await ws.send(json.dumps({"type": "session_stop"}))


PAGE_CUT_JS = "window.atlas.sessionId !== null && window.atlas.audioChunks > 0"


@pytest.mark.slow
def test_the_page_reconnects_and_resumes_when_the_socket_drops_mid_reply(atlas, speech, artifacts, tmp_path):
    """Headless Chromium, the page served through the proxy; the proxy cuts every connection while Atlas answers."""
    from playwright.sync_api import sync_playwright

    pcm, rate = read_wav(speech["puppy"])
    mic = write_wav(
        tmp_path / "mic.wav", np.concatenate([np.zeros(rate, np.int16), pcm, np.zeros(rate * 40, np.int16)]), rate
    )
    port = int(atlas.rsplit(":", 1)[1])
    loop = asyncio.new_event_loop()
    proxy = loop.run_until_complete(CuttingProxy(port).start())
    runner = __import__("threading").Thread(target=loop.run_forever, daemon=True)
    runner.start()
    try:
        with sync_playwright() as p:
            browser = chromium_with_microphone(p, mic, "--autoplay-policy=no-user-gesture-required")
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{proxy.port}/")
            page.click("#start")
            page.wait_for_function(PAGE_CUT_JS, timeout=90000)
            first = page.evaluate("window.atlas.sessionId")
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result()
            loop.call_soon_threadsafe(proxy.cut)
            page.wait_for_function("window.atlas.reconnects >= 1 && window.atlas.resumed === true", timeout=30000)
            second = page.evaluate("window.atlas.sessionId")
            shown = page.evaluate("window.atlas.states")
            page.screenshot(path=str(artifacts / "page_reconnected.png"))
            page.click("#start")  # Stop
            page.wait_for_function("window.atlas.sessionEnd !== null", timeout=20000)
            browser.close()
    finally:
        loop.call_soon_threadsafe(loop.stop)
    assert second != first and "reconnecting" in shown
    rows = _session_rows(artifacts / "server.sqlite3", [first, second])
    assert rows[second]["resumed_from"] == first and rows[second]["reconnects"] == 1
