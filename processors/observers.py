"""Observers that cost nothing for the frames they do not watch.

Pipecat's `WorkerObserver` (the proxy in front of a worker's observers) gives each observer its own
queue and task, and puts into every queue (a queue put and a task wake-up each):
- every frame's first push, whatever its type: per session that is 50 caller-audio frames a second,
  plus every reply audio chunk, word and token;
- every frame every processor processes (`on_process_frame`), pushed or not, whether or not the
  observer implements `on_process_frame`.
The benchmark's profile at 10 sessions put these queues and wake-ups at several percent of the
server's time. Our observers watch a few frame types each and none implements `on_process_frame`.

`SelectiveWorkerObserver` is Pipecat's proxy with two filters in front of the queues: an observer
that declares `FRAME_TYPES` is handed only pushes of those types (one without it gets every push,
as in Pipecat), and `on_process_frame` reaches only observers that override it. It adds no state,
so `select_frames(worker)` only changes the class of the worker's own proxy.
"""

from __future__ import annotations

from pipecat.frames.frames import Frame
from pipecat.observers.base_observer import BaseObserver, FrameProcessed, FramePushed
from pipecat.pipeline.worker_observer import WorkerObserver


def _wants(observer: BaseObserver, frame: Frame) -> bool:
    types = getattr(observer, "FRAME_TYPES", None)
    return types is None or isinstance(frame, types)


def _processes(observer: BaseObserver) -> bool:
    return type(observer).on_process_frame is not BaseObserver.on_process_frame


class SelectiveWorkerObserver(WorkerObserver):
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
            if data.first_push or proxy.observer.observe_every_push:
                await proxy.queue.put(data)

    async def on_process_frame(self, data: FrameProcessed):
        if not self._proxies:
            return
        for proxy in self._proxies.values():
            if _processes(proxy.observer):
                await proxy.queue.put(data)


def select_frames(worker) -> None:
    """Make a `PipelineWorker`'s observer proxy selective (before the worker runs)."""
    assert type(worker._observer) is WorkerObserver, "Pipecat's worker observer changed: review SelectiveWorkerObserver"
    worker._observer.__class__ = SelectiveWorkerObserver
