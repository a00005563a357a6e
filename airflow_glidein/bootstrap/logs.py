"""Pilot logs in Airflow object storage: <base>/<entry>/<pilot id>/<name>.

The base is ``[glidein] pilot_logs`` (an ObjectStoragePath URL, e.g.
``s3://bucket/glidein-logs`` with ``conn_id`` in it), by default
``file://$AIRFLOW_HOME/glidein-logs``. Uploads are streamed and capped per
file and per pilot; a name is one plain file name (no ``/``, no ``..``).
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio

NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
MAX_FILE = 16 * 1024 * 1024
MAX_PILOT = 64 * 1024 * 1024


class LogRefused(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_name(name: str, what: str = "log name") -> str:
    if "/" in name or "\\" in name or ".." in name:
        raise LogRefused(400, f"{what} {name[:80]!r} refused: it may not contain '/', '\\' or '..'")
    if not NAME.match(name):
        raise LogRefused(400, f"{what} {name[:80]!r} refused: use 1-128 of A-Z a-z 0-9 _ . -")
    return name


def _setting(key: str, default: str) -> str:
    from airflow.sdk import conf

    return conf.get("glidein", key, fallback=None) or default


@dataclass
class LogStore:
    base: object  # ObjectStoragePath
    max_file: int = MAX_FILE
    max_pilot: int = MAX_PILOT

    @classmethod
    def from_config(cls) -> LogStore:
        from airflow.sdk import ObjectStoragePath

        home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
        base = _setting("pilot_logs", f"file://{home}/glidein-logs")
        return cls(ObjectStoragePath(base), int(_setting("pilot_log_max_file_bytes", str(MAX_FILE))),
                   int(_setting("pilot_log_max_pilot_bytes", str(MAX_PILOT))))

    def pilot_dir(self, entry: str, pilot_id: str):
        return self.base / check_name(entry, "entry") / check_name(pilot_id, "pilot id")

    def list(self, entry: str, pilot_id: str) -> list[tuple[str, int]]:
        d = self.pilot_dir(entry, pilot_id)
        if not d.exists():
            return []
        return sorted((p.name, p.stat()["size"]) for p in d.iterdir() if p.is_file())

    def pilots(self) -> list[tuple[str, str]]:
        if not self.base.exists():
            return []
        return sorted((e.name, p.name) for e in self.base.iterdir() if e.is_dir() for p in e.iterdir() if p.is_dir())

    def read(self, entry: str, pilot_id: str, name: str) -> bytes:
        path = self.pilot_dir(entry, pilot_id) / check_name(name)
        if not path.exists():
            raise LogRefused(404, f"pilot {pilot_id} at {entry} has no log {name}")
        return path.read_bytes()

    async def write(self, entry: str, pilot_id: str, name: str, chunks: AsyncIterator[bytes],
                    declared: int | None = None) -> int:
        """Store one upload; past a cap, stop reading, drop what was written and refuse."""
        check_name(name)
        d = self.pilot_dir(entry, pilot_id)
        others = sum(size for n, size in self.list(entry, pilot_id) if n != name)
        cap = min(self.max_file, self.max_pilot - others)
        why = (f"the per-file cap of {self.max_file} bytes" if cap == self.max_file
               else f"pilot {pilot_id}'s remaining log quota of {max(cap, 0)} bytes")
        if declared is not None and declared > cap:
            raise LogRefused(413, f"log {name} of {declared} bytes refused: over {why}")
        await anyio.to_thread.run_sync(lambda: d.mkdir(parents=True, exist_ok=True))
        path = d / name
        size = 0
        f = await anyio.to_thread.run_sync(path.open, "wb")
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > cap:
                    break
                await anyio.to_thread.run_sync(f.write, chunk)
        finally:
            await anyio.to_thread.run_sync(f.close)
        if size > cap:
            await anyio.to_thread.run_sync(path.unlink)
            raise LogRefused(413, f"log {name} cut off and refused at {cap} bytes: over {why}")
        return size
