"""The benchmark's reference: a bare Pipecat 1.14 phone bot, as Pipecat's own Twilio example builds it.

One FastAPI app with `/twilio/ws`: Pipecat's TwilioFrameSerializer and FastAPIWebsocketTransport,
Silero VAD (and smart-turn v3 when ATLAS_SMART_TURN is on) loaded per call (as the examples do), and
Pipecat's own Deepgram, Anthropic and ElevenLabs services, pointed at the same fakes and given the same
model, prompt and VAD and turn-end settings as Atlas. No Atlas processor, serializer, recorder or metrics:
what Atlas adds or saves is measured against this, in the same run.

Run: `python -m bench.bare_pipecat --port 8100` with DEEPGRAM_BASE_URL, ANTHROPIC_BASE_URL,
ELEVENLABS_BASE_URL (and their keys) in the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import uvicorn
from fastapi import FastAPI, WebSocket
from loguru import logger


def create_app() -> FastAPI:
    from anthropic import AsyncAnthropic
    from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import (
        LocalSmartTurnAnalyzerV3,
    )
    from pipecat.audio.vad.silero import SileroVADAnalyzer
    from pipecat.audio.vad.vad_analyzer import VADParams
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import (
        LLMContextAggregatorPair,
        LLMUserAggregatorParams,
    )
    from pipecat.serializers.twilio import TwilioFrameSerializer
    from pipecat.services.anthropic.llm import AnthropicLLMService
    from pipecat.services.deepgram.stt import DeepgramSTTService
    from pipecat.services.elevenlabs.tts import ElevenLabsTTSService
    from pipecat.transports.websocket.fastapi import (
        FastAPIWebsocketParams,
        FastAPIWebsocketTransport,
    )
    from pipecat.turns.user_stop.speech_timeout_user_turn_stop_strategy import (
        SpeechTimeoutUserTurnStopStrategy,
    )
    from pipecat.turns.user_stop.turn_analyzer_user_turn_stop_strategy import (
        TurnAnalyzerUserTurnStopStrategy,
    )
    from pipecat.turns.user_turn_strategies import UserTurnStrategies
    from pipecat.workers.runner import WorkerRunner

    from config.prompts import system_prompt
    from config.settings import get_settings

    env, s = os.environ, get_settings()
    # Pipecat's own stop strategies: the VAD stop of Atlas's fixed turn end (0.5 s) then its speech timeout
    vad = VADParams(stop_secs=s.vad_stop_secs or 0.5, start_secs=s.vad_start_secs, min_volume=s.vad_min_volume)
    app = FastAPI()

    @app.get("/healthz")
    async def healthz():
        return {"ok": True}

    @app.websocket("/twilio/ws")
    async def twilio_ws(websocket: WebSocket):
        await websocket.accept()
        messages = websocket.iter_text()
        await messages.__anext__()  # "connected"
        start = json.loads(await messages.__anext__())["start"]
        serializer = TwilioFrameSerializer(
            stream_sid=start["streamSid"],
            call_sid=start["callSid"],
            params=TwilioFrameSerializer.InputParams(auto_hang_up=False),
        )
        transport = FastAPIWebsocketTransport(
            websocket,
            FastAPIWebsocketParams(
                audio_in_enabled=True, audio_out_enabled=True, add_wav_header=False, serializer=serializer
            ),
        )
        stt = DeepgramSTTService(
            api_key=env["DEEPGRAM_API_KEY"],
            base_url=env["DEEPGRAM_BASE_URL"],
            settings=DeepgramSTTService.Settings(
                model="nova-3", interim_results=True, punctuate=True, endpointing=300, utterance_end_ms=1000
            ),
        )
        llm = AnthropicLLMService(
            api_key=env["ANTHROPIC_API_KEY"],
            client=AsyncAnthropic(api_key=env["ANTHROPIC_API_KEY"], base_url=env["ANTHROPIC_BASE_URL"]),
            settings=AnthropicLLMService.Settings(
                model=s.anthropic_model, system_instruction=system_prompt(local_model=False), max_tokens=s.max_tokens
            ),
        )
        tts = ElevenLabsTTSService(
            api_key=env["ELEVENLABS_API_KEY"],
            url=env["ELEVENLABS_BASE_URL"],
            settings=ElevenLabsTTSService.Settings(voice=env["ELEVENLABS_VOICE_ID"], model="eleven_flash_v2_5"),
        )
        context = LLMContext()
        aggregators = LLMContextAggregatorPair(
            context,
            user_params=LLMUserAggregatorParams(
                vad_analyzer=SileroVADAnalyzer(params=vad),  # the same VAD settings as Atlas
                # the same turn end as Atlas: smart-turn v3 (loaded per call) or the speech timeout
                user_turn_strategies=UserTurnStrategies(
                    stop=[
                        TurnAnalyzerUserTurnStopStrategy(turn_analyzer=LocalSmartTurnAnalyzerV3())
                        if s.smart_turn
                        else SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=s.user_speech_timeout_secs)
                    ]
                ),
            ),
        )
        pipeline = Pipeline(
            [transport.input(), stt, aggregators.user(), llm, tts, transport.output(), aggregators.assistant()]
        )
        worker = PipelineWorker(
            pipeline,
            params=PipelineParams(
                audio_in_sample_rate=8000, audio_out_sample_rate=8000, enable_metrics=True, enable_usage_metrics=True
            ),
        )

        @transport.event_handler("on_client_disconnected")
        async def _gone(_transport, _client):
            await worker.cancel()

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        await runner.run()

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_pipecat")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level=os.environ.get("ATLAS_LOG_LEVEL", "WARNING"))
    uvicorn.run(create_app(), host="127.0.0.1", port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
