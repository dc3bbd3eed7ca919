"""`atlas-voice doctor`: check what a server needs before it starts, and say what to fix.

Each check prints one line, `ok`, `warn` or `FAIL`, and for a failure the fix. It reads the settings as
`serve` would (environment and `.env`), then checks: the agent file and tool modules; each chosen
provider's key, with the vendor itself (Deepgram and ElevenLabs: a WebSocket handshake, closed at once;
Anthropic: `GET /v1/models/{model}`, free; nothing billed); the listening port; the offline engines (their
checksummed files, llama-server); the store (the SQLite file's folder, or Supabase's REST API with the
service key) and Redis when set. Exit code 1 when anything failed.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

OK, WARN, FAIL = "ok", "warn", "FAIL"
TIMEOUT = 5.0


@dataclass
class Check:
    status: str
    what: str
    detail: str = ""


def _settings_error(e) -> str:
    """A pydantic ValidationError as the environment variables at fault."""
    from config.settings import Settings

    names = {
        name: str(getattr(f.validation_alias, "choices", [name.upper()])[0])
        for name, f in Settings.model_fields.items()
    }
    parts = []
    for err in e.errors():
        loc = str(err["loc"][0]) if err["loc"] else ""
        parts.append(f"{names.get(loc, loc)}: {err['msg']}")
    return "; ".join(parts)


def check_port(host: str, port: int) -> Check:
    what = f"port {host}:{port}"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return Check(FAIL, what, "in use by another program: stop it, or set ATLAS_PORT (serve --port)")
            if e.errno == errno.EADDRNOTAVAIL:
                return Check(FAIL, what, "this machine has no such address: set ATLAS_HOST (serve --host)")
            return Check(FAIL, what, f"cannot listen there: {e.strerror}")
    return Check(OK, what, "free")


def check_engines(s, agents) -> list[Check]:
    from bots.agents import engine_needs
    from services.local import models
    from services.local.llama_server import LlamaServerMissing, find_llama_server

    needs = engine_needs(s, agents)
    checks: list[Check] = []

    def verify(what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
            checks.append(Check(OK, what, "files present, checksums match"))
        except models.ModelError as e:
            checks.append(Check(FAIL, what, str(e)))

    verify("Piper voice (every voice's fallback)", lambda: models.verified_piper_dir(s.cache_dir))
    if needs.whisper:
        verify("Whisper tiny.en", lambda: models.verified_whisper_dir(s.cache_dir))
    if needs.local_llm and s.llm_url:
        checks.append(Check(OK, "local LLM", f"served at ATLAS_LLM_URL={s.llm_url} (not checked here)"))
    elif needs.local_llm:
        checks.append(_check_llm_model(s, models))
        try:
            checks.append(Check(OK, "llama-server", str(find_llama_server(s.llama_server))))
        except LlamaServerMissing as e:
            checks.append(Check(FAIL, "llama-server", str(e)))
    return checks


def _check_llm_model(s, models) -> Check:
    what = "local LLM model"
    if s.llm_model_path is not None:
        if s.llm_model_path.is_file():
            return Check(OK, what, str(s.llm_model_path))
        return Check(FAIL, what, f"ATLAS_LLM_MODEL_PATH={s.llm_model_path} does not exist: fix the path or unset it")
    target = models.default_llm_path(s.cache_dir)
    if target.exists() and target.with_suffix(".verified").exists():
        return Check(OK, what, f"{target} (verified)")
    try:
        models._qwen_part_paths()
    except models.ModelError as e:
        return Check(FAIL, what, f"{e}; or set ATLAS_LLM_MODEL_PATH to a GGUF file")
    return Check(WARN, what, "not assembled yet: `atlas-voice models` does it now (the server would at start)")


async def check_keys(s, agents) -> list[Check]:
    from bots.agents import agent_settings

    resolved = [agent_settings(s, a) for a in agents.by_name.values()]
    checks = []
    if any(a.resolved_stt == "deepgram" for a in resolved):
        checks.append(await _deepgram(s))
    if any(a.resolved_llm == "anthropic" for a in resolved):
        checks.append(await _anthropic(s))
    if any(a.resolved_tts == "elevenlabs" for a in resolved):
        checks.append(await _elevenlabs(s))
    return checks


async def _handshake(what: str, variable: str, url: str, headers: dict[str, str]) -> Check:
    import websockets
    from websockets.exceptions import InvalidStatus

    try:
        async with websockets.connect(url, additional_headers=headers, open_timeout=TIMEOUT):
            pass
    except InvalidStatus as e:
        status = e.response.status_code
        if status in (401, 403):
            return Check(FAIL, what, f"{variable} was refused ({status}): check the key")
        return Check(FAIL, what, f"the handshake was refused ({status}): check the model and voice settings")
    except (OSError, TimeoutError) as e:
        return Check(FAIL, what, f"cannot reach {url.split('?')[0]}: {type(e).__name__}: {e}")
    return Check(OK, what, "key accepted")


async def _deepgram(s) -> Check:
    from config.settings import secret

    url = f"{s.deepgram_base_url.rstrip('/')}/v1/listen?model={s.deepgram_model}&encoding=linear16&sample_rate=16000"
    return await _handshake(
        "Deepgram", "DEEPGRAM_API_KEY", url, {"Authorization": f"Token {secret(s.deepgram_api_key)}"}
    )


async def _elevenlabs(s) -> Check:
    from config.settings import secret

    base = s.elevenlabs_base_url.rstrip("/")
    voice, model = s.elevenlabs_voice_id, s.elevenlabs_model
    url = f"{base}/v1/text-to-speech/{voice}/multi-stream-input?model_id={model}&output_format=pcm_16000"
    return await _handshake("ElevenLabs", "ELEVENLABS_API_KEY", url, {"xi-api-key": secret(s.elevenlabs_api_key)})


async def _anthropic(s) -> Check:
    import anthropic

    from config.settings import secret

    client = anthropic.AsyncAnthropic(
        api_key=secret(s.anthropic_api_key), base_url=s.anthropic_base_url, max_retries=0, timeout=TIMEOUT
    )
    try:
        await client.models.retrieve(s.anthropic_model)
    except anthropic.AuthenticationError as e:
        return Check(FAIL, "Anthropic", f"ANTHROPIC_API_KEY was refused ({e.status_code}): check the key")
    except anthropic.NotFoundError:
        return Check(FAIL, "Anthropic", f"ANTHROPIC_MODEL={s.anthropic_model} is not a model this key can use")
    except anthropic.APIConnectionError as e:
        return Check(FAIL, "Anthropic", f"cannot reach {s.anthropic_base_url}: {e}")
    except anthropic.APIStatusError as e:
        return Check(FAIL, "Anthropic", f"the API answered {e.status_code}")
    finally:
        await client.close()
    return Check(OK, "Anthropic", f"key accepted, {s.anthropic_model} available")


async def check_store(s) -> list[Check]:
    checks = []
    if s.supabase_url:
        import httpx

        from config.settings import secret

        key = secret(s.supabase_service_role_key)
        url = f"{s.supabase_url.rstrip('/')}/rest/v1/voice_sessions?select=id&limit=1"
        try:
            async with httpx.AsyncClient(timeout=TIMEOUT) as client:
                r = await client.get(url, headers={"apikey": key, "Authorization": f"Bearer {key}"})
        except httpx.HTTPError as e:
            checks.append(Check(FAIL, "Supabase", f"cannot reach {s.supabase_url}: {type(e).__name__}"))
        else:
            if r.status_code in (401, 403):
                checks.append(Check(FAIL, "Supabase", "SUPABASE_SERVICE_ROLE_KEY was refused: check the key"))
            elif r.status_code == 404:
                checks.append(Check(FAIL, "Supabase", "no voice_sessions table: apply supabase/migrations"))
            elif r.status_code >= 300:
                checks.append(Check(FAIL, "Supabase", f"the REST API answered {r.status_code}"))
            else:
                checks.append(Check(OK, "Supabase", "the service key reads voice_sessions"))
    else:
        path: Path = s.resolved_sqlite_path
        folder = next((p for p in [path.parent, *path.parent.parents] if p.exists()), None)
        if folder is None or not os.access(folder, os.W_OK):
            checks.append(Check(FAIL, "SQLite store", f"cannot write {path}: set ATLAS_SQLITE_PATH or ATLAS_CACHE_DIR"))
        else:
            checks.append(Check(OK, "SQLite store", str(path)))
    if s.redis_url:
        import redis.asyncio as redis

        redis_client = redis.from_url(s.redis_url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
        try:
            await redis_client.ping()  # type: ignore[misc]  # redis-py types it for sync and async clients
            checks.append(Check(OK, "Redis", "answers"))
        except Exception as e:  # noqa: BLE001 - any failure is the answer
            checks.append(Check(FAIL, "Redis", f"ATLAS_REDIS_URL does not answer: {type(e).__name__}"))
        finally:
            await redis_client.aclose()
    return checks


def run_doctor(host: str | None = None, port: int | None = None, out=sys.stdout) -> int:
    from pydantic import ValidationError

    from config.settings import Settings

    def show(c: Check) -> None:
        print(f"{c.status:>4}  {c.what}" + (f": {c.detail}" if c.detail else ""), file=out)

    try:
        s = Settings()
    except ValidationError as e:
        show(Check(FAIL, "settings", _settings_error(e)))
        return 1
    checks = [Check(OK, "settings", f"stt={s.resolved_stt} llm={s.resolved_llm} tts={s.resolved_tts}")]
    try:
        s.check_providers()
    except ValueError as e:
        checks.append(Check(FAIL, "providers", str(e)))
    agents = None
    try:
        from bots.agents import load_agent_config

        agents = load_agent_config(s)
        checks.append(Check(OK, "agents", f"{', '.join(agents.names)} (default {agents.default})"))
    except ValueError as e:
        checks.append(Check(FAIL, "agents", str(e)))
    if agents is not None and (s.rollout.strip() or s.rollout_file is not None):
        from bots.rollout import rollout_from_settings

        try:
            split = rollout_from_settings(s, agents).current()
            checks.append(Check(OK, "rollout", f"{split}; the rest: {agents.default}"))
        except ValueError as e:
            checks.append(Check(FAIL, "rollout", str(e)))
    checks.append(check_port(host or s.host, port or s.port))
    if agents is not None:
        checks.extend(check_engines(s, agents))

    async def remote() -> list[Check]:
        keys = await check_keys(s, agents) if agents is not None else []
        return keys + await check_store(s)

    checks.extend(asyncio.run(remote()))
    for c in checks:
        show(c)
    failed = [c for c in checks if c.status == FAIL]
    print(f"\n{len(failed)} problem(s) to fix" if failed else "\nall good: `atlas-voice serve` can start", file=out)
    return 1 if failed else 0
