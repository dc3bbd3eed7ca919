"""How fast do user turns end, and how often is the user cut off, for each VAD / speech timeout / smart-turn
setting?

Speech (35 utterances):
- 16 Piper ("joe") sentences a user says in one turn ("Hi Atlas," <450 ms> "what time does the museum
  open tomorrow?", lists, numbers, hesitations; 2 with no pause as controls). Piper speaks each
  sentence at once, so the prosody at a comma is mid-sentence, and each comma's gap is replaced by
  the scripted pause (350-600 ms). Sampling noise is off, so every run hears the same speech.
- the same 14 sentences with pauses, each phrase spoken on its own (`name/sep`): a sentence-final
  fall before every pause, like a speaker who finishes a phrase and then adds more.
- the five LibriVox clips in /usr/share/pocketsphinx/test/data/librivox as recorded (their own
  pauses count).
Each gets 0.6 s of lead and 5 s of trailing noise (Piper: Gaussian, -58 dBFS, also under the speech;
LibriVox: Gaussian at the clip's own noise floor). Pause tolerance: "book_table" and "capital_of"
again with the pause swept over 300-1200 ms, to find the longest pause each setting survives.

Audio paths, all reaching the analyzers at 16 kHz:
- `browser`: the 16 kHz audio as is, in 20 ms frames (the web client sends 16 kHz).
- `phone`: downsampled to 8 kHz and G.711 mu-law encoded (fakes/twilio.py), then sent as
  Twilio media messages (20 ms) through the app's own `AtlasTwilioSerializer.deserialize`
  (transports/twilio/serializer.py: decode, then its SoX "QQ" stream resampler to 16 kHz).
- `phone-vhq` (full sweep only): the same through Pipecat's stock `TwilioFrameSerializer`, whose
  SoX "VHQ" stream resampler holds ~95 ms back and hands audio on in bursts of ~95 ms.
Each frame is processed at the time it arrives (the end of the packet that released it). Results
are the same on every run except on `phone-vhq` (SoX's VHQ stream output varies by +-2 LSB from run
to run, enough to flip a marginal VAD decision) and for a few ms of measured inference time.

Method (offline, simulated time, no real-time waiting): every frame goes through Pipecat's real
analyzers, built as bots/pipeline.py builds them on the ONNX sessions of `LocalEngines.load`:
`SharedSileroVADAnalyzer` (VADParams: stop_secs swept, start_secs 0.2, min_volume 0.3) and
`SharedSmartTurnAnalyzerV3` (SmartTurnParams: stop_secs swept). Smart-turn's clock (`time.monotonic`
in base_smart_turn) is the simulated clock, so its buffering, pre-speech window and silence timer
behave as in real time. Around them this file mirrors Pipecat 1.14's `LLMUserAggregator` (frame N
goes to the VAD, then to the stop strategy with the VAD state from before frame N, then the VAD
event it caused) and the two stop strategies the pipeline uses:
- smart-turn off, `SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=<speech timeout>)`: the VAD
  reports a stop after stop_secs of non-speech, then the speech-timeout timer runs; the turn ends
  when it expires unless the VAD reported speech again first. The speech timeout is its own
  setting (`Config.speech_timeout_secs`); unset, it equals VAD stop_secs (the rows where both are
  the same). The sweep also pairs a short VAD stop (0.2, 0.3 s) with longer timeouts (0.3-0.8 s):
  the same silence before a turn ends, split differently between the VAD and the timer.
- smart-turn on, `TurnAnalyzerUserTurnStopStrategy`: at the VAD stop smart-turn predicts on the
  audio so far; "complete" ends the turn once inference is done (its measured time is added);
  "incomplete" keeps the turn open, and it ends anyway after smart-turn stop_secs more silence
  (counted from the VAD stop) unless the VAD reports speech again.
The VAD reports renewed speech only after start_secs (0.2 s) of it, so a timer can expire while the
user has already resumed. Transcripts are taken as in hand (Whisper's are finalized): the numbers
are what turn detection costs; a slower STT adds its own time on top.

Definitions:
- true end of speech: end of the last 10 ms frame louder than 35 dB below the utterance's loudest
  frame (for Piper: the end of the last word).
- false cut-off: a turn end while at least 100 ms of speech still follows (the user was mid-turn).
- turn-end delay: the first turn end that is not a cut-off, minus the true end of speech.
- smart-turn incomplete share: utterances whose prediction at the end of speech was "incomplete"
  (they paid the smart-turn stop_secs fallback wait).
- longest pause survived: the longest swept pause up to which neither pause sentence is cut off.
- recommended: per path, the lowest mean delay with no false cut-off that survives 700 ms pauses
  (the longest scripted pause plus 100 ms), over all VAD stop / speech timeout / smart-turn rows.

Run: `.venv/bin/python -m bench.turns [--out bench/results] [--quick]` (full sweep: a few minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

SR = 16000
FRAME = 320  # 20 ms at 16 kHz
LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
VAD_STOPS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.8)
# Smart-turn off: speech timeouts paired with the short VAD stops (besides timeout = VAD stop).
SPLIT_VAD_STOPS = (0.2, 0.3)
SPEECH_TIMEOUTS = (0.3, 0.4, 0.5, 0.6, 0.8)
SMART_STOPS = (1.0, 1.5, 3.0)
VAD_START_SECS, VAD_MIN_VOLUME = 0.2, 0.3
LEAD_SECS, TAIL_SECS = 0.6, 5.0
CUT_MIN_SPEECH_SECS = 0.1
PATHS = ("browser", "phone", "phone-vhq")
PATH_TITLES = {
    "browser": "browser: 16 kHz as sent by the web client",
    "phone": "phone: 8 kHz mu-law through the app's Twilio serializer (SoX QQ stream resampler to 16 kHz)",
    "phone-vhq": "phone-vhq: 8 kHz mu-law through Pipecat's stock TwilioFrameSerializer (SoX VHQ stream "
    "resampler, ~95 ms bursts)",
}
SOURCES = ("piper", "piper-separate", "librivox")

# What a user says in one turn: text, then pause (ms), then text... A comma ends every part that a
# pause follows, so that Piper, speaking the whole sentence at once, leaves a gap there (see below).
SCRIPTS: list[tuple[str, list]] = [
    ("hi_atlas_museum", ["Hi Atlas,", 450, "what time does the museum open tomorrow?"]),
    ("book_table", ["I'd like to book a table for two,", 500, "at eight thirty."]),
    ("shopping_list", ["I need milk,", 400, "eggs,", 400, "and bread."]),
    ("um_weather", ["Um,", 600, "can you tell me the weather in Paris?"]),
    ("move_meeting", ["So I was thinking,", 550, "maybe we could move the meeting to Friday."]),
    ("phone_number", ["My number is five five five,", 500, "one two three,", 450, "four five six seven."]),
    ("set_timer", ["Set a timer for,", 500, "twenty minutes."]),
    ("capital_of", ["What's the capital of,", 600, "Australia?"]),
    ("remind_mother", ["Remind me to call my mother,", 450, "when I get home."]),
    ("hey_atlas_jazz", ["Hey Atlas,", 350, "play some jazz."]),
    ("fly_denver", ["I want to fly from Boston to,", 500, "uh,", 500, "Denver next Monday."]),
    ("okay_then", ["Okay,", 400, "and then what happens?"]),
    ("boil_egg", ["How long do I boil an egg,", 550, "for a soft yolk?"]),
    ("address", ["Send it to twelve Oak Street,", 600, "apartment four B."]),
    ("what_time", ["What time is it?"]),
    ("penguin_joke", ["Tell me a joke about penguins."]),
]
# Pause tolerance: the same sentences with the pause swept, to find the longest pause each setting
# survives. A recommended setting must survive MIN_TOLERATED_PAUSE_MS (the longest scripted pause
# plus a 100 ms margin).
PAUSE_SCRIPTS = ("book_table", "capital_of")
PAUSE_GRID_MS = tuple(range(300, 1201, 50))
MIN_TOLERATED_PAUSE_MS = 700
QUICK = ("hi_atlas_museum", "book_table", "book_table/sep", "what_time", "librivox_0880")


@dataclass
class Utterance:
    name: str
    source: str  # one of SOURCES
    text: str
    pauses_ms: list[int]
    audio: np.ndarray = field(repr=False)  # int16, 16 kHz, with lead and tail noise
    speech_end: float  # seconds into `audio`
    speech: np.ndarray = field(repr=False)  # bool per 10 ms: speech (energy)


@dataclass(frozen=True)
class Config:
    vad_stop_secs: float
    smart_turn: bool
    smart_turn_stop_secs: float | None = None
    speech_timeout_secs: float | None = None  # smart-turn off: user_speech_timeout; None = vad_stop_secs

    @property
    def user_speech_timeout(self) -> float | None:
        """The effective `SpeechTimeoutUserTurnStopStrategy` user_speech_timeout (None with smart-turn,
        whose stop strategy has no such timer)."""
        if self.smart_turn:
            return None
        return self.vad_stop_secs if self.speech_timeout_secs is None else self.speech_timeout_secs


def configs(quick: bool = False) -> list[Config]:
    if quick:
        return [
            Config(0.2, False),
            Config(0.2, False, speech_timeout_secs=0.6),
            Config(0.8, False),
            Config(0.2, True, 1.5),
        ]
    out = []
    for s in VAD_STOPS:
        out.append(Config(s, False))
        if s in SPLIT_VAD_STOPS:
            out += [Config(s, False, speech_timeout_secs=t) for t in SPEECH_TIMEOUTS if t != s]
        out += [Config(s, True, t) for t in SMART_STOPS]
    return out


# ---- speech -------------------------------------------------------------------------------------


def _frame_rms(audio: np.ndarray, n: int = SR // 100) -> np.ndarray:
    frames = len(audio) // n
    return np.sqrt((audio[: frames * n].astype(np.float64).reshape(frames, n) ** 2).mean(axis=1))


def _loud(audio: np.ndarray, db_below_peak: float = 35.0) -> np.ndarray:
    rms = _frame_rms(audio)
    return rms > rms.max() * 10 ** (-db_below_peak / 20)


def _noise(n: int, rms: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, rms, n)


def _finish(name, source, text, pauses, speech: np.ndarray, noise_rms: float, noisy: bool) -> Utterance:
    """Lead + speech + tail, with stationary noise under the padding (and the speech unless `noisy`)."""
    lead, tail = int(LEAD_SECS * SR), int(TAIL_SECS * SR)
    clean = np.concatenate([np.zeros(lead), speech.astype(np.float64), np.zeros(tail)])
    seed = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16)
    noise = _noise(len(clean), noise_rms, seed)
    if noisy:  # a recording brings its own noise
        noise[lead : lead + len(speech)] = 0.0
    audio = np.clip(clean + noise, -32768, 32767).astype(np.int16)
    mask = _loud(clean.astype(np.int16))
    end = (np.nonzero(mask)[0][-1] + 1) / 100
    return Utterance(name, source, text, pauses, audio, float(end), mask)


@functools.cache
def _piper(text: str) -> np.ndarray:
    """Piper's speech for `text` at 16 kHz, without its own leading and trailing silence. As
    fakes/base.py's piper_pcm, but with the model's sampling noise off so every run hears the
    same speech."""
    import soxr
    from piper.config import SynthesisConfig

    from fakes.base import _engine_lock, _piper_voice

    voice = _piper_voice()
    with _engine_lock:
        chunks = voice.synthesize(text, syn_config=SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0))
        audio = np.concatenate([c.audio_float_array for c in chunks])
    pcm = np.clip(soxr.resample(audio, voice.config.sample_rate, SR) * 32767.0, -32768, 32767).astype(np.int16)
    loud = np.nonzero(_loud(pcm, 40.0))[0]
    return pcm[loud[0] * SR // 100 : (loud[-1] + 1) * SR // 100]


def _comma_gap(speech: np.ndarray, near: float) -> tuple[int, int]:
    """Samples of the longest quiet run (10 ms frames 40 dB under the peak) around `near` seconds."""
    quiet = ~_loud(speech, 40.0)
    lo, hi = int(near * 70), min(len(quiet), int(near * 100) + 35)  # 0.7 x near .. near + 350 ms
    runs, start = [], None
    for i in range(lo, hi + 1):
        if i < hi and quiet[i]:
            start = i if start is None else start
        elif start is not None:
            runs.append((i - start, -abs((start + i) / 200 - near), start, i))
            start = None
    if not runs or max(runs)[0] < 3:
        raise ValueError(f"no pause in Piper's speech near {near:.2f} s")
    _, _, a, b = max(runs)
    return a * SR // 100, b * SR // 100


def piper_utterance(name: str, parts: list, joined: bool = True) -> Utterance:
    """`joined`: Piper speaks the whole sentence once (continuing prosody at the commas) and each
    comma's gap is replaced by the scripted pause. Otherwise each part is spoken on its own, so it
    ends with a sentence-final fall, like a speaker who finishes a phrase and then adds more."""
    texts = [p for p in parts if isinstance(p, str)]
    pauses = [p for p in parts if isinstance(p, int)]
    if joined:
        full, pieces, at = _piper(" ".join(texts)), [], 0
        for k, pause in enumerate(pauses, 1):
            a, b = _comma_gap(full, len(_piper(" ".join(texts[:k]))) / SR)
            pieces += [full[at:a], np.zeros(pause * SR // 1000, np.int16)]
            at = b
        speech = np.concatenate([*pieces, full[at:]])
    else:
        speech = np.concatenate(
            [
                x
                for t, p in zip(texts, pauses + [0], strict=False)
                for x in (_piper(t), np.zeros(p * SR // 1000, np.int16))
            ]
        )
    source = "piper" if joined else "piper-separate"
    return _finish(name if joined else name + "/sep", source, " ".join(texts), pauses, speech, 40.0, noisy=False)


def librivox_utterances() -> list[Utterance]:
    from app.talk import load_wav

    texts = {}
    for line in (LIBRIVOX / "transcription").read_text().splitlines():
        words, _, fileid = line.rpartition("(")
        texts[fileid.strip(" )")] = words.replace("<s>", "").replace("</s>", "").strip()
    out = []
    for path in sorted(LIBRIVOX.glob("*.wav")):
        audio = load_wav(path, SR)
        floor = float(np.percentile(_frame_rms(audio), 10))
        name = "librivox_" + path.stem.rsplit("-", 1)[-1]
        out.append(_finish(name, "librivox", texts.get(path.stem, ""), [], audio, noise_rms=floor, noisy=True))
    return out


def utterances(quick: bool = False) -> list[Utterance]:
    out = [piper_utterance(n, p) for n, p in SCRIPTS if not quick or n in QUICK]
    out += [
        piper_utterance(n, p, joined=False)
        for n, p in SCRIPTS
        if any(isinstance(x, int) for x in p) and (not quick or n + "/sep" in QUICK)
    ]
    return out + [u for u in librivox_utterances() if not quick or u.name in QUICK]


def pause_utterances(quick: bool = False) -> list[Utterance]:
    """PAUSE_SCRIPTS with the pause set to each of PAUSE_GRID_MS, named like "book_table@450"."""
    scripts = dict(SCRIPTS)
    return [
        piper_utterance(f"{name}@{pause}", [scripts[name][0], pause, scripts[name][2]])
        for name in (PAUSE_SCRIPTS[:1] if quick else PAUSE_SCRIPTS)
        for pause in ((400, 700, 1000) if quick else PAUSE_GRID_MS)
    ]


async def path_frames(audio: np.ndarray, path: str) -> list[tuple[bytes, float]]:
    """The 16 kHz InputAudioRawFrame payloads the pipeline gets for `audio` on `path`, each with the
    time it arrives (the end of the 20 ms packet that released it)."""
    if path == "browser":
        return [(audio[i : i + FRAME].tobytes(), (i + FRAME) / SR) for i in range(0, len(audio) - FRAME + 1, FRAME)]
    import base64

    import soxr
    from pipecat.serializers.twilio import TwilioFrameSerializer

    from fakes.twilio import mulaw_encode
    from transports.twilio.serializer import AtlasTwilioSerializer

    pcm8 = soxr.resample(audio.astype(np.float32) / 32768.0, SR, 8000, quality="HQ")
    ulaw = mulaw_encode(np.clip(pcm8 * 32768.0, -32768, 32767).astype(np.int16))
    cls = AtlasTwilioSerializer if path == "phone" else TwilioFrameSerializer
    serializer = cls("MZbench", params=TwilioFrameSerializer.InputParams(auto_hang_up=False))
    serializer._sample_rate = SR  # what setup() takes from the pipeline's audio_in_sample_rate
    # Its resampler is cleared after 0.2 s of wall-clock silence between packets, which a live call
    # never has (they come every 20 ms) but a busy offline loop might: never clear here.
    serializer._input_resampler._clear_after_secs = None
    frames = []
    for i in range(0, len(ulaw) - 159, 160):
        payload = base64.b64encode(ulaw[i : i + 160]).decode()
        frame = await serializer.deserialize(json.dumps({"event": "media", "media": {"payload": payload}}))
        if frame is not None:  # None while the resampler holds the audio back
            frames.append((frame.audio, (i + 160) / 8000))
    return frames


# ---- analyzers ----------------------------------------------------------------------------------


class SimClock:
    """Stands in for the `time` module inside base_smart_turn: monotonic() is simulated time."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    perf_counter = staticmethod(time.perf_counter)


class Models:
    """The shared ONNX sessions, analyzer classes that time (and memoize) the model calls."""

    def __init__(self):
        from services.local.engines import (
            LocalEngines,
            SharedSileroVADAnalyzer,
            SharedSmartTurnAnalyzerV3,
        )

        engines = LocalEngines.load(stt=False, tts=False, smart_turn=True)
        self.silero_ms: list[float] = []
        self.smart_turn_ms: list[float] = []
        cache: dict[str, tuple[dict, float]] = {}
        models = self

        class TimedSilero(SharedSileroVADAnalyzer):
            def voice_confidence(self, buffer):
                t = time.perf_counter()
                try:
                    return super().voice_confidence(buffer)
                finally:
                    models.silero_ms.append((time.perf_counter() - t) * 1000)

        class CachedSmartTurn(SharedSmartTurnAnalyzerV3):
            """The same audio always gets the same prediction: run the model once per distinct segment."""

            def _predict_endpoint(self, audio_array):
                key = hashlib.sha1(audio_array.tobytes()).hexdigest()
                if key not in cache:
                    t = time.perf_counter()
                    result = super()._predict_endpoint(audio_array)
                    cache[key] = (result, (time.perf_counter() - t) * 1000)
                    models.smart_turn_ms.append(cache[key][1])
                self.last_ms = cache[key][1]
                return cache[key][0]

        self.silero = lambda params: TimedSilero(engines.silero_session, params=params)
        self.smart_turn = lambda params: CachedSmartTurn(engines.smart_turn_session, params=params)


def vad_events(models: Models, frames: list[tuple[bytes, float]], stop_secs: float) -> list[str | None]:
    """Per frame, the VADController's event after it: "start", "stop" or None (Silero, real params)."""
    from pipecat.audio.vad.vad_analyzer import VADParams, VADState

    vad = models.silero(VADParams(stop_secs=stop_secs, start_secs=VAD_START_SECS, min_volume=VAD_MIN_VOLUME))
    vad.set_sample_rate(SR)
    state, events = VADState.QUIET, []
    for frame, _ in frames:
        new = vad._run_analyzer(frame)  # the body of VADAnalyzer.analyze_audio, without the thread hop
        event = None
        if new != state and new in (VADState.SPEAKING, VADState.QUIET):
            event, state = ("start" if new == VADState.SPEAKING else "stop"), new
        events.append(event)
    vad._executor.shutdown(wait=False)
    return events


async def simulate(
    models: Models, frames: list[tuple[bytes, float]], events: list[str | None], cfg: Config, clock: SimClock
) -> dict:
    """Turn ends (time, cause) and smart-turn calls for one utterance, mirroring LLMUserAggregator:
    frame N goes to the VAD, then to the stop strategy with the VAD flag from before frame N, then the
    VAD event it caused (queued by the aggregator) reaches the strategy."""
    from pipecat.audio.turn.base_turn_analyzer import EndOfTurnState
    from pipecat.audio.turn.smart_turn.base_smart_turn import SmartTurnParams

    analyzer = models.smart_turn(SmartTurnParams(stop_secs=cfg.smart_turn_stop_secs)) if cfg.smart_turn else None
    if analyzer:
        analyzer.set_sample_rate(SR)
    ends, calls = [], []
    speaking, deadline = False, None

    async def predict(cause: str, at: float) -> tuple[bool, float]:
        """The strategy's analyze_end_of_turn: (complete, seconds it took). After the silence
        timeout the analyzer has already emptied its buffer, so no model runs then."""
        analyzer.last_ms = 0.0
        state, metrics = await analyzer.analyze_end_of_turn()
        done = state == EndOfTurnState.COMPLETE
        if metrics is not None:
            calls.append(
                {
                    "t": round(at, 3),
                    "cause": cause,
                    "complete": done,
                    "probability": round(metrics.probability, 3),
                    "ms": round(analyzer.last_ms, 1),
                }
            )
        return done, analyzer.last_ms / 1000

    for (frame, t), event in zip(frames, events, strict=False):
        if deadline is not None and deadline <= t:  # speech-timeout timer expired before this frame
            ends.append((deadline, "speech_timeout"))
            deadline = None
        clock.now = t
        if analyzer and analyzer.append_audio(frame, speaking) == EndOfTurnState.COMPLETE:
            _, took = await predict("silence", t)  # smart-turn stop_secs of silence: the turn ends
            ends.append((t + took, "smart_turn_timeout"))
            analyzer.clear()
        if event == "start":
            speaking, deadline = True, None
            if analyzer:
                analyzer.update_vad_start_secs(VAD_START_SECS)
        elif event == "stop":
            speaking = False
            if not analyzer:
                deadline = t + cfg.user_speech_timeout
            else:
                done, took = await predict("vad_stop", t)
                if done:
                    ends.append((t + took, "smart_turn_complete"))
                    analyzer.clear()
    if analyzer:
        await analyzer.cleanup()
    return {"ends": [(round(e, 3), c) for e, c in ends], "calls": calls}


def score(u: Utterance, sim: dict) -> dict:
    """False cut-offs, the turn-end delay and whether smart-turn judged the end of speech incomplete."""

    def speech_after(te: float) -> float:
        return float(u.speech[int(np.ceil(te * 100)) :].sum()) / 100

    cuts = [e for e, _ in sim["ends"] if speech_after(e) >= CUT_MIN_SPEECH_SECS]
    final = next(((e, c) for e, c in sim["ends"] if e not in cuts), None)
    at_end = [c for c in sim["calls"] if c["cause"] == "vad_stop" and speech_after(c["t"]) < CUT_MIN_SPEECH_SECS]
    return {
        "false_cutoffs": len(cuts),
        "cutoff_at": cuts,
        "delay_ms": None if final is None else round((final[0] - u.speech_end) * 1000),
        "ended_by": None if final is None else final[1],
        "incomplete_at_end": None if not at_end else not at_end[0]["complete"],
        "smart_turn_calls": sim["calls"],
    }


# ---- sweep and report ---------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q))) if values else None


def summarize(path: str, cfg: Config, runs: list[dict], sources: dict[str, str]) -> dict:
    delays = [r["delay_ms"] for r in runs if r["delay_ms"] is not None]
    judged = [r["incomplete_at_end"] for r in runs if r["incomplete_at_end"] is not None]
    cut = sorted({r["utterance"] for r in runs if r["false_cutoffs"]})
    return {
        "path": path,
        **asdict(cfg),
        "user_speech_timeout_secs": cfg.user_speech_timeout,
        "utterances": len(runs),
        "false_cutoff_utterances": len(cut),
        "false_cutoff_rate": round(len(cut) / len(runs), 3),
        "false_cutoffs_by_source": {src: sum(sources[c] == src for c in cut) for src in SOURCES},
        "cut_off": cut,
        "delay_p50_ms": _pct(delays, 50),
        "delay_p95_ms": _pct(delays, 95),
        "delay_mean_ms": round(float(np.mean(delays))) if delays else None,
        "delay_max_ms": max(delays) if delays else None,
        "no_turn_end": len(runs) - len(delays),
        "smart_turn_incomplete_share": round(sum(judged) / len(judged), 3) if judged else None,
    }


def recommend(summary: list[dict]) -> dict:
    """Per path: the config with the lowest mean delay (then p95) without false cut-offs that also
    survives pauses of MIN_TOLERATED_PAUSE_MS."""
    out = {}
    for path in PATHS:
        safe = [
            s
            for s in summary
            if s["path"] == path
            and s["false_cutoff_utterances"] == 0
            and s["no_turn_end"] == 0
            and (s["longest_pause_survived_ms"] or 0) >= MIN_TOLERATED_PAUSE_MS
        ]
        if safe:
            best = min(safe, key=lambda s: (s["delay_mean_ms"], s["delay_p95_ms"]))
            out[path] = {
                k: best[k]
                for k in (
                    "vad_stop_secs",
                    "smart_turn",
                    "smart_turn_stop_secs",
                    "speech_timeout_secs",
                    "user_speech_timeout_secs",
                    "delay_p50_ms",
                    "delay_p95_ms",
                    "delay_mean_ms",
                    "longest_pause_survived_ms",
                )
            }
    return out


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    versions = {p: metadata.version(p) for p in ("pipecat-ai", "onnxruntime")}
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **versions,
    }


def _pause(ms: int | None, grid: list[int]) -> str:
    return f"< {grid[0]} ms" if ms is None else (f">= {ms} ms" if ms == grid[-1] else f"{ms} ms")


def _fmt(v, unit=""):
    return "-" if v is None else f"{v}{unit}"


def markdown(report: dict) -> str:
    m, t, c = report["machine"], report["timing"], report["counts"]
    grid = report["pause_grid"]["pauses_ms"]
    lines = [
        "# Turn-end benchmark (bench/turns.py)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, Pipecat {m['pipecat-ai']}, "
        f"onnxruntime {m['onnxruntime']}. Sweep took {report['runtime_secs']} s.",
        "",
        f"{len(report['utterances'])} utterances per path: {c['piper']} Piper sentences spoken at once with their "
        f"comma gaps stretched to 350-600 ms ({c['no_pause']} of them with no pause), "
        f"{c['piper-separate']} the same with each "
        f"phrase spoken on its own (`/sep`, phrase-final fall before each pause), {c['librivox']} LibriVox clips as "
        f"recorded. Cut-offs are counted as all (piper / sep / librivox). VAD start_secs {VAD_START_SECS}, "
        f"min_volume {VAD_MIN_VOLUME}. Delay = first turn end after the true end of speech; a false cut-off "
        f"is a turn end with >= {int(CUT_MIN_SPEECH_SECS * 1000)} ms of speech still to come. See the module "
        "docstring for the method.",
        "",
        f"Model time: smart-turn inference p50 {t['smart_turn_ms']['p50']} ms, p95 {t['smart_turn_ms']['p95']} ms "
        f"({t['smart_turn_ms']['n']} distinct calls); Silero p50 {t['silero_ms_per_32ms']['p50']} ms, "
        f"p95 {t['silero_ms_per_32ms']['p95']} ms per 32 ms window.",
        "",
        f"Longest pause survived: {', '.join(report['pause_grid']['scripts'])} with the pause swept over "
        f"{grid[0]}-{grid[-1]} ms: the longest pause up to which none of them is cut off.",
        "",
    ]
    for path in PATHS:
        rows = [s for s in report["summary"] if s["path"] == path]
        if not rows:
            continue
        lines += [
            f"## {PATH_TITLES[path]}",
            "",
            "| VAD stop | smart-turn | speech timeout | cut-offs | delay p50 | delay p95 | mean | max "
            "| ST incomplete at end | longest pause survived | cut off |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in rows:
            st = f"on, {s['smart_turn_stop_secs']}s" if s["smart_turn"] else "off"
            inc = "-" if s["smart_turn_incomplete_share"] is None else f"{s['smart_turn_incomplete_share']:.0%}"
            by = "/".join(str(s["false_cutoffs_by_source"][src]) for src in SOURCES)
            lines.append(
                f"| {s['vad_stop_secs']}s | {st} | {_fmt(s['user_speech_timeout_secs'], 's')} | "
                f"{s['false_cutoff_utterances']}/{s['utterances']} ({by}) | "
                f"{_fmt(s['delay_p50_ms'], ' ms')} | {_fmt(s['delay_p95_ms'], ' ms')} | "
                f"{_fmt(s['delay_mean_ms'], ' ms')} | "
                f"{_fmt(s['delay_max_ms'], ' ms')} | {inc} | {_pause(s['longest_pause_survived_ms'], grid)} | "
                f"{', '.join(s['cut_off'])} |"
            )
        lines.append("")
    lines += [
        "## Lowest mean delay with no false cut-off",
        "",
        f"Mechanical pick: no false cut-off, survives {MIN_TOLERATED_PAUSE_MS} ms pauses, lowest mean delay. "
        "The delays leave STT out: with smart-turn the turn also waits for the transcript, which a "
        "segmented STT (Whisper) only starts at the VAD stop; without it, the STT runs during the "
        "speech-timeout wait.",
        "",
    ]
    for path, r in report["recommendation"].items():
        st = (
            f"smart-turn on, stop {r['smart_turn_stop_secs']}s"
            if r["smart_turn"]
            else f"smart-turn off, speech timeout {r['user_speech_timeout_secs']}s"
        )
        lines.append(
            f"- {path}: VAD stop {r['vad_stop_secs']}s, {st}: p50 {r['delay_p50_ms']} ms, "
            f"p95 {r['delay_p95_ms']} ms, mean {r['delay_mean_ms']} ms, "
            f"survives pauses up to {r['longest_pause_survived_ms']} ms"
        )
    lines += ["", "## Utterances", "", "| name | source | pauses (ms) | true end (s) | text |", "|---|---|---|---|---|"]
    for u in report["utterances"]:
        lines.append(
            f"| {u['name']} | {u['source']} | {', '.join(map(str, u['pauses_ms'])) or '-'} | "
            f"{u['speech_end']} | {u['text']} |"
        )
    return "\n".join(lines) + "\n"


async def run_all(models: Models, utts: list[Utterance], cfgs: list[Config], paths) -> list[dict]:
    import pipecat.audio.turn.smart_turn.base_smart_turn as base_smart_turn

    clock, real_time = SimClock(), base_smart_turn.time
    base_smart_turn.time = clock
    runs = []
    try:
        for path in paths:
            for u in utts:
                frames = await path_frames(u.audio, path)
                for stop in sorted({c.vad_stop_secs for c in cfgs}):
                    events = vad_events(models, frames, stop)
                    for cfg in (c for c in cfgs if c.vad_stop_secs == stop):
                        sim = await simulate(models, frames, events, cfg, clock)
                        runs.append(
                            {
                                "path": path,
                                "utterance": u.name,
                                **asdict(cfg),
                                **score(u, sim),
                                "turn_ends": sim["ends"],
                            }
                        )
    finally:
        base_smart_turn.time = real_time
    return runs


def _of(runs: list[dict], path: str, cfg: Config) -> list[dict]:
    return [
        r
        for r in runs
        if r["path"] == path
        and Config(r["vad_stop_secs"], r["smart_turn"], r["smart_turn_stop_secs"], r["speech_timeout_secs"]) == cfg
    ]


def longest_pause(runs: list[dict], pauses: dict[str, int]) -> int | None:
    """The longest pause such that no sentence with a pause up to it was cut off (None: not even the
    shortest)."""
    cut = min((pauses[r["utterance"]] for r in runs if r["false_cutoffs"]), default=None)
    ok = [p for p in pauses.values() if cut is None or p < cut]
    return max(ok) if ok else None


async def sweep(
    utts: list[Utterance],
    cfgs: list[Config],
    paths=PATHS,
    models: Models | None = None,
    pause_utts: list[Utterance] = (),
) -> dict:
    models = models or Models()
    runs = await run_all(models, utts, cfgs, paths)
    pause_runs = await run_all(models, list(pause_utts), cfgs, paths)
    pauses = {u.name: u.pauses_ms[0] for u in pause_utts}
    sources = {u.name: u.source for u in utts}
    summary = []
    for p in paths:
        for c in cfgs:
            s = summarize(p, c, _of(runs, p, c), sources)
            s["longest_pause_survived_ms"] = longest_pause(_of(pause_runs, p, c), pauses) if pauses else None
            summary.append(s)

    def pct(xs):
        if not xs:
            return None
        return {
            "p50": round(float(np.percentile(xs, 50)), 2),
            "p95": round(float(np.percentile(xs, 95)), 2),
            "mean": round(float(np.mean(xs)), 2),
            "n": len(xs),
        }

    keep = (
        "path",
        "utterance",
        "vad_stop_secs",
        "smart_turn",
        "smart_turn_stop_secs",
        "speech_timeout_secs",
        "false_cutoffs",
        "delay_ms",
    )
    return {
        "timing": {"smart_turn_ms": pct(models.smart_turn_ms), "silero_ms_per_32ms": pct(models.silero_ms)},
        "summary": summary,
        "recommendation": recommend(summary),
        "runs": runs,
        "pause_runs": [{k: r[k] for k in keep} for r in pause_runs],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output directory")
    parser.add_argument("--quick", action="store_true", help="a few utterances and configs only")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    utts, pause_utts = utterances(args.quick), pause_utterances(args.quick)
    paths = PATHS[:2] if args.quick else PATHS
    report = asyncio.run(sweep(utts, configs(args.quick), paths, pause_utts=pause_utts))
    report = {
        "machine": machine(),
        "runtime_secs": round(time.perf_counter() - t0, 1),
        "quick": args.quick,
        "pause_grid": {
            "scripts": list(PAUSE_SCRIPTS[:1] if args.quick else PAUSE_SCRIPTS),
            "pauses_ms": sorted({u.pauses_ms[0] for u in pause_utts}),
        },
        "settings": {
            "vad_start_secs": VAD_START_SECS,
            "vad_min_volume": VAD_MIN_VOLUME,
            "cutoff_min_speech_secs": CUT_MIN_SPEECH_SECS,
            "lead_secs": LEAD_SECS,
            "tail_secs": TAIL_SECS,
        },
        "counts": {
            **{s: sum(u.source == s for u in utts) for s in SOURCES},
            "no_pause": sum(u.source == "piper" and not u.pauses_ms for u in utts),
        },
        "utterances": [
            {
                "name": u.name,
                "source": u.source,
                "text": u.text,
                "pauses_ms": u.pauses_ms,
                "speech_end": round(u.speech_end, 2),
            }
            for u in utts
        ],
        **report,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "turns.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "turns.md").write_text(markdown(report))
    print(markdown(report).split("## Utterances")[0])
    print(f"wrote {out / 'turns.json'} and {out / 'turns.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
