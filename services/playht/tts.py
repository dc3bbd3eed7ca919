"""PlayHT streaming TTS (legacy): our own Pipecat service, because Pipecat has none any more.

PlayHT shut its API down on 2025-12-31 and Pipecat removed its PlayHT services (0.0.104). The
product spec still asks for PlayHT, so this service implements the spec's request exactly, for
anyone running a PlayHT-compatible endpoint (`PLAYHT_BASE_URL`): `POST /api/v2/tts/stream` with
`Authorization: Bearer <key>` and `X-User-ID`, a JSON body of text, voice manifest URL,
`output_format`, `sample_rate`, `speed` (1.05) and `voice_engine`, answered by a stream of audio.

Plain HTTP (aiohttp) rather than `pyht`: pyht 0.1.14, its last release, hard-codes
`https://api.play.ht` for this endpoint and pins `websockets<14`, which conflicts with Pipecat.

`raw` output (16-bit PCM at the pipeline's rate) is the default: it plays as it arrives with no
decoding. `mp3` (the spec's choice) is decoded incrementally with PyAV (already installed with
faster-whisper). A failed request (HTTP error, timeout, a stream cut short) is spoken by the local
Piper voice from that sentence to the end of the reply (`PiperFallbackMixin`).
"""

from __future__ import annotations

from typing import cast

import aiohttp
from loguru import logger
from pipecat.frames.frames import TTSAudioRawFrame
from pipecat.services.settings import TTSSettings
from pipecat.utils.tracing.service_decorators import traced_tts

from compat.pipecat import TTSInternals
from services.fallback import PiperFallbackMixin


class PlayHTError(Exception):
    pass


class _Mp3Decoder:
    """Incremental MP3 -> 16-bit mono PCM at `rate`.

    PyAV's parser keeps partial frames between chunks. A leading ID3v2 tag (encoders such as LAME
    write one) is skipped first: fed to the MP3 decoder it is invalid data. A damaged frame is
    dropped rather than failing the whole sentence.
    """

    def __init__(self, rate: int):
        import av

        self._invalid_data = av.error.InvalidDataError
        self._codec = av.CodecContext.create("mp3", "r")
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        self._head = bytearray()  # bytes held until the ID3 tag (if any) is known and skipped
        self._skip: int | None = None

    def _strip_id3(self, data: bytes) -> bytes:
        if self._skip is None:
            self._head += data
            if len(self._head) < 10:
                return b""
            head = bytes(self._head)
            self._head.clear()
            if head[:3] == b"ID3":
                size = (head[6] & 0x7F) << 21 | (head[7] & 0x7F) << 14 | (head[8] & 0x7F) << 7 | (head[9] & 0x7F)
                self._skip = 10 + size + (10 if head[5] & 0x10 else 0)
            else:
                self._skip = 0
            data = head
        if self._skip:
            cut = min(self._skip, len(data))
            self._skip -= cut
            data = data[cut:]
        return data

    def feed(self, data: bytes | None) -> bytes:
        out = bytearray()
        if data is not None:
            data = self._strip_id3(data)
            if not data:
                return b""
        for packet in self._codec.parse(data) if data else [None]:
            try:
                frames = self._codec.decode(packet)
            except self._invalid_data:
                continue
            for frame in frames:
                for resampled in self._resampler.resample(frame):
                    out += resampled.to_ndarray().tobytes()
        return bytes(out)


class PlayHTHttpTTSService(PiperFallbackMixin, TTSInternals):
    def __init__(
        self,
        *,
        api_key: str,
        user_id: str,
        base_url: str = "https://api.play.ht",
        voice: str,
        voice_engine: str = "PlayHT2.0-turbo",
        output_format: str = "raw",
        speed: float = 1.05,
        timeout: float = 5.0,
        fallback_voice=None,
        **kwargs,
    ):
        super().__init__(
            push_start_frame=True,
            push_stop_frames=True,
            settings=TTSSettings(model=voice_engine, voice=voice, language=None),
            **kwargs,
        )
        self._init_fallback(fallback_voice)
        self._api_key = api_key
        self._user_id = user_id
        self._url = base_url.rstrip("/") + "/api/v2/tts/stream"
        self._voice_engine = voice_engine
        self._output_format = output_format
        self._speed = speed
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def can_generate_metrics(self) -> bool:
        return True

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def _close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def stop(self, frame):
        await super().stop(frame)
        await self._close()

    async def cancel(self, frame):
        await super().cancel(frame)
        await self._close()

    async def cleanup(self):
        await super().cleanup()
        await self._close()

    async def _vendor_chunks(self, text: str):
        """PCM chunks at `self.sample_rate` from PlayHT; raises PlayHTError on any failure."""
        body = {
            "text": text,
            "voice": cast(TTSSettings, self.settings).voice,
            "voice_engine": self._voice_engine,
            "output_format": self._output_format,
            "sample_rate": self.sample_rate,
            "speed": self._speed,
        }
        headers = {
            "Authorization": f"Bearer {self._api_key}",
            "X-User-ID": self._user_id,
            "Content-Type": "application/json",
            "Accept": "audio/mpeg" if self._output_format == "mp3" else "application/octet-stream",
        }
        decoder = _Mp3Decoder(self.sample_rate) if self._output_format == "mp3" else None
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._timeout, sock_read=self._timeout)
        try:
            async with self._client().post(self._url, json=body, headers=headers, timeout=timeout) as response:
                if response.status != 200:
                    detail = (await response.text())[:200]
                    raise PlayHTError(f"HTTP {response.status}: {detail}")
                odd = b""
                async for data in response.content.iter_any():
                    pcm = decoder.feed(data) if decoder else data
                    pcm, odd = odd + pcm, b""
                    if len(pcm) % 2:
                        pcm, odd = pcm[:-1], pcm[-1:]
                    if pcm:
                        yield pcm
                if decoder and (tail := decoder.feed(None)):
                    yield tail
        except PlayHTError:
            raise
        except Exception as e:  # connection refused, reset mid-stream, timeout, bad MP3
            raise PlayHTError(f"{type(e).__name__}: {e}") from e

    @traced_tts  # Pipecat's `tts` span (ATLAS_TRACING), as its own TTS services have
    async def run_tts(self, text: str, context_id: str):
        if self._use_fallback(context_id):
            async for frame in self._piper_frames(text, context_id):
                yield frame
            return
        await self.start_tts_usage_metrics(text)
        spoken = 0
        try:
            async for pcm in self._vendor_chunks(text):
                await self.stop_ttfb_metrics()
                spoken += len(pcm)
                yield TTSAudioRawFrame(pcm, self.sample_rate, 1, context_id=context_id)
            if spoken:
                return
            raise PlayHTError("the stream carried no audio")
        except PlayHTError as e:
            await self._start_fallback(context_id, f"PlayHT request failed ({e})")
        # The sentence that failed is spoken again whole: cutting in mid-word would be worse.
        logger.debug(f"{self}: Piper speaks [{text}] after {spoken} bytes from PlayHT")
        async for frame in self._piper_frames(text, context_id):
            yield frame
