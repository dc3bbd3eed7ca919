"""The doors of Pipecat's own clients: RTVI over a WebSocket (Pipecat's Python client transport, protobuf) and
over WebRTC (Pipecat's prebuilt page in headless Chromium, fake microphone, loopback), on the real engines."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import httpx
import numpy as np
import pytest

from tests.helpers import chromium_with_microphone, read_wav, wer, words, write_wav

# --- start tickets ---------------------------------------------------------------------------------------


def test_a_start_ticket_opens_one_session_of_its_door_and_expires():
    from transports.rtvi.tickets import StartTickets
    from vocabulary.errors import ProtocolError

    tickets = StartTickets("shared", ttl_secs=30)
    ticket = tickets.issue("websocket", "5b0e8c4e-1c9f-4a57-9d1c-1d7c2b8a3e11", "front")
    claims = tickets.redeem(ticket, "websocket")
    assert claims["sub"] == "5b0e8c4e-1c9f-4a57-9d1c-1d7c2b8a3e11" and claims["agent"] == "front"
    with pytest.raises(ProtocolError, match="used already"):
        tickets.redeem(ticket, "websocket")
    with pytest.raises(ProtocolError, match="not for the webrtc door"):
        tickets.check(tickets.issue("websocket", None, None), "webrtc")
    # Another process with the same secret redeems it; one with another secret does not.
    assert StartTickets("shared", 30).redeem(tickets.issue("webrtc", None, None), "webrtc")["sub"] == ""
    with pytest.raises(ProtocolError, match="not valid"):
        StartTickets("other", 30).redeem(tickets.issue("webrtc", None, None), "webrtc")
    with pytest.raises(ProtocolError, match="not valid"):
        tickets.redeem(ticket[:-2] + ("AA" if not ticket.endswith("AA") else "BB"), "websocket")
    with pytest.raises(ProtocolError, match="POST /start first"):
        tickets.redeem(None, "websocket")
    expired = StartTickets("shared", ttl_secs=-5).issue("webrtc", None, None)
    with pytest.raises(ProtocolError, match="expired"):
        tickets.redeem(expired, "webrtc")


# --- the protobuf serializer's bounds ---------------------------------------------------------------------


def _serializer(refused: list, budget_secs: float = 2.0, max_messages: float = 0):
    from bots.limits import AudioBudget, MessageRate
    from transports.rtvi.serializer import BoundedProtobufSerializer

    async def on_refused(code, message):
        refused.append(str(code))

    async def on_flood():
        refused.append("flood")

    return BoundedProtobufSerializer(
        max_audio_bytes=8192,
        max_text_bytes=1024,
        rate=MessageRate(max_messages) if max_messages else None,
        budget=AudioBudget(budget_secs),
        on_audio=lambda: None,
        on_refused=on_refused,
        on_flood=on_flood,
    )


async def test_the_protobuf_door_reads_only_bounded_audio_and_rtvi_messages():
    from pipecat.frames.frames import (
        InputAudioRawFrame,
        InputTransportMessageFrame,
        OutputAudioRawFrame,
        OutputTransportMessageFrame,
        TextFrame,
        TranscriptionFrame,
    )
    from pipecat.serializers.protobuf import ProtobufFrameSerializer

    plain = ProtobufFrameSerializer()
    refused: list = []
    s = _serializer(refused)

    async def wire(frame):
        return await plain.serialize(frame)

    audio = await s.deserialize(await wire(OutputAudioRawFrame(b"\x01\x00" * 320, 16000, 1)))
    assert isinstance(audio, InputAudioRawFrame) and len(audio.audio) == 640
    # 48 kHz from a client is resampled to the pipeline's 16 kHz.
    audio48 = await s.deserialize(await wire(OutputAudioRawFrame(b"\x01\x00" * 960, 48000, 1)))
    assert isinstance(audio48, InputAudioRawFrame) and audio48.sample_rate == 16000
    ready = {"label": "rtvi-ai", "type": "client-ready", "id": "1", "data": {"version": "2.2.0"}}
    message = await s.deserialize(await wire(OutputTransportMessageFrame(message=ready)))
    assert isinstance(message, InputTransportMessageFrame) and message.message["type"] == "client-ready"
    # A text or transcription frame would be spoken or answered as if the pipeline had made it.
    assert await s.deserialize(await wire(TextFrame("say this"))) is None
    assert await s.deserialize(await wire(TranscriptionFrame("fake words", "u", "t"))) is None
    assert await s.deserialize(b"\xff\x00garbage") is None
    assert await s.deserialize("a text message") is None
    assert await s.deserialize(await wire(OutputAudioRawFrame(b"\x00\x00" * 320, 16000, 2))) is None
    assert await s.deserialize(await wire(OutputAudioRawFrame(b"\x00" * 641, 16000, 1))) is None
    assert await s.deserialize(await wire(OutputAudioRawFrame(b"\x00\x00" * 8000, 16000, 1))) is None
    assert refused == [
        "INVALID_MESSAGE",
        "INVALID_MESSAGE",
        "INVALID_MESSAGE",
        "INVALID_MESSAGE",
        "INVALID_FIELD",
        "ODD_LENGTH_PCM",
        "FRAME_TOO_LARGE",
    ]
    # Seconds of audio: real time plus the burst; beyond it, dropped and told (once a second at most).
    refused.clear()
    budgeted = _serializer(refused, budget_secs=1.0)
    second = await wire(OutputAudioRawFrame(b"\x00\x00" * 4000, 16000, 1))  # 0.25 s
    passed = [await budgeted.deserialize(second) for _ in range(12)]
    assert 4 <= sum(f is not None for f in passed) <= 6
    assert refused == ["AUDIO_RATE_EXCEEDED"]


async def test_a_flooding_protobuf_connection_is_cut_off():
    from pipecat.frames.frames import OutputAudioRawFrame
    from pipecat.serializers.protobuf import ProtobufFrameSerializer

    refused: list = []
    s = _serializer(refused, budget_secs=1000, max_messages=50)
    data = await ProtobufFrameSerializer().serialize(OutputAudioRawFrame(b"\x00\x00" * 16, 16000, 1))
    for _ in range(2000):
        await s.deserialize(data)
        if "flood" in refused:
            break
        await asyncio.sleep(0.001)
    assert "flood" in refused


# --- the store -------------------------------------------------------------------------------------------


def test_a_store_made_before_the_rtvi_doors_takes_their_sessions(tmp_path):
    """An embedded store made by an earlier release (transport CHECK without webrtc/rtvi_ws) is widened on open."""
    from storage.sinks import SCHEMA, SQLiteSink

    path = tmp_path / "old.sqlite3"
    old = SCHEMA.read_text().replace(
        "CHECK (transport IN ('websocket', 'twilio', 'daily', 'webrtc', 'rtvi_ws'))",
        "CHECK (transport IN ('websocket', 'twilio', 'daily'))",
    )
    conn = sqlite3.connect(path)
    conn.executescript(old)
    conn.execute("INSERT INTO voice_sessions (id, transport, started_at) VALUES ('a', 'daily', '2026-12-01T00:00:00Z')")
    conn.commit()
    conn.close()
    db = SQLiteSink(path)._db()
    db.execute("INSERT INTO voice_sessions (id, transport, started_at) VALUES ('b', 'webrtc', '2026-12-05T00:00:00Z')")
    db.execute("INSERT INTO voice_sessions (id, transport, started_at) VALUES ('c', 'rtvi_ws', '2026-12-05T00:00:00Z')")
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("INSERT INTO voice_sessions (id, transport, started_at) VALUES ('d', 'fax', '2026-12-05T00:00:00Z')")
    assert [r[0] for r in db.execute("SELECT transport FROM voice_sessions ORDER BY id")] == [
        "daily",
        "webrtc",
        "rtvi_ws",
    ]


# --- over real sockets, on the real engines ---------------------------------------------------------------


def _start(base: str, transport: str, **body) -> dict:
    r = httpx.post(base + "/start", json={"transport": transport, "body": body}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_start_refuses_what_it_cannot_start(atlas):
    bad = httpx.post(atlas + "/start", json={"transport": "carrier-pigeon"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["code"] == "INVALID_FIELD"
    agent = httpx.post(atlas + "/start", json={"transport": "webrtc", "body": {"agent": "nobody"}}, timeout=10)
    assert agent.status_code == 400 and agent.json()["code"] == "UNKNOWN_AGENT"
    big = httpx.post(atlas + "/start", content=b"{" + b" " * 5000 + b"}", timeout=10)
    assert big.status_code == 413
    ticket = _start(atlas, "webrtc")["sessionId"]
    # An offer with no SDP, a forged ticket, a websocket ticket at the WebRTC door: refused, nothing starts.
    r = httpx.post(f"{atlas}/sessions/{ticket}/api/offer", json={"type": "offer"}, timeout=10)
    assert r.status_code == 400 and r.json()["code"] == "INVALID_FIELD"
    r = httpx.post(f"{atlas}/sessions/forged/api/offer", json={"sdp": "v=0", "type": "offer"}, timeout=10)
    assert r.status_code == 401 and r.json()["code"] == "AUTH_FAILED"
    ws_ticket = _start(atlas, "websocket")["token"]
    r = httpx.post(f"{atlas}/sessions/{ws_ticket}/api/offer", json={"sdp": "v=0", "type": "offer"}, timeout=10)
    assert r.status_code == 401 and "not for the webrtc door" in r.json()["message"]
    r = httpx.patch(
        f"{atlas}/sessions/{ticket}/api/offer", json={"pc_id": "someone-elses", "candidates": []}, timeout=10
    )
    assert r.status_code == 404


async def _pipecat_client_conversation(url: str, wav, seconds: float) -> dict:
    """Pipecat's own WebSocket client transport, protobuf frames, as a Pipecat app talking to a bot: the RTVI
    handshake, then `wav` spoken in real time, then silence; returns what came back."""
    from pipecat.frames.frames import (
        Frame,
        InputAudioRawFrame,
        InputTransportMessageFrame,
        InterruptionFrame,
        OutputAudioRawFrame,
        OutputTransportMessageUrgentFrame,
    )
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.serializers.protobuf import ProtobufFrameSerializer
    from pipecat.transports.websocket.client import WebsocketClientParams, WebsocketClientTransport
    from pipecat.workers.runner import WorkerRunner

    got: dict = {"messages": [], "audio_bytes": 0, "audio_rate": None, "interruptions": 0}

    class Collect(FrameProcessor):
        async def process_frame(self, frame: Frame, direction: FrameDirection):
            await super().process_frame(frame, direction)
            if isinstance(frame, InterruptionFrame):
                # The bot's "stop playing" (protobuf `interruption`): a caller's microphone goes on.
                got["interruptions"] += 1
                return
            if isinstance(frame, InputTransportMessageFrame):
                got["messages"].append(frame.message)
            elif isinstance(frame, InputAudioRawFrame):
                got["audio_bytes"] += len(frame.audio)
                got["audio_rate"] = frame.sample_rate
                return
            await self.push_frame(frame, direction)

    transport = WebsocketClientTransport(
        url,
        WebsocketClientParams(
            serializer=ProtobufFrameSerializer(),
            audio_in_enabled=True,
            audio_out_enabled=True,
            audio_in_sample_rate=16000,
            audio_out_sample_rate=16000,
            add_wav_header=False,
        ),
    )
    worker = PipelineWorker(
        Pipeline([transport.input(), Collect(), transport.output()]),
        params=PipelineParams(audio_in_sample_rate=16000, audio_out_sample_rate=16000),
        enable_rtvi=False,
        idle_timeout_secs=None,
    )
    pcm, rate = read_wav(wav)
    assert rate == 16000

    @transport.event_handler("on_connected")
    async def _connected(_transport, _ws):
        ready = {
            "label": "rtvi-ai",
            "type": "client-ready",
            "id": "ready-1",
            "data": {"version": "2.2.0", "about": {"library": "pipecat-python-test"}},
        }
        await worker.queue_frame(OutputTransportMessageUrgentFrame(message=ready))
        chunk = 320  # 20 ms
        audio = np.concatenate([np.zeros(8000, np.int16), pcm, np.zeros(int(16000 * seconds), np.int16)])
        for i in range(0, len(audio), chunk):
            await worker.queue_frame(OutputAudioRawFrame(audio[i : i + chunk].tobytes(), 16000, 1))

    async def stop_when_answered():
        # The bot's reply to the whole utterance has been spoken: it stopped speaking after the speech ended.
        spoken_by = time.monotonic() + 0.5 + len(pcm) / 16000 + 1.0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            types = [m.get("type") for m in got["messages"]]
            if time.monotonic() > spoken_by and types and types[-1] == "bot-stopped-speaking":
                break
            if seconds == 0 and "error" in types:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    stopper = asyncio.create_task(stop_when_answered())
    await runner.run()
    await stopper
    return got


def _rtvi(messages: list[dict], kind: str) -> list[dict]:
    return [m for m in messages if m.get("label") == "rtvi-ai" and m.get("type") == kind]


def _assert_recorded(atlas: str, artifacts, door: str, since: float) -> None:
    """The session that just ended is in the store under its door, ended, with its turns, and /metrics counts
    its turns under the door."""
    from tests.helpers import metric_samples

    since_iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(since - 1))
    deadline = time.monotonic() + 20
    while True:
        db = sqlite3.connect(artifacts / "server.sqlite3")
        rows = db.execute(
            "SELECT s.id, s.ended_at, count(t.id) FROM voice_sessions s LEFT JOIN voice_turns t ON t.session_id = s.id"
            " WHERE s.transport = ? AND s.started_at >= ? GROUP BY s.id",
            (door, since_iso),
        ).fetchall()
        db.close()
        if any(ended and turns >= 1 for _id, ended, turns in rows):
            break
        assert time.monotonic() < deadline, f"no ended {door} session with turns recorded: {rows}"
        time.sleep(0.5)
    samples = metric_samples(httpx.get(atlas + "/metrics", timeout=10).text)
    assert samples.get(("atlas_turns_total", (("transport", door),)), 0) >= 1, door


async def test_pipecat_python_websocket_client_holds_a_spoken_conversation(atlas, speech, artifacts):
    from tests.conftest import UTTERANCES

    began = time.time()
    started = await asyncio.to_thread(_start, atlas, "websocket")
    assert started["wsUrl"].startswith("ws://") and started["wsUrl"].endswith("/rtvi/ws")
    got = await _pipecat_client_conversation(f"{started['wsUrl']}?token={started['token']}", speech["dinner"], 25)
    messages = got["messages"]
    assert _rtvi(messages, "bot-ready"), [m.get("type") for m in messages]
    finals = [m["data"]["text"] for m in _rtvi(messages, "user-transcription") if m["data"].get("final")]
    assert wer(UTTERANCES["dinner"], " ".join(finals)) <= 0.15, finals
    spoken = " ".join(m["data"]["text"] for m in _rtvi(messages, "bot-tts-text"))
    assert len(words(spoken)) >= 3, spoken
    assert _rtvi(messages, "bot-started-speaking") and _rtvi(messages, "user-started-speaking")
    assert _rtvi(messages, "metrics"), "RTVI metrics (TTFB, processing) reach the client"
    assert got["audio_bytes"] > 16000 and got["audio_rate"], "the reply's audio came back as protobuf frames"
    assert not _rtvi(messages, "error"), _rtvi(messages, "error")
    await asyncio.to_thread(_assert_recorded, atlas, artifacts, "rtvi_ws", began)
    # A ticket opens one session: the same URL again is refused with an RTVI error and a policy close.
    again = await _pipecat_client_conversation(f"{started['wsUrl']}?token={started['token']}", speech["dinner"], 0)
    errors = [m["data"]["error"] for m in _rtvi(again["messages"], "error")]
    assert errors and errors[0].startswith("AUTH_FAILED: the start ticket was used already"), again["messages"]


# Pipecat's SmallWebRTC client protocol, as its JS transport speaks it, on the browser's own WebRTC stack: the
# fake microphone's track and a data channel in the offer (ICE gathered first), POST /start, the offer to
# /sessions/<id>/api/offer, the answer, then RTVI's client-ready over the data channel.
WEBRTC_CLIENT_JS = """
async () => {
  const out = window.__rtvi = {messages: [], offer: null};
  const stream = await navigator.mediaDevices.getUserMedia({audio: true});
  const pc = window.__pc = new RTCPeerConnection({iceServers: []});
  const dc = pc.createDataChannel("chat", {ordered: true});
  dc.onmessage = (e) => { try { out.messages.push(JSON.parse(e.data)); } catch (err) {} };
  dc.onopen = () => dc.send(JSON.stringify({label: "rtvi-ai", type: "client-ready", id: "ready-1",
    data: {version: "2.2.0", about: {library: "chromium-webrtc-test"}}}));
  pc.addTransceiver(stream.getAudioTracks()[0], {direction: "sendrecv"});
  pc.ontrack = (e) => { const a = new Audio(); a.srcObject = new MediaStream([e.track]); a.muted = true; a.play(); };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((done) => {
    if (pc.iceGatheringState === "complete") return done();
    pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && done());
  });
  const post = (url, body) => fetch(url, {method: "POST", headers: {"content-type": "application/json"},
    body: JSON.stringify(body)});
  // The request Pipecat's prebuilt page makes.
  const start = await (await post("/start", {createDailyRoom: false, enableDefaultIceServers: true,
    transport: "webrtc"})).json();
  const answered = await post(`/sessions/${start.sessionId}/api/offer`,
    {sdp: pc.localDescription.sdp, type: "offer"});
  out.offer = {status: answered.status, body: await answered.json()};
  await pc.setRemoteDescription({sdp: out.offer.body.sdp, type: out.offer.body.type});
}
"""

# What the audio track brought: Opus sends a few bytes a packet for silence, hundreds for speech (headless
# Chromium plays nothing out, so its audio level stats stay 0).
RECEIVED_AUDIO_JS = """
async () => {
  let packets = 0, bytes = 0;
  (await window.__pc.getStats()).forEach((r) => {
    if (r.type === "inbound-rtp" && r.kind === "audio") { packets += r.packetsReceived; bytes += r.bytesReceived; }
  });
  return {packets, bytes};
}
"""


def test_a_browser_holds_a_spoken_conversation_over_webrtc(atlas, speech, artifacts, tmp_path):
    """Headless Chromium, its fake microphone playing speech, over loopback WebRTC to the server's aiortc: the
    speech is heard, the reply comes back as audio on the track and as RTVI messages on the data channel."""
    from playwright.sync_api import sync_playwright

    from tests.conftest import UTTERANCES

    began = time.time()
    pcm, rate = read_wav(speech["dinner"])
    mic = write_wav(
        tmp_path / "mic.wav", np.concatenate([np.zeros(rate, np.int16), pcm, np.zeros(rate * 30, np.int16)]), rate
    )
    with sync_playwright() as p:
        browser = chromium_with_microphone(
            p,
            mic,
            "--autoplay-policy=no-user-gesture-required",
            # Host candidates as addresses, not mDNS names (aiortc resolves no .local names).
            "--disable-features=WebRtcHideLocalIpsWithMdns",
        )
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(atlas + "/livez")  # any page of the server's origin: /start and the offer are same-origin
        page.evaluate(WEBRTC_CLIENT_JS)
        offer = page.evaluate("window.__rtvi.offer")
        page.wait_for_function(
            "window.__rtvi.messages.some(m => m.type === 'user-transcription' && m.data.final"
            " && m.data.text.toLowerCase().includes('dinner'))",
            timeout=90000,
        )
        page.wait_for_function(
            "window.__rtvi.messages.filter(m => m.type === 'bot-stopped-speaking').length > 0", timeout=90000
        )
        audio = page.evaluate(RECEIVED_AUDIO_JS)
        messages = page.evaluate("window.__rtvi.messages")
        page.evaluate("window.__pc.close()")
        browser.close()
    assert offer["status"] == 200 and offer["body"]["type"] == "answer", offer
    assert _rtvi(messages, "bot-ready"), [m.get("type") for m in messages]
    finals = [m["data"]["text"] for m in _rtvi(messages, "user-transcription") if m["data"].get("final")]
    assert wer(UTTERANCES["dinner"], " ".join(finals)) <= 0.2, finals
    spoken = " ".join(m["data"]["text"] for m in _rtvi(messages, "bot-tts-text"))
    assert len(words(spoken)) >= 3, spoken
    assert audio["bytes"] > 30000, audio  # seconds of speech on the audio track, not only silence
    assert not _rtvi(messages, "error") and not errors, (_rtvi(messages, "error"), errors)
    _assert_recorded(atlas, artifacts, "webrtc", began)


def test_pipecat_prebuilt_client_is_served_at_client(atlas, artifacts):
    """Pipecat's prebuilt page (pipecat-ai-prebuilt from PyPI) at /client/, its assets with it. Its microphone
    comes from Daily's call-machine bundle, which the page fetches from c.daily.co: a browser with internet
    access connects; this machine has none, so the conversation itself is tested above on the same routes."""
    from playwright.sync_api import sync_playwright

    from tests.helpers import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page()
        failed: list[str] = []
        page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.goto(atlas + "/client/")
        page.get_by_role("button", name="Connect").wait_for(timeout=30000)
        title = page.title()
        page.screenshot(path=str(artifacts / "prebuilt_client.png"))
        browser.close()
    assert title == "Pipecat Playground" or "Pipecat" in title, title
    assert not [f for f in failed if atlas in f], failed
