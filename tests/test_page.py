"""The browser page (web/): what a person sees and hears on a desktop and on phones, in headless Chromium, and the
capture worklet's resampling to 16 kHz (a low-pass filter first, so nothing above 8 kHz folds back into speech).

The tests that launch Chromium or start Atlas are marked slow; the worklet's filter is also measured without a
browser (in Node, which Playwright ships), in the fast tier."""

from __future__ import annotations

import http.server
import json
import re
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import CHROMIUM, CHROMIUM_ARGS, REPO, chromium_with_microphone, free_port, read_wav, write_wav

WEB = REPO / "web"
PAGE_FILES = ["index.html", "app.js", "style.css", "capture-worklet.js", "playback-worklet.js"]
MIC_BLOCKED = "Microphone access is blocked. Allow it from the address bar, then press Start."
PHONES = ["Galaxy S8", "Pixel 5", "iPhone 12", "iPhone 11 Pro Max"]  # 360, 393, 390 and 414 px wide
SHOTS = {"Pixel 5": "page_phone", "iPhone 12": "page_phone_iphone"}

# The capture worklet as it was before the low-pass filter (linear interpolation straight to 16 kHz), to show
# what the filter fixes.
LINEAR_WORKLET = r"""
const TARGET_RATE = 16000, FRAME_SAMPLES = 320;
class LinearCapture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.ratio = sampleRate / TARGET_RATE; this.pos = 0; this.pending = new Float32Array(0);
    this.frame = new Int16Array(FRAME_SAMPLES); this.filled = 0;
  }
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true;
    const merged = new Float32Array(this.pending.length + channel.length);
    merged.set(this.pending); merged.set(channel, this.pending.length);
    let pos = this.pos;
    while (pos + 1 < merged.length) {
      const i = Math.floor(pos), frac = pos - i;
      const c = Math.max(-1, Math.min(1, merged[i] + (merged[i + 1] - merged[i]) * frac));
      this.frame[this.filled++] = c < 0 ? c * 0x8000 : c * 0x7fff;
      if (this.filled === FRAME_SAMPLES) {
        const out = new Int16Array(this.frame);
        this.port.postMessage({ type: "pcm", buffer: out.buffer }, [out.buffer]);
        this.filled = 0;
      }
      pos += this.ratio;
    }
    const keep = Math.floor(pos);
    this.pending = merged.slice(keep); this.pos = pos - keep;
    return true;
  }
}
registerProcessor("atlas-capture", LinearCapture);
"""


def db(ratio: float) -> float:
    return 20 * np.log10(max(ratio, 1e-12))


# --- the capture worklet's filter, in Node (fast) -----------------------------------------------------------

NODE_HARNESS = r"""
// Runs an AudioWorklet capture processor outside a browser: feeds sines in 128-sample render quanta and reports
// the 16 kHz output's level, the frames and level messages it sent, and its CPU time per quantum.
const fs = require("fs"), vm = require("vm");
const [file, rate] = [process.argv[2], Number(process.argv[3])];
const freqs = JSON.parse(process.argv[4]);
function load() {
  let Proc = null;
  const sent = [];
  const scope = {
    sampleRate: rate, Math, Float32Array, Int16Array, Object, console,
    AudioWorkletProcessor: class { constructor() { this.port = { postMessage: (m) => sent.push(m) }; } },
    registerProcessor: (name, cls) => { Proc = cls; },
  };
  vm.createContext(scope);
  vm.runInContext(fs.readFileSync(file, "utf8"), scope);
  return { proc: new Proc(), sent };
}
const result = { tones: {} };
for (const f of freqs) {
  const { proc, sent } = load();
  const n = rate, q = new Float32Array(128);
  for (let i = 0; i < n; i += 128) {
    for (let j = 0; j < 128; j++) q[j] = 0.5 * Math.sin((2 * Math.PI * f * (i + j)) / rate);
    proc.process([[q]]);
  }
  const pcm = sent.filter((m) => m.type === "pcm").map((m) => new Int16Array(m.buffer));
  const out = [];
  pcm.forEach((frame) => out.push(...frame));
  const skip = 800; // the filter's first 50 ms
  let acc = 0;
  for (let i = skip; i < out.length; i++) acc += (out[i] / 32768) ** 2;
  result.tones[f] = {
    rms: Math.sqrt(acc / (out.length - skip)), inRms: 0.5 / Math.SQRT2, samples: out.length,
    frameSizes: [...new Set(pcm.map((p) => p.length))],
    levels: sent.filter((m) => m.type === "level").length,
  };
}
// CPU: a warmed-up processor on noise.
const { proc } = load();
const noise = [];
for (let k = 0; k < 16; k++) noise.push(Float32Array.from({ length: 128 }, () => Math.random() - 0.5));
for (let i = 0; i < 5000; i++) proc.process([[noise[i & 15]]]);
const N = 50000, t0 = process.hrtime.bigint();
for (let i = 0; i < N; i++) proc.process([[noise[i & 15]]]);
result.usPerQuantum = Number(process.hrtime.bigint() - t0) / 1000 / N;
console.log(JSON.stringify(result));
"""


def node_binary() -> str | None:
    try:  # Playwright's own Node (every install with the test tools has it)
        from playwright._impl._driver import compute_driver_executable

        node = compute_driver_executable()[0]
        if Path(node).exists():
            return str(node)
    except Exception:
        pass
    return shutil.which("node")


def run_in_node(tmp_path: Path, worklet: Path, rate: int, freqs: list[int]) -> dict:
    node = node_binary()
    if node is None:
        pytest.skip("no Node to run the worklet in")
    harness = tmp_path / "harness.js"
    harness.write_text(NODE_HARNESS)
    out = subprocess.run(
        [node, str(harness), str(worklet), str(rate), json.dumps(freqs)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("rate", [48000, 44100])
def test_capture_worklet_low_pass_filters_before_16k(tmp_path, rate):
    """A 10 kHz tone (above 16 kHz's Nyquist frequency, 8 kHz) comes out at least 40 dB down, where linear
    interpolation folds it to 6 kHz (at 48 kHz, at full strength); speech frequencies pass unchanged."""
    linear = tmp_path / "linear-worklet.js"
    linear.write_text(LINEAR_WORKLET)
    tones = [1000, 3000, 6000, 8500, 10000, 12000, 15000]
    new = run_in_node(tmp_path, WEB / "capture-worklet.js", rate, tones)
    old = run_in_node(tmp_path, linear, rate, tones)
    gain = {f: db(t["rms"] / t["inRms"]) for f, t in new["tones"].items()}
    old_gain = {f: db(t["rms"] / t["inRms"]) for f, t in old["tones"].items()}
    print(f"\n{rate} Hz in: gain (dB) per tone, low-pass vs linear interpolation; CPU per 128-sample quantum")
    for f in gain:
        print(f"  {int(f):>6} Hz  {gain[f]:8.1f}  vs {old_gain[f]:8.1f}")
    print(f"  CPU: {new['usPerQuantum']:.1f} us vs {old['usPerQuantum']:.1f} us per quantum (Node, this machine)")
    for f in ["1000", "3000", "6000"]:
        assert abs(gain[f]) < 0.2, (f, gain[f])
    for f in ["8500", "10000", "12000", "15000"]:
        assert gain[f] < -40, (f, gain[f])
    assert old_gain["10000"] > -10  # what the filter fixes: the old resampler let the alias through
    t = new["tones"]["1000"]
    assert t["frameSizes"] == [320] and t["samples"] >= 15000  # 20 ms frames of 16 kHz, one second's worth
    assert 15 <= t["levels"] <= 25  # level messages about 20 times a second
    # Cheap enough for a phone: a quantum lasts 2.7-2.9 ms; this is a few microseconds here.
    assert new["usPerQuantum"] < 300, new["usPerQuantum"]


def test_capture_worklet_passes_16k_through(tmp_path):
    result = run_in_node(tmp_path, WEB / "capture-worklet.js", 16000, [1000, 7000])
    for t in result["tones"].values():
        assert abs(db(t["rms"] / t["inRms"])) < 0.01 and t["samples"] == 16000


# --- the page's own contract (fast) -------------------------------------------------------------------------


def protocol_error_codes() -> list[str]:
    """The codes of docs/PROTOCOL.md's `error` table (the messages a page can receive)."""
    text = (REPO / "docs" / "PROTOCOL.md").read_text()
    section = text.split("### `error`", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"^\| `([A-Z_]+)` \|", section, re.M)


def test_every_server_error_code_has_a_sentence_on_the_page():
    script = (WEB / "app.js").read_text()
    table = script.split("const ERROR_TEXT = {", 1)[1].split("};", 1)[0]
    worded = set(re.findall(r"^\s+([A-Z_]+):", table, re.M))
    codes = protocol_error_codes()
    assert len(codes) > 20
    assert not set(codes) - worded, sorted(set(codes) - worded)
    assert MIC_BLOCKED in table


def test_the_page_needs_nothing_from_the_network():
    """No CDN, no package: the server is often offline, and the page must work from it alone."""
    for name in PAGE_FILES:
        text = (WEB / name).read_text()
        assert not re.search(r"(src|href)=\"(https?:)?//", text), name
        assert not re.search(r"import\s.*from\s|require\(|https?://(?!www\.w3\.org)", text), name
    html = (WEB / "index.html").read_text()
    assert 'name="viewport"' in html and "width=device-width" in html


# --- a static copy of the page, for tests that need no Atlas behind it ------------------------------------


class _PageHandler(http.server.BaseHTTPRequestHandler):
    TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}

    def do_GET(self):  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        name = "index.html" if path == "/" else path.removeprefix("/static/")
        file = WEB / name
        if name not in PAGE_FILES or not file.exists():
            self.send_error(404)
            return
        body = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", self.TYPES[file.suffix] + "; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def page_site():
    """web/ served as the server serves it (`/` and `/static/...`), with nothing behind /ws."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _PageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def watch(page) -> list[str]:
    """Collects the page's uncaught errors and console errors."""
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on(
        "console",
        lambda m: (
            errors.append(m.text)
            if m.type == "error" and not m.text.startswith("Failed to load resource")  # an HTTP 4xx the page handles
            else None
        ),
    )
    return errors


def layout(page) -> dict:
    return page.evaluate(
        """() => ({
            scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
            bodyScrollWidth: document.body.scrollWidth,
            start: (() => { const r = document.getElementById('start').getBoundingClientRect();
                            return {top: r.top, bottom: r.bottom, height: r.height, width: r.width}; })(),
            innerHeight: window.innerHeight,
            small: [...document.querySelectorAll('button, summary, input[type=range], .rating label')]
                .filter((el) => el.offsetParent !== null)
                .map((el) => [el.id || el.textContent.trim(), el.getBoundingClientRect().height])
                .filter(([, h]) => h < 44),
        })"""
    )


def assert_fits(page, where: str) -> None:
    box = layout(page)
    assert box["scrollWidth"] <= box["innerWidth"], (where, box)  # no horizontal scrolling
    assert box["bodyScrollWidth"] <= box["innerWidth"], (where, box)
    assert box["start"]["height"] >= 44 and box["start"]["width"] >= 44, (where, box)
    assert 0 <= box["start"]["top"] and box["start"]["bottom"] <= box["innerHeight"], (where, box)  # on screen
    assert not box["small"], (where, box["small"])  # every control big enough for a finger


SCRIPTED_CALL = [
    {"type": "session_started", "sessionId": "s-1", "audioFormat": {"encoding": "pcm_s16le", "sampleRate": 22050}},
    {"type": "status", "status": "listening"},
    {"type": "status", "status": "transcribing"},
    {"type": "partial_transcript", "text": "Hi Atlas, can you", "confidence": 0.6},
    {"type": "final_transcript", "text": "Hi Atlas, can you suggest a good name for my new puppy?", "confidence": 0.93},
    {"type": "status", "status": "thinking"},
    {"type": "status", "status": "speaking"},
    {"type": "bot_transcript", "text": "How about Biscuit?", "sentenceIndex": 0},
    {"type": "bot_transcript", "text": "It is short and friendly.", "sentenceIndex": 1},
    {"type": "status", "status": "listening"},
    {
        "type": "turn_metrics",
        "turn": 0,
        "voiceToVoiceMs": 1234,
        "sttMs": 210,
        "llmMs": 640,
        "ttsMs": 180,
        "interrupted": False,
    },
]


def deliver(page, messages) -> None:
    """Server messages, handed to the page's handler as if they came over /ws."""
    page.evaluate("(ms) => ms.forEach((m) => onMessage({data: JSON.stringify(m)}))", messages)


@pytest.mark.slow
def test_desktop_and_phone_layouts(page_site, artifacts):
    """Idle and mid-conversation, at 1280x800 and on phones 360-414 px wide: no sideways scrolling, a Start
    button on screen and every control at least 44 px tall."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            for name, options, shot in [
                ("desktop", {"viewport": {"width": 1280, "height": 800}}, "page_desktop"),
                *[(phone, p.devices[phone], SHOTS.get(phone)) for phone in PHONES],
            ]:
                context = browser.new_context(**{k: v for k, v in options.items() if k != "default_browser_type"})
                page = context.new_page()
                errors = watch(page)
                page.goto(page_site + "/")
                assert page.is_visible("#start") and page.inner_text("#start") == "Start"
                assert_fits(page, name + " idle")
                if shot:
                    page.screenshot(path=str(artifacts / f"{shot}.png"), animations="disabled")
                deliver(page, SCRIPTED_CALL)
                deliver(page, [{"type": "error", "code": "TTS_FALLBACK", "message": "voice provider failed"}])
                assert_fits(page, name + " in a call")
                if shot:
                    page.screenshot(path=str(artifacts / f"{shot}_scripted_call.png"), animations="disabled")
                assert not errors, (name, errors)
                context.close()
        finally:
            browser.close()


@pytest.mark.slow
def test_the_conversation_state_errors_and_latency_as_they_happen(page_site):
    """Scripted server messages (no server): the user's words as partials then finals, Atlas's as spoken, the
    state shown and announced, errors in words with their code, the last turn's latency."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors = watch(page)
            page.goto(page_site + "/")
            assert page.inner_text("#status") == "Ready"
            states = []
            for m in SCRIPTED_CALL[:4]:
                deliver(page, [m])
                states.append((page.inner_text("#status"), page.inner_text("#announce")))
            assert states[1] == ("Listening", "Atlas: Listening.")
            assert states[2] == ("Hearing you", "Atlas: Hearing you.")
            assert page.get_attribute("#announce", "aria-live") == "polite"
            # The partial is shown as the user speaks, then replaced by the final.
            assert page.inner_text("#transcript .partial .text") == "Hi Atlas, can you"
            deliver(page, SCRIPTED_CALL[4:6])
            assert page.locator("#transcript .partial").count() == 0
            assert page.inner_text("#transcript li.user .text").startswith("Hi Atlas, can you suggest")
            assert page.inner_text("#status") == "Thinking"
            deliver(page, SCRIPTED_CALL[6:8])
            assert page.inner_text("#status") == "Speaking"
            assert page.inner_text("#transcript li.bot .text") == "How about Biscuit?"
            deliver(page, SCRIPTED_CALL[8:])
            assert page.inner_text("#transcript li.bot .text") == "How about Biscuit? It is short and friendly."
            assert page.locator("#transcript li.bot").count() == 1  # one bubble per answer
            assert re.fullmatch(r"last turn: 1\.23 s", page.inner_text("#latency").strip())
            assert page.evaluate("atlas.turnMetrics.map((m) => m.voiceToVoiceMs)") == [1234]
            # ElevenLabs' word-by-word transcript joins into one bubble; an interruption marks it.
            deliver(
                page,
                [
                    {"type": "status", "status": "transcribing"},
                    {"type": "final_transcript", "text": "Any other ideas?", "confidence": None},
                    {"type": "status", "status": "speaking"},
                    {"type": "bot_transcript", "text": "Another", "sentenceIndex": 2},
                    {"type": "bot_transcript", "text": "thought", "sentenceIndex": 2},
                    {"type": "audio_flush", "reason": "interruption"},
                    {
                        "type": "turn_metrics",
                        "turn": 1,
                        "voiceToVoiceMs": None,
                        "sttMs": None,
                        "llmMs": None,
                        "ttsMs": None,
                        "interrupted": True,
                    },
                ],
            )
            bots = page.locator("#transcript li.bot")
            assert bots.count() == 2 and re.fullmatch(
                r"Atlas\s+Another thought\s+\(interrupted\)", bots.nth(1).inner_text()
            )
            assert "1.23 s" in page.inner_text("#latency")  # a turn without an answer keeps the last figure
            # Errors: a sentence a person understands, the code small beside it.
            for code, words in [
                ("SERVER_BUSY", "Atlas is busy with other calls right now. Try again in a minute."),
                ("RATE_LIMITED", "Too many calls were started in the last minute. Wait a minute, then press Start."),
                ("SOMETHING_NEW", "Something went wrong: it broke"),
            ]:
                deliver(page, [{"type": "error", "code": code, "message": "it broke"}])
                assert page.inner_text("#error-text") == words
                assert page.inner_text("#error-code") == code
                assert page.get_attribute("#error", "role") == "alert"
            deliver(page, [{"type": "session_end", "sessionId": "s-1", "reason": "client_stop", "duration": 3.0}])
            # No feedbackToken (a server without feedback): the page does not ask.
            assert page.is_hidden("#feedback") and page.evaluate("atlas.feedback.state") == "none"
            assert not errors, errors
        finally:
            browser.close()


@pytest.mark.slow
def test_feedback_form_posts_the_rating_and_explains_a_refusal(page_site):
    """The form at a call's end (its /feedback answered here by the test): a rating chosen with the keyboard, a
    comment cut at 1000 characters, the thank-you, and a refusal in words."""
    from playwright.sync_api import sync_playwright

    posted = []

    def feedback(route):
        body = json.loads(route.request.post_data)
        posted.append(body)
        if len(posted) == 1:
            route.fulfill(
                status=400,
                content_type="application/json",
                body=json.dumps({"type": "error", "code": "INVALID_FIELD", "message": "'rating' must be 1-5"}),
            )
        else:
            route.fulfill(status=200, content_type="application/json", body='{"ok": true}')

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors = watch(page)
            page.route("**/feedback", feedback)
            page.goto(page_site + "/")
            deliver(page, SCRIPTED_CALL)
            deliver(
                page, [{"type": "session_end", "sessionId": "s-1", "reason": "client_stop", "feedbackToken": "tok"}]
            )
            assert page.is_visible("#feedback") and page.inner_text("#feedback h2") == "How was this call?"
            assert page.evaluate("atlas.feedback.state") == "asking"
            assert page.is_disabled("#feedback-send")  # a rating first
            page.focus("#rating-1")
            page.keyboard.press("ArrowRight")
            page.keyboard.press("ArrowRight")
            page.keyboard.press("ArrowRight")
            assert page.evaluate("atlas.feedback.rating") == 4
            assert page.inner_text("#rating-word") == "Good"
            page.fill("#feedback-comment", "x" * 1200)
            page.click("#feedback-send")
            page.wait_for_function("atlas.feedback.state === 'error'")
            assert "Your feedback could not be sent" in page.inner_text("#feedback-result")
            assert "INVALID_FIELD" in page.inner_text("#feedback-result")
            page.click("#feedback-send")  # try again
            page.wait_for_function("atlas.feedback.state === 'sent'")
            assert page.inner_text("#feedback-result").startswith("Thank you")
            assert posted[1] == {"sessionId": "s-1", "feedbackToken": "tok", "rating": 4, "comment": "x" * 1000}
            # The next call's end asks again; "Not now" puts the form away.
            deliver(page, SCRIPTED_CALL[:1])
            deliver(page, [{"type": "session_end", "sessionId": "s-1", "reason": "client_stop", "feedbackToken": "t2"}])
            assert page.is_visible("#feedback") and page.evaluate("atlas.feedback.state") == "asking"
            page.click("#feedback-skip")
            assert page.is_hidden("#feedback") and page.evaluate("atlas.feedback.state") == "dismissed"
            assert len(posted) == 2 and not errors, errors
        finally:
            browser.close()


# --- the capture worklet in Chromium's own audio engine -----------------------------------------------------

OFFLINE_RENDER = """async ([source, rate, freq]) => {
  // One second of a sine through the capture worklet in an OfflineAudioContext; the 16 kHz PCM it posts.
  const ctx = new OfflineAudioContext(1, rate, rate);
  const url = source ? URL.createObjectURL(new Blob([source], {type: 'text/javascript'}))
                     : '/static/capture-worklet.js';
  await ctx.audioWorklet.addModule(url);
  const node = new AudioWorkletNode(ctx, 'atlas-capture', {numberOfOutputs: 0});
  const pcm = [];
  let frames = 0;
  node.port.onmessage = (e) => { if (e.data.type === 'pcm') { frames++; pcm.push(...new Int16Array(e.data.buffer)); } };
  const buffer = ctx.createBuffer(1, rate, rate);
  const data = buffer.getChannelData(0);
  for (let i = 0; i < data.length; i++) data[i] = 0.5 * Math.sin(2 * Math.PI * freq * i / rate);
  const src = ctx.createBufferSource();
  src.buffer = buffer;
  src.connect(node);
  src.start();
  await ctx.startRendering();
  for (let i = 0; i < 50 && frames < 45; i++) await new Promise((r) => setTimeout(r, 20));  // messages in flight
  const tail = pcm.slice(800);
  const rms = Math.sqrt(tail.reduce((a, s) => a + (s / 32768) ** 2, 0) / tail.length);
  return {rms, inRms: 0.5 / Math.SQRT2, samples: pcm.length};
}"""


@pytest.mark.slow
def test_capture_worklet_aliasing_in_chromium(page_site):
    """The worklet in Chromium's OfflineAudioContext at 48 and 44.1 kHz: a 10 kHz sine is at least 40 dB down at
    16 kHz (the old linear interpolation: barely down at all), a 1 kHz sine passes within 1 dB."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(page_site + "/")
            figures = {}
            for rate in (48000, 44100):
                for freq in (1000, 10000):
                    for name, source in (("low-pass", None), ("linear", LINEAR_WORKLET)):
                        r = page.evaluate(OFFLINE_RENDER, [source, rate, freq])
                        assert r["samples"] >= 14000, r
                        figures[rate, freq, name] = db(r["rms"] / r["inRms"])
        finally:
            browser.close()
    print("\nChromium OfflineAudioContext, gain at 16 kHz (dB): low-pass vs linear interpolation")
    for rate in (48000, 44100):
        for freq in (1000, 10000):
            print(
                f"  {rate} Hz in, {freq:>5} Hz tone: {figures[rate, freq, 'low-pass']:7.1f} vs "
                f"{figures[rate, freq, 'linear']:7.1f}"
            )
        assert figures[rate, 10000, "low-pass"] <= -40, figures
        assert abs(figures[rate, 1000, "low-pass"]) <= 1, figures
        assert figures[rate, 10000, "linear"] > -40, figures  # the old resampler fails the same check


# --- with Atlas: a phone, the microphone refused, the wake lock ---------------------------------------------


def speech_then_silence(tmp_path: Path, wav: Path) -> Path:
    """Chromium's fake microphone loops its file: half a second of quiet, the speech, then time for the answer."""
    pcm, rate = read_wav(wav)
    silence = np.zeros(rate * 25, np.int16)
    return write_wav(tmp_path / "mic.wav", np.concatenate([np.zeros(rate // 2, np.int16), pcm, silence]), rate)


def silent_mic(tmp_path: Path) -> Path:
    return write_wav(tmp_path / "silence.wav", np.zeros(16000 * 5, np.int16))


def device(p, name: str) -> dict:
    return {k: v for k, v in p.devices[name].items() if k != "default_browser_type"}


@pytest.mark.slow
def test_a_tap_on_a_phone_starts_a_call_and_plays_the_reply(atlas, speech, artifacts, tmp_path):
    """Pixel 5 (touch, mobile): one tap on Start makes and unlocks the audio (no autoplay exemption here), the
    call starts with the chosen voice speed, Atlas answers and the answer reaches the speakers."""
    from playwright.sync_api import sync_playwright

    mic = speech_then_silence(tmp_path, speech["dinner"])
    sent = []
    with sync_playwright() as p:
        browser = chromium_with_microphone(p, mic)
        try:
            context = browser.new_context(**device(p, "Pixel 5"))
            page = context.new_page()
            errors = watch(page)
            page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(payload)))
            page.goto(atlas + "/")
            assert_fits(page, "phone idle")
            page.locator("#speed").fill("0.9")
            assert page.inner_text("#speed-value") == "0.90\u00d7"
            page.tap("#start")
            page.wait_for_function("window.atlas.sessionId !== null", timeout=30000)
            assert page.evaluate("atlas.audioState") == "running"  # unlocked by the tap
            assert page.is_disabled("#speed")  # a call's speed is set at its start
            page.wait_for_function("window.atlas.finals.length > 0", timeout=90000)
            page.wait_for_function("atlas.audioSeconds > 1.0 && atlas.botText.length > 0", timeout=120000)
            page.wait_for_function("atlas.playedSeconds > 0.5", timeout=60000)  # played, not just received
            assert_fits(page, "phone in a call")
            page.screenshot(path=str(artifacts / "page_phone_talking.png"), animations="disabled")
            state = page.evaluate("({finals: atlas.finals, bot: atlas.botText, errors: atlas.errors})")
            transcript = page.inner_text("#transcript")
            page.tap("#start")  # Stop
            page.wait_for_function("window.atlas.sessionEnd !== null", timeout=30000)
            page.wait_for_function("window.atlas.state === 'idle'", timeout=10000)
            assert page.inner_text("#start") == "Start" and not page.is_disabled("#speed")
            assert page.evaluate("localStorage.getItem('atlas-speed')") == "0.9"  # remembered for next time
        finally:
            browser.close()
    assert not errors and not state["errors"], (errors, state["errors"])
    starts = [json.loads(f) for f in sent if isinstance(f, str) and '"session_start"' in f]
    assert len(starts) == 1 and starts[0]["speed"] == 0.9, starts
    assert "dinner" in transcript.lower() and state["bot"][0].split()[0] in transcript


@pytest.mark.slow
def test_a_refused_microphone_is_explained_and_the_page_stays_usable(atlas, tmp_path):
    """Microphone permission denied: the message says what to do, nothing is asked of the server, no feedback
    form; once allowed, Start works. A missing or busy microphone gets its own words."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # A fake microphone exists, but no fake permission prompt: Chromium denies it (permissions=[]).
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                *CHROMIUM_ARGS,
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={silent_mic(tmp_path)}",
            ],
        )
        try:
            context = browser.new_context(permissions=[])
            page = context.new_page()
            errors = watch(page)
            sockets = []
            page.on("websocket", lambda ws: sockets.append(ws.url))
            page.goto(atlas + "/")
            page.click("#start")
            page.wait_for_function("atlas.errors.length > 0", timeout=15000)
            assert page.inner_text("#error-text") == MIC_BLOCKED
            assert page.inner_text("#error-code") == "MIC_BLOCKED" and page.is_visible("#error")
            assert page.evaluate("atlas.state") == "idle" and page.inner_text("#start") == "Start"
            assert not page.is_disabled("#start") and page.is_disabled("#mute")
            assert not sockets  # no session asked for
            assert page.is_hidden("#feedback") and page.evaluate("atlas.feedback.state") == "none"

            # Allowed from the address bar: the same page, Start again.
            context.grant_permissions(["microphone"], origin=atlas)
            page.click("#start")
            page.wait_for_function("window.atlas.sessionId !== null", timeout=30000)
            assert page.is_hidden("#error")
            page.click("#start")
            page.wait_for_function("window.atlas.sessionEnd !== null", timeout=30000)
            assert not errors, errors
            context.close()

            for name, words in [
                ("NotFoundError", "No microphone was found."),
                ("NotReadableError", "another app may be using it"),
            ]:
                context = browser.new_context()
                context.add_init_script(
                    f"navigator.mediaDevices.getUserMedia = () => Promise.reject(new DOMException('no', '{name}'));"
                )
                page = context.new_page()
                page.goto(atlas + "/")
                page.click("#start")
                page.wait_for_function("atlas.errors.length > 0", timeout=15000)
                assert words in page.inner_text("#error-text"), name
                assert not page.is_disabled("#start")
                context.close()
        finally:
            browser.close()


WAKE_LOCK_PROBE = """
// Records the page's screen wake locks (a test probe around the real API).
if ('wakeLock' in navigator) {
  const request = navigator.wakeLock.request.bind(navigator.wakeLock);
  window.__locks = [];
  navigator.wakeLock.request = async (type) => {
    const lock = await request(type);
    window.__locks.push(lock);
    return lock;
  };
}
"""


@pytest.mark.slow
def test_the_screen_stays_on_during_a_call(atlas, tmp_path):
    """A screen wake lock is held while a call runs, taken again when the page comes back into view (the system
    drops it when the page is hidden), released at the end; a browser without the API still makes calls."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = chromium_with_microphone(p, silent_mic(tmp_path))
        try:
            context = browser.new_context()
            context.add_init_script(WAKE_LOCK_PROBE)
            page = context.new_page()
            errors = watch(page)
            page.goto(atlas + "/")
            supported = page.evaluate("'wakeLock' in navigator")
            print(f"\nheadless Chromium has navigator.wakeLock: {supported}")
            page.click("#start")
            page.wait_for_function("window.atlas.sessionId !== null", timeout=30000)
            if supported:
                page.wait_for_function("atlas.wakeLock === 'held'", timeout=10000)
                # The page is hidden (the system releases the lock), then shown again.
                page.evaluate("window.__locks[0].release()")
                page.wait_for_function("atlas.wakeLock === 'released'")
                page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
                page.wait_for_function("atlas.wakeLock === 'held'", timeout=10000)
                assert page.evaluate("window.__locks.length") == 2
            page.click("#start")
            page.wait_for_function("window.atlas.sessionEnd !== null", timeout=30000)
            if supported:
                page.wait_for_function("atlas.wakeLock === 'released'", timeout=10000)
                assert page.evaluate("window.__locks.every((lock) => lock.released)")
            assert not errors, errors
            context.close()

            # Without the API (older Safari, Firefox): nothing breaks.
            context = browser.new_context()
            context.add_init_script("delete Navigator.prototype.wakeLock;")
            page = context.new_page()
            errors = watch(page)
            page.goto(atlas + "/")
            assert page.evaluate("'wakeLock' in navigator") is False
            page.click("#start")
            page.wait_for_function("window.atlas.sessionId !== null", timeout=30000)
            page.click("#start")
            page.wait_for_function("window.atlas.sessionEnd !== null", timeout=30000)
            assert page.evaluate("atlas.wakeLock") == "unsupported"
            assert not errors and not page.evaluate("atlas.errors"), errors
        finally:
            browser.close()


# --- with Atlas's turn_metrics and /feedback (docs/PROTOCOL.md) ---------------------------------------------


@pytest.mark.slow
def test_turn_latency_and_feedback_after_a_real_call(atlas, speech, artifacts, tmp_path):
    """A real call on the desktop: the last turn's latency from `turn_metrics`, then at the end the feedback form;
    a tampered token is refused in words, the real one thanked."""
    from playwright.sync_api import sync_playwright

    mic = speech_then_silence(tmp_path, speech["puppy"])
    with sync_playwright() as p:
        browser = chromium_with_microphone(p, mic, "--autoplay-policy=no-user-gesture-required")
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            errors = watch(page)
            page.goto(atlas + "/")
            page.click("#start")
            page.wait_for_function("atlas.audioSeconds > 1.0 && atlas.botText.length > 0", timeout=150000)
            page.screenshot(path=str(artifacts / "page_desktop_talking.png"), animations="disabled")
            page.wait_for_function("atlas.turnMetrics.length > 0", timeout=60000)
            metrics = page.evaluate("atlas.turnMetrics[0]")
            assert metrics["type"] == "turn_metrics" and metrics["voiceToVoiceMs"] > 0, metrics
            latency = page.inner_text("#latency").strip()
            assert re.fullmatch(r"last turn: \d+\.\d\d s", latency), latency
            assert abs(float(latency.split()[2]) - metrics["voiceToVoiceMs"] / 1000) < 0.006
            page.screenshot(path=str(artifacts / "page_desktop_talking.png"), animations="disabled")
            session_id = page.evaluate("atlas.sessionId")
            page.click("#start")
            page.wait_for_function("window.atlas.sessionEnd !== null", timeout=30000)
            end = page.evaluate("atlas.sessionEnd")
            assert isinstance(end.get("feedbackToken"), str) and end["feedbackToken"], end
            page.wait_for_selector("#feedback", state="visible")
            assert page.evaluate("atlas.feedback.sessionId") == session_id

            # First a tampered token (the server must refuse it, in a sentence), then the real one.
            def tamper(route):
                body = json.loads(route.request.post_data)
                body["feedbackToken"] = body["feedbackToken"][::-1] + "x"
                route.continue_(post_data=json.dumps(body))

            page.route("**/feedback", tamper, times=1)
            page.click("label[for=rating-5]")
            page.fill("#feedback-comment", "Quick and friendly.")
            page.click("#feedback-send")
            page.wait_for_function("['error', 'sent'].includes(atlas.feedback.state)", timeout=15000)
            refused = page.evaluate("atlas.feedback")
            assert refused["state"] == "error" and refused["error"]["code"], refused
            assert refused["error"]["code"] in page.inner_text("#feedback-result")
            page.click("#feedback-send")
            page.wait_for_function("['error', 'sent'].includes(atlas.feedback.state)", timeout=15000)
            assert page.evaluate("atlas.feedback.state") == "sent", page.evaluate("atlas.feedback")
            assert page.inner_text("#feedback-result").startswith("Thank you")
            page.screenshot(path=str(artifacts / "page_desktop_feedback.png"), animations="disabled")
            assert not errors, errors
        finally:
            browser.close()
