"""The fake cloud vendors with scripted latency, in a process of their own.

The benchmark runs them apart from both the server under test (so its CPU and memory are the
server's alone) and the simulated callers (so a busy caller loop does not delay a vendor's answer).
They are the test fakes of tests/fakes, which speak each vendor's documented protocol; here they
answer with a fixed transcript and reply instead of running Whisper, so their own cost stays small:

- Deepgram: the final transcript `stt_delay` seconds after the utterance is finalized (Pipecat asks
  for it when its VAD stops) or endpointed.
- Claude: the stream starts `llm_delay` seconds after the request, then `llm_tps` tokens per second.
- ElevenLabs: first audio `tts_delay` seconds after each text segment is committed (Piper speech, cached).

Faults (`atlas-voice bench faults`): each Deepgram stream is dropped (TCP abort, no close frame) with
probability `stt_drop` at a random point 1-20 s of audio in; each Claude request answers 529 with
`llm_overload` or stalls `llm_stall_secs` after `message_start` with `llm_stall`; each ElevenLabs context
is cut (connection aborted) with `tts_fail` after 0.2-2 s of audio. The counts are printed as a JSON line
when the process ends.

With `jitter` > 0 every delay is drawn from a log-normal distribution with that coefficient of variation
around its median; at 0 (the default) delays are exact, so the server's overhead is exact too.

Run: `python -m bench.vendors '{"stt_delay": 0.3, ...}'`: prints one JSON line with the URLs, then serves
until stdin closes.
"""

from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import asdict, dataclass

from fakes.base import FaultQueue

VOICE_ID = "21m00Tcm4TlvDq8EAJjs"
TRANSCRIPT = "What is the quickest way to the old harbour from the station?"
# The reply: a first clause after 4+ words, then whole sentences (~30 tokens, ~6 s of speech).
REPLY = (
    "The quickest way to the old harbour, if you ask me, is the number nine tram. "
    "It runs every ten minutes until midnight."
)


@dataclass
class VendorScript:
    """Scripted vendor latency (seconds) and token rate; the defaults are published figures
    (../shared/notes/anchors.md): Deepgram final 0.3 s, Claude first token 0.6 s then 80 tokens/s,
    TTS first audio 0.2 s."""

    stt_delay: float = 0.3
    llm_delay: float = 0.6
    llm_tps: float = 80.0
    tts_delay: float = 0.2
    jitter: float = 0.0
    stt_drop: float = 0.0
    llm_overload: float = 0.0
    llm_stall: float = 0.0
    llm_stall_secs: float = 10.0
    tts_fail: float = 0.0

    def sample(self, median: float) -> float:
        if self.jitter <= 0 or median <= 0:
            return median
        sigma = math.sqrt(math.log(1 + self.jitter**2))
        return median * math.exp(random.gauss(0.0, sigma))

    def injected(self, turn_end: dict) -> float:
        """What a turn must wait for, server aside: the turn end, then first token and first audio.

        `turn_end` is the server's setting (`turn_end_setting`). The VAD's stop comes first; Deepgram's final
        follows `stt_delay` after the Finalize sent then. Fixed turn end: with the speech timeout the turn
        ends when both it and the final are in (they run side by side); smart-turn ends it on the final when
        it judges the turn complete. The rule: the turn ends after `silence` (from the end of speech), not
        before the final; with preemption the LLM starts on the final and its reply is held until the turn
        ends, so first audio waits for the later of the two.
        """
        vad, stt, llm, tts = turn_end["vad_stop"], self.stt_delay, self.llm_delay, self.tts_delay
        if turn_end.get("mode") == "rule":
            ended = max(turn_end["silence"], vad + stt)
            if turn_end.get("preempt"):
                return max(ended, vad + stt + llm) + tts
            return ended + llm + tts
        after_stop = stt if turn_end["smart_turn"] else max(turn_end["speech_timeout"], stt)
        return vad + after_stop + llm + tts


def turn_end_setting(settings, transcript: str = TRANSCRIPT) -> dict:
    """The turn-end figures `injected` needs, from a server's Settings (the rule's silence for `transcript`,
    which the scripted Deepgram returns for every utterance)."""
    from processors.turn_end import TurnEndRule, words_verdict

    out = {
        "mode": settings.turn_end,
        "vad_stop": settings.resolved_vad_stop_secs,
        "smart_turn": settings.smart_turn,
        "speech_timeout": settings.user_speech_timeout_secs,
        "preempt": settings.turn_end == "rule" and settings.preempt,
    }
    if settings.turn_end == "rule":
        rule = TurnEndRule.from_settings(settings)
        # smart-turn's verdict on the bench's speech is not known here: taken as complete
        out["silence"] = rule.silence(words_verdict(transcript), True if settings.smart_turn else None)
    return out


class RandomFaults(FaultQueue):
    """A fake's fault queue whose every take is a fault drawn at random (`draw` returns one or None),
    counted by kind."""

    def __init__(self, draw):
        super().__init__()
        self._draw = draw
        self.counts: dict[str, int] = {}
        self.takes = 0

    def take(self):
        scripted = super().take()
        if scripted is not None:
            return scripted
        self.takes += 1
        kind, fault = self._draw()
        if fault is not None:
            self.counts[kind] = self.counts.get(kind, 0) + 1
        return fault


def _random_faults(fakes: dict, script: VendorScript) -> dict[str, RandomFaults]:
    from fakes.anthropic import _Fault

    def stt():
        return ("stt_drop", random.uniform(1.0, 20.0)) if random.random() < script.stt_drop else ("", None)

    def llm():
        r = random.random()
        if r < script.llm_overload:
            return "llm_529", _Fault("fail", status=529)
        if r < script.llm_overload + script.llm_stall:
            return "llm_stall", _Fault("stall", seconds=script.llm_stall_secs)
        return "", None

    def tts():
        return ("tts_fail", random.uniform(0.2, 2.0)) if random.random() < script.tts_fail else ("", None)

    queues = {"deepgram": RandomFaults(stt), "anthropic": RandomFaults(llm), "elevenlabs": RandomFaults(tts)}
    fakes["deepgram"]._drops = queues["deepgram"]
    fakes["anthropic"]._faults = queues["anthropic"]
    fakes["elevenlabs"]._failures = queues["elevenlabs"]
    return queues


def _sampled(attr: str):
    def get(self):
        return self.script.sample(getattr(self.script, attr))

    return property(get, lambda self, value: None)  # the fakes' own constructors set a constant: ignored


def start_vendors(script: VendorScript) -> dict:
    """Start the three fakes in this process; return them by name."""
    from fakes.anthropic import FakeAnthropic
    from fakes.deepgram import FakeDeepgram
    from fakes.elevenlabs import FakeElevenLabs

    class Deepgram(FakeDeepgram):
        final_delay = _sampled("stt_delay")

    class Anthropic(FakeAnthropic):
        first_token_delay = _sampled("llm_delay")

    class ElevenLabs(FakeElevenLabs):
        first_audio_delay = _sampled("tts_delay")

    for cls in (Deepgram, Anthropic, ElevenLabs):
        cls.script = script
    fakes = {
        "deepgram": Deepgram(transcripts=lambda: TRANSCRIPT),
        "anthropic": Anthropic(reply=lambda body: REPLY, tokens_per_second=script.llm_tps),
        "elevenlabs": ElevenLabs(voices={VOICE_ID}),
    }
    for fake in fakes.values():
        fake.start()
    return fakes


def vendor_env(urls: dict) -> dict[str, str]:
    """The environment that points Atlas (or the bare Pipecat bot) at the fakes."""
    return {
        "DEEPGRAM_API_KEY": "test-deepgram-key",
        "DEEPGRAM_BASE_URL": urls["deepgram"],
        "ANTHROPIC_API_KEY": "test-anthropic-key",
        "ANTHROPIC_BASE_URL": urls["anthropic"],
        "ELEVENLABS_API_KEY": "test-elevenlabs-key",
        "ELEVENLABS_BASE_URL": urls["elevenlabs"],
        "ELEVENLABS_VOICE_ID": VOICE_ID,
        "ATLAS_TTS": "elevenlabs",
    }


def main() -> int:
    script = VendorScript(**json.loads(sys.argv[1] if len(sys.argv) > 1 else "{}"))
    fakes = start_vendors(script)
    fakes["elevenlabs"].synthesize("Warming up.", 16000)  # load Piper before the first caller
    urls = {
        "deepgram": fakes["deepgram"].ws_url,
        "anthropic": fakes["anthropic"].http_url,
        "elevenlabs": fakes["elevenlabs"].ws_url,
        "script": asdict(script),
    }
    faults = (
        _random_faults(fakes, script)
        if script.stt_drop or script.llm_overload or script.llm_stall or script.tts_fail
        else {}
    )
    print(json.dumps(urls), flush=True)
    sys.stdin.read()  # serve until the benchmark closes our stdin
    report = {name: {"takes": q.takes, **q.counts} for name, q in faults.items()}
    report["deepgram_connections"] = len(fakes["deepgram"].connections)
    requests = list(fakes["anthropic"].requests)
    report["anthropic_requests"] = len(requests)
    # What each Claude request carried (messages, bytes): a long call's context must stay flat.
    report["anthropic_request_sizes"] = [
        [len((r.body or {}).get("messages", [])) if isinstance(r.body, dict) else 0, len(json.dumps(r.body))]
        for r in requests
    ]
    print(json.dumps(report), flush=True)
    for fake in fakes.values():
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
