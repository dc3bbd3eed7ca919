"""Agent definitions: what an agent says first, how it thinks and sounds, what it may do.

`ATLAS_AGENT_CONFIG` names a TOML file of one or more named agents::

    default = "concierge"            # optional when there is one agent

    [agents.concierge]
    prompt = "You're the concierge of the Grand Hotel. Keep answers to two sentences."
    greeting = "Grand Hotel, good evening. How can I help?"   # spoken first; "" = wait for the caller
    language = "en"                  # BCP-47: Deepgram's language, ElevenLabs' language_code, the prompt
    voice = "21m00Tcm4TlvDq8EAJjs"   # the TTS provider's voice (ElevenLabs voice id, PlayHT voice URL)
    stt = "deepgram"                 # providers; unset = ATLAS_STT / ATLAS_LLM / ATLAS_TTS
    llm = "anthropic"
    tts = "elevenlabs"
    max_tokens = 200                 # the LLM's reply bound; unset = ATLAS_MAX_TOKENS / ATLAS_LLM_MAX_TOKENS
    context_messages = 10            # history sent besides the new question; unset = ATLAS_CONTEXT_MESSAGES
    tools = ["get_time", "end_call"] # registered tools (bots/tools.py) this agent may call
    store_transcripts = true         # keep each turn's words in voice_turns (deleted after the retention)
    transfer_number = "+15551234567" # where transfer_call dials (phone door)

With no file the built-in Atlas agent (the spec's prompt, no greeting, no tools) is the only one. A file
that cannot be used stops the server at start-up with the file, the line and the key at fault.
Which tools exist is checked by the runtime once the tool modules are imported (bots/runtime.py).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from config.prompts import ATLAS_SYSTEM_PROMPT

DEFAULT_AGENT = "atlas"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")

# Names for the prompt's "answer in ..." line; other codes are named by their code.
LANGUAGE_NAMES = {
    "ar": "Arabic", "bg": "Bulgarian", "ca": "Catalan", "cs": "Czech", "da": "Danish", "de": "German",
    "el": "Greek", "en": "English", "es": "Spanish", "fi": "Finnish", "fr": "French", "hi": "Hindi",
    "hu": "Hungarian", "id": "Indonesian", "it": "Italian", "ja": "Japanese", "ko": "Korean",
    "ms": "Malay", "nl": "Dutch", "no": "Norwegian", "pl": "Polish", "pt": "Portuguese", "ro": "Romanian",
    "ru": "Russian", "sk": "Slovak", "sv": "Swedish", "ta": "Tamil", "tr": "Turkish", "uk": "Ukrainian",
    "vi": "Vietnamese", "zh": "Chinese",
}  # fmt: skip


class AgentConfigError(ValueError):
    """An agent file that cannot be used: the message names the file, the line and the key."""


class Agent(BaseModel):
    """One agent; every field but the name has a default, so `[agents.x]` alone is the Atlas agent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = DEFAULT_AGENT
    prompt: str = Field(ATLAS_SYSTEM_PROMPT, min_length=1, max_length=20_000)
    greeting: str = Field("", max_length=500)
    language: str = "en"
    voice: str | None = Field(None, min_length=1, max_length=200)
    stt: Literal["whisper", "deepgram"] | None = None
    llm: Literal["llama", "openai", "anthropic"] | None = None
    tts: Literal["piper", "elevenlabs", "playht"] | None = None
    max_tokens: int | None = Field(None, ge=16, le=4096)
    context_messages: int | None = Field(None, ge=2, le=100)  # None: ATLAS_CONTEXT_MESSAGES
    tools: tuple[str, ...] = ()
    store_transcripts: bool = False
    transfer_number: str | None = None

    @field_validator("language")
    @classmethod
    def _language(cls, value: str) -> str:
        from pipecat.transcriptions.language import Language

        try:
            return Language(value).value
        except ValueError:
            raise ValueError(f"'{value}' is not a BCP-47 language Pipecat knows (e.g. 'en', 'es', 'fr-CA')") from None

    @field_validator("tools")
    @classmethod
    def _tools(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("a tool is listed twice")
        return value

    @field_validator("transfer_number")
    @classmethod
    def _number(cls, value: str | None) -> str | None:
        if value is not None and not _E164.match(value):
            raise ValueError(f"'{value}' is not an E.164 phone number (+ and 7-15 digits)")
        return value

    @property
    def base_language(self) -> str:
        return self.language.split("-")[0].lower()

    @property
    def english(self) -> bool:
        return self.base_language == "en"

    def system_prompt(self, local_model: bool) -> str:
        """The prompt as sent: the agent's; the greeting it spoke; a line naming its language when that is not
        English; and for a local model the line that keeps its words speakable (config/prompts.py)."""
        from config.prompts import SPOKEN_OUTPUT_SUFFIX

        prompt = self.prompt
        if self.greeting:
            # The greeting is spoken, not kept as a message: a conversation sent to Claude opens with the caller.
            prompt += f'\n- You opened this call by saying: "{self.greeting}"'
        if not self.english:
            name = LANGUAGE_NAMES.get(self.base_language, f"the language with the code {self.language}")
            prompt += f"\n- Always answer in {name}, whatever language the caller uses"
        if local_model and self.tools:
            # Small local models otherwise reach for a tool on any question.
            prompt += "\n- Call a tool only when the caller asks for what it does; otherwise just talk"
        return prompt + (SPOKEN_OUTPUT_SUFFIX if local_model else "")


@dataclass(frozen=True)
class Agents:
    """The server's agents, by name, and the one a session gets when it names none."""

    by_name: dict[str, Agent]
    default: str
    source: Path | None = None

    def get(self, name: str | None) -> Agent:
        """The named agent (the default for None); KeyError for a name not on the list."""
        return self.by_name[name or self.default]

    def named(self, name: str | None) -> Agent | None:
        """The agent a client asked for by name (None when it named none: the rollout chooses); KeyError for a
        name not on the list."""
        return None if not name else self.by_name[name]

    @property
    def names(self) -> list[str]:
        return sorted(self.by_name)


def builtin_agents() -> Agents:
    return Agents({DEFAULT_AGENT: Agent()}, DEFAULT_AGENT)


def _line_of(text: str, agent: str | None, key: str | None) -> int | None:
    """The line (1-based) of `key` in `[agents.<agent>]`, or of that section's header, or of a top-level key."""
    lines = text.splitlines()
    header = re.compile(rf"^\s*\[\s*agents\s*\.\s*[\"']?{re.escape(agent)}[\"']?\s*\]") if agent else None
    keyline = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=") if key else None
    start, in_section = None, agent is None
    for i, line in enumerate(lines, 1):
        if header is not None and header.match(line):
            start, in_section = i, True
            continue
        if in_section and agent is not None and re.match(r"^\s*\[", line):
            break  # the next section
        if in_section and keyline is not None and keyline.match(line):
            return i
    return start


def load_agents(path: Path | None) -> Agents:
    """The agents of the file at `path` (None: the built-in Atlas agent), or AgentConfigError."""
    if path is None:
        return builtin_agents()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise AgentConfigError(f"ATLAS_AGENT_CONFIG={path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise AgentConfigError(f"{path}: not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise AgentConfigError(f"{path}: not valid TOML: {e}") from None

    def fail(message: str, agent: str | None = None, key: str | None = None) -> AgentConfigError:
        line = _line_of(text, agent, key)
        where = f"{path}" + (f", line {line}" if line else "")
        what = ".".join(p for p in ("agents" if agent else None, agent, key) if p)
        return AgentConfigError(f"{where}: {what + ': ' if what else ''}{message}")

    unknown = sorted(set(data) - {"default", "agents"})
    if unknown:
        raise fail("unknown top-level key (expected 'default' and [agents.<name>] tables)", key=unknown[0])
    agents_table = data.get("agents")
    if not isinstance(agents_table, dict) or not agents_table:
        raise fail("no agents: add at least one [agents.<name>] table")
    agents: dict[str, Agent] = {}
    for name, body in agents_table.items():
        if not _NAME.match(name):
            raise fail("an agent's name is lower-case letters, digits, '-' and '_' (at most 64)", name)
        if not isinstance(body, dict):
            raise fail("must be a table ([agents.<name>])", name)
        if "name" in body:
            raise fail("the name comes from the table's header; remove this key", name, "name")
        try:
            agents[name] = Agent(name=name, **body)
        except ValidationError as e:
            err = e.errors()[0]
            key = str(err["loc"][0]) if err["loc"] else None
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = f"unknown key (known: {', '.join(sorted(set(Agent.model_fields) - {'name'}))})"
            raise fail(message, name, key) from None
    default = data.get("default")
    if default is None:
        if len(agents) > 1:
            raise fail(f'{len(agents)} agents and no `default = "<name>"` saying which one sessions get')
        default = next(iter(agents))
    elif not isinstance(default, str) or default not in agents:
        raise fail(f"{default!r} is not one of the agents ({', '.join(sorted(agents))})", key="default")
    for agent in agents.values():
        if agent.transfer_number is None and "transfer_call" in agent.tools:
            raise fail("lists transfer_call but sets no transfer_number to dial", agent.name, "tools")
    return Agents(agents, default, path)
