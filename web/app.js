// Atlas browser client: microphone -> /ws as PCM16 16 kHz; server audio_chunks -> gapless playback.
// Protocol: docs/PROTOCOL.md. `window.atlas` exposes state for the end-to-end test.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  start: $("start"), mute: $("mute"), interrupt: $("interrupt"), status: $("status"),
  level: $("level"), partial: $("partial"), transcript: $("transcript"), stats: $("stats"),
  latency: $("latency"), error: $("error"), token: $("token"), signin: $("signin"),
};

// The user's Supabase access token, for servers with auth on. Supabase's sign-in redirect brings it in the
// address's fragment (#access_token=...): it is kept in sessionStorage (this tab only) and removed from the
// address bar; it can also be pasted into the sign-in field.
(function takeTokenFromAddress() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("access_token");
  if (token) {
    sessionStorage.setItem("atlas-token", token);
    history.replaceState(null, "", location.pathname + location.search);
  }
  ui.token.value = sessionStorage.getItem("atlas-token") || "";
  ui.token.onchange = () => sessionStorage.setItem("atlas-token", ui.token.value.trim());
})();

const atlas = (window.atlas = {
  state: "idle", sessionId: null, audioChunks: 0, audioSeconds: 0, finals: [], botText: [],
  errors: [], flushes: 0, sessionEnd: null,
});

let ws = null, ctx = null, mic = null, capture = null, playback = null, source = null;
let outRate = 22050, muted = false;
let botLine = null, botSentence = -1;

function setStatus(s) {
  atlas.state = s;
  ui.status.textContent = s;
  ui.status.className = "status " + s;
}

function addLine(kind, text, note) {
  const li = document.createElement("li");
  li.className = kind;
  li.textContent = text;
  if (note) {
    const small = document.createElement("small");
    small.textContent = note;
    li.appendChild(small);
  }
  ui.transcript.appendChild(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function showError(msg) {
  atlas.errors.push(msg);
  ui.error.textContent = `${msg.code}: ${msg.message}`;
  if (msg.code === "AUTH_FAILED") ui.signin.open = true;
}

function b64ToBuffer(b64) {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return bytes.buffer;
}

function onMessage(ev) {
  if (typeof ev.data !== "string") return;
  const m = JSON.parse(ev.data);
  switch (m.type) {
    case "session_started":
      atlas.sessionId = m.sessionId;
      outRate = m.audioFormat.sampleRate;
      playback.port.postMessage({ type: "format", sampleRate: outRate });
      break;
    case "status":
      setStatus(m.status);
      if (m.status === "transcribing") botLine = null;
      break;
    case "partial_transcript":
      ui.partial.textContent = m.text;
      break;
    case "final_transcript":
      ui.partial.textContent = "";
      atlas.finals.push(m.text);
      addLine("user", m.text, m.confidence != null ? `${Math.round(m.confidence * 100)}%` : "");
      botLine = null;
      break;
    case "audio_chunk": {
      const buf = b64ToBuffer(m.audio);
      atlas.audioChunks++;
      atlas.audioSeconds += buf.byteLength / 2 / outRate;
      playback.port.postMessage({ type: "push", buffer: buf }, [buf]);
      ui.stats.textContent = `audio: ${atlas.audioChunks} chunks, ${atlas.audioSeconds.toFixed(1)} s`;
      break;
    }
    case "bot_transcript":
      atlas.botText.push(m.text);
      if (!botLine || m.sentenceIndex !== botSentence + 1) botLine = addLine("bot", "");
      botSentence = m.sentenceIndex;
      botLine.textContent = (botLine.textContent + " " + m.text).trim();
      break;
    case "audio_flush":
      atlas.flushes++;
      playback.port.postMessage({ type: "flush" });
      break;
    case "error":
      showError(m);
      break;
    case "session_end":
      atlas.sessionEnd = m;
      if (m.metrics && m.metrics.p50Latency != null) {
        ui.latency.textContent = `voice-to-voice p50 ${m.metrics.p50Latency} ms, p95 ${m.metrics.p95Latency} ms`;
      }
      break;
  }
}

async function start() {
  ui.start.disabled = true;
  ui.error.textContent = "";
  try {
    ctx = new AudioContext();
    await ctx.audioWorklet.addModule("/static/capture-worklet.js");
    await ctx.audioWorklet.addModule("/static/playback-worklet.js");
    mic = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    playback = new AudioWorkletNode(ctx, "atlas-playback", { outputChannelCount: [1] });
    playback.connect(ctx.destination);
    capture = new AudioWorkletNode(ctx, "atlas-capture", { numberOfOutputs: 0 });
    source = ctx.createMediaStreamSource(mic);
    source.connect(capture);
    if (ctx.state === "suspended") await ctx.resume();

    const proto = location.protocol === "https:" ? "wss" : "ws";
    ws = new WebSocket(`${proto}://${location.host}/ws`);
    ws.binaryType = "arraybuffer";
    ws.onmessage = onMessage;
    ws.onclose = () => stop(false);
    ws.onerror = () => showError({ code: "CONNECTION", message: "connection to the server failed" });
    await new Promise((resolve, reject) => {
      ws.onopen = resolve;
      setTimeout(() => reject(new Error("timeout connecting")), 10000);
    });
    const user = localStorage.getItem("atlas-user") || `browser-${crypto.randomUUID()}`;
    localStorage.setItem("atlas-user", user);
    const start = { type: "session_start", userId: user, conversationId: crypto.randomUUID() };
    const token = ui.token.value.trim();
    if (token) start.authToken = token;
    // `?agent=<name>` on the page's URL talks to that agent of the server (its default otherwise).
    const agent = new URLSearchParams(location.search).get("agent");
    if (agent) start.agent = agent;
    ws.send(JSON.stringify(start));

    capture.port.onmessage = (e) => {
      if (e.data.type === "pcm") {
        if (ws && ws.readyState === WebSocket.OPEN && atlas.sessionId) ws.send(e.data.buffer);
      } else if (e.data.type === "level") {
        ui.level.style.width = `${Math.min(100, Math.round(e.data.rms * 400))}%`;
      }
    };
    ui.start.textContent = "Stop";
    ui.start.disabled = false;
    ui.start.onclick = () => stop(true);
    ui.mute.disabled = ui.interrupt.disabled = false;
  } catch (err) {
    showError({ code: "START_FAILED", message: err.message || String(err) });
    await stop(false);
  }
}

async function stop(sendStop) {
  if (sendStop && ws && ws.readyState === WebSocket.OPEN) {
    ws.send(JSON.stringify({ type: "session_stop" }));
    return; // the server answers session_end and closes; onclose comes back here
  }
  if (mic) mic.getTracks().forEach((t) => t.stop());
  if (ctx) await ctx.close().catch(() => {});
  ws = ctx = mic = capture = playback = source = null;
  atlas.sessionId = null;
  setStatus("idle");
  ui.start.textContent = "Start";
  ui.start.disabled = false;
  ui.start.onclick = start;
  ui.mute.disabled = ui.interrupt.disabled = true;
  ui.level.style.width = "0";
}

ui.start.onclick = start;
ui.mute.onclick = () => {
  muted = !muted;
  ws && ws.send(JSON.stringify({ type: muted ? "mute" : "unmute" }));
  ui.mute.textContent = muted ? "Unmute" : "Mute";
  ui.mute.setAttribute("aria-pressed", String(muted));
};
ui.interrupt.onclick = () => {
  ws && ws.send(JSON.stringify({ type: "interrupt" }));
  playback && playback.port.postMessage({ type: "flush" });
};
