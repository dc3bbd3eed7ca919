"""The local LLM (services/local/llama_server.py): llama.cpp's llama-server with one slot per offline
session, each keeping its conversation cached between turns, and a clear SERVER_BUSY past the slots."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import websockets

from bots.runtime import Runtime
from config.settings import Settings
from tests.helpers import connected_client, server_process


def offline_runtime(tmp_path, **settings) -> Runtime:
    """A Runtime whose sessions talk to its own llama-server (only its bookkeeping is used here)."""
    runtime = Runtime(settings=Settings(cache_dir=tmp_path, **settings))
    runtime.llm_server = object()  # type: ignore[assignment]
    runtime.free_llm_slots = list(range(runtime.settings.llm_slots))
    return runtime


def test_offline_sessions_are_capped_at_the_slots_each_with_its_own(tmp_path):
    runtime = offline_runtime(tmp_path, llm_slots=2, max_sessions=10)
    assert runtime.max_sessions == 2 and "ATLAS_LLM_SLOTS" in runtime.busy_message()
    assert [runtime.claim_llm_slot(), runtime.claim_llm_slot(), runtime.claim_llm_slot()] == [0, 1, None]
    runtime.return_llm_slot(0)
    runtime.return_llm_slot(0)  # returned twice (an error path and the end): still one slot
    assert runtime.free_llm_slots == [0]
    # ATLAS_MAX_SESSIONS lower than the slots: it is the cap, and the message says so
    runtime = offline_runtime(tmp_path, llm_slots=8, max_sessions=3)
    assert runtime.max_sessions == 3 and "3 sessions" in runtime.busy_message()


def test_claude_sessions_take_no_slot_and_keep_their_cap(tmp_path):
    runtime = offline_runtime(tmp_path, llm_slots=2, max_sessions=10, anthropic_api_key="sk-ant-x")
    assert runtime.max_sessions == 10 and runtime.claim_llm_slot() is None


async def refused(ws_url: str) -> dict:
    async with websockets.connect(ws_url) as ws:
        return json.loads(await asyncio.wait_for(ws.recv(), 10))


@pytest.mark.slow
async def test_past_its_slots_an_offline_server_says_busy_and_a_freed_slot_admits_again(artifacts):
    env = {"ATLAS_LLM_SLOTS": "1", "ATLAS_MAX_SESSIONS": "5", "ATLAS_STT": "whisper"}
    with server_process(env, artifacts / "server_llm_slots.log") as (base, _proc):
        ws_url = base.replace("http://", "ws://") + "/ws"
        assert httpx.get(base + "/readyz").json()["capacity"] == 1
        first = await connected_client(ws_url)
        busy = await refused(ws_url)
        assert busy["type"] == "error" and busy["code"] == "SERVER_BUSY", busy
        assert "(1, ATLAS_LLM_SLOTS)" in busy["message"]
        await first.stop()
        deadline = time.monotonic() + 10
        while httpx.get(base + "/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the slot never came back"
            await asyncio.sleep(0.1)
        second = await connected_client(ws_url)  # the returned slot
        await second.stop()


@pytest.mark.slow
def test_the_llm_server_dies_with_the_process_that_started_it(tmp_path):
    """However the Atlas process ends (here SIGKILL: no cleanup runs), its llama-server does not outlive it."""
    import os
    import signal
    import subprocess
    import sys

    script = (
        "import asyncio, sys\n"
        "from config.settings import Settings\n"
        "from services.local.llama_server import LlamaServer\n"
        "from services.local.models import resolve_llm_path\n"
        "async def main():\n"
        "    s = Settings()\n"
        "    server = LlamaServer(resolve_llm_path(s.llm_model_path, s.cache_dir), slots=1)\n"
        "    await server.start()\n"
        "    print(server.proc.pid, flush=True)\n"
        "    await asyncio.sleep(600)\n"
        "asyncio.run(main())\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        child = int(parent.stdout.readline())
        os.kill(child, 0)  # running
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 15
        while True:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            # reaped by init once it exits; a zombie still answers kill(0) until then
            if open(f"/proc/{child}/stat").read().split()[2] == "Z":
                break
            assert time.monotonic() < deadline, "llama-server outlived its parent"
            time.sleep(0.2)
    finally:
        if parent.poll() is None:
            parent.kill()


@pytest.mark.slow
async def test_a_sessions_first_turn_finds_the_system_prompt_in_its_slot():
    """The server warms every slot with the system prompt: a first request evaluates its question only."""
    from config.prompts import system_prompt
    from services.local.llama_server import LlamaServer, prompt_tokens_evaluated
    from services.local.models import resolve_llm_path

    s = Settings()
    server = LlamaServer(resolve_llm_path(s.llm_model_path, s.cache_dir), slots=2)
    await server.start()
    try:
        await server.warm_slots(system_prompt(local_model=True))
        before = await prompt_tokens_evaluated(server.metrics_url)
        body = {
            "model": "local",
            "messages": [
                {"role": "system", "content": system_prompt(local_model=True)},
                {"role": "user", "content": "Is the museum open on Sunday afternoons?"},
            ],
            "max_tokens": 8,
            "id_slot": 1,
        }
        async with httpx.AsyncClient(timeout=60) as client:
            usage = (await client.post(server.base_url + "/chat/completions", json=body)).json()["usage"]
        evaluated = await prompt_tokens_evaluated(server.metrics_url) - before
        assert usage["prompt_tokens"] > 80  # the system prompt and the question
        assert usage["prompt_tokens_details"]["cached_tokens"] >= 60, usage
        assert evaluated < 30, (evaluated, usage)
    finally:
        await server.stop()
