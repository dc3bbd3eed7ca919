"""Observers see exactly the frames they declare, and the caller's audio stops at the user aggregator.

A real Pipecat worker runs a small pipeline with the worker observer made selective
(compat/pipecat.py); what each observer receives is compared with what Pipecat's own proxy
would hand it.
"""

from __future__ import annotations

import asyncio

from pipecat.frames.frames import (
    EndFrame,
    Frame,
    InputAudioRawFrame,
    TextFrame,
    TranscriptionFrame,
)
from pipecat.observers.base_observer import BaseObserver, FrameProcessed, FramePushed
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMUserAggregatorParams,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from bots.pipeline import UserAggregator
from compat.pipecat import select_frames


class Passthrough(FrameProcessor):
    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)


class Recorder(BaseObserver):
    def __init__(self, frame_types=None, every_push: bool = False):
        super().__init__(observe_every_push=every_push)
        if frame_types is not None:
            self.FRAME_TYPES = frame_types
        self.pushed: list[Frame] = []

    async def on_push_frame(self, data: FramePushed):
        self.pushed.append(data.frame)


class ProcessRecorder(Recorder):
    def __init__(self):
        super().__init__(frame_types=(TextFrame,))
        self.processed: list[Frame] = []

    async def on_process_frame(self, data: FrameProcessed):
        self.processed.append(data.frame)


async def run_pipeline(
    observers: list[BaseObserver], frames: list[Frame], selective: bool, processors: list[FrameProcessor] | None = None
) -> None:
    worker = PipelineWorker(
        Pipeline(processors or [Passthrough(), Passthrough(), Passthrough()]),
        params=PipelineParams(),
        observers=observers,
        enable_rtvi=False,
        enable_turn_tracking=False,
        idle_timeout_secs=None,
    )
    if selective:
        select_frames(worker)
    for frame in frames:
        await worker.queue_frame(frame)
    await worker.queue_frame(EndFrame())
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await asyncio.wait_for(runner.run(), 30)
    await asyncio.sleep(0.1)  # proxies drain their queues


def frames() -> list[Frame]:
    audio = [InputAudioRawFrame(audio=b"\0\0" * 320, sample_rate=16000, num_channels=1) for _ in range(5)]
    texts = [TextFrame(text="hello"), TranscriptionFrame(text="hi", user_id="u", timestamp="t")]
    return audio[:3] + texts[:1] + audio[3:] + texts[1:]


class TranscriptsEveryPush(Recorder):
    EVERY_PUSH_TYPES = (TranscriptionFrame,)


async def test_selective_observer_hands_later_pushes_of_every_push_types_only():
    """An observer that watches every push but declares EVERY_PUSH_TYPES (TurnMetricsObserver: the output
    transport's release of a TTSTextFrame) gets one push per hop of those, and the first push of the rest."""
    chosen = TranscriptsEveryPush((TextFrame,), every_push=True)
    sent = frames()
    await run_pipeline([chosen], sent, selective=True)
    transcripts = [f for f in chosen.pushed if isinstance(f, TranscriptionFrame)]
    others = [f for f in chosen.pushed if not isinstance(f, TranscriptionFrame)]
    assert len(transcripts) > 1 and others == [f for f in sent if type(f) is TextFrame]


async def test_selective_observer_hands_each_observer_what_pipecat_would_of_its_types():
    sent = frames()
    stock = [Recorder((TextFrame,)), Recorder(), Recorder((TextFrame,), every_push=True), ProcessRecorder()]
    await run_pipeline(stock, sent, selective=False)
    chosen = [Recorder((TextFrame,)), Recorder(), Recorder((TextFrame,), every_push=True), ProcessRecorder()]
    sent = frames()
    await run_pipeline(chosen, sent, selective=True)

    def names(fs):
        return [type(f).__name__ for f in fs]

    texts = [f for f in sent if isinstance(f, TextFrame)]  # TranscriptionFrame is a TextFrame
    assert chosen[0].pushed == texts  # once each (first push), no audio
    # an observer without FRAME_TYPES gets every first push, as from Pipecat's proxy
    assert names(chosen[1].pushed) == names(stock[1].pushed)
    assert sum(isinstance(f, InputAudioRawFrame) for f in chosen[1].pushed) == 5
    # every push of its types: one per hop
    assert names(chosen[2].pushed) == names([f for f in stock[2].pushed if isinstance(f, TextFrame)])
    assert len(chosen[2].pushed) > len(texts)
    # on_process_frame still reaches an observer that implements it, every frame every processor
    assert names(chosen[3].processed) == names(stock[3].processed)
    assert sum(isinstance(f, InputAudioRawFrame) for f in chosen[3].processed) >= 5 * 3


class Hops(BaseObserver):
    def __init__(self):
        super().__init__(observe_every_push=True)
        self.audio_to: list[str] = []

    async def on_push_frame(self, data: FramePushed):
        if isinstance(data.frame, InputAudioRawFrame):
            self.audio_to.append(type(data.destination).__name__)


async def test_caller_audio_stops_at_the_user_aggregator():
    hops = Hops()
    user = UserAggregator(LLMContext(), params=LLMUserAggregatorParams())
    await run_pipeline([hops], frames(), selective=False, processors=[Passthrough(), user, Passthrough()])
    # 5 frames reach the aggregator (source -> Passthrough -> aggregator), none go past it
    assert hops.audio_to.count("UserAggregator") == 5
    assert hops.audio_to.count("Passthrough") == 5  # the first hop only
    assert "PipelineSink" not in hops.audio_to
