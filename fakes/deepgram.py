"""A local fake of Deepgram's live transcription WebSocket (`/v1/listen`, Nova models).

It speaks the documented wire protocol closely enough that the real deepgram-sdk (7.x) parses every
message into its typed models (`ListenV1Results`, `ListenV1UtteranceEnd`, `ListenV1SpeechStarted`,
`ListenV1Metadata`, `ListenV1Error`), and it refuses what Deepgram refuses: no/wrong
`Authorization: Token <key>` -> HTTP 401 before the upgrade, unknown model/encoding/bad parameter
values -> HTTP 400 (body `{"err_code", "err_msg", "request_id"}` plus the `dg-request-id` and
`dg-error` headers Deepgram documents for failed upgrades).

Languages: `language` (BCP-47; Deepgram's default `en` when absent) is checked against what the model serves, as
Deepgram's docs and changelogs list it for nova-3 (monolingual codes plus `multi`), nova-3-medical, nova-2 and
nova-2's English-only variants; other (legacy) models only need a well-formed tag. A combination Deepgram does
not serve is refused at the handshake with its 400, `{"err_code": "Bad Request", "err_msg": "Bad Request: No
such model/language/tier combination found.", ...}`. Each connection records its `language` (and
`language_hints`). With `language=multi` the Results carry what Deepgram documents for multilingual streams:
`languages` on the alternative and `language` on each word (the first `language_hint`, else `en`: the fake
does not detect languages), and on nova-3 `languages_hinted` (the hints normalized to base codes, `[]` when
none). Whisper mode always transcribes as English; scripted mode can answer per language (below).

Speech handling: an energy detector on 20 ms frames (the inputs are clean synthetic speech plus
silence or low noise) finds speech; `endpointing` ms of silence after it ends the utterance with a
final `Results` (`is_final` and `speech_final` true). The transcript comes from the local Whisper
(`whisper_transcribe`, run in a thread so the loop never blocks) or, in scripted mode, from the
`transcripts` list or callable (no Whisper at all: the mode for load tests); a callable that takes an argument
is given the connection's language (`lambda language: {"es": "Hola.", "en": "Hello."}[language]`).
Timestamps are seconds of audio since the start of the connection's stream, and consecutive finals tile that
timeline (each final's `start` is the previous final's `start + duration`), as on Deepgram.

Faults, settable from any thread: `drop_after(seconds_of_audio)` aborts the TCP connection (no close
frame) once a connection has received that much audio; `reject_next(status)` refuses handshakes;
`late_final_next(text, delay)` sends one more final after the next one (words committed late).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import json
import re
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

from fakes.base import FakeServer, RecordedRequest, whisper_transcribe

# --- what Deepgram accepts ------------------------------------------------------------------------

# Streaming (v1) models, as listed in deepgram-sdk's ListenV1Model. Flux models live on /v2/listen.
MODELS = {
    "nova-3",
    "nova-3-general",
    "nova-3-medical",
    "nova-2",
    "nova-2-general",
    "nova-2-meeting",
    "nova-2-finance",
    "nova-2-conversationalai",
    "nova-2-voicemail",
    "nova-2-video",
    "nova-2-medical",
    "nova-2-drivethru",
    "nova-2-automotive",
    "nova-2-phonecall",
    "nova-2-atc",
    "nova",
    "nova-general",
    "nova-phonecall",
    "nova-medical",
    "enhanced",
    "enhanced-general",
    "enhanced-meeting",
    "enhanced-phonecall",
    "enhanced-finance",
    "base",
    "base-general",
    "meeting",
    "phonecall",
    "finance",
    "conversationalai",
    "voicemail",
    "video",
}
# Every encoding Deepgram documents for raw streaming audio; the fake decodes only the first three.
ENCODINGS = {"linear16", "mulaw", "alaw", "linear32", "flac", "amr-nb", "amr-wb", "opus", "ogg-opus", "speex", "g729"}
DECODABLE = {"linear16", "mulaw", "alaw"}
BOOL_PARAMS = {
    "interim_results",
    "punctuate",
    "smart_format",
    "vad_events",
    "diarize",
    "dictation",
    "numerals",
    "profanity_filter",
    "multichannel",
    "detect_entities",
    "mip_opt_out",
    "filler_words",
    "no_delay",
    "measurements",
    "utterances",
}
FREE_PARAMS = {
    "language",
    "version",
    "tag",
    "extra",
    "callback",
    "callback_method",
    "keyterm",
    "keywords",
    "search",
    "replace",
    "redact",
    "diarize_model",
    "language_hint",
}
KNOWN_PARAMS = (
    BOOL_PARAMS | FREE_PARAMS | {"model", "encoding", "sample_rate", "channels", "endpointing", "utterance_end_ms"}
)

# Languages by model, from Deepgram's Models & Languages Overview and its Nova-3 changelog entries (2025-08 ..
# 2026-08: de/nl/sv/da, es/fr/pt, it/tr/no/id, bg/cs/fi/hi/hu/ja/ko/pl/ru/uk/vi, ca/et/nl-BE/de-CH/el/lv/lt/ms/
# ro/sk, be/bn/bs/hr/kn/mk/mr/sr/sl/ta/tl/te, zh-HK/th, zh/zh-TW, pa/ne); gu, af, hy and ka as seen accepted by
# the live API. Codes compare case-insensitively; a connection records the canonical spelling.
_ENGLISH = ("en", "en-US", "en-AU", "en-GB", "en-IN", "en-NZ")
NOVA3_LANGUAGES = frozenset(
    {
        *_ENGLISH,
        "multi",
        *("de", "de-CH", "nl", "nl-BE", "sv", "sv-SE", "da", "da-DK", "es", "es-419", "fr", "fr-CA"),
        *("pt", "pt-BR", "pt-PT", "it", "tr", "no", "id", "bg", "cs", "fi", "hi", "hu", "ja", "ko", "ko-KR"),
        *("pl", "ru", "uk", "vi", "ca", "et", "el", "lv", "lt", "ms", "ro", "sk", "be", "bn", "bs", "hr", "kn"),
        *("mk", "mr", "sr", "sl", "ta", "tl", "te", "th", "th-TH", "pa", "pa-IN", "ne", "gu", "af", "hy", "ka"),
        *("zh", "zh-CN", "zh-Hans", "zh-TW", "zh-Hant", "zh-HK"),
    }
)
NOVA3_MEDICAL_LANGUAGES = frozenset({*_ENGLISH, "en-CA", "en-IE", "multi"})
NOVA2_LANGUAGES = frozenset(
    {
        *_ENGLISH,
        "multi",
        *("bg", "ca", "zh", "zh-CN", "zh-Hans", "zh-TW", "zh-Hant", "zh-HK", "cs", "da", "da-DK", "nl", "nl-BE"),
        *("et", "fi", "fr", "fr-CA", "de", "de-CH", "el", "hi", "hu", "id", "it", "ja", "ko", "ko-KR", "lv"),
        *("lt", "ms", "no", "pl", "pt", "pt-BR", "pt-PT", "ro", "ru", "sk", "es", "es-419", "sv", "sv-SE"),
        *("th", "th-TH", "tr", "uk", "vi"),
    }
)
NOVA2_VARIANT_LANGUAGES = frozenset({"en", "en-US"})  # nova-2-meeting, -phonecall, ...: English only
# Nova-3 multilingual's 55 languages (Nova-3 Language Prompting): what `language_hint` accepts. Other region
# subtags resolve to their base code (en-GB -> en), as `languages_hinted` reports them.
MULTI_HINT_LANGUAGES = frozenset(
    {
        *("af", "ar", "be", "bn", "bs", "bg", "ca", "zh-HK", "zh", "hr", "cs", "da", "nl", "en", "et", "fi"),
        *("nl-BE", "fr", "gl", "de", "el", "gu", "he", "hi", "hu", "id", "it", "ja", "kn", "ko", "lv", "lt"),
        *("mk", "ms", "mr", "no", "fa", "pl", "pt", "ro", "ru", "sr", "sk", "sl", "es", "sv", "tl", "ta", "te"),
        *("th", "tr", "uk", "vi", "xh", "zu"),
    }
)
NO_SUCH_COMBINATION = "Bad Request: No such model/language/tier combination found."


def _canonical(code: str, known: frozenset[str]) -> str | None:
    """`code` as spelled in `known`, compared case-insensitively; None if absent."""
    lowered = code.lower()
    return next((k for k in known if k.lower() == lowered), None)


def languages_for(model: str) -> frozenset[str] | None:
    """The `language` values `model` serves on /v1/listen, or None when the fake does not check (legacy models)."""
    if model in ("nova-3", "nova-3-general"):
        return NOVA3_LANGUAGES
    if model == "nova-3-medical":
        return NOVA3_MEDICAL_LANGUAGES
    if model in ("nova-2", "nova-2-general"):
        return NOVA2_LANGUAGES
    if model.startswith("nova-2-"):
        return NOVA2_VARIANT_LANGUAGES
    return None


def normalize_hint(hint: str) -> str | None:
    """A `language_hint` as Nova-3 multilingual reports it in `languages_hinted` (`ES` -> `es`, `en-GB` -> `en`,
    `zh-hk` -> `zh-HK`), or None if it names no language the model knows."""
    exact = _canonical(hint, MULTI_HINT_LANGUAGES)
    if exact is not None:
        return exact
    return _canonical(hint.split("-")[0], MULTI_HINT_LANGUAGES)


def _takes_argument(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params)


DEFAULT_ENDPOINTING_MS = 10  # Deepgram: "Endpointing is enabled by default and set to 10 milliseconds"
NO_ENDPOINTING_GAP_MS = 500  # endpointing=false: still finalize (is_final, not speech_final) after a pause
MIN_GAP_MS = 100  # the detector's hangover: shorter dips (stop consonants) are not pauses
SPEECH_DB = -45.0  # RMS in dBFS above which a 20 ms frame is speech
MIN_UTTERANCE_FRAMES = 3  # fewer speech frames than this in a segment (a click) transcribe as ""
SILENCE_FINAL_EVERY = 3.0  # Deepgram also finalizes long stretches of silence (empty transcript)
WORDS_PER_SECOND = 2.5  # growth of scripted interim prefixes


class _Rejected(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# --- G.711 ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _g711_tables() -> tuple[np.ndarray, np.ndarray]:
    ulaw = np.zeros(256, np.int16)
    alaw = np.zeros(256, np.int16)
    for i in range(256):
        u = ~i & 0xFF
        t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
        ulaw[i] = (0x84 - t) if u & 0x80 else (t - 0x84)
        a = i ^ 0x55
        t = (a & 0x0F) << 4
        seg = (a & 0x70) >> 4
        if seg == 0:
            t += 8
        elif seg == 1:
            t += 0x108
        else:
            t = (t + 0x108) << (seg - 1)
        alaw[i] = t if a & 0x80 else -t
    return ulaw, alaw


def g711_decode(data: bytes, law: str) -> np.ndarray:
    """mu-law or A-law bytes -> int16 samples."""
    ulaw, alaw = _g711_tables()
    return (ulaw if law == "mulaw" else alaw)[np.frombuffer(data, np.uint8)]


# --- records --------------------------------------------------------------------------------------


@dataclass
class DeepgramConnection:
    """One accepted `/v1/listen` WebSocket, as the fake saw it and answered it."""

    request: RecordedRequest
    request_id: str
    model: str
    encoding: str
    sample_rate: int
    channels: int
    interim_results: bool
    punctuate: bool
    endpointing_ms: int | None  # None: endpointing=false
    utterance_end_ms: int | None
    vad_events: bool
    language: str = "en"  # as the handshake asked (canonical spelling); Deepgram's default when absent
    language_hints: list[str] = field(default_factory=list)  # `language_hint` values, normalized (multi only)
    audio_bytes: int = 0
    audio_seconds: float = 0.0
    control: list[dict] = field(default_factory=list)  # JSON messages received (KeepAlive, Finalize, ...)
    sent: list[dict] = field(default_factory=list)  # every JSON message sent, in order
    finals: list[str] = field(default_factory=list)  # non-empty final transcripts sent
    closed: bool = False

    @property
    def path(self) -> str:
        return self.request.path

    @property
    def query(self) -> dict[str, str]:
        return self.request.query

    @property
    def headers(self) -> dict[str, str]:
        return self.request.headers

    @property
    def events(self) -> list[str]:
        return self.request.events

    @property
    def results(self) -> list[dict]:
        return [m for m in self.sent if m.get("type") == "Results"]

    @property
    def interims(self) -> list[str]:
        return [m["channel"]["alternatives"][0]["transcript"] for m in self.results if not m["is_final"]]


# --- the server -----------------------------------------------------------------------------------


class FakeDeepgram(FakeServer):
    """Fake Deepgram streaming STT. Use as a context manager; point clients at `.ws_url`."""

    idle_timeout = 10.0  # NET-0001: close after this long without audio or a text message

    def __init__(
        self,
        *,
        api_key: str = "test-deepgram-key",
        transcripts: list[str] | Callable[[], str] | Callable[[str], str] | None = None,
        final_delay: float = 0.0,
        interim_every: float = 1.0,
    ) -> None:
        super().__init__()
        self.api_key = api_key
        # A list is used up in order; a callable is asked for each utterance (load tests: never runs out), with
        # the connection's language if it takes an argument.
        self.transcripts = transcripts if transcripts is None or callable(transcripts) else list(transcripts)
        self.final_delay = final_delay
        self.interim_every = interim_every
        self.connections: list[DeepgramConnection] = []
        self._lock = threading.Lock()
        self._drops = self._fault_queue()
        self._rejects = self._fault_queue()
        self._stalls = self._fault_queue()
        self._late_finals = self._fault_queue()
        self.app.router.add_get("/v1/listen", self._listen)
        self.app.router.add_route("*", "/{tail:.*}", self._not_found)

    # --- faults and accessors (any thread) -------------------------------------------------------

    def drop_after(self, seconds_of_audio: float, times: int = 1) -> None:
        """The next `times` connections are aborted (no close frame) after this much audio."""
        self._drops.add(float(seconds_of_audio), times)

    def reject_next(self, status: int, times: int = 1) -> None:
        """The next `times` handshakes are refused with this HTTP status."""
        self._rejects.add(int(status), times)

    def stall_next(self, seconds: float, times: int = 1) -> None:
        """The next `times` handshakes are answered only after `seconds` (a slow network or region)."""
        self._stalls.add(float(seconds), times)

    def late_final_next(self, text: str, delay: float, times: int = 1) -> None:
        """After the next `times` non-empty finals, one more final (`is_final`, not `speech_final`) with
        `text`, `delay` seconds later: words Deepgram commits after a final the client took as complete."""
        self._late_finals.add((str(text), float(delay)), times)

    @property
    def finals(self) -> list[str]:
        """All non-empty final transcripts sent, over all connections, in order."""
        return [t for c in list(self.connections) for t in c.finals]

    def _next_script(self, language: str = "en") -> str | None:
        if callable(self.transcripts):
            return self.transcripts(language) if _takes_argument(self.transcripts) else self.transcripts()
        with self._lock:
            return self.transcripts.pop(0) if self.transcripts else None

    # --- HTTP side -------------------------------------------------------------------------------

    @staticmethod
    def _error(status: int, message: str, request_id: str) -> web.Response:
        code = {
            400: "Bad Request",
            401: "INVALID_AUTH",
            402: "ASR_PAYMENT_REQUIRED",
            403: "ACCESS_DENIED",
            404: "Not Found",
            429: "TOO_MANY_REQUESTS",
        }.get(status, "INTERNAL_SERVER_ERROR")
        return web.json_response(
            {"err_code": code, "err_msg": message, "request_id": request_id},
            status=status,
            headers={"dg-request-id": request_id, "dg-error": message},
        )

    async def _not_found(self, request: web.Request) -> web.Response:
        rec = self.record(request)
        rec.status = 404
        request_id = str(uuid.uuid4())
        return self._error(
            404, f"{request.method} {request.path} is not served (the fake serves GET /v1/listen)", request_id
        )

    def _authorized(self, request: web.Request) -> bool:
        auth = request.headers.get("Authorization", "")
        scheme, _, credential = auth.partition(" ")
        if scheme.lower() == "token" and credential.strip() == self.api_key:
            return True
        # Browsers: `Sec-WebSocket-Protocol: token, <key>` (documented alternative).
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        return len(protocols) == 2 and protocols[0].lower() == "token" and protocols[1] == self.api_key

    def _options(self, query) -> dict[str, Any]:
        """Validate the query like Deepgram; raise _Rejected(400) with its reason."""
        for key in query:
            if key not in KNOWN_PARAMS:
                raise _Rejected(400, f"Unknown query parameter '{key}' (this fake rejects unknown parameters)")
        for key in query:
            if len(query.getall(key)) > 1 and key not in {
                "keyterm",
                "keywords",
                "search",
                "replace",
                "redact",
                "tag",
                "extra",
                "language_hint",
            }:
                raise _Rejected(400, f"Parameter '{key}' given more than once")

        def boolean(name: str, default: bool) -> bool:
            value = query.get(name)
            if value is None:
                return default
            if value not in ("true", "false"):
                raise _Rejected(400, f"Invalid value '{value}' for '{name}': expected true or false")
            return value == "true"

        def integer(name: str, low: int, high: int) -> int | None:
            value = query.get(name)
            if value is None:
                return None
            if not re.fullmatch(r"\d+", value) or not low <= int(value) <= high:
                raise _Rejected(400, f"Invalid value '{value}' for '{name}': expected an integer {low}..{high}")
            return int(value)

        bools = {name: boolean(name, False) for name in BOOL_PARAMS}
        model = query.get("model", "base-general")
        if model not in MODELS:
            raise _Rejected(400, f"No such model '{model}' for streaming (known: nova-3, nova-2, ...)")
        language = query.get("language", "en")
        served = languages_for(model)
        if served is None:
            if language != "multi" and not re.fullmatch(r"[a-zA-Z]{2,3}(-[A-Za-z0-9]{2,8})*", language):
                raise _Rejected(400, NO_SUCH_COMBINATION)
        else:
            canonical = _canonical(language, served)
            if canonical is None:
                raise _Rejected(400, NO_SUCH_COMBINATION)
            language = canonical
        hints: list[str] = []
        if language == "multi" and model.startswith("nova-3"):
            for hint in [h.strip() for value in query.getall("language_hint", []) for h in value.split(",")]:
                normalized = normalize_hint(hint)
                if normalized is None:
                    raise _Rejected(400, f"Bad Request: unsupported language_hint '{hint}' for {model} multilingual")
                if normalized not in hints:
                    hints.append(normalized)
        if "keyterm" in query and not model.startswith("nova-3"):
            raise _Rejected(400, "Keyterm prompting is only available for Nova-3 models")
        if "keywords" in query and model.startswith("nova-3"):
            raise _Rejected(400, "Keywords are not supported for Nova-3; use keyterm")
        if query.get("diarize_model") not in (None, "v1", "latest"):
            raise _Rejected(400, f"diarize_model '{query.get('diarize_model')}' is not supported for streaming")
        encoding = query.get("encoding")
        if encoding is None:
            raise _Rejected(
                400,
                "This fake needs raw audio: pass encoding (and sample_rate); containerized "
                "audio is accepted by Deepgram but not decoded here",
            )
        if encoding not in ENCODINGS:
            raise _Rejected(400, f"Invalid encoding '{encoding}'")
        if encoding not in DECODABLE:
            raise _Rejected(
                400, f"Encoding '{encoding}' is valid on Deepgram but this fake decodes only {sorted(DECODABLE)}"
            )
        sample_rate = integer("sample_rate", 1, 192000)
        if sample_rate is None:
            raise _Rejected(400, "sample_rate is required when encoding is given")
        if encoding in ("mulaw", "alaw") and sample_rate not in (8000, 16000):
            raise _Rejected(400, f"sample_rate {sample_rate} is not supported with {encoding}")
        channels = integer("channels", 1, 16) or 1
        if bools["multichannel"] and channels > 1:
            raise _Rejected(400, "multichannel=true with channels>1 is valid on Deepgram but not faked")
        endpointing_raw = query.get("endpointing")
        if endpointing_raw is None or endpointing_raw == "true":
            endpointing: int | None = DEFAULT_ENDPOINTING_MS
        elif endpointing_raw == "false":
            endpointing = None
        else:
            endpointing = integer("endpointing", 0, 60000)
        utterance_end_ms = integer("utterance_end_ms", 0, 60000)
        if query.get("callback_method", "POST") not in ("GET", "POST", "PUT"):
            raise _Rejected(400, f"Invalid callback_method '{query.get('callback_method')}'")
        return {
            "model": model,
            "encoding": encoding,
            "sample_rate": sample_rate,
            "channels": channels,
            "interim_results": bools["interim_results"],
            "punctuate": bools["punctuate"] or bools["smart_format"] or bools["dictation"],
            "endpointing_ms": endpointing,
            "utterance_end_ms": utterance_end_ms,
            "vad_events": bools["vad_events"],
            "language": language,
            "language_hints": hints,
        }

    async def _listen(self, request: web.Request) -> web.StreamResponse:
        rec = self.record(request)
        request_id = str(uuid.uuid4())
        stall = self._stalls.take()
        if stall:
            rec.events.append(f"stalled:{stall:g}")
            await asyncio.sleep(stall)
        status = self._rejects.take()
        if status is not None:
            rec.status = status
            rec.events.append(f"rejected_by_fault:{status}")
            return self._error(status, f"Rejected by the fake (scripted fault, status {status})", request_id)
        if request.headers.get("Upgrade", "").lower() != "websocket":
            rec.status = 400
            return self._error(400, "Expected a WebSocket upgrade on /v1/listen", request_id)
        if not self._authorized(request):
            rec.status = 401
            return self._error(401, "Invalid credentials.", request_id)
        try:
            options = self._options(request.query)
        except _Rejected as e:
            rec.status = e.status
            rec.events.append(f"rejected:{e.message}")
            return self._error(e.status, e.message, request_id)

        transport = request.transport
        protocols = ("token",) if request.headers.get("Sec-WebSocket-Protocol") else ()
        ws = web.WebSocketResponse(protocols=protocols, timeout=2.0, max_msg_size=16 * 1024 * 1024)
        ws.headers["dg-request-id"] = request_id
        await ws.prepare(request)
        rec.status = 101
        conn = DeepgramConnection(request=rec, request_id=request_id, **options)
        self.connections.append(conn)
        stream = _Stream(self, conn, ws, transport, drop_at=self._drops.take())
        try:
            await stream.run()
        finally:
            conn.closed = True
        return ws


# --- one live stream ------------------------------------------------------------------------------


@dataclass
class _Job:
    kind: str  # "interim", "final", "utterance_end", "speech_started", "metadata"
    start: float = 0.0
    end: float = 0.0
    speech_start: float = 0.0
    speech_end: float = 0.0
    speech_final: bool = False
    from_finalize: bool = False
    has_speech: bool = False
    audio: np.ndarray | None = None  # Whisper mode: the segment's samples (native rate)
    script: str | None = None
    due: float = 0.0  # loop time before which a final must not be sent
    text: str = ""  # "error": the client message that could not be parsed


class _Stream:
    def __init__(
        self, fake: FakeDeepgram, conn: DeepgramConnection, ws: web.WebSocketResponse, transport, drop_at: float | None
    ) -> None:
        self.fake, self.conn, self.ws, self.transport, self.drop_at = fake, conn, ws, transport, drop_at
        self.loop = asyncio.get_running_loop()
        self.rate = conn.sample_rate
        self.frame = max(1, self.rate // 50)  # 20 ms
        self.whisper = fake.transcripts is None
        self.sha = hashlib.sha256()
        self.pending = np.zeros(0, np.int16)
        self.samples = 0  # mono samples through the detector
        self.gap_ms = max(conn.endpointing_ms, MIN_GAP_MS) if conn.endpointing_ms is not None else NO_ENDPOINTING_GAP_MS
        self.out: deque[_Job] = deque()
        self.wake = asyncio.Event()
        self.model_uuid = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"fake-deepgram/{conn.model}"))
        self.closing = False
        self._new_segment(0.0)
        self.in_speech = False
        self.silence_ms = 0
        self.utterance_end_due: float | None = None
        self.last_word_end = 0.0

    def _new_segment(self, start: float) -> None:
        self.seg_start = start
        self.seg_audio: list[np.ndarray] = []
        self.speech_frames = 0
        self.utt_start: float | None = None
        self.speech_end = start
        self.since_interim = 0.0
        self.script: str | None = None

    @property
    def now(self) -> float:
        return self.samples / self.rate

    # --- the two loops ---------------------------------------------------------------------------

    async def run(self) -> None:
        sender = asyncio.create_task(self._send_loop())
        try:
            await self._receive_loop()
        finally:
            if not sender.done():
                if self.closing:
                    try:
                        await asyncio.wait_for(asyncio.shield(sender), 30)
                    except (TimeoutError, Exception):
                        pass
                sender.cancel()
                try:
                    await sender
                except (asyncio.CancelledError, Exception):
                    pass

    async def _receive_loop(self) -> None:
        conn = self.conn
        while True:
            try:
                msg = await self.ws.receive(timeout=self.fake.idle_timeout)
            except TimeoutError:
                conn.events.append("closed_idle:NET-0001")
                await self.ws.close(
                    code=1011,
                    message=b"Deepgram did not receive audio data or a text message "
                    b"within the timeout window. See https://dpgr.am/net0001",
                )
                return
            if msg.type == WSMsgType.BINARY:
                if self.closing:
                    continue
                if not msg.data:  # an empty binary message is the legacy way to close the stream
                    conn.events.append("empty_binary_close")
                    self._close_stream()
                    continue
                self._audio(msg.data)
                if self.drop_at is not None and conn.audio_seconds >= self.drop_at:
                    conn.events.append(f"closed_by_fault:drop_after:{self.drop_at}")
                    if self.transport is not None:
                        self.transport.abort()
                    return
            elif msg.type == WSMsgType.TEXT:
                self._control(msg.data)
            else:  # CLOSE, CLOSING, CLOSED, ERROR
                if not self.closing:
                    conn.events.append("client_disconnected")
                return

    def _control(self, text: str) -> None:
        try:
            message = json.loads(text)
            kind = message["type"]
        except (ValueError, KeyError, TypeError):
            self.conn.control.append({"unparsed": text})
            self._enqueue(_Job("error", text=text))
            return
        self.conn.control.append(message)
        if kind == "KeepAlive":
            return
        if kind == "Finalize":
            if self.in_speech and self.silence_ms > 0:  # in the pause after speech: the utterance ends here
                self._end_utterance(self.now, speech_final=False, from_finalize=True)
            elif self.now > self.seg_start:
                self._close_segment(self.now, speech_final=False, from_finalize=True)
        elif kind == "CloseStream":
            self._close_stream()
        else:
            self._enqueue(_Job("error", text=text))

    def _close_stream(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self.speech_frames or self.now > self.seg_start:
            self._close_segment(self.now, speech_final=self.in_speech or self.speech_frames > 0, from_finalize=False)
        self._enqueue(_Job("metadata"))

    # --- audio in --------------------------------------------------------------------------------

    def _audio(self, data: bytes) -> None:
        conn = self.conn
        self.sha.update(data)
        conn.audio_bytes += len(data)
        if conn.encoding == "linear16":
            usable = len(data) - len(data) % 2
            samples = np.frombuffer(data[:usable], "<i2")
        else:
            samples = g711_decode(data, conn.encoding)
        if conn.channels > 1:
            samples = samples[: len(samples) // conn.channels * conn.channels]
            samples = samples.reshape(-1, conn.channels).mean(axis=1).astype(np.int16)
        width = 2 if conn.encoding == "linear16" else 1
        conn.audio_seconds = conn.audio_bytes / (width * conn.channels * self.rate)
        buf = np.concatenate([self.pending, samples]) if len(self.pending) else samples
        n = len(buf) // self.frame
        for i in range(n):
            self._frame(buf[i * self.frame : (i + 1) * self.frame])
        self.pending = buf[n * self.frame :].copy()

    def _frame(self, frame: np.ndarray) -> None:
        conn = self.conn
        t_start = self.now
        self.samples += len(frame)
        t_end = self.now
        if self.whisper:
            self.seg_audio.append(frame)
        level = float(np.sqrt(np.mean(np.square(frame.astype(np.float32))))) / 32768.0
        speech = 20.0 * np.log10(level + 1e-12) > SPEECH_DB
        if speech:
            if not self.in_speech:
                self.in_speech = True
                if self.utt_start is None:
                    self.utt_start = t_start
                    if conn.vad_events:
                        self._enqueue(_Job("speech_started", start=t_start))
            self.utterance_end_due = None
            self.silence_ms = 0
            self.speech_frames += 1
            self.speech_end = t_end
            self.since_interim += len(frame) / self.rate
            if conn.interim_results and self.since_interim >= self.fake.interim_every:
                self.since_interim = 0.0
                self._enqueue(self._segment_job("interim", t_end))
            return
        if self.in_speech:
            self.silence_ms += 20
            if self.silence_ms >= self.gap_ms:
                self._end_utterance(t_end, speech_final=conn.endpointing_ms is not None, from_finalize=False)
        elif self.utterance_end_due is not None and t_end >= self.utterance_end_due:
            self.utterance_end_due = None
            self._enqueue(_Job("utterance_end", end=self.last_word_end))
        elif self.utt_start is None and t_end - self.seg_start >= SILENCE_FINAL_EVERY:
            self._close_segment(t_end, speech_final=False, from_finalize=False)

    def _end_utterance(self, end: float, *, speech_final: bool, from_finalize: bool) -> None:
        self.in_speech = False
        had_speech = self.speech_frames >= MIN_UTTERANCE_FRAMES
        speech_end = self.speech_end
        self._close_segment(end, speech_final=speech_final, from_finalize=from_finalize)
        if had_speech:
            self.last_word_end = speech_end
            if self.conn.utterance_end_ms is not None:
                self.utterance_end_due = speech_end + self.conn.utterance_end_ms / 1000.0

    def _segment_job(self, kind: str, end: float) -> _Job:
        has_speech = self.speech_frames >= MIN_UTTERANCE_FRAMES
        job = _Job(
            kind,
            start=self.seg_start,
            end=end,
            has_speech=has_speech,
            speech_start=self.utt_start if self.utt_start is not None else self.seg_start,
            speech_end=self.speech_end,
        )
        if has_speech:
            if self.whisper:
                job.audio = np.concatenate(self.seg_audio) if self.seg_audio else np.zeros(0, np.int16)
            else:
                if self.script is None:
                    self.script = self.fake._next_script(self.conn.language)
                    if self.script is None:
                        self.conn.events.append("script_exhausted")
                        self.script = ""
                job.script = self.script
        return job

    def _close_segment(self, end: float, *, speech_final: bool, from_finalize: bool) -> None:
        job = self._segment_job("final", end)
        job.speech_final = speech_final and job.has_speech
        job.from_finalize = from_finalize
        job.due = self.loop.time() + self.fake.final_delay
        self._enqueue(job)
        self._new_segment(end)
        if self.in_speech:  # Finalize in the middle of speech: the rest is a new utterance
            self.utt_start = end

    def _enqueue(self, job: _Job) -> None:
        self.out.append(job)
        self.wake.set()

    # --- messages out ----------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.out:
                job = self.out.popleft()
                if job.kind == "interim" and any(j.kind in ("interim", "final") for j in self.out):
                    continue  # a newer result for this segment is queued: skip the stale interim
                message = await self._message(job)
                if job.kind == "final":
                    wait = job.due - self.loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                if self.ws.closed:
                    return
                try:
                    await self.ws.send_str(json.dumps(message))
                except (ConnectionError, RuntimeError):
                    return
                self.conn.sent.append(message)
                if job.kind == "final" and message["channel"]["alternatives"][0]["transcript"]:
                    self.conn.finals.append(message["channel"]["alternatives"][0]["transcript"])
                    late = self.fake._late_finals.take()
                    if late is not None:
                        self.loop.create_task(self._late_final(message, *late))
                if job.kind == "metadata":
                    self.conn.events.append("closed_after_closestream")
                    await self.ws.close(code=1000)
                    return

    async def _late_final(self, after: dict, text: str, delay: float) -> None:
        await asyncio.sleep(delay)
        end = after["start"] + after["duration"]
        words = self._words(text, 0.99, end, end + 0.5)[1]
        message = {
            **after,
            "start": round(end, 3),
            "duration": 0.5,
            "speech_final": False,
            "from_finalize": False,
            "channel": {"alternatives": [self._alternative(text, 0.99, words)]},
        }
        if not self.ws.closed:
            await self.ws.send_str(json.dumps(message))
            self.conn.sent.append(message)
            self.conn.finals.append(text)

    async def _transcript(self, job: _Job) -> tuple[str, float]:
        if not job.has_speech:
            return "", 0.0
        if job.script is not None:
            if job.kind == "final":
                return job.script, 0.99
            words = job.script.split()
            shown = min(len(words), max(1, int(np.ceil((job.end - job.speech_start) * WORDS_PER_SECOND))))
            return " ".join(words[:shown]), 0.9
        audio = job.audio
        lo = max(0, int((job.speech_start - job.start - 0.2) * self.rate))
        hi = int((job.speech_end - job.start + 0.2) * self.rate)
        audio = audio[lo:hi]
        if self.rate != 16000:
            import soxr

            audio = np.clip(
                soxr.resample(audio.astype(np.float32) / 32768.0, self.rate, 16000) * 32767.0, -32768, 32767
            ).astype(np.int16)
        return await self.loop.run_in_executor(None, whisper_transcribe, audio.tobytes())

    def _words(self, text: str, confidence: float, start: float, end: float) -> tuple[str, list[dict]]:
        tokens = text.split()
        plain = [re.sub(r"[^\w']", "", t).lower() for t in tokens]
        pairs = [(p, t) for p, t in zip(plain, tokens, strict=False) if p]
        if not self.conn.punctuate:
            text = " ".join(p for p, _ in pairs)
        total = sum(len(p) + 1 for p, _ in pairs) or 1
        span = max(0.0, end - start)
        words, t = [], start
        for p, token in pairs:
            d = span * (len(p) + 1) / total
            word = {"word": p, "start": round(t, 3), "end": round(t + d, 3), "confidence": confidence}
            if self.conn.language == "multi":
                word["language"] = self.spoken_language
            if self.conn.punctuate:
                word["punctuated_word"] = token
            words.append(word)
            t += d
        return text, words

    @property
    def spoken_language(self) -> str:
        """What a multilingual stream reports as detected: the first hint, else English (no real detection)."""
        return self.conn.language_hints[0] if self.conn.language_hints else "en"

    def _alternative(self, text: str, confidence: float, words: list[dict]) -> dict:
        alt: dict[str, Any] = {"transcript": text, "confidence": confidence, "words": words}
        if self.conn.language == "multi":
            if words:  # documented as absent when the model assigns no language
                alt["languages"] = [self.spoken_language]
            if self.conn.model.startswith("nova-3"):
                alt["languages_hinted"] = list(self.conn.language_hints)
        return alt

    def _model_info(self) -> dict:
        model = self.conn.model
        arch = next((a for a in ("nova-3", "nova-2", "nova", "enhanced") if model.startswith(a)), "base")
        variant = model[len(arch) :].lstrip("-") if model.startswith(arch) else model
        return {"name": f"{variant or 'general'}-{arch}", "version": "2025-01-01.0", "arch": arch}

    async def _message(self, job: _Job) -> dict:
        if job.kind == "speech_started":
            return {"type": "SpeechStarted", "channel": [0, 1], "timestamp": round(job.start, 3)}
        if job.kind == "utterance_end":
            return {"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": round(job.end, 3)}
        if job.kind == "error":
            return {
                "type": "Error",
                "variant": "SchemaError",
                "description": "Could not parse the client message",
                "message": job.text,
            }
        if job.kind == "metadata":
            info = self._model_info()
            return {
                "type": "Metadata",
                "transaction_key": "deprecated",
                "request_id": self.conn.request_id,
                "sha256": self.sha.hexdigest(),
                "created": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "duration": round(self.conn.audio_seconds, 3),
                "channels": self.conn.channels,
                "models": [self.model_uuid],
                "model_info": {self.model_uuid: info},
            }
        text, confidence = await self._transcript(job)
        text, words = self._words(text, confidence, job.speech_start, job.speech_end)
        return {
            "type": "Results",
            "channel_index": [0, 1],
            "duration": round(job.end - job.start, 3),
            "start": round(job.start, 3),
            "is_final": job.kind == "final",
            "speech_final": job.speech_final,
            "channel": {"alternatives": [self._alternative(text, confidence if text else 0.0, words)]},
            "metadata": {
                "request_id": self.conn.request_id,
                "model_info": self._model_info(),
                "model_uuid": self.model_uuid,
            },
            "from_finalize": job.from_finalize,
        }
