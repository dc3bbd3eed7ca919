"""The local LLM: llama.cpp's OpenAI-compatible server in a child process.

Why a child process and not an in-process `llama_cpp.Llama`: generation holds the GIL between
tokens, which would stall every session's audio on the event loop; a separate process keeps the
server's loop free and lets Pipecat's own `OpenAILLMService` talk to it (streaming, cancellation by
closing the HTTP stream on interruption, TTFB and token metrics) exactly as it talks to any
OpenAI-compatible URL. One child serves every session of the process.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from loguru import logger


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    def __init__(self, model_path: Path, *, threads: int = 2, context_tokens: int = 4096):
        self.model_path = model_path
        self.threads = threads
        self.context_tokens = context_tokens
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self._log_task: asyncio.Task | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self, timeout: float = 180.0) -> None:
        cmd = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(self.model_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_threads",
            str(self.threads),
            "--n_threads_batch",
            str(self.threads),
            "--n_ctx",
            str(self.context_tokens),
            "--model_alias",
            "local",
            "--verbose",
            "false",
        ]
        logger.info(f"Starting local LLM server on port {self.port}: {self.model_path.name}")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._log_task = asyncio.create_task(self._pump_logs())
        async with httpx.AsyncClient(timeout=2.0) as client:
            while time.perf_counter() - t0 < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"local LLM server exited with code {self.proc.returncode}")
                try:
                    r = await client.get(f"{self.base_url}/models")
                    if r.status_code == 200:
                        logger.info(f"Local LLM server ready in {time.perf_counter() - t0:.1f}s")
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        await self.stop()
        raise TimeoutError(f"local LLM server not ready after {timeout}s")

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
