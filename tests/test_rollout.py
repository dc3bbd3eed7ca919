"""Rollout by percentage: a stable split of the users between named variants (agents), recorded per session,
changed without a restart."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from bots.rollout import BUCKETS, CONTROL, Rollout, bucket_of, parse_split, write_rollout_file
from config.agents import Agent, Agents
from tests.helpers import REPO, running_server

AGENTS = Agents({"atlas": Agent(name="atlas"), "v2": Agent(name="v2"), "v3": Agent(name="v3")}, "atlas")

AGENT_FILE = """
default = "atlas"

[agents.atlas]
prompt = "You are Atlas."

[agents.v2]
prompt = "You are Atlas, version two."

[agents.v3]
prompt = "You are Atlas, version three."
"""


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_split_names_agents_with_shares_that_fit_in_100():
    assert str(parse_split("v2=10, v3=2.5%", AGENTS)) == "v2=10,v3=2.5"
    assert parse_split("# nothing yet\n\n", AGENTS).shares == ()
    assert parse_split("v2=10 # ten percent\nv3=5", AGENTS).shares == (("v2", 10.0), ("v3", 5.0))
    for text, why in (
        ("v9=10", "no agent named 'v9'"),
        ("atlas=10", "the default agent"),
        ("control=10", "no agent named 'control'"),
        ("v2=10,v2=5", "given twice"),
        ("v2=101", "over 100%"),
        ("v2=60,v3=50", "add up to 110%"),
        ("v2", "not name=percent"),
        ("v2=-5", "not name=percent"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_split(text, AGENTS)


def test_users_keep_their_variant_and_raising_a_share_only_adds_users():
    users = [f"user-{i}" for i in range(20000)]
    assert [bucket_of(u) for u in users[:50]] == [bucket_of(u) for u in users[:50]]  # stable
    assert all(0 <= bucket_of(u) < BUCKETS for u in users[:1000])
    ten, fifty = Rollout(AGENTS, "v2=10"), Rollout(AGENTS, "v2=50")
    in_ten = {u for u in users if ten.assign(u)[1] == "v2"}
    in_fifty = {u for u in users if fifty.assign(u)[1] == "v2"}
    assert 0.09 < len(in_ten) / len(users) < 0.11 and 0.48 < len(in_fifty) / len(users) < 0.52
    assert in_ten <= in_fifty  # 10% -> 50%: everyone in v2 stays in v2
    agent, variant = ten.assign(next(iter(in_ten)))
    assert (agent.name, variant) == ("v2", "v2")
    agent, variant = ten.assign(next(u for u in users if u not in in_ten))
    assert (agent.name, variant) == ("atlas", CONTROL)
    two = Rollout(AGENTS, "v2=10,v3=10")
    counts = {v: sum(1 for u in users if two.assign(u)[1] == v) for v in ("v2", "v3", CONTROL)}
    assert all(0.09 < counts[v] / len(users) < 0.11 for v in ("v2", "v3")), counts
    assert Rollout(AGENTS, "").assign("anyone") == (AGENTS.get(None), None)  # no rollout: no variant
    assert Rollout(AGENTS, "v2=100").assign(None)[1] == "v2"


def test_the_rollout_file_is_followed_without_a_restart_and_a_bad_edit_keeps_the_last_good_split(tmp_path):
    path = tmp_path / "rollout.txt"
    write_rollout_file(path, "v2=10", AGENTS)
    clock = Clock()
    rollout = Rollout(AGENTS, path=path, clock=clock)
    assert str(rollout.current()) == "v2=10"
    write_rollout_file(path, "v2=50", AGENTS)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a later modification time, whatever the fs
    assert str(rollout.current()) == "v2=10"  # looked at no more than once a second
    clock.t += 1.5
    assert str(rollout.current()) == "v2=50"
    path.write_text("v2=500\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    clock.t += 1.5
    assert str(rollout.current()) == "v2=50"  # invalid: the last good split stays
    path.unlink()
    clock.t += 1.5
    assert rollout.current().shares == ()  # no file: no variants (everyone gets the default agent)


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "rollout", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_rollout_cli_sets_and_shows_and_refuses_an_unknown_agent(tmp_path):
    (tmp_path / "agents.toml").write_text(AGENT_FILE)
    env = {"ATLAS_AGENT_CONFIG": str(tmp_path / "agents.toml"), "ATLAS_ROLLOUT_FILE": str(tmp_path / "rollout.txt")}
    done = _cli("set", "v2=10", "v3=5", env=env)
    assert done.returncode == 0, done.stderr
    assert "v2=10,v3=5" in (tmp_path / "rollout.txt").read_text()
    shown = _cli("show", env=env)
    assert shown.returncode == 0 and "v2=10,v3=5" in shown.stdout and "atlas (control)" in shown.stdout
    bad = _cli("set", "v9=10", env=env)
    assert bad.returncode == 2 and "no agent named 'v9'" in bad.stderr
    assert "v2=10,v3=5" in (tmp_path / "rollout.txt").read_text()  # unchanged
    no_file = _cli("set", "v2=10", env={"ATLAS_AGENT_CONFIG": env["ATLAS_AGENT_CONFIG"]})
    assert no_file.returncode == 2 and "ATLAS_ROLLOUT_FILE" in no_file.stderr
    serve = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--port", "1"],
        cwd=REPO,
        env={**os.environ, "ATLAS_AGENT_CONFIG": env["ATLAS_AGENT_CONFIG"], "ATLAS_ROLLOUT": "v2=10,nobody=5"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert serve.returncode == 2 and "ATLAS_ROLLOUT: rollout: no agent named 'nobody'" in serve.stderr


@pytest.fixture(scope="module")
def rollout_server(artifacts, tmp_path_factory):
    """A server with three agents and a rollout file; Claude's key is never used (no session speaks)."""
    folder = tmp_path_factory.mktemp("rollout")
    (folder / "agents.toml").write_text(AGENT_FILE)
    (folder / "rollout.txt").write_text("v2=50\n")
    env = {
        "ATLAS_AGENT_CONFIG": str(folder / "agents.toml"),
        "ATLAS_ROLLOUT_FILE": str(folder / "rollout.txt"),
        "ATLAS_LLM": "anthropic",
        "ANTHROPIC_API_KEY": "unused",
        "ATLAS_LLM_FALLBACK": "apology",
    }
    log = artifacts / "server_rollout.log"
    with running_server(env, log) as base:
        yield base, folder / "rollout.txt", log.with_suffix(".sqlite3")


async def _session(url: str, user: str, agent: str | None = None) -> str:
    from app.talk import VoiceClient

    client = VoiceClient(url, user_id=user, agent=agent)
    await client.connect()
    await client.send_silence(0.2)
    await client.stop()
    assert client.session_id
    return client.session_id


def _rows(db: Path, ids: list[str]) -> dict[str, tuple]:
    deadline = time.monotonic() + 20
    while True:
        with sqlite3.connect(db) as conn:
            found = {
                r[0]: (r[1], r[2])
                for r in conn.execute(
                    f"SELECT id, agent, variant FROM voice_sessions WHERE id IN ({','.join('?' * len(ids))})", ids
                )
            }
        if len(found) == len(ids) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


@pytest.mark.slow
async def test_sessions_get_and_record_their_variant_and_follow_a_new_split_without_a_restart(rollout_server):
    base, rollout_file, db = rollout_server
    url = base.replace("http://", "ws://") + "/ws"
    half = Rollout(AGENTS, "v2=50")
    users = [f"browser-{uuid.UUID(int=i)}" for i in range(8)]
    # The server hashes the client's userId as this test does: each session gets the predicted variant.
    expected = {u: half.assign(u)[1] for u in users}
    assert set(expected.values()) == {"v2", CONTROL}, expected  # both sides are exercised
    ids = {u: await _session(url, u) for u in users}
    rows = _rows(db, list(ids.values()))
    for u, sid in ids.items():
        variant = expected[u]
        assert rows[sid] == ("v2" if variant == "v2" else "atlas", variant), (u, rows[sid])
    # A client that names its agent takes no part in the rollout.
    chosen = await _session(url, users[0], agent="v3")
    assert _rows(db, [chosen])[chosen] == ("v3", None)
    # 50% -> 100%: new sessions follow within a second, the server never restarted.
    rollout_file.write_text("v2=100\n")
    os.utime(rollout_file, ns=(time.time_ns(), time.time_ns() + 10**9))
    time.sleep(1.2)
    after = {u: await _session(url, u) for u in users[:4]}
    rows = _rows(db, list(after.values()))
    assert {rows[sid] for sid in after.values()} == {("v2", "v2")}, rows
    log = (Path(str(db).removesuffix(".sqlite3") + ".log")).read_text()
    assert "rollout: v2=50 -> v2=100" in log
