// Atlas browser client: microphone -> /ws as PCM16 16 kHz; server audio_chunks -> gapless playback.
// Protocol: docs/PROTOCOL.md. `window.atlas` exposes state for the end-to-end tests.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  app: $("app"), start: $("start"), mute: $("mute"), interrupt: $("interrupt"), status: $("status"),
  hint: $("hint"), orb: $("orb"), level: $("level"), transcript: $("transcript"), empty: $("empty"),
  conversation: $("conversation"), stats: $("stats"), latency: $("latency"), latencyValue: $("latency-value"),
  error: $("error"), errorText: $("error-text"), errorCode: $("error-code"), token: $("token"),
  signin: $("signin"), speed: $("speed"), speedValue: $("speed-value"), announce: $("announce"),
  feedback: $("feedback"), feedbackComment: $("feedback-comment"), feedbackCount: $("feedback-count"),
  feedbackSend: $("feedback-send"), feedbackSkip: $("feedback-skip"), feedbackResult: $("feedback-result"),
  ratingWord: $("rating-word"),
};

// --- what a person reads ----------------------------------------------------------------------------------

// Each state: the label shown (and announced) and a hint under it.
const STATES = {
  idle: ["Ready", "Press Start to talk to Atlas."],
  connecting: ["Connecting", "Getting the microphone and connecting to Atlas..."],
  listening: ["Listening", "Go ahead, Atlas is listening."],
  transcribing: ["Hearing you", "Atlas is hearing you. Pause when you are done."],
  thinking: ["Thinking", "Atlas is working out an answer."],
  speaking: ["Speaking", "Atlas is answering. Talk to interrupt."],
  stopping: ["Ending the call", "Saying goodbye to the server..."],
  reconnecting: ["Reconnecting", "The connection dropped. Getting it back; the conversation goes on..."],
};

// The server's error codes (docs/PROTOCOL.md's `error` table and HTTP errors) in a sentence. The code itself is
// shown small beside it, for a bug report.
const ERROR_TEXT = {
  NOT_STARTED: "The call had not started yet when audio was sent. Press Start again.",
  ALREADY_STARTED: "This call had already started; the call goes on.",
  INVALID_JSON: "The page sent a message the server could not read. Reload the page if this keeps happening.",
  INVALID_MESSAGE: "The page sent a message the server could not read. Reload the page if this keeps happening.",
  UNKNOWN_TYPE: "The page and the server disagree about the protocol. Reload the page.",
  INVALID_FIELD: "The server refused a setting this page sent. Reload the page, then press Start.",
  FRAME_TOO_LARGE: "Some audio was too large to send and was dropped.",
  ODD_LENGTH_PCM: "Some audio arrived damaged and was dropped.",
  SESSION_START_TIMEOUT: "The call took too long to start. Press Start to try again.",
  SESSION_IDLE_TIMEOUT: "The call ended because no audio arrived for a long time.",
  SESSION_MAX_DURATION: "The call reached its maximum length and ended. Press Start for a new one.",
  SERVER_NOT_READY: "Atlas is still starting up. Wait a few seconds, then press Start.",
  SERVER_BUSY: "Atlas is busy with other calls right now. Try again in a minute.",
  SERVER_SHUTTING_DOWN: "Atlas is restarting. Press Start again in a moment.",
  LIMITS_UNAVAILABLE: "Atlas cannot take new calls for a moment. Try again shortly.",
  ORIGIN_NOT_ALLOWED: "This server does not accept calls from this web address.",
  TOO_MANY_SESSIONS: "You already have the most calls open at once. End another one (another tab?) first.",
  RATE_LIMITED: "Too many calls were started in the last minute. Wait a minute, then press Start.",
  MESSAGE_RATE_EXCEEDED: "This device is sending too fast; some audio was dropped.",
  AUDIO_RATE_EXCEEDED: "Audio is arriving faster than real time; some of it was dropped.",
  AUDIO_BACKLOG: "Atlas fell behind and ended the call. Press Start to try again.",
  AUTH_FAILED: "Sign-in is needed. Paste a valid access token under Sign-in token, then press Start.",
  PIPELINE_ERROR: "Something went wrong with speech on the server; the call goes on.",
  STT_RECONNECTING: "Speech recognition reconnected; nothing you said is lost.",
  LLM_UNAVAILABLE: "Atlas's main brain is unavailable, so this answer comes from a backup.",
  TTS_FALLBACK: "Atlas's usual voice failed, so a backup voice finishes this answer.",
  TOOL_FAILED: "A tool Atlas tried to use did not work; the call goes on.",
  UNKNOWN_AGENT: "The agent named in this address does not exist on the server. Remove ?agent=... and press Start.",
  RESUME_FAILED: "The dropped call could not be picked up again. Press Start to begin a new one.",
  INTERNAL_ERROR: "Something went wrong on the server and the call ended. Press Start to try again.",
  TWILIO_SIGNATURE_INVALID: "A phone request was refused because it was not signed by Twilio.",
  TWILIO_STREAM_REFUSED: "A phone stream was refused.",
  // Client-side problems, in the same form.
  MIC_BLOCKED: "Microphone access is blocked. Allow it from the address bar, then press Start.",
  MIC_NOT_FOUND: "No microphone was found. Plug one in or switch it on, then press Start.",
  MIC_BUSY: "The microphone could not be opened; another app may be using it. Close that app, then press Start.",
  MIC_FAILED: "The microphone could not be opened. Check it, then press Start.",
  NEEDS_HTTPS: "The microphone only works on a secure (https) page. Open this page over https.",
  UNSUPPORTED: "This browser cannot record audio here. Try a recent Chrome, Edge, Firefox or Safari.",
  CONNECTION: "Atlas could not be reached. Check your connection, then press Start.",
  CONNECTION_LOST: "The connection to Atlas was lost. Press Start to talk again.",
  START_FAILED: "The call could not start. Press Start to try again.",
  // Feedback (POST /feedback).
  FEEDBACK_FAILED: "Your feedback could not be sent. Try again.",
};
// Codes that report something the call survived: shown quietly, not as an alarm.
const NOTICES = new Set([
  "ALREADY_STARTED", "FRAME_TOO_LARGE", "ODD_LENGTH_PCM", "MESSAGE_RATE_EXCEEDED", "AUDIO_RATE_EXCEEDED",
  "PIPELINE_ERROR", "STT_RECONNECTING", "LLM_UNAVAILABLE", "TTS_FALLBACK", "TOOL_FAILED",
]);
const RATING_WORDS = ["", "Bad", "Poor", "Okay", "Good", "Great"];
const SPEED_MIN = 0.7, SPEED_MAX = 1.2;

// --- state for the tests ----------------------------------------------------------------------------------

const atlas = (window.atlas = {
  state: "idle", sessionId: null, audioChunks: 0, audioSeconds: 0, finals: [], partials: [], botText: [],
  errors: [], flushes: 0, sessionEnd: null, turnMetrics: [], speed: 1,
  reconnects: 0, resumed: false, states: [], // a dropped connection picked up again (session_start `resume`)
  playedSeconds: 0, playing: false, // reply audio that reached the speakers (from the playback worklet)
  audioState: "none", // the AudioContext's state after the tap that started the call
  wakeLock: "wakeLock" in navigator ? "released" : "unsupported", // held | released | unavailable | unsupported
  wakeLockEvents: [],
  feedback: { state: "none", sessionId: null, rating: null, comment: "", error: null },
});

let ws = null, ctx = null, mic = null, capture = null, playback = null, source = null;
let outRate = 22050, muted = false, running = false, callStarted = false, stopTimer = null;
let botLine = null, partialLine = null, lastSessionId = null;
let wakeLock = null, noticeTimer = null, startTimer = null;
// What a dropped connection needs to resume the call: the session_start sent, and the server's resume token.
let startMsg = null, resumeToken = null, reconnectTimer = null;
const RECONNECT_DELAYS = [500, 1000, 2000, 4000, 8000, 8000]; // ms between tries (backoff)

// --- the state shown and announced ------------------------------------------------------------------------

function setStatus(s) {
  if (atlas.state !== s) atlas.states.push(s);
  atlas.state = s;
  const [label, hint] = STATES[s] || [s, ""];
  ui.status.textContent = label;
  ui.status.className = "status " + s;
  ui.hint.textContent = muted && running ? "Your microphone is muted. Press Unmute to talk." : hint;
  ui.app.className = "app " + s + (muted ? " muted" : "");
  // Announced once per change (the visible label is not itself live: it would repeat on every repaint).
  if (ui.announce.dataset.state !== s) {
    ui.announce.dataset.state = s;
    if (s !== "idle") ui.announce.textContent = `Atlas: ${label}.`;
    else if (atlas.feedback.state === "asking") ui.announce.textContent = "Call ended. How was this call? Rate it below.";
    else ui.announce.textContent = callStarted ? "Call ended." : "";
  }
}

function scrollToEnd() {
  ui.conversation.scrollTop = ui.conversation.scrollHeight;
}

function addLine(kind, text, note) {
  ui.empty.hidden = true;
  const li = document.createElement("li");
  li.className = kind;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = kind.startsWith("user") ? "You" : kind === "system" ? "" : "Atlas";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  li.append(who, body);
  if (note) {
    const small = document.createElement("small");
    small.textContent = note;
    small.title = "how sure speech recognition was";
    li.append(" ", small);
  }
  ui.transcript.insertBefore(li, partialLine && partialLine.parentNode ? partialLine : null);
  scrollToEnd();
  return li;
}

function setPartial(text) {
  if (!text) {
    if (partialLine) partialLine.remove();
    partialLine = null;
    return;
  }
  if (!partialLine) {
    partialLine = document.createElement("li");
    partialLine.className = "user partial";
    partialLine.setAttribute("aria-hidden", "true"); // the final is announced, not every guess
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = "You";
    const body = document.createElement("span");
    body.className = "text";
    partialLine.append(who, body);
  }
  partialLine.querySelector(".text").textContent = text;
  if (!partialLine.parentNode) ui.transcript.appendChild(partialLine);
  ui.empty.hidden = true;
  scrollToEnd();
}

// --- errors in words --------------------------------------------------------------------------------------

function showError(msg) {
  atlas.errors.push(msg);
  const code = msg.code || "ERROR";
  const text = ERROR_TEXT[code] || (msg.message ? `Something went wrong: ${msg.message}` : "Something went wrong.");
  ui.errorText.textContent = text;
  ui.errorCode.textContent = code;
  ui.errorCode.title = msg.message || "";
  ui.error.hidden = false;
  ui.error.classList.toggle("notice", NOTICES.has(code));
  // Something the call survived fades after a while; a real problem stays until the next Start.
  clearTimeout(noticeTimer);
  if (NOTICES.has(code)) noticeTimer = setTimeout(clearError, 8000);
  if (code === "AUTH_FAILED") {
    ui.signin.hidden = false;
    ui.signin.open = true;
  }
}

function clearError() {
  ui.error.hidden = true;
  ui.errorText.textContent = ui.errorCode.textContent = "";
}

function micErrorCode(err) {
  switch (err && err.name) {
    case "NotAllowedError":
    case "PermissionDeniedError":
    case "SecurityError":
      return "MIC_BLOCKED";
    case "NotFoundError":
    case "DevicesNotFoundError":
    case "OverconstrainedError":
      return "MIC_NOT_FOUND";
    case "NotReadableError":
    case "TrackStartError":
    case "AbortError":
      return "MIC_BUSY";
    default:
      return "MIC_FAILED";
  }
}

class StartError extends Error {
  constructor(code, message) {
    super(message || code);
    this.code = code;
  }
}

// --- audio ------------------------------------------------------------------------------------------------

function b64ToBuffer(b64) {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return bytes.buffer;
}

// Called synchronously inside the tap/click: mobile browsers only let audio start from a user gesture, so the
// AudioContext is made and resumed here, and a silent sample is played to unlock output on older iOS.
function unlockAudio() {
  const AC = window.AudioContext || window.webkitAudioContext;
  if (!AC) throw new StartError("UNSUPPORTED", "no Web Audio");
  ctx = new AC({ latencyHint: "interactive" });
  const resumed = ctx.resume().catch(() => {});
  try {
    const silent = ctx.createBufferSource();
    silent.buffer = ctx.createBuffer(1, 1, ctx.sampleRate);
    silent.connect(ctx.destination);
    silent.start(0);
  } catch (_) { /* nothing to unlock */ }
  atlas.audioState = ctx.state;
  ctx.onstatechange = () => { if (ctx) atlas.audioState = ctx.state; };
  return resumed;
}

// A later tap anywhere brings back audio the system suspended (a phone call, iOS "interrupted").
document.addEventListener("pointerdown", () => {
  if (ctx && running && ctx.state !== "running" && ctx.state !== "closed") ctx.resume().catch(() => {});
}, { passive: true });

// --- screen wake lock: the phone's screen stays on during a call -----------------------------------------

async function acquireWakeLock() {
  if (!("wakeLock" in navigator) || wakeLock || !running || document.visibilityState !== "visible") return;
  try {
    const lock = await navigator.wakeLock.request("screen");
    if (!running) { // the call ended while asking
      lock.release().catch(() => {});
      return;
    }
    wakeLock = lock;
    atlas.wakeLock = "held";
    atlas.wakeLockEvents.push("acquired");
    lock.addEventListener("release", () => {
      if (wakeLock === lock) wakeLock = null;
      atlas.wakeLock = "released";
      atlas.wakeLockEvents.push("released");
    });
  } catch (err) { // refused (battery saver, a hidden page, a policy): the call goes on without it
    atlas.wakeLock = "unavailable";
    atlas.wakeLockEvents.push("refused: " + (err && err.name));
  }
}

function releaseWakeLock() {
  if (wakeLock) {
    const lock = wakeLock;
    wakeLock = null;
    lock.release().catch(() => {});
  }
}

document.addEventListener("visibilitychange", () => {
  if (document.visibilityState !== "visible" || !running) return;
  acquireWakeLock(); // the system releases the lock when the page is hidden
  if (ctx && ctx.state === "suspended") ctx.resume().catch(() => {});
});

// Storage may be off (private browsing, a policy): the page works without remembering.
function stored(storage, key) {
  try {
    return storage.getItem(key);
  } catch (_) {
    return null;
  }
}

function store(storage, key, value) {
  try {
    storage.setItem(key, value);
  } catch (_) { /* not remembered */ }
}

// --- voice speed ------------------------------------------------------------------------------------------

function clampSpeed(v) {
  const n = Number(v);
  if (!Number.isFinite(n)) return 1;
  return Math.round(Math.min(SPEED_MAX, Math.max(SPEED_MIN, n)) * 100) / 100;
}

function showSpeed() {
  atlas.speed = clampSpeed(ui.speed.value);
  ui.speedValue.textContent = atlas.speed.toFixed(2) + "\u00d7";
}

ui.speed.value = String(clampSpeed(stored(localStorage, "atlas-speed") ?? 1));
showSpeed();
ui.speed.addEventListener("input", showSpeed);
ui.speed.addEventListener("change", () => {
  showSpeed();
  store(localStorage, "atlas-speed", String(atlas.speed));
});

// --- sign-in token ----------------------------------------------------------------------------------------

// The user's Supabase access token, for servers with auth on. Supabase's sign-in redirect brings it in the
// address's fragment (#access_token=...): it is kept in sessionStorage (this tab only) and removed from the
// address bar; it can also be pasted into the sign-in field.
(function takeTokenFromAddress() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("access_token");
  if (token) {
    store(sessionStorage, "atlas-token", token);
    history.replaceState(null, "", location.pathname + location.search);
  }
  ui.token.value = stored(sessionStorage, "atlas-token") || "";
  ui.signin.hidden = !ui.token.value;
  ui.token.onchange = () => store(sessionStorage, "atlas-token", ui.token.value.trim());
})();

// --- turn latency -----------------------------------------------------------------------------------------

function secs(ms) {
  return ms == null ? null : (ms / 1000).toFixed(2) + " s";
}

function showTurnMetrics(m) {
  atlas.turnMetrics.push(m);
  if (m.voiceToVoiceMs == null) return; // e.g. a turn interrupted before any answer: keep the last figure
  ui.latencyValue.textContent = secs(m.voiceToVoiceMs);
  const parts = [["hearing", m.sttMs], ["thinking", m.llmMs], ["voice", m.ttsMs]]
    .filter(([, v]) => v != null).map(([k, v]) => `${k} ${secs(v)}`);
  ui.latency.title = `Turn ${m.turn}: from the end of your words to Atlas's first sound` +
    (parts.length ? ` (${parts.join(", ")})` : "") + (m.interrupted ? "; interrupted" : "");
  ui.latency.classList.add("known");
}

// --- the conversation -------------------------------------------------------------------------------------

function onMessage(ev) {
  if (typeof ev.data !== "string") return;
  let m;
  try {
    m = JSON.parse(ev.data);
  } catch (_) {
    return;
  }
  switch (m.type) {
    case "session_started":
      atlas.sessionId = lastSessionId = m.sessionId;
      resumeToken = m.resumeToken || null;
      if (m.resumed) {
        atlas.resumed = true;
        atlas.reconnects++;
        clearError();
        addLine("system", "Reconnected. The conversation goes on.");
        setStatus("listening");
      }
      if (m.audioFormat && m.audioFormat.sampleRate) outRate = m.audioFormat.sampleRate;
      if (playback) playback.port.postMessage({ type: "format", sampleRate: outRate });
      running = callStarted = true;
      acquireWakeLock();
      enableCallControls(true);
      break;
    case "status":
      if (atlas.state === "stopping") break;
      setStatus(m.status);
      if (m.status === "transcribing") botLine = null;
      break;
    case "partial_transcript":
      atlas.partials.push(m.text);
      setPartial(m.text);
      break;
    case "final_transcript":
      setPartial("");
      atlas.finals.push(m.text);
      addLine("user", m.text, m.confidence != null ? `${Math.round(m.confidence * 100)}%` : "");
      botLine = null;
      break;
    case "audio_chunk": {
      const buf = b64ToBuffer(m.audio);
      atlas.audioChunks++;
      atlas.audioSeconds += buf.byteLength / 2 / outRate;
      if (playback) playback.port.postMessage({ type: "push", buffer: buf }, [buf]);
      ui.stats.textContent = `audio: ${atlas.audioChunks} chunks, ${atlas.audioSeconds.toFixed(1)} s`;
      break;
    }
    case "bot_transcript": {
      // One bubble per answer: Piper sends a sentence at a time, ElevenLabs a word at a time.
      atlas.botText.push(m.text);
      if (!botLine) botLine = addLine("bot", "");
      const body = botLine.querySelector(".text");
      body.textContent = (body.textContent + " " + m.text).trim();
      scrollToEnd();
      break;
    }
    case "audio_flush":
      atlas.flushes++;
      if (playback) playback.port.postMessage({ type: "flush" });
      if (botLine) {
        botLine.classList.add("interrupted");
        const note = document.createElement("small");
        note.textContent = "(interrupted)";
        botLine.append(" ", note);
      }
      botLine = null;
      break;
    case "turn_metrics":
      showTurnMetrics(m);
      break;
    case "error":
      showError(m);
      // Before session_started, an error means this start failed (the server ignores that session_start).
      if (!atlas.sessionId && (atlas.state === "connecting" || atlas.state === "reconnecting")) cleanup();
      break;
    case "session_end":
      atlas.sessionEnd = m;
      if (!atlas.turnMetrics.length && m.metrics && m.metrics.p50Latency != null) {
        // A server without turn_metrics: the session's median instead.
        ui.latencyValue.textContent = secs(m.metrics.p50Latency) + " (median)";
      ui.latency.classList.add("known");
      }
      if (m.feedbackToken) askFeedback(m.sessionId || lastSessionId, m.feedbackToken);
      break;
  }
}

function enableCallControls(on) {
  ui.mute.disabled = ui.interrupt.disabled = !on;
  ui.speed.disabled = on || atlas.state === "connecting";
}

async function start() {
  if (ws || atlas.state === "connecting") return;
  ui.start.disabled = true;
  clearError();
  hideFeedback("replaced");
  muted = callStarted = false;
  ui.mute.textContent = "Mute";
  ui.mute.setAttribute("aria-pressed", "false");
  atlas.sessionEnd = null;
  setStatus("connecting");
  ui.speed.disabled = true;
  try {
    const resumed = unlockAudio(); // first, while the tap still counts as a user gesture
    if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new StartError(window.isSecureContext ? "UNSUPPORTED" : "NEEDS_HTTPS");
    }
    if (!ctx.audioWorklet) throw new StartError("UNSUPPORTED", "no AudioWorklet");
    // The microphone is asked for while the worklets load; a stream that arrives after a failure is let go.
    const myCtx = ctx;
    const micAsked = navigator.mediaDevices
      .getUserMedia({ audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true } })
      .then(
        (stream) => {
          if (ctx !== myCtx) stream.getTracks().forEach((t) => t.stop());
          else mic = stream;
          return stream;
        },
        (err) => { throw new StartError(micErrorCode(err), err && err.message); },
      );
    micAsked.catch(() => {}); // handled below, after the worklets
    await ctx.audioWorklet.addModule("/static/capture-worklet.js");
    await ctx.audioWorklet.addModule("/static/playback-worklet.js");
    await micAsked;
    await resumed;
    playback = new AudioWorkletNode(ctx, "atlas-playback", { outputChannelCount: [1] });
    playback.connect(ctx.destination);
    playback.port.onmessage = (e) => {
      if (e.data.type === "buffered") {
        atlas.playedSeconds = e.data.played;
        atlas.playing = e.data.playing;
      }
    };
    capture = new AudioWorkletNode(ctx, "atlas-capture", { numberOfOutputs: 0 });
    source = ctx.createMediaStreamSource(mic);
    source.connect(capture);
    if (ctx.state === "suspended") await ctx.resume().catch(() => {});
    atlas.audioState = ctx.state;
    capture.port.onmessage = (e) => {
      if (e.data.type === "pcm") {
        if (ws && ws.readyState === WebSocket.OPEN && atlas.sessionId) ws.send(e.data.buffer);
      } else if (e.data.type === "level") {
        const level = muted ? 0 : Math.min(1, e.data.rms * 4);
        ui.level.style.width = `${Math.round(level * 100)}%`;
        ui.orb.style.setProperty("--level", level.toFixed(2));
      }
    };

    const sock = await openSocket();
    const user = stored(localStorage, "atlas-user") || `browser-${crypto.randomUUID()}`;
    store(localStorage, "atlas-user", user);
    const msg = { type: "session_start", userId: user, conversationId: crypto.randomUUID(), speed: atlas.speed };
    const token = ui.token.value.trim();
    if (token) msg.authToken = token;
    // `?agent=<name>` on the page's URL talks to that agent of the server (its default otherwise).
    const agent = new URLSearchParams(location.search).get("agent");
    if (agent) msg.agent = agent;
    startMsg = msg;
    resumeToken = null;
    atlas.resumed = false;
    sock.send(JSON.stringify(msg));
    startTimer = setTimeout(() => {
      if (ws === sock && !atlas.sessionId) {
        showError({ code: "START_FAILED", message: "no session_started in 30 s" });
        cleanup();
      }
    }, 30000);
    ui.start.textContent = "Stop";
    ui.start.classList.add("stop");
    ui.start.disabled = false;
  } catch (err) {
    if (err instanceof StartError) showError({ code: err.code, message: err.message });
    else showError({ code: "START_FAILED", message: (err && err.message) || String(err) });
    cleanup();
  }
}

// A socket to /ws, open (rejects after 10 s or when refused); its messages go to onMessage.
async function openSocket() {
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const sock = (ws = new WebSocket(`${proto}://${location.host}/ws`));
  sock.binaryType = "arraybuffer";
  sock.onmessage = onMessage;
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new StartError("CONNECTION", "timed out connecting")), 10000);
    sock.onopen = () => { clearTimeout(timer); resolve(); };
    sock.onclose = () => { clearTimeout(timer); reject(new StartError("CONNECTION", "connection refused")); };
  });
  sock.onclose = (ev) => onClosed(sock, ev);
  return sock;
}

// The socket closed: after session_end (a normal end) or not (refused, or the connection dropped).
function onClosed(sock, ev) {
  if (sock !== ws) return;
  const refusedWithReason = atlas.errors.length && !atlas.sessionId; // the server said why before closing
  const dropped = !atlas.sessionEnd && atlas.state !== "stopping" && !refusedWithReason;
  // A call that was running, dropped without a refusal (1008) or an end: pick it up again.
  if (dropped && atlas.sessionId && resumeToken && ev.code !== 1008) {
    reconnect(0);
    return;
  }
  if (dropped) {
    showError({ code: atlas.sessionId ? "CONNECTION_LOST" : "CONNECTION", message: `closed with code ${ev.code}` });
  }
  cleanup();
}

// Connect again (with backoff) and resume the conversation: the server restores its context in a new session.
function reconnect(attempt) {
  ws = null;
  atlas.sessionId = null; // no audio goes out until the new session has started
  setStatus("reconnecting");
  enableCallControls(false);
  if (playback) playback.port.postMessage({ type: "flush" });
  botLine = null;
  if (attempt >= RECONNECT_DELAYS.length) {
    showError({ code: "CONNECTION_LOST", message: `gave up after ${attempt} tries` });
    cleanup();
    return;
  }
  reconnectTimer = setTimeout(async () => {
    if (atlas.state !== "reconnecting") return; // stopped meanwhile
    try {
      const sock = await openSocket();
      const msg = { ...startMsg, resume: { sessionId: lastSessionId, token: resumeToken } };
      const token = ui.token.value.trim(); // a token refreshed since the call started
      if (token) msg.authToken = token;
      sock.send(JSON.stringify(msg));
    } catch (_) {
      reconnect(attempt + 1);
    }
  }, RECONNECT_DELAYS[attempt]);
}

function stop() {
  if (ws && ws.readyState === WebSocket.OPEN && atlas.sessionId) {
    setStatus("stopping");
    ui.start.disabled = true;
    ws.send(JSON.stringify({ type: "session_stop" }));
    // The server answers session_end and closes; if it does not within 5 s, close from here.
    const sock = ws;
    stopTimer = setTimeout(() => { if (ws === sock) { sock.close(); cleanup(); } }, 5000);
    if (playback) playback.port.postMessage({ type: "flush" });
    return;
  }
  cleanup();
}

function cleanup() {
  clearTimeout(stopTimer);
  clearTimeout(startTimer);
  clearTimeout(reconnectTimer);
  resumeToken = null;
  running = false;
  releaseWakeLock();
  if (ws) {
    const sock = ws;
    ws = null;
    sock.onclose = sock.onmessage = null;
    if (sock.readyState === WebSocket.OPEN || sock.readyState === WebSocket.CONNECTING) sock.close();
  }
  if (mic) mic.getTracks().forEach((t) => t.stop());
  if (ctx) ctx.close().catch(() => {});
  ctx = mic = capture = playback = source = null;
  atlas.sessionId = null;
  botLine = null;
  setPartial("");
  setStatus("idle");
  ui.start.textContent = "Start";
  ui.start.classList.remove("stop");
  ui.start.disabled = false;
  enableCallControls(false);
  ui.level.style.width = "0";
  ui.orb.style.setProperty("--level", "0");
}

ui.start.addEventListener("click", () => (ws || atlas.state === "reconnecting" ? stop() : start()));
// Leaving the page ends the call properly (the server records it as stopped, not dropped).
window.addEventListener("pagehide", () => {
  if (ws && ws.readyState === WebSocket.OPEN && atlas.sessionId) ws.send(JSON.stringify({ type: "session_stop" }));
});
ui.mute.addEventListener("click", () => {
  muted = !muted;
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: muted ? "mute" : "unmute" }));
  ui.mute.textContent = muted ? "Unmute" : "Mute";
  ui.mute.setAttribute("aria-pressed", String(muted));
  setStatus(atlas.state);
});
ui.interrupt.addEventListener("click", () => {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "interrupt" }));
  if (playback) playback.port.postMessage({ type: "flush" });
});

// --- feedback after a call --------------------------------------------------------------------------------

let feedbackToken = null;

function askFeedback(sessionId, token) {
  if (!sessionId) return; // the call never started: nothing to rate
  feedbackToken = token;
  atlas.feedback = { state: "asking", sessionId, rating: null, comment: "", error: null };
  ui.feedback.reset();
  ui.feedback.hidden = false;
  ui.feedback.classList.remove("done");
  ui.feedbackResult.textContent = "";
  ui.feedbackResult.className = "feedback-result";
  ui.feedbackCount.textContent = "0";
  ui.ratingWord.textContent = "";
  showStars(0);
  ui.feedbackSend.disabled = true;
  ui.feedbackSend.textContent = "Send";
  ui.empty.hidden = true;
  ui.feedback.scrollIntoView({ block: "nearest" });
}

function showStars(rating) {
  ui.feedback.querySelectorAll(".rating label").forEach((label, i) => label.classList.toggle("on", i < rating));
}

function hideFeedback(why) {
  if (atlas.feedback.state === "asking" || atlas.feedback.state === "error") atlas.feedback.state = why;
  ui.feedback.hidden = true;
}

ui.feedback.addEventListener("change", (e) => {
  if (e.target.name !== "rating") return;
  atlas.feedback.rating = Number(e.target.value);
  ui.ratingWord.textContent = RATING_WORDS[atlas.feedback.rating];
  showStars(atlas.feedback.rating);
  ui.feedbackSend.disabled = atlas.feedback.state === "sending";
});
ui.feedbackComment.addEventListener("input", () => {
  ui.feedbackCount.textContent = String(ui.feedbackComment.value.length);
});
ui.feedbackSkip.addEventListener("click", () => hideFeedback("dismissed"));

ui.feedback.addEventListener("submit", async (e) => {
  e.preventDefault();
  const fb = atlas.feedback;
  if (!fb.rating || fb.state === "sending" || fb.state === "sent") return;
  fb.comment = ui.feedbackComment.value.slice(0, 1000);
  fb.state = "sending";
  fb.error = null;
  ui.feedbackSend.disabled = true;
  ui.feedbackSend.textContent = "Sending...";
  ui.feedbackResult.textContent = "";
  try {
    const r = await fetch("/feedback", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sessionId: fb.sessionId, feedbackToken, rating: fb.rating, comment: fb.comment }),
    });
    let body = null;
    try {
      body = await r.json();
    } catch (_) { /* not JSON */ }
    if (r.ok && body && body.ok) {
      fb.state = "sent";
      ui.feedback.classList.add("done");
      ui.feedbackResult.className = "feedback-result ok";
      const stars = fb.rating === 1 ? "1 star" : `${fb.rating} stars`;
      ui.feedbackResult.textContent = `Thank you! You rated this call ${stars}. It helps make Atlas better.`;
      ui.feedbackSend.textContent = "Sent";
      return;
    }
    const code = (body && body.code) || (r.status === 404 ? "FEEDBACK_UNAVAILABLE" : "FEEDBACK_FAILED");
    throw Object.assign(new Error((body && body.message) || `HTTP ${r.status}`), { code });
  } catch (err) {
    fb.state = "error";
    fb.error = { code: err.code || "CONNECTION", message: err.message };
    const words = {
      FEEDBACK_UNAVAILABLE: "This server does not take feedback.",
      CONNECTION: "Your feedback could not be sent: Atlas could not be reached. Try again.",
      RATE_LIMITED: "Too much feedback was sent from here just now. Try again in a minute.",
      AUTH_FAILED: "This call can no longer be rated (its feedback link has expired or is not valid).",
      FRAME_TOO_LARGE: "Your comment is too long to send. Shorten it, then press Send.",
      INVALID_JSON: "Your feedback could not be read by the server. Reload the page to try again.",
      INVALID_FIELD: `Your feedback could not be sent: ${err.message}`,
    }[fb.error.code] || ERROR_TEXT.FEEDBACK_FAILED + (err.message ? ` (${err.message})` : "");
    ui.feedbackResult.className = "feedback-result bad";
    ui.feedbackResult.textContent = "";
    const small = document.createElement("code");
    small.className = "error-code";
    small.textContent = fb.error.code;
    ui.feedbackResult.append(words + " ", small);
    ui.feedbackSend.disabled = false;
    ui.feedbackSend.textContent = "Send";
  }
});
