"""Every use Atlas makes of Pipecat's internals (pipecat-ai==1.14.0), in one place.

Where Pipecat has no public way to do what Atlas needs, the code that reaches into a Pipecat class sits
here and nowhere else: each `*Internals` class below is a thin subclass of a Pipecat class that turns
the private attributes and methods Atlas relies on into named members (properties, and hook methods
Pipecat's own code calls). Atlas's services, analyzers and transports derive from these, and use only
those names. tests/test_compat.py pins what each one relies on, so a Pipecat upgrade that changes an
internal fails there, by name; scripts/pipecat_privates.py lists every use and checks none is outside
this package.

Hooks: where Pipecat calls a private method that Atlas extends (`_on_message`, `_process_context`, ...),
the adapter overrides that private method to call a public hook of the same meaning (`on_message`,
`process_context`, ...), whose default is Pipecat's own method. A subclass overrides the hook and calls
`super().<hook>(...)` for Pipecat's behaviour.
"""

from __future__ import annotations

import functools
from typing import Any

from pipecat.audio.turn.smart_turn.base_smart_turn import BaseSmartTurn
from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
from pipecat.audio.vad.silero import SileroOnnxModel, SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADParams, VADState
from pipecat.frames.frames import ErrorFrame, Frame
from pipecat.observers.base_observer import BaseObserver, FrameProcessed, FramePushed
from pipecat.pipeline.worker_observer import WorkerObserver
from pipecat.processors.frameworks.rtvi import RTVIProcessor
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.services.anthropic.llm import AnthropicLLMService
from pipecat.services.deepgram.stt import DeepgramSTTService
from pipecat.services.elevenlabs.tts import ElevenLabsTTSService
from pipecat.services.piper.tts import PiperTTSService
from pipecat.services.tts_service import TTSService
from pipecat.services.whisper.stt import WhisperSTTService
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketOutputTransport,
    FastAPIWebsocketTransport,
)
from pipecat.utils.text.simple_text_aggregator import SimpleTextAggregator

from vocabulary.errors import ErrorCode
from vocabulary.frames import CodedErrorFrame

# --- live objects ---------------------------------------------------------------------------------------


def become(obj: Any, cls: type) -> None:
    """Give a live Pipecat object a subclass's behaviour, where Pipecat builds the object itself (the user
    aggregator inside LLMContextAggregatorPair, the worker's observer proxy): `cls` must derive from the
    object's class and add methods only, no state of its own."""
    assert issubclass(cls, type(obj)), f"{cls.__name__} does not derive from {type(obj).__name__}"
    assert "__init__" not in vars(cls), f"{cls.__name__} must not add state"
    obj.__class__ = cls


# --- observers: the worker's observer proxy ---------------------------------------------------------------


def _wants(observer: BaseObserver, frame: Frame) -> bool:
    types = getattr(observer, "FRAME_TYPES", None)
    return types is None or isinstance(frame, types)


def _processes(observer: BaseObserver) -> bool:
    return type(observer).on_process_frame is not BaseObserver.on_process_frame


class SelectiveWorkerObserver(WorkerObserver):
    """Pipecat's observer proxy with two filters in front of its queues.

    Pipecat's `WorkerObserver` gives each observer its own queue and task, and puts into every queue (a
    queue put and a task wake-up each) every frame's first push whatever its type, and every frame every
    processor processes, whether or not the observer implements `on_process_frame`. Here an observer that
    declares `FRAME_TYPES` is handed only pushes of those types (one without it gets every push, as in
    Pipecat); an observer that watches every push and declares `EVERY_PUSH_TYPES` gets the later pushes of
    those types only (the first push of the rest); and `on_process_frame` reaches only observers that
    override it.
    Relies on: `WorkerObserver._proxies` (id -> proxy with `.observer` and `.queue`) and
    `._frames_pushed` (frame id -> frame, for `first_push`)."""

    async def on_push_frame(self, data: FramePushed):
        if not self._proxies:
            return
        frame = data.frame
        proxies = [p for p in self._proxies.values() if _wants(p.observer, frame)]
        if not proxies:
            return
        data.first_push = frame.id not in self._frames_pushed
        if data.first_push:
            self._frames_pushed[frame.id] = frame
        for proxy in proxies:
            observer = proxy.observer
            if data.first_push or (
                observer.observe_every_push and isinstance(frame, getattr(observer, "EVERY_PUSH_TYPES", None) or Frame)
            ):
                await proxy.queue.put(data)

    async def on_process_frame(self, data: FrameProcessed):
        if not self._proxies:
            return
        for proxy in self._proxies.values():
            if _processes(proxy.observer):
                await proxy.queue.put(data)


def select_frames(worker) -> None:
    """Make a `PipelineWorker`'s observer proxy (`worker._observer`) selective, before the worker runs."""
    assert type(worker._observer) is WorkerObserver, "Pipecat's worker observer changed: review SelectiveWorkerObserver"
    become(worker._observer, SelectiveWorkerObserver)


# --- serializers ------------------------------------------------------------------------------------------


def skip_twilio_hang_up(serializer: TwilioFrameSerializer) -> None:
    """The caller hung up: Pipecat's serializer must not try a REST hang-up of the call when the pipeline
    ends (`_hangup_attempted`, checked on End/Cancel)."""
    serializer._hangup_attempted = True


# --- text aggregation ---------------------------------------------------------------------------------------


class SimpleTextAggregatorInternals(SimpleTextAggregator):
    """Pipecat's sentence aggregator's buffer (`_text`) and one-character sentence check
    (`_check_sentence_with_lookahead`)."""

    @property
    def buffer(self) -> str:
        return self._text

    @buffer.setter
    def buffer(self, text: str) -> None:
        self._text = text

    async def sentence_after(self, char: str):
        """Feed one character already appended to `buffer`; the sentence it completes, if any."""
        return await self._check_sentence_with_lookahead(char)


# --- LLM -------------------------------------------------------------------------------------------------


class AnthropicInternals(AnthropicLLMService):
    """Pipecat's Anthropic service's two steps around a request: `_process_context` (one reply) and
    `_create_message_stream` (the SDK call whose events it reads)."""

    async def _process_context(self, context):
        await self.process_context(context)

    async def process_context(self, context) -> None:
        await AnthropicLLMService._process_context(self, context)

    async def _create_message_stream(self, api_call, params):
        return await self.create_message_stream(api_call, params)

    async def create_message_stream(self, api_call, params):
        return await AnthropicLLMService._create_message_stream(self, api_call, params)


# --- STT -------------------------------------------------------------------------------------------------


class DeepgramInternals(DeepgramSTTService):
    """Pipecat's Deepgram service's connection: the live connection (`_connection`), the SDK client and
    connect arguments, the keep-alive, the settle event and quick-failure tracker, the channel count, and
    the loop and message/error handlers Pipecat runs (`_connection_handler`, `_on_message`, `_on_error`)."""

    @property
    def live_connection(self):
        return self._connection

    @live_connection.setter
    def live_connection(self, connection) -> None:
        self._connection = connection

    @property
    def channels(self) -> int:
        return self._channels

    def connect(self):
        """The SDK's async context manager for one connection, with the service's settings."""
        return self._client.listen.v1.connect(**self._build_connect_kwargs())

    def keepalive(self):
        return self._keepalive_handler()

    def settled(self) -> None:
        """A connection is up (or given up on): whoever waits to send may go on."""
        self._connection_settled.set()

    def gives_up_after(self, uptime_secs: float) -> bool:
        """Record a connection that lasted `uptime_secs`; True when Pipecat's tracker says to stop trying."""
        return self._quick_failure_tracker.record(uptime_secs).should_give_up

    async def _connection_handler(self):
        await self.connection_loop()

    async def connection_loop(self) -> None:
        await DeepgramSTTService._connection_handler(self)

    async def _on_message(self, message):
        await self.on_message(message)

    async def on_message(self, message) -> None:
        await DeepgramSTTService._on_message(self, message)

    async def _on_error(self, error):
        await self.on_error(error)

    async def on_error(self, error) -> None:
        await DeepgramSTTService._on_error(self, error)


class WhisperInternals(WhisperSTTService):
    """Pipecat's Whisper service: its model (`_model`, loaded by `_load` in `__init__`), the segment being
    spoken (`_audio_buffer`, `_user_speaking`) and the speaker's id (`_user_id`)."""

    def _load(self):
        self._model = self.load_model()

    def load_model(self):
        """The model Pipecat's `__init__` loads; override to hand in a shared one."""
        WhisperSTTService._load(self)
        return self._model

    @property
    def model(self):
        return self._model

    @property
    def user_speaking(self) -> bool:
        return self._user_speaking

    @property
    def segment(self) -> bytes:
        return bytes(self._audio_buffer)

    @property
    def speaker_id(self) -> str:
        return self._user_id


# --- TTS -------------------------------------------------------------------------------------------------


class TTSInternals(TTSService):
    """Pipecat's TTS base: turning a PCM iterator into the reply's audio frames
    (`_stream_audio_frames_from_iterator`)."""

    def audio_frames(self, chunks, *, in_sample_rate: int, context_id: str):
        return self._stream_audio_frames_from_iterator(chunks, in_sample_rate=in_sample_rate, context_id=context_id)


class ElevenLabsInternals(ElevenLabsTTSService):
    """Pipecat's ElevenLabs service: its socket (`_websocket`, `_disconnecting`), the reply being written
    (`_turn_context_id`, `_is_yielding_frames_synchronously`), and the steps Pipecat runs: reading the
    next audio of a context (`_next_audio_context_item`), closing a context at ElevenLabs
    (`_close_context`), the receive loop (`_receive_messages`)."""

    def audio_frames(self, chunks, *, in_sample_rate: int, context_id: str):
        return self._stream_audio_frames_from_iterator(chunks, in_sample_rate=in_sample_rate, context_id=context_id)

    @property
    def socket(self):
        return self._websocket

    @property
    def disconnecting(self) -> bool:
        return self._disconnecting

    @property
    def turn_context_id(self) -> str | None:
        return self._turn_context_id

    def end_reply_with_its_text(self) -> None:
        """The reply still being written ends its audio context when its text ends, as an HTTP TTS does."""
        self._is_yielding_frames_synchronously = True

    async def _next_audio_context_item(self, context_id: str):
        return await self.next_audio_context_item(context_id)

    async def next_audio_context_item(self, context_id: str):
        return await ElevenLabsTTSService._next_audio_context_item(self, context_id)

    async def _close_context(self, context_id: str):
        await self.close_context(context_id)

    async def close_context(self, context_id: str) -> None:
        await ElevenLabsTTSService._close_context(self, context_id)

    async def _receive_messages(self):
        await self.receive_messages()

    async def receive_messages(self) -> None:
        await ElevenLabsTTSService._receive_messages(self)


class PiperInternals(PiperTTSService):
    """Pipecat's Piper service with a voice handed in (`_voice`) instead of one loaded per service."""

    def __init__(self, voice, **kwargs):
        TTSService.__init__(self, push_start_frame=True, push_stop_frames=True, **kwargs)
        self._voice = voice


# --- VAD and turn analysis ---------------------------------------------------------------------------------


def silero_session():
    """A loaded Silero VAD ONNX session (Pipecat's analyzer loads it; `_model.session`)."""
    return SileroVADAnalyzer()._model.session


def smart_turn_session():
    """A loaded smart-turn v3 ONNX session (`LocalSmartTurnAnalyzerV3()._session`)."""
    return LocalSmartTurnAnalyzerV3()._session


class SmartTurnInternals(LocalSmartTurnAnalyzerV3):
    """Pipecat's local smart-turn v3 on an ONNX session handed in (`_session`), without loading one."""

    def __init__(self, session, **kwargs):
        BaseSmartTurn.__init__(self, **kwargs)
        self._log_data = False
        self._session = session


class SileroInternals(SileroVADAnalyzer):
    """Pipecat's Silero analyzer on an ONNX session handed in, with what its state machine keeps:
    the VAD state and its start/stop counters (`_vad_state`, ...), the audio not yet analysed
    (`_vad_buffer`, `_vad_frames_num_bytes`), the model's recurrent state (`_model.reset_states`), the
    loudness tracker (`_volume_tracker`, `_prev_volume`), and the two steps Pipecat runs per chunk
    (`_run_analyzer`, `_get_smoothed_volume`)."""

    def __init__(self, session, *, sample_rate: int | None = None, params: VADParams | None = None):
        VADAnalyzer.__init__(self, sample_rate=sample_rate, params=params)
        model = SileroOnnxModel.__new__(SileroOnnxModel)
        model.session = session
        model.sample_rates = [8000, 16000]
        model.reset_states()
        self._model = model
        self._windows_since_reset = 0
        self._low_confidence_windows = 0

    @property
    def state(self) -> VADState:
        return self._vad_state

    def force_quiet(self) -> None:
        """Declare the speaker quiet now (the next analysis reports a stop if they were speaking)."""
        self._vad_state = VADState.QUIET
        self._vad_starting_count = self._vad_stopping_count = 0

    def pending_with(self, buffer: bytes) -> bytes:
        """The audio the next analysis would see: what is left over from the last chunk, then `buffer`."""
        return self._vad_buffer + buffer

    @property
    def window_bytes(self) -> int:
        return self._vad_frames_num_bytes

    def reset_model(self) -> None:
        self._model.reset_states()

    def track_volume(self, audio: bytes) -> float:
        """Add a window to the loudness tracker without computing its volume; the last volume."""
        self._volume_tracker.update(audio, self.sample_rate)
        return self._prev_volume

    def _run_analyzer(self, buffer: bytes) -> VADState:
        return self.run_analyzer(buffer)

    def run_analyzer(self, buffer: bytes) -> VADState:
        """Analyse a chunk on this thread (Pipecat's step, run in its executor)."""
        return SileroVADAnalyzer._run_analyzer(self, buffer)

    def _get_smoothed_volume(self, audio: bytes) -> float:
        return self.smoothed_volume(audio)

    def smoothed_volume(self, audio: bytes) -> float:
        return SileroVADAnalyzer._get_smoothed_volume(self, audio)


# --- transports --------------------------------------------------------------------------------------------


class WebsocketOutputInternals(FastAPIWebsocketOutputTransport):
    """Pipecat's FastAPI WebSocket output: writing one frame (`_write_frame`), the pause between audio
    chunks (`_write_audio_sleep`) and the transport's params (`_params`, for its serializer)."""

    @property
    def serializer(self):
        return self._params.serializer

    async def write_frame(self, frame: Frame) -> None:
        await self._write_frame(frame)

    async def _write_audio_sleep(self):
        await self.audio_sleep()

    async def audio_sleep(self) -> None:
        await FastAPIWebsocketOutputTransport._write_audio_sleep(self)


def use_output(transport: FastAPIWebsocketTransport, output_cls: type) -> None:
    """Replace the output half Pipecat's transport made (`_output`) with `output_cls`, built the same way."""
    transport._output = output_cls(transport, transport._client, transport._params, name=transport._output_name)


# --- RTVI ----------------------------------------------------------------------------------------------------


class SafeErrorsRTVIProcessor(RTVIProcessor):
    """Pipecat's RTVI processor, whose `error` messages carry only what a client may see.

    Pipecat sends every ErrorFrame that reaches it as an RTVI `error` with the frame's own text
    (`_send_error_frame`), and a service's error text can hold a vendor's answer or a URL. Here the message is
    `<CODE>: <message>`: a CodedErrorFrame's stable code and client message (vocabulary/errors.py), else
    PIPELINE_ERROR with a sentence that names no internals."""

    async def _send_error_frame(self, frame):
        if isinstance(frame, CodedErrorFrame):
            text = f"{frame.code}: {frame.client_message}"
        else:
            text = f"{ErrorCode.PIPELINE_ERROR}: a speech engine failed; the session goes on"
        await RTVIProcessor._send_error_frame(self, ErrorFrame(error=text, fatal=frame.fatal))


# --- vendor SDKs under Pipecat's services ----------------------------------------------------------------


def deepgram_without_compression() -> None:
    """Open Deepgram's socket without permessage-deflate: the SDK offers it and has no option to turn it
    off, and compressing every 20 ms of PCM was ~18% of the server's CPU at 10 sessions, for little saved
    bandwidth. Wraps the SDK's module-level `websockets_client_connect` (deepgram-sdk 7) once."""
    import deepgram.listen.v1.client as client

    if not isinstance(client.websockets_client_connect, functools.partial):
        client.websockets_client_connect = functools.partial(  # type: ignore[assignment]
            client.websockets_client_connect, compression=None
        )
