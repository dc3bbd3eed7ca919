"""Agent files and tool registration: what a newcomer writes, and the errors they get when it is wrong."""

from __future__ import annotations

import pytest

from bots.agents import agent_settings, load_agent_config
from bots.tools import ToolCall, register_tool, registered_tools, tool
from config.agents import DEFAULT_AGENT, AgentConfigError, load_agents
from config.prompts import system_prompt
from config.settings import Settings


def write(tmp_path, text: str):
    path = tmp_path / "agents.toml"
    path.write_text(text)
    return path


def error(tmp_path, text: str) -> str:
    with pytest.raises(AgentConfigError) as e:
        load_agents(write(tmp_path, text))
    return str(e.value)


def test_no_file_is_the_built_in_atlas_agent_with_the_spec_prompt():
    agents = load_agents(None)
    agent = agents.get(None)
    assert agents.names == [DEFAULT_AGENT] and agent.greeting == "" and agent.tools == ()
    assert agent.system_prompt(local_model=True) == system_prompt(local_model=True)
    assert agent.system_prompt(local_model=False) == system_prompt(local_model=False)


def test_a_file_of_agents_with_a_default(tmp_path):
    agents = load_agents(
        write(
            tmp_path,
            'default = "desk"\n[agents.desk]\ngreeting = "Hello!"\ntools = ["end_call"]\n'
            '[agents.es]\nlanguage = "es"\nprompt = "Eres amable."\nmax_tokens = 80\ncontext_messages = 6\n',
        )
    )
    assert agents.names == ["desk", "es"] and agents.get(None).name == "desk"
    desk, es = agents.get("desk"), agents.get("es")
    assert desk.tools == ("end_call",) and 'You opened this call by saying: "Hello!"' in desk.system_prompt(False)
    assert es.system_prompt(False).startswith("Eres amable.") and "Always answer in Spanish" in es.system_prompt(False)
    assert es.max_tokens == 80 and es.context_messages == 6
    with pytest.raises(KeyError):
        agents.get("nope")
    # One agent needs no `default`.
    assert load_agents(write(tmp_path, "[agents.only]\n")).get(None).name == "only"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[agents.a]\nprompt = "x"\ngreting = "hi"\n', ["line 3", "agents.a.greting", "unknown key"]),
        ('[agents.a]\nprompt = "x"\nmax_tokens = 5\n', ["line 3", "agents.a.max_tokens", "16"]),
        ('[agents.a]\n\nlanguage = "klingon"\n', ["line 3", "agents.a.language", "not a BCP-47"]),
        ('[agents.a]\ntools = ["transfer_call"]\n', ["line 2", "agents.a.tools", "transfer_number"]),
        ('[agents.a]\ntransfer_number = "555-1234"\n', ["line 2", "agents.a.transfer_number", "E.164"]),
        ('[agents.a]\nstt = "siri"\n', ["line 2", "agents.a.stt", "whisper"]),
        ("[agents.a]\n[agents.b]\n", ["2 agents", "default"]),
        ('default = "c"\n[agents.a]\n', ["line 1", "default", "'c' is not one of the agents"]),
        ('agent = "a"\n[agents.a]\n', ["line 1", "agent", "unknown top-level key"]),
        ('[agents.a]\nprompt = "unterminated\n', ["not valid TOML", "line 2"]),
        ("[agents.Bad_Name]\n", ["agents.Bad_Name", "lower-case"]),
        ('[agents.a]\nname = "b"\n', ["line 2", "agents.a.name"]),
        ("title = 1\n", ["unknown top-level key"]),
        ("", ["no agents"]),
    ],
)
def test_a_bad_file_names_the_file_the_line_and_the_key(tmp_path, text, expected):
    message = error(tmp_path, text)
    assert str(tmp_path / "agents.toml") in message
    for part in expected:
        assert part in message, (part, message)


def test_an_unreadable_file_says_so(tmp_path):
    with pytest.raises(AgentConfigError, match="cannot read it"):
        load_agents(tmp_path / "missing.toml")


def test_the_server_checks_tools_and_languages_against_what_it_has(tmp_path):
    path = write(tmp_path, '[agents.a]\ntools = ["get_weather"]\n')
    with pytest.raises(ValueError, match="no tool named 'get_weather' is registered"):
        load_agent_config(Settings(ATLAS_AGENT_CONFIG=path))
    path = write(tmp_path, '[agents.a]\nlanguage = "de"\n')
    with pytest.raises(ValueError, match="English only"):
        load_agent_config(Settings(ATLAS_AGENT_CONFIG=path, ATLAS_STT="whisper", ATLAS_TTS="piper"))
    # With Deepgram and ElevenLabs for that agent, German is fine.
    path = write(tmp_path, '[agents.a]\nlanguage = "de"\nstt = "deepgram"\ntts = "elevenlabs"\n')
    agents = load_agent_config(Settings(ATLAS_AGENT_CONFIG=path, ATLAS_STT="whisper", ATLAS_TTS="piper"))
    s = agent_settings(Settings(ATLAS_STT="whisper"), agents.get(None))
    assert s.resolved_stt == "deepgram" and s.resolved_tts == "elevenlabs"
    with pytest.raises(ValueError, match="ATLAS_TWILIO_AGENT='front' is not one of the agents"):
        load_agent_config(Settings(ATLAS_TWILIO_AGENT="front"))
    with pytest.raises(ValueError, match="importing 'no_such_module' failed"):
        load_agent_config(Settings(ATLAS_TOOL_MODULES="no_such_module"))


def test_registering_tools_checks_name_schema_and_handler():
    async def handler(args: dict, call: ToolCall) -> str:
        return "ok"

    with pytest.raises(ValueError, match="letters, digits"):
        register_tool("get time", handler, description="x")
    with pytest.raises(ValueError, match="needs a description"):
        register_tool("t1", handler, description=" ")
    with pytest.raises(ValueError, match='"type": "object"'):
        register_tool("t2", handler, description="x", parameters={"type": "string"})
    with pytest.raises(ValueError, match="not a valid JSON schema"):
        register_tool("t3", handler, description="x", parameters={"type": "object", "properties": 5})
    with pytest.raises(ValueError, match="async function"):
        register_tool("t4", lambda a, c: "x", description="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already registered"):
        register_tool("end_call", handler, description="x")

    @tool(description="Echo the text.", parameters={"type": "object", "properties": {"text": {"type": "string"}}})
    async def echo_for_test(args: dict, call: ToolCall) -> str:
        return args["text"]

    assert "echo_for_test" in registered_tools() and {"end_call", "transfer_call"} <= set(registered_tools())
