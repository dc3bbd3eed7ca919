"""Rollout by percentage: named variants (agents of the agent file) for a share of the users each.

`ATLAS_ROLLOUT="v2=10"` gives the agent `v2` to 10% of the users and the default agent to the rest (`control`);
several variants split further (`"v2=10,v3=5"`). A user's share is a stable hash of who they are (the verified
user id, else the id the client gives, else the phone number or address), so a user keeps their variant from one
session to the next, and raising a variant's share (10% -> 50% -> 100%) keeps everyone it had and adds others.
Changing the order of the variants or the shares of those before it moves some users between variants.

With ATLAS_ROLLOUT_FILE the rollout is read from that file instead (the same text; lines and `#` comments
allowed) and read again whenever it changes, so new sessions follow a new split without a restart (`atlas-voice
rollout set "v2=50"` writes it; a Kubernetes ConfigMap mounted there updates it in place). A file that turns
unreadable or invalid keeps the last good rollout, with an error in the log.

A session whose client asks for an agent by name gets it and takes no part in the rollout (its `variant` is
NULL); the others record theirs (`voice_sessions.variant`: the variant's name, or `control`).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from config.agents import Agent, Agents

CONTROL = "control"
BUCKETS = 10_000  # shares are kept to 0.01%
RECHECK_SECS = 1.0  # how often the file's modification time is looked at (at most, on new sessions)
_ITEM = re.compile(r"^\s*([A-Za-z0-9_-]{1,64})\s*=\s*([0-9]+(?:\.[0-9]+)?)\s*%?\s*$")


@dataclass(frozen=True)
class Split:
    """The variants and their shares in percent, in the order given (each takes the next range of buckets)."""

    shares: tuple[tuple[str, float], ...] = ()

    def text(self) -> str:
        """As ATLAS_ROLLOUT writes it ("" when no variant)."""
        return ",".join(f"{name}={share:g}" for name, share in self.shares)

    def __str__(self) -> str:
        return self.text() or "(no variants)"

    def pick(self, bucket: int) -> str:
        """The variant of a user in `bucket` (0 .. BUCKETS-1), or CONTROL."""
        edge = 0.0
        for name, share in self.shares:
            edge += share * BUCKETS / 100
            if bucket < edge:
                return name
        return CONTROL


def parse_split(text: str, agents: Agents) -> Split:
    """`name=percent` items separated by commas or lines (`#` starts a comment); ValueError says what is wrong:
    an unknown agent, the default agent as a variant, a variant twice, a share over 100 or shares over 100 in all."""
    shares: list[tuple[str, float]] = []
    for line in text.splitlines():
        for item in line.split("#", 1)[0].split(","):
            if not item.strip():
                continue
            m = _ITEM.match(item)
            if not m:
                raise ValueError(f"rollout: {item.strip()[:80]!r} is not name=percent (e.g. v2=10)")
            name, share = m.group(1), float(m.group(2))
            if name not in agents.by_name:
                raise ValueError(
                    f"rollout: no agent named {name!r} (the agents: {', '.join(agents.names)}; ATLAS_AGENT_CONFIG)"
                )
            if name == agents.default or name == CONTROL:
                raise ValueError(f"rollout: {name!r} is the default agent, which every other user gets")
            if any(name == n for n, _ in shares):
                raise ValueError(f"rollout: {name!r} is given twice")
            if share > 100:
                raise ValueError(f"rollout: {name}={share:g} is over 100%")
            shares.append((name, share))
    total = sum(s for _, s in shares)
    if total > 100 + 1e-9:
        raise ValueError(f"rollout: the shares add up to {total:g}%, over 100%")
    return Split(tuple(shares))


def bucket_of(key: str) -> int:
    """A user's stable place, 0 .. BUCKETS-1: the first 8 bytes of SHA-256 of their key."""
    digest = hashlib.sha256(b"atlas-rollout\x00" + key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


class Rollout:
    """The server's rollout: from ATLAS_ROLLOUT, or ATLAS_ROLLOUT_FILE read again when it changes."""

    def __init__(self, agents: Agents, text: str = "", path: Path | None = None, clock=time.monotonic):
        self.agents = agents
        self.path = path
        self._clock = clock
        self._mtime: float | None = None
        self._checked = -1e9
        if path is not None:
            self.split = parse_split(path.read_text() if path.exists() else "", agents)
            self._mtime = _mtime(path)
        else:
            self.split = parse_split(text, agents)

    @property
    def active(self) -> bool:
        return bool(self.current().shares)

    def current(self) -> Split:
        """The split in force (the file read again if it changed since the last look, at most every second)."""
        if self.path is None:
            return self.split
        now = self._clock()
        if now - self._checked < RECHECK_SECS:
            return self.split
        self._checked = now
        mtime = _mtime(self.path)
        if mtime != self._mtime:
            self._mtime = mtime
            try:
                text = self.path.read_text() if mtime is not None else ""
                split = parse_split(text, self.agents)
            except (OSError, ValueError) as e:
                logger.error(f"rollout: {self.path} not applied, {self.split} stays in force: {e}")
                return self.split
            if split != self.split:
                logger.info(f"rollout: {self.split} -> {split} (from {self.path}), for sessions from now on")
                self.split = split
        return self.split

    def assign(self, key: str | None) -> tuple[Agent, str | None]:
        """The agent for a session whose client named none, and its variant (None when no rollout is active)."""
        split = self.current()
        if not split.shares:
            return self.agents.get(None), None
        variant = split.pick(bucket_of(key or ""))
        return self.agents.get(None if variant == CONTROL else variant), variant


def rollout_from_settings(settings, agents: Agents) -> Rollout:
    """The server's rollout (ATLAS_ROLLOUT_FILE, else ATLAS_ROLLOUT); ValueError says what is wrong with it."""
    if settings.rollout_file is not None:
        if settings.rollout.strip():
            raise ValueError("set ATLAS_ROLLOUT or ATLAS_ROLLOUT_FILE, not both")
        path = Path(settings.rollout_file)
        try:
            return Rollout(agents, path=path)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        except OSError as e:
            raise ValueError(f"ATLAS_ROLLOUT_FILE {path}: {e.strerror or e}") from None
    try:
        return Rollout(agents, settings.rollout)
    except ValueError as e:
        raise ValueError(f"ATLAS_ROLLOUT: {e}") from None


def _mtime(path: Path) -> float | None:
    try:
        return os.stat(path).st_mtime_ns / 1e9
    except OSError:
        return None


def write_rollout_file(path: Path, text: str, agents: Agents) -> Split:
    """Check `text` and write it to `path` atomically (a rename), for `atlas-voice rollout set`."""
    split = parse_split(text, agents)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(
        f"# Atlas rollout (ATLAS_ROLLOUT_FILE): variant=percent; the rest get the default agent\n{split.text()}\n"
    )
    os.replace(tmp, path)
    return split
