"""What compat/pipecat.py relies on of Pipecat's internals, pinned: a Pipecat upgrade that renames or changes
one of them fails here, by name, instead of somewhere in a call. And no Atlas module outside compat/ uses a
Pipecat private (scripts/pipecat_privates.py)."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys

import numpy as np
import pytest
from pipecat.audio.vad.vad_analyzer import VADState
from pipecat.frames.frames import EndFrame

from compat import pipecat as compat
from tests.helpers import REPO


def source(fn) -> str:
    return inspect.getsource(fn)


def is_coroutine(cls, name: str) -> bool:
    return inspect.iscoroutinefunction(getattr(cls, name))


def test_no_pipecat_private_is_used_outside_compat():
    out = subprocess.run(
        [sys.executable, "scripts/pipecat_privates.py"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    outside = [line for line in lines[:-1] if not line.startswith("compat/")]
    assert not outside, outside
    assert lines[-1].endswith("in 1 files"), lines[-1]


def test_become_refuses_a_class_with_state_or_of_another_family():
    class Base:
        pass

    class Adds(Base):
        def hello(self):
            return "hi"

    class WithState(Base):
        def __init__(self):
            self.x = 1

    obj = Base()
    compat.become(obj, Adds)
    assert obj.hello() == "hi"
    with pytest.raises(AssertionError):
        compat.become(Base(), WithState)
    with pytest.raises(AssertionError):
        compat.become(Base(), int)


async def test_worker_observer_proxies_and_first_push_bookkeeping():
    from pipecat.observers.base_observer import BaseObserver
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineWorker
    from pipecat.pipeline.worker_observer import WorkerObserver

    worker = PipelineWorker(Pipeline([]), observers=[BaseObserver()])
    assert type(worker._observer) is WorkerObserver
    # The proxies (observer -> proxy with .observer and .queue) exist once the worker starts; first pushes
    # are remembered by frame id.
    assert "_proxies" in vars(worker._observer) and hasattr(worker._observer._frames_pushed, "__contains__")
    from pipecat.pipeline.worker_observer import Proxy

    assert {"observer", "queue"} <= set(Proxy.__annotations__)
    compat.select_frames(worker)
    assert type(worker._observer) is compat.SelectiveWorkerObserver
    assert "_proxies" in source(WorkerObserver.on_push_frame) and "_frames_pushed" in source(WorkerObserver)


def test_twilio_serializer_skips_its_hang_up_when_told():
    from pipecat.serializers.twilio import TwilioFrameSerializer

    assert "_hangup_attempted" in source(TwilioFrameSerializer.serialize)
    serializer = TwilioFrameSerializer(
        "MZ" + "0" * 32,
        call_sid="CA" + "0" * 32,
        account_sid="AC" + "0" * 32,
        auth_token="t",
        base_url="http://127.0.0.1:9",
    )
    compat.skip_twilio_hang_up(serializer)
    assert asyncio.run(serializer.serialize(EndFrame())) is None  # no REST call was tried


async def test_sentence_aggregator_buffer_and_lookahead():
    agg = compat.SimpleTextAggregatorInternals()
    sentences = []
    for char in "Hello there. Next":
        agg.buffer += char
        if found := await agg.sentence_after(char):
            sentences.append(found.text)
    assert sentences == ["Hello there."] and agg.buffer.strip() == "Next"


def test_anthropic_request_steps():
    from pipecat.services.anthropic.llm import AnthropicLLMService

    assert is_coroutine(AnthropicLLMService, "_process_context")
    assert is_coroutine(AnthropicLLMService, "_create_message_stream")
    assert "_create_message_stream" in source(AnthropicLLMService._process_context)


def test_deepgram_connection_internals():
    from pipecat.services.deepgram.stt import DeepgramSTTService

    service = compat.DeepgramInternals(api_key="test")
    assert service.live_connection is None and service.channels == 1
    assert isinstance(service._connection_settled, asyncio.Event)
    assert hasattr(service._client.listen.v1, "connect") and isinstance(service._build_connect_kwargs(), dict)
    assert service.gives_up_after(60.0) is False
    for name in ("_connection_handler", "_keepalive_handler", "_on_message", "_on_error"):
        assert is_coroutine(DeepgramSTTService, name), name
    assert "_on_message" in source(DeepgramSTTService._connection_handler)


def test_deepgram_sdk_connect_is_a_module_attribute_the_connection_uses():
    import deepgram.listen.v1.client as client

    compat.deepgram_without_compression()
    assert client.websockets_client_connect.keywords == {"compression": None}
    assert "websockets_client_connect" in inspect.getsource(client)


def test_whisper_model_and_segment_internals():
    sentinel = object()

    class Shared(compat.WhisperInternals):
        def load_model(self):
            return sentinel

    service = Shared()
    assert service.model is sentinel
    assert service.user_speaking is False and service.segment == b"" and isinstance(service.speaker_id, str)


async def test_segmented_stt_transcribes_each_vad_segment_once_in_order():
    """The streaming Whisper (services/local/engines.py) pairs each VAD stop it saw with the next `run_stt`
    call: Pipecat must call it once per stop, in the stops' order, with that segment's audio (never an empty
    one: trailing silence is appended)."""
    from pipecat.frames.frames import InputAudioRawFrame, VADUserStartedSpeakingFrame, VADUserStoppedSpeakingFrame
    from pipecat.tests.utils import run_test

    heard: list[int] = []

    class Counting(compat.WhisperInternals):
        def load_model(self):
            return object()

        async def run_stt(self, audio: bytes):
            heard.append(len(audio))
            yield None

    def speech(frames: int) -> list:
        chunk = InputAudioRawFrame(np.full(320, 1000, np.int16).tobytes(), 16000, 1)
        return [VADUserStartedSpeakingFrame(), *[chunk] * frames, VADUserStoppedSpeakingFrame(stop_secs=0.2)]

    await run_test(Counting(), frames_to_send=[*speech(10), *speech(30), *speech(20)])
    assert len(heard) == 3 and heard[0] < heard[2] < heard[1], heard


def test_tts_audio_frames_from_an_iterator():
    from pipecat.services.tts_service import TTSService

    params = inspect.signature(TTSService._stream_audio_frames_from_iterator).parameters
    assert {"in_sample_rate", "context_id"} <= set(params)


def test_elevenlabs_socket_and_context_internals():
    from pipecat.services.elevenlabs.tts import ElevenLabsTTSService

    service = compat.ElevenLabsInternals(api_key="test", settings=ElevenLabsTTSService.Settings(voice="v"))
    assert service.socket is None and service.disconnecting is False and service.turn_context_id is None
    service.end_reply_with_its_text()
    assert service._is_yielding_frames_synchronously is True
    for name in ("_next_audio_context_item", "_close_context", "_receive_messages"):
        assert is_coroutine(ElevenLabsTTSService, name), name


def test_piper_speaks_with_the_voice_handed_in():
    from pipecat.services.piper.tts import PiperTTSService

    assert "self._voice" in source(PiperTTSService.run_tts)


def test_silero_and_smart_turn_on_shared_sessions():
    session = compat.silero_session()
    assert session.__class__.__name__ == "InferenceSession"
    vad = compat.SileroInternals(session, sample_rate=16000)
    vad.set_sample_rate(16000)
    assert vad.state == VADState.QUIET and vad.window_bytes == 1024
    assert vad.run_analyzer(bytes(32000)) == VADState.QUIET
    assert len(vad.pending_with(b"\x00\x00")) == 32000 % 1024 + 2  # the part window left over, then the new
    speech = (np.sin(np.arange(16000) / 3) * 8000).astype(np.int16).tobytes()
    vad.smoothed_volume(speech[:1024])
    assert isinstance(vad.track_volume(speech[:1024]), float)
    vad._vad_state = VADState.SPEAKING
    vad.force_quiet()
    assert vad.state == VADState.QUIET and vad._vad_starting_count == vad._vad_stopping_count == 0
    vad.reset_model()
    smart = compat.SmartTurnInternals(compat.smart_turn_session())
    assert smart._session is not None and smart._log_data is False


def test_websocket_output_internals():
    from pipecat.transports.websocket.fastapi import FastAPIWebsocketOutputTransport, FastAPIWebsocketParams

    assert is_coroutine(FastAPIWebsocketOutputTransport, "_write_frame")
    assert is_coroutine(FastAPIWebsocketOutputTransport, "_write_audio_sleep")
    assert "_write_audio_sleep" in inspect.getsource(inspect.getmodule(FastAPIWebsocketOutputTransport))

    class Socket:
        client_state = application_state = None

    from pipecat.transports.websocket.fastapi import FastAPIWebsocketTransport

    class Output(compat.WebsocketOutputInternals):
        pass

    transport = FastAPIWebsocketTransport(Socket(), FastAPIWebsocketParams(serializer=None))
    compat.use_output(transport, Output)
    assert isinstance(transport.output(), Output) and transport.output().serializer is None


async def test_rtvi_errors_carry_only_the_code_and_the_client_message():
    """RTVIProcessor sends an ErrorFrame through `_send_error_frame`; ours sends `<CODE>: <message>` instead of
    the frame's own text, which may quote a vendor."""
    from pipecat.frames.frames import ErrorFrame, OutputTransportMessageUrgentFrame
    from pipecat.processors.frameworks.rtvi import RTVIProcessor

    from vocabulary.frames import coded_error

    assert is_coroutine(RTVIProcessor, "_send_error_frame")
    assert "_send_error_frame(frame)" in source(RTVIProcessor.process_frame)
    sent: list = []
    rtvi = compat.SafeErrorsRTVIProcessor()

    async def push_frame(frame, direction=None):
        if isinstance(frame, OutputTransportMessageUrgentFrame):
            sent.append(frame.message)

    rtvi.push_frame = push_frame  # type: ignore[method-assign]
    await rtvi._send_error_frame(coded_error("TOOL_FAILED", "the tool 'x' failed", "KeyError: api.vendor.com/secret"))
    await rtvi._send_error_frame(ErrorFrame(error="Deepgram 401 from wss://api.deepgram.com?token=abc"))
    assert [m["data"]["error"] for m in sent] == [
        "TOOL_FAILED: the tool 'x' failed",
        "PIPELINE_ERROR: a speech engine failed; the session goes on",
    ]
    assert all(m["type"] == "error" and m["label"] == "rtvi-ai" for m in sent)


def test_webrtc_input_takes_its_audio_through_push_audio_frame():
    """The WebRTC door's audio budget overrides `push_audio_frame` on Pipecat's SmallWebRTC input (made a
    subclass with compat.become): the input must still deliver every received frame through it."""
    from pipecat.transports.smallwebrtc.transport import SmallWebRTCInputTransport

    assert "await self.push_audio_frame(audio_frame)" in source(SmallWebRTCInputTransport._receive_audio)
    assert "__init__" not in vars(__import__("transports.rtvi.door", fromlist=["x"])._BudgetedWebRTCInput)
