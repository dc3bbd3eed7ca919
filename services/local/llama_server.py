"""The local LLM: llama.cpp's own `llama-server` in a child process.

Why a child process and not an in-process `llama_cpp.Llama`: generation holds the GIL between
tokens, which would stall every session's audio on the event loop; a separate process keeps the
server's loop free and lets Pipecat's own `OpenAILLMService` talk to it (streaming, cancellation by
closing the HTTP stream on interruption, TTFB and token metrics) exactly as it talks to any
OpenAI-compatible URL. One child serves every session of the process (of the machine, with workers).

Why llama.cpp's `llama-server` and not llama-cpp-python's server (which we used before): that one
serves one request at a time, and once the 10-message window starts sliding every request differs
from the last one right after the system prompt, so it evaluated the whole prompt again at every
turn. `llama-server` has parallel slots (one per live session, each keeping its conversation's KV
cache, continuous batching across them) and `--cache-reuse`: the part of the prompt that is still
in a slot's cache after the window dropped the oldest exchange is shifted into place instead of
evaluated again (bench/results: prompt tokens evaluated per turn). It is built from the llama.cpp
source vendored in the llama-cpp-python sdist (scripts/quickstart.sh).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from loguru import logger


class LlamaServerMissing(RuntimeError):
    """No llama-server binary: the message says how to build it."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: the kernel sends it SIGTERM when the Atlas process dies, however it dies (a
    SIGKILL or a crash runs no `stop`), so no orphaned server keeps its 2 GB and its port. Linux ties this to
    the thread that started the child: `start` runs on the event loop's thread, which lives as long as the
    process."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def find_llama_server(configured: Path | None = None) -> Path:
    """`configured` (ATLAS_LLAMA_SERVER), else the `llama-server` next to this Python (the quick start
    builds it into .venv/bin), else one on PATH."""
    if configured is not None:
        if not configured.is_file():
            raise LlamaServerMissing(f"ATLAS_LLAMA_SERVER={configured} does not exist")
        return configured
    beside = Path(sys.executable).parent / "llama-server"
    if beside.is_file():
        return beside
    found = shutil.which("llama-server")
    if found:
        return Path(found)
    raise LlamaServerMissing(
        "llama-server is not installed: scripts/quickstart.sh install builds it (about 6 minutes on 2 cores), "
        "or set ATLAS_LLAMA_SERVER to a llama.cpp llama-server binary"
    )


class LlamaServer:
    """`slots` parallel sequences of `context_tokens` each (a session's conversation stays in its slot);
    `cache_reuse_tokens`: the shortest run of cached tokens shifted into place rather than evaluated again
    (0: off). A message of the window is 20-80 tokens; the run kept after a slide is all of them."""

    def __init__(
        self,
        model_path: Path,
        *,
        threads: int = 2,
        context_tokens: int = 4096,
        slots: int = 4,
        cache_reuse_tokens: int = 16,
        binary: Path | None = None,
    ):
        self.model_path = model_path
        self.threads = threads
        self.context_tokens = context_tokens
        self.slots = slots
        self.cache_reuse_tokens = cache_reuse_tokens
        self.binary = find_llama_server(binary)
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self._log_task: asyncio.Task | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def metrics_url(self) -> str:
        """llama-server's Prometheus counters (prompt tokens evaluated, tokens generated)."""
        return f"http://127.0.0.1:{self.port}/metrics"

    def command(self) -> list[str]:
        return [
            str(self.binary),
            "--model",
            str(self.model_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--threads",
            str(self.threads),
            "--threads-batch",
            str(self.threads),
            # each slot its own context of context_tokens (not one pool shared by all)
            "--ctx-size",
            str(self.context_tokens * self.slots),
            "--parallel",
            str(self.slots),
            "--no-kv-unified",
            "--cache-reuse",
            str(self.cache_reuse_tokens),
            "--alias",
            "local",
            "--jinja",
            "--no-webui",
            "--metrics",
        ]

    async def start(self, timeout: float = 180.0) -> None:
        logger.info(f"Starting local LLM server on port {self.port}: {self.model_path.name}, {self.slots} slots")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )
        self._log_task = asyncio.create_task(self._pump_logs())
        async with httpx.AsyncClient(timeout=2.0) as client:
            while time.perf_counter() - t0 < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"local LLM server exited with code {self.proc.returncode}")
                try:
                    r = await client.get(f"http://127.0.0.1:{self.port}/health")
                    if r.status_code == 200:
                        logger.info(f"Local LLM server ready in {time.perf_counter() - t0:.1f}s")
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        await self.stop()
        raise TimeoutError(f"local LLM server not ready after {timeout}s")

    async def warm_slots(self, system_prompt: str) -> None:
        """Put the system prompt in every slot's cache, so that a session's first request evaluates only its
        question (~20 tokens), not the ~100 of the prompt before it too (about 1 s on 2 cores, measured as
        the first turn of every offline call: 2.8-3.0 s against ~1.7 s). The slots are filled in one batch."""
        t0 = time.perf_counter()

        async def warm(client: httpx.AsyncClient, slot: int) -> None:
            body = {
                "model": "local",
                "messages": [{"role": "system", "content": system_prompt}, {"role": "user", "content": "Hi"}],
                "max_tokens": 1,
                "id_slot": slot,
                "cache_prompt": True,
            }
            r = await client.post(f"{self.base_url}/chat/completions", json=body, headers={"Connection": "close"})
            r.raise_for_status()

        try:
            async with httpx.AsyncClient(timeout=60.0) as client:
                await asyncio.gather(*(warm(client, slot) for slot in range(self.slots)))
        except httpx.HTTPError as e:  # a cold slot is slower, not broken
            logger.warning(f"Local LLM: the slots were not warmed ({e}); first turns evaluate the whole prompt")
            return
        logger.info(f"Local LLM: the system prompt is in all {self.slots} slots ({time.perf_counter() - t0:.1f}s)")

    async def _pump_logs(self) -> None:
        assert self.proc and self.proc.stdout
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, self.proc.stdout.readline)
            if not line:
                return
            logger.debug(f"llama.cpp: {line.decode(errors='replace').rstrip()}")

    async def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self._log_task:
            self._log_task.cancel()
        self.proc = None


async def prompt_tokens_evaluated(metrics_url: str) -> float:
    """llama-server's count of prompt tokens it evaluated (not taken from a slot's cache) since it started."""
    async with httpx.AsyncClient(timeout=5.0) as client:
        text = (await client.get(metrics_url)).text
    for line in text.splitlines():
        if line.startswith("llamacpp:prompt_tokens_total"):
            return float(line.split()[-1])
    raise ValueError("llama-server's /metrics has no llamacpp:prompt_tokens_total")
