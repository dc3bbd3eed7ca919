"""The one pipeline builder every door (WebSocket, Twilio, Daily) shares.

transport in -> STT -> user aggregator (Silero VAD, then the turn-end rule with preemptive replies,
or the speech timeout or smart-turn; the caller's audio goes no further) -> context window (last N
messages; the system prompt lives in the LLM settings) -> LLM -> spoken reply (plain speech, a reply's
first clause as its own chunk, then at most a few whole sentences) -> TTS -> transport out -> assistant aggregator
(keeps only what was actually sent to be spoken).

What is loaded once per process (engines, the local LLM server) comes from the `Runtime`
(bots/runtime.py) passed to every build.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from pipecat.audio.turn.smart_turn.base_smart_turn import SmartTurnParams
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.frames.frames import InputAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregator,
    LLMUserAggregatorParams,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.turns.user_stop.base_user_turn_stop_strategy import BaseUserTurnStopStrategy
from pipecat.turns.user_stop.speech_timeout_user_turn_stop_strategy import (
    SpeechTimeoutUserTurnStopStrategy,
)
from pipecat.turns.user_stop.turn_analyzer_user_turn_stop_strategy import (
    TurnAnalyzerUserTurnStopStrategy,
)
from pipecat.turns.user_turn_strategies import UserTurnStrategies

from bots.runtime import Runtime
from bots.tools import ToolCall, pipecat_handler, registered_tools, tools_schema
from compat.pipecat import become
from config.agents import Agent
from processors.context_window import ContextWindow
from processors.sentence_marker import SentenceMarker
from processors.spoken_reply import SpokenReplyProcessor
from processors.turn_end import PreemptiveTurnStopStrategy, TurnEndRule
from services.factory import make_llm, make_stt, make_tts
from services.local.engines import SharedSileroVADAnalyzer, SharedSmartTurnAnalyzerV3
from vocabulary.audio import RECEIVED_AT


class UserAggregator(LLMUserAggregator):
    """Pipecat's user aggregator, except that the caller's audio stops here, and a session that has
    fallen too far behind its caller is reported.

    Pipecat's aggregator runs the VAD and turn analyzer on the caller's audio, then pushes every
    `InputAudioRawFrame` on down the pipeline: context window, LLM, first clause, TTS, sentence
    marker, output transport and assistant aggregator each take 50 frames a second per session that
    none of them uses (a queue hop and a task wake-up each). Past this point nothing needs them.

    Pipecat's queues in front of this point (the input transport's, the STT's) are unbounded: when the
    process cannot keep up, a session's audio waits there and the caller hears replies later and
    later. Each caller frame carries the time it arrived (vocabulary.audio.RECEIVED_AT); once one
    reaches here more than `max_lag_secs` late, `on_backlog(lag)` is called (once), and the session
    ends (AUDIO_BACKLOG), which bounds what any one session can queue.

    `LLMContextAggregatorPair` builds it as Pipecat's and `build_pipeline` changes its class, then
    sets `on_backlog` and `max_lag_secs`.
    """

    on_backlog: Callable[[float], None] | None = None
    max_lag_secs = 0.0

    async def process_frame(self, frame, direction: FrameDirection):
        if self.on_backlog is not None and isinstance(frame, InputAudioRawFrame):
            received = frame.metadata.get(RECEIVED_AT)
            if received is not None and time.monotonic() - received > self.max_lag_secs:
                callback, self.on_backlog = self.on_backlog, None
                callback(time.monotonic() - received)
        await super().process_frame(frame, direction)

    async def push_frame(self, frame, direction: FrameDirection = FrameDirection.DOWNSTREAM):
        if direction == FrameDirection.DOWNSTREAM and isinstance(frame, InputAudioRawFrame):
            return
        await super().push_frame(frame, direction)


@dataclass
class BuiltPipeline:
    pipeline: Pipeline
    context: LLMContext
    llm: object
    context_window: ContextWindow


def build_pipeline(
    runtime: Runtime,
    transport,
    on_backlog=None,
    llm_slot: int | None = None,
    agent: Agent | None = None,
    tool_call: ToolCall | None = None,
    on_tool_failure=None,
    speed: float = 1.0,
    history: list[dict] | None = None,
) -> BuiltPipeline:
    """The pipeline for one session of `agent` (the default agent when None) on `transport`; `on_backlog(lag_secs)`
    is called once if the session falls more than ATLAS_MAX_AUDIO_LAG_SECS behind its caller's audio; `llm_slot`:
    the local LLM's slot that keeps the session's conversation cached (Runtime.claim_llm_slot); `tool_call`: what
    the agent's tools are told about the session, and `on_tool_failure(name, reason)` awaited when one fails;
    `speed`: the voice's speed (1.0 the voice's own); `history`: the messages of a resumed conversation."""
    agent = agent or runtime.agents.get(None)
    s = runtime.agent_settings(agent)
    engines = runtime.engines
    assert engines is not None, "engines are not loaded"

    stt = make_stt(s, engines, agent)
    llm = make_llm(
        s,
        runtime.llm_base_url,
        runtime.llm_model,
        runtime.monitor.provider_retry,
        llm_slot=llm_slot,
        agent=agent,
    )
    tts = make_tts(s, engines, agent, speed)
    tools = [registered_tools()[name] for name in agent.tools]
    if tools:
        call = tool_call or ToolCall(session_id="", agent=agent.name, door="")

        async def no_report(_name: str, _reason: str) -> None:
            pass

        for t in tools:
            llm.register_function(t.name, pipecat_handler(t, call, s.tool_timeout_secs, on_tool_failure or no_report))

    vad_stop = s.resolved_vad_stop_secs
    rule = TurnEndRule.from_settings(s)
    smart = s.smart_turn and engines.smart_turn_session is not None
    if s.turn_end == "rule":
        longest_wait = rule.longest
    else:
        longest_wait = s.smart_turn_stop_secs if smart else s.user_speech_timeout_secs
    vad = SharedSileroVADAnalyzer(
        engines.silero_session,
        params=VADParams(stop_secs=vad_stop, start_secs=s.vad_start_secs, min_volume=s.vad_min_volume),
        gate_dbfs=s.vad_gate_dbfs,
        max_speech_secs=s.max_user_turn_secs,
        # long enough for the turn strategy to end the turn on the forced stop
        hold_secs=longest_wait + 0.5,
    )
    stop: list[BaseUserTurnStopStrategy]
    if s.turn_end == "rule":
        # smart-turn's own silence timeout never decides here: the rule's timer does
        analyzer = (
            SharedSmartTurnAnalyzerV3(engines.smart_turn_session, params=SmartTurnParams(stop_secs=rule.longest + 1.0))
            if smart
            else None
        )
        stop = [
            PreemptiveTurnStopStrategy(
                rule=rule,
                vad_stop_secs=vad_stop,
                preempt=s.preempt,
                lead_secs=s.preempt_lead_secs,
                max_per_turn=s.preempt_max_per_turn,
                turn_analyzer=analyzer,
            )
        ]
    elif smart:
        stop = [
            TurnAnalyzerUserTurnStopStrategy(
                turn_analyzer=SharedSmartTurnAnalyzerV3(
                    engines.smart_turn_session, params=SmartTurnParams(stop_secs=s.smart_turn_stop_secs)
                )
            )
        ]
    else:
        stop = [SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=s.user_speech_timeout_secs)]

    messages: list = [dict(m) for m in history or []]  # a resumed conversation goes on where it stopped
    context = LLMContext(messages, tools=tools_schema(tools)) if tools else LLMContext(messages)
    aggregators = LLMContextAggregatorPair(
        context,
        user_params=LLMUserAggregatorParams(vad_analyzer=vad, user_turn_strategies=UserTurnStrategies(stop=stop)),
    )
    become(aggregators.user(), UserAggregator)
    user = cast(UserAggregator, aggregators.user())
    user.on_backlog, user.max_lag_secs = on_backlog, s.max_audio_lag_secs
    window = ContextWindow(max_messages=agent.context_messages or s.context_messages, context=context)
    # What reaches the TTS and the context: plain speech, the reply's first clause on its own, then whole
    # sentences, at most ATLAS_REPLY_MAX_SENTENCES of them.
    spoken = SpokenReplyProcessor(min_words=s.first_clause_words, max_sentences=s.reply_max_sentences)
    pipeline = Pipeline(
        [
            transport.input(),
            stt,
            aggregators.user(),
            window,
            llm,
            spoken,
            tts,
            SentenceMarker(),
            transport.output(),
            aggregators.assistant(),
        ]
    )
    return BuiltPipeline(pipeline=pipeline, context=context, llm=llm, context_window=window)
