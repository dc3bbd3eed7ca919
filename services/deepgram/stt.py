"""Deepgram streaming STT that survives a dropped socket without losing what the user said.

Pipecat's DeepgramSTTService reconnects after an error, but with a 4-10 s exponential backoff and
while it is disconnected `run_stt` drops the audio on the floor; the words in flight when the
socket died (sent, but not yet finalized by Deepgram) are lost too. On a phone call that is a
sentence the bot never hears. This subclass keeps Pipecat's service (settings, message handling,
finalize-on-VAD-stop, metrics) and changes only the connection loop:

- every chunk of audio is also kept in a replay buffer until a final `Results` covers it
  (`start + duration` of each final, in the connection's own timeline, tells how far Deepgram has
  committed), capped at `replay_secs`;
- when the socket drops, it reconnects at once (then 0.25 s, 0.5 s, 1 s ... between attempts) and
  first sends the buffered audio (Deepgram accepts faster than real time), so the utterance that
  was cut is transcribed whole; a Finalize the VAD asked for during the gap is sent after it;
- the client is told with a recoverable `STT_RECONNECTING` error, never a session end.

A handshake refused with a 4xx (bad key, bad parameters) still gives up at once, as in Pipecat.
"""

from __future__ import annotations

import asyncio
import time

from deepgram.core import ApiError
from deepgram.core.events import EventType
from deepgram.listen.v1.types import ListenV1Finalize, ListenV1Results
from loguru import logger
from pipecat.frames.frames import Frame, VADUserStoppedSpeakingFrame
from pipecat.processors.frame_processor import FrameDirection

from compat.pipecat import DeepgramInternals, deepgram_without_compression
from vocabulary.errors import ErrorCode
from vocabulary.frames import coded_error

# Compressing every 20 ms of PCM costs far more CPU than it saves bandwidth (speech PCM deflates poorly).
deepgram_without_compression()

RECONNECT_DELAYS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
SEND_SECS = 0.08


class ResilientDeepgramSTTService(DeepgramInternals):
    def __init__(self, *, replay_secs: float = 30.0, **kwargs):
        super().__init__(**kwargs)
        self._replay_secs = replay_secs
        self._buffer = bytearray()  # audio not yet covered by a final, starting at absolute byte _buffer_base
        self._buffer_base = 0
        self._conn_base = 0  # absolute byte offset where the current connection's stream began
        self._finalize_after_replay = False  # a Finalize the VAD asked for while disconnected
        self._unsent = 0  # bytes at the end of _buffer not yet sent
        self._committed_on_connection = False  # the current connection has finalized some audio

    # --- audio in -------------------------------------------------------------------------------------

    @property
    def _bytes_per_sec(self) -> int:
        return self.sample_rate * 2 * self.channels

    def _keep(self, audio: bytes) -> None:
        self._buffer += audio
        limit = int(self._replay_secs * self._bytes_per_sec)
        excess = len(self._buffer) - limit
        # Trim in steps of a second: once the buffer is full, trimming per 20 ms frame would move
        # the whole buffer (about 1 MB at 30 s) fifty times a second.
        if excess > self._bytes_per_sec:
            excess -= excess % 2
            del self._buffer[:excess]
            self._buffer_base += excess

    async def run_stt(self, audio: bytes):
        # Audio goes out in 80 ms messages (Deepgram suggests 20-250 ms), not per 20 ms frame: a quarter of
        # the socket writes. Nothing waits on it: the VAD's stop sends the rest before its Finalize.
        self._keep(audio)
        self._unsent += len(audio)
        if self._unsent >= int(SEND_SECS * self._bytes_per_sec):
            await self._send_unsent()
        yield None

    async def _send_unsent(self) -> None:
        count, self._unsent = self._unsent, 0
        connection = self.live_connection
        if connection is None or not count:
            return  # while disconnected the replay sends it
        try:
            await connection.send_media(bytes(self._buffer[-count:]))
        except Exception as e:  # the connection loop notices the drop and replays this audio
            logger.warning(f"{self}: send failed, reconnecting: {e}")
            self.live_connection = None

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        if isinstance(frame, VADUserStoppedSpeakingFrame):
            await self._send_unsent()  # all the audio before the Finalize Pipecat sends next
            if self.live_connection is None:
                self._finalize_after_replay = True  # sent after the replay, once a connection is back
        await super().process_frame(frame, direction)

    async def on_message(self, message) -> None:
        if isinstance(message, ListenV1Results) and message.is_final:
            self._committed_on_connection = True
            end = (message.start or 0.0) + (message.duration or 0.0)
            committed = self._conn_base + int(end * self._bytes_per_sec)
            committed -= committed % 2
            drop = min(len(self._buffer), committed - self._buffer_base)
            if drop > 0:
                del self._buffer[:drop]
                self._buffer_base += drop
        await super().on_message(message)

    # --- the connection loop ------------------------------------------------------------------------

    async def on_error(self, error) -> None:
        # The SDK reports the drop here and then ends `start_listening`; the loop below reconnects
        # and tells the client once (STT_RECONNECTING), so no second, generic error goes out.
        logger.warning(f"{self}: Deepgram connection error: {error}")
        await self.stop_all_metrics()

    async def _replay(self, connection) -> None:
        """Send what Deepgram has not finalized, then hand live audio over to `run_stt`."""
        self._conn_base = self._buffer_base
        sent = 0
        chunk = self._bytes_per_sec // 10
        while sent < len(self._buffer):  # run_stt may append while we send
            piece = bytes(self._buffer[sent : sent + chunk])
            await connection.send_media(piece)
            sent += len(piece)
        self._unsent = 0  # the replay sent everything up to here
        self.live_connection = connection
        if sent:
            logger.info(f"{self}: replayed {sent / self._bytes_per_sec:.2f}s of audio after reconnecting")
        if self._finalize_after_replay:
            self._finalize_after_replay = False
            self.request_finalize()
            await connection.send_finalize(ListenV1Finalize(type="Finalize"))

    async def connection_loop(self) -> None:
        attempt = 0
        try:
            while True:
                connected_at = None
                keepalive_task = listener = None
                self._committed_on_connection = False
                try:
                    async with self.connect() as connection:
                        connected_at = time.monotonic()
                        connection.on(EventType.MESSAGE, self.on_message)
                        connection.on(EventType.ERROR, self.on_error)
                        listener = self.create_task(connection.start_listening(), f"{self}::listen")
                        await self._replay(connection)
                        self.settled()
                        if attempt:
                            logger.info(f"{self}: reconnected to Deepgram (attempt {attempt})")
                        keepalive_task = self.create_task(self.keepalive(), f"{self}::keepalive")
                        await listener
                except ApiError as e:
                    if e.status_code is not None and 400 <= e.status_code < 500:
                        await self.push_error(
                            error_msg=f"Deepgram rejected the connection (status {e.status_code}): {e.body}",
                            exception=e,
                            force_treat_as_permanent=True,
                        )
                        return
                    logger.warning(f"{self}: Deepgram connection failed: {e}")
                except Exception as e:
                    logger.warning(f"{self}: Deepgram connection lost: {type(e).__name__}: {e}")
                finally:
                    self.live_connection = None
                    for task in (keepalive_task, listener):
                        if task is not None and not task.done():
                            await self.cancel_task(task)

                uptime = time.monotonic() - connected_at if connected_at is not None else 0.0
                # Pipecat's tracker gives up after three connections in a row that each lasted under 5 s: a
                # server that accepts the handshake and then refuses everything. A connection that finalized
                # audio made progress (its words are committed and no longer replayed), however short it was,
                # so it counts as a stable one; otherwise a replay that meets a second drop quickly ends the call.
                if self.gives_up_after(float("inf") if self._committed_on_connection else uptime):
                    await self.push_error(
                        error_msg="Deepgram connection failed to stay up", force_treat_as_permanent=True
                    )
                    return
                attempt = attempt + 1 if uptime < 5.0 and not self._committed_on_connection else 1
                await self.push_error_frame(
                    coded_error(
                        ErrorCode.STT_RECONNECTING,
                        "speech recognition reconnecting; your audio is kept",
                        "Deepgram socket dropped",
                    )
                )
                await asyncio.sleep(RECONNECT_DELAYS[min(attempt - 1, len(RECONNECT_DELAYS) - 1)])
        finally:
            self.settled()
