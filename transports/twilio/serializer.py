"""Twilio Media Streams for the pipeline: Pipecat's serializer writes; what Twilio sends is read here."""

from __future__ import annotations

import base64
import binascii
import json

from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.audio.resamplers.soxr_stream_resampler import SOXRStreamAudioResampler
from pipecat.audio.utils import ulaw_to_pcm
from pipecat.frames.frames import InputAudioRawFrame, InputDTMFFrame
from pipecat.serializers.twilio import TwilioFrameSerializer

from bots.limits import AudioBudget, MessageRate
from compat.pipecat import skip_twilio_hang_up
from transports.common import AudioBatcher, text_too_large
from vocabulary.audio import CLIENT_SAMPLE_RATE, PHONE_RATE, stamped
from vocabulary.errors import ErrorCode


class AtlasTwilioSerializer(TwilioFrameSerializer):
    """Pipecat's Twilio serializer for what the bot sends; what Twilio sends is read here.

    Pipecat's `deserialize` parses whatever arrives (any size, any rate; a malformed message is logged
    whole, so a flood of them floods the log) and decodes every media payload. Here each message is
    checked before any work: its size (ATLAS_MAX_TEXT_MESSAGE_BYTES), the connection's message rate,
    then, for media, the audio budget in seconds (real time plus a burst). Malformed messages are
    dropped and counted (INVALID_MESSAGE), never logged with their content. Media is decoded with
    Pipecat's own `ulaw_to_pcm`; `stop` ends the session without a REST hang-up (the call is over),
    `mark` echoes are reported, `dtmf` becomes Pipecat's InputDTMFFrame.
    """

    def __init__(
        self,
        *args,
        on_audio=None,
        on_stop=None,
        on_error=None,
        on_mark=None,
        audio_batch_ms: int = 40,
        max_text_bytes: int = 8192,
        rate: MessageRate | None = None,
        budget: AudioBudget | None = None,
        on_flood=None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self._batch = AudioBatcher(CLIENT_SAMPLE_RATE, audio_batch_ms)  # after the 8 -> 16 kHz resampling
        # Pipecat's default (SoX "VHQ" stream) holds 8 -> 16 kHz input back ~100 ms and hands it on in bursts,
        # so the VAD heard the end of speech late. SoX's "quick" cubic filter keeps 1 sample; phone audio has
        # nothing above 4 kHz for a steeper filter to protect.
        self._in_resampler = SOXRStreamAudioResampler(quality="QQ")
        self._in_rate = CLIENT_SAMPLE_RATE
        self._max_text = max_text_bytes
        self._rate = rate
        self._budget = budget
        self._on_mark = on_mark
        self._on_audio = on_audio
        self._on_stop = on_stop
        self._on_error = on_error
        self._on_flood = on_flood  # called once when the message rate says the stream is flooding
        self.caller_hung_up = False
        self.dropped: dict[str, int] = {}

    async def setup(self, setup):
        await super().setup(setup)
        self._in_rate = setup.audio_in_sample_rate

    def _drop(self, code: ErrorCode, tell: bool = True) -> None:
        self.dropped[str(code)] = self.dropped.get(str(code), 0) + 1
        if tell and self._on_error:
            self._on_error(str(code))

    async def deserialize(self, data: str | bytes):
        if not isinstance(data, str) or text_too_large(data, self._max_text):
            self._drop(ErrorCode.FRAME_TOO_LARGE if isinstance(data, str) else ErrorCode.INVALID_MESSAGE)
            return None
        if self._rate is not None and not self._rate.allow():
            self._drop(ErrorCode.MESSAGE_RATE_EXCEEDED, self._rate.should_tell())
            if self._on_flood is not None and self._rate.flooding:
                on_flood, self._on_flood = self._on_flood, None
                await on_flood()
            return None
        try:
            message = json.loads(data)
        except (ValueError, RecursionError):
            message = None
        event = message.get("event") if isinstance(message, dict) else None
        if event == "media":
            return await self._media(message.get("media"))
        if event == "stop":
            # The call is over: no REST hang-up (Pipecat's serializer would otherwise try one at the end).
            self.caller_hung_up = True
            skip_twilio_hang_up(self)
            if self._on_stop:
                await self._on_stop()
            return None
        if event == "mark":
            mark = message.get("mark")
            name = mark.get("name") if isinstance(mark, dict) else None
            if isinstance(name, str) and len(name) <= 64 and self._on_mark:
                self._on_mark(name)
            return None
        if event == "dtmf":
            dtmf = message.get("dtmf")
            digit = dtmf.get("digit") if isinstance(dtmf, dict) else None
            try:
                return InputDTMFFrame(KeypadEntry(str(digit)))
            except ValueError:
                self._drop(ErrorCode.INVALID_MESSAGE)
                return None
        if isinstance(event, str) and event in ("connected", "start"):
            return None
        self._drop(ErrorCode.INVALID_MESSAGE)
        return None

    async def _media(self, media) -> InputAudioRawFrame | None:
        payload = media.get("payload") if isinstance(media, dict) else None
        if not isinstance(payload, str) or not payload:
            self._drop(ErrorCode.INVALID_MESSAGE)
            return None
        try:
            ulaw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            self._drop(ErrorCode.INVALID_MESSAGE)
            return None
        if self._budget is not None and not self._budget.take(len(ulaw) / PHONE_RATE):
            self._drop(ErrorCode.AUDIO_RATE_EXCEEDED, self._budget.should_tell())
            return None
        if self._on_audio:
            self._on_audio()
        pcm = await ulaw_to_pcm(ulaw, PHONE_RATE, self._in_rate, self._in_resampler)
        audio = self._batch.add(pcm) if pcm else None
        if audio is None:
            return None
        return stamped(InputAudioRawFrame(audio=audio, num_channels=1, sample_rate=self._in_rate))
