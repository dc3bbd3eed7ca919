"""The server's agents, checked against what this process has: the agent file (config/agents.py), the tools
registered by ATLAS_TOOL_MODULES (bots/tools.py), and the engines each agent's language needs.

Kept apart from the runtime (which loads engines) so `atlas-voice serve` can refuse a bad file before it
starts anything, with the file, the line and the key at fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bots.tools import import_tool_modules, registered_tools
from config.agents import Agent, Agents, load_agents
from config.settings import Settings


def agent_settings(settings: Settings, agent: Agent) -> Settings:
    """The settings a session of `agent` runs with: the server's, with the agent's providers."""
    update: dict[str, Any] = {k: getattr(agent, k) for k in ("stt", "llm", "tts") if getattr(agent, k)}
    return settings.model_copy(update=update) if update else settings


@dataclass(frozen=True)
class EngineNeeds:
    """What the server's agents, taken together, need loaded."""

    whisper: bool  # an agent hears with Whisper
    local_llm: bool  # an agent thinks with a local/OpenAI-compatible LLM, or Claude falls back to the local one
    openai: bool  # an agent uses ATLAS_LLM=openai (a server at ATLAS_LLM_URL)


def engine_needs(settings: Settings, agents: Agents) -> EngineNeeds:
    """The engines to load for these agents (the runtime, `doctor` and the worker supervisor ask the same)."""
    resolved = [agent_settings(settings, a) for a in agents.by_name.values()]
    return EngineNeeds(
        whisper=any(a.resolved_stt == "whisper" for a in resolved),
        local_llm=any(a.resolved_llm != "anthropic" for a in resolved) or settings.llm_fallback == "local",
        openai=any(a.resolved_llm == "openai" for a in resolved),
    )


def load_agent_config(settings: Settings) -> Agents:
    """Import the tool modules, read the agent file and check every agent; ValueError says what to fix."""
    import_tool_modules(settings.tool_modules)
    agents = load_agents(settings.agent_config)
    tools = registered_tools()
    where = f"{agents.source}: " if agents.source else ""
    for agent in agents.by_name.values():
        unknown = [t for t in agent.tools if t not in tools]
        if unknown:
            raise ValueError(
                f"{where}agents.{agent.name}.tools: no tool named {unknown[0]!r} is registered "
                f"(registered: {', '.join(sorted(tools))}; ATLAS_TOOL_MODULES imports the modules that add tools)"
            )
        s = agent_settings(settings, agent)
        if not agent.english:
            # Whisper tiny.en and the one Piper voice shipped are English only; the local LLM is not the limit.
            offline = [
                what
                for what, local in (
                    ("Whisper tiny.en (ATLAS_STT)", s.resolved_stt == "whisper"),
                    ("the Piper voice (ATLAS_TTS)", s.resolved_tts == "piper"),
                )
                if local
            ]
            if offline:
                raise ValueError(
                    f"{where}agents.{agent.name}.language: {agent.language!r}, but {' and '.join(offline)} "
                    "speak English only; give this agent Deepgram and ElevenLabs (or PlayHT), or language 'en'"
                )
    if settings.twilio_agent is not None and settings.twilio_agent not in agents.by_name:
        raise ValueError(
            f"ATLAS_TWILIO_AGENT={settings.twilio_agent!r} is not one of the agents ({', '.join(agents.names)})"
        )
    return agents
