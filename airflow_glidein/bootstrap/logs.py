"""Pilot logs in Airflow object storage: <base>/<entry>/<pilot id>/<name>.

The base is ``[glidein] pilot_logs`` (an ObjectStoragePath URL, e.g.
``s3://bucket/glidein-logs`` with ``conn_id`` in it), by default
``file://$AIRFLOW_HOME/glidein-logs``. A name is one plain file name (no
``/``, no ``..``).

Quota is reserved before a byte is read: each upload takes its room (its
Content-Length, or the most it may write) in ``glidein_pilot_log_files``
in one transaction per pilot, so parallel uploads with one token cannot
together pass the per-pilot cap, nor the cap on files per pilot. An upload
streams into a hidden temporary object and replaces the named log only once
it is complete: an oversize, too slow or disconnected upload leaves the
earlier file as it was. Logs older than ``[glidein] pilot_log_retention_days``
are pruned (``prune``).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import anyio
from sqlalchemy import BigInteger, Column, Float, String, Table, delete, func, insert, select, text

from airflow_glidein.bootstrap.guard import env_stamp, number, setting
from airflow_glidein.state import METADATA, StateStore

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
MAX_FILE = 16 * 1024 * 1024
MAX_PILOT = 64 * 1024 * 1024
MAX_FILES = 32  # files per pilot (its HTCondor logs, stdout/stderr, the wrapper's log)
EARLY_MAX = 1024 * 1024  # bytes per file a bootstrap (UserData-readable) token may write before the exchange
IDLE_TIMEOUT = 30.0  # s an upload may send nothing
BODY_TIMEOUT = 600.0  # s an upload may take in all
RETENTION_DAYS = 30.0
BUFFER = 64 * 1024  # bytes of an upload held in memory before they go to its temporary object
STORED = ""  # the upload column of a stored file's row

files = Table(
    "glidein_pilot_log_files", METADATA,
    Column("entry", String(64), primary_key=True),
    Column("pilot_id", String(255), primary_key=True),
    Column("name", String(128), primary_key=True),
    Column("upload", String(64), primary_key=True),  # '' for the stored file, else an upload in flight
    Column("bytes", BigInteger, nullable=False),  # stored size, or the room an upload in flight holds
    Column("updated", Float, nullable=False),
)


class LogRefused(ValueError):
    def __init__(self, status: int, message: str, reason: str = "refused") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.retry_after: int | None = None


def check_name(name: str, what: str = "log name") -> str:
    if "/" in name or "\\" in name or ".." in name:
        raise LogRefused(400, f"{what} {name[:80]!r} refused: it may not contain '/', '\\' or '..'", "bad_request")
    if not NAME.match(name):
        raise LogRefused(400, f"{what} {name[:80]!r} refused: use 1-128 of A-Z a-z 0-9 _ . -", "bad_request")
    return name


@lru_cache(maxsize=4)
def _from_config(stamp: tuple[tuple[str, str], ...]) -> LogStore:
    return LogStore._read()


def _lock_pilot(conn: Any, entry: str, pilot_id: str) -> None:
    """Serialize one pilot's reservations (SQLite's BEGIN IMMEDIATE already serializes everything)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": f"glidein-logs/{entry}/{pilot_id}"})


@dataclass
class LogStore:
    base: Any  # ObjectStoragePath
    max_file: int = MAX_FILE
    max_pilot: int = MAX_PILOT
    max_files: int = MAX_FILES
    idle_timeout: float = IDLE_TIMEOUT
    body_timeout: float = BODY_TIMEOUT

    @classmethod
    def from_config(cls) -> LogStore:
        return _from_config(env_stamp())

    @classmethod
    def _read(cls) -> LogStore:
        from airflow.sdk import ObjectStoragePath

        home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
        base = setting("pilot_logs", f"file://{home}/glidein-logs")
        return cls(ObjectStoragePath(base), int(number("pilot_log_max_file_bytes", MAX_FILE)),
                   int(number("pilot_log_max_pilot_bytes", MAX_PILOT)), int(number("pilot_log_max_files", MAX_FILES)),
                   number("bootstrap_body_idle_timeout", IDLE_TIMEOUT), number("bootstrap_body_timeout", BODY_TIMEOUT))

    def pilot_dir(self, entry: str, pilot_id: str):
        return self.base / check_name(entry, "entry") / check_name(pilot_id, "pilot id")

    def list(self, entry: str, pilot_id: str) -> list[tuple[str, int]]:
        d = self.pilot_dir(entry, pilot_id)
        if not d.exists():
            return []
        return sorted((p.name, p.stat()["size"]) for p in d.iterdir() if NAME.match(p.name) and p.is_file())

    def pilots(self) -> list[tuple[str, str]]:
        if not self.base.exists():
            return []
        return sorted((e.name, p.name) for e in self.base.iterdir() if e.is_dir() for p in e.iterdir() if p.is_dir())

    def read(self, entry: str, pilot_id: str, name: str) -> bytes:
        path = self.pilot_dir(entry, pilot_id) / check_name(name)
        if not path.exists():
            raise LogRefused(404, f"pilot {pilot_id} at {entry} has no log {name}", "not_found")
        return path.read_bytes()

    # -- quota ------------------------------------------------------------
    def reserve(self, st: StateStore, entry: str, pilot_id: str, name: str, declared: int | None, cap: int,
                now: float) -> tuple[str, int]:
        """Take room for one upload: (upload id, bytes it may write). Refuses past the pilot's caps."""
        with st.begin() as conn:
            _lock_pilot(conn, entry, pilot_id)
            rows = conn.execute(select(files.c.name, files.c.bytes).where(
                files.c.entry == entry, files.c.pilot_id == pilot_id)).all()
            names = {r.name for r in rows}
            if name not in names and len(names) >= self.max_files:
                raise LogRefused(413, f"log {name} refused: pilot {pilot_id} has its {self.max_files} files",
                                 "too_many_files")
            left = self.max_pilot - sum(r.bytes for r in rows)
            room = min(cap, left) if declared is None else declared
            if room <= 0 or room > left:
                raise LogRefused(413, f"log {name}{'' if declared is None else f' of {declared} bytes'} refused: "
                                      f"over pilot {pilot_id}'s remaining log quota of {max(left, 0)} bytes", "quota")
            upload = secrets.token_hex(8)
            conn.execute(insert(files).values(entry=entry, pilot_id=pilot_id, name=name, upload=upload, bytes=room,
                                              updated=now))
        return upload, room

    def _settle(self, st: StateStore, entry: str, pilot_id: str, name: str, upload: str, size: int | None) -> None:
        """Drop an upload's reservation; with ``size``, record it as the stored file."""
        where = (files.c.entry == entry, files.c.pilot_id == pilot_id, files.c.name == name)
        with st.begin() as conn:
            _lock_pilot(conn, entry, pilot_id)
            conn.execute(delete(files).where(*where, files.c.upload.in_([upload] if size is None else [upload, STORED])))
            if size is not None:
                conn.execute(insert(files).values(entry=entry, pilot_id=pilot_id, name=name, upload=STORED,
                                                  bytes=size, updated=time.time()))

    # -- an upload ----------------------------------------------------------
    async def write(self, st: StateStore, entry: str, pilot_id: str, name: str, chunks: AsyncIterator[bytes],
                    declared: int | None = None, early: bool = False) -> int:
        """Store one upload under its reserved room; on any failure the earlier file stays and the room is freed."""
        check_name(name)
        cap = min(self.max_file, EARLY_MAX) if early else self.max_file
        why = "the per-file cap" + (" before the exchange" if early else "")
        if declared is not None and declared > cap:
            raise LogRefused(413, f"log {name} of {declared} bytes refused: over {why} of {cap} bytes", "too_large")
        upload, room = await anyio.to_thread.run_sync(
            self.reserve, st, entry, pilot_id, name, declared, cap, time.time())
        d = self.pilot_dir(entry, pilot_id)
        sink = _Sink(d, d / f".{name}.{upload}.part")
        try:
            size = await self._stream(chunks, sink, room, name)
            if declared is not None and size != declared:
                raise LogRefused(400, f"log {name}: {size} bytes came of the {declared} announced", "truncated")

            def finish() -> None:
                sink.finish(d / name)
                self._settle(st, entry, pilot_id, name, upload, size)

            await anyio.to_thread.run_sync(finish)
        except BaseException:
            def drop() -> None:
                sink.discard()
                self._settle(st, entry, pilot_id, name, upload, None)

            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(drop)
            raise
        return size

    async def _stream(self, chunks: AsyncIterator[bytes], sink: _Sink, room: int, name: str) -> int:
        from starlette.requests import ClientDisconnect

        size = 0
        it = chunks.__aiter__()
        try:
            with anyio.fail_after(self.body_timeout):
                while True:
                    with anyio.fail_after(self.idle_timeout):
                        try:
                            chunk = await it.__anext__()
                        except StopAsyncIteration:
                            return size
                    size += len(chunk)
                    if size > room:
                        raise LogRefused(413, f"log {name} cut off and refused at {room} bytes: over the room it "
                                              "had (per-file cap or the pilot's remaining quota)", "too_large")
                    if sink.add(chunk):
                        await anyio.to_thread.run_sync(sink.flush)
        except TimeoutError:
            raise LogRefused(408, f"log {name} refused: the upload was too slow ({size} bytes came; an upload may "
                                  f"pause {self.idle_timeout:g} s and take {self.body_timeout:g} s)", "slow") from None
        except ClientDisconnect:
            raise LogRefused(400, f"log {name}: the client disconnected after {size} bytes", "disconnected") from None

    # -- upkeep ------------------------------------------------------------
    def prune(self, st: StateStore, now: float, retention_days: float | None = None) -> dict[str, int]:
        """Delete logs stored longer ago than the retention, and what uploads that died left behind."""
        days = number("pilot_log_retention_days", RETENTION_DAYS) if retention_days is None else retention_days
        stale_upload = now - 2 * self.body_timeout
        with st.begin() as conn:
            old = conn.execute(select(files).where(
                ((files.c.upload == STORED) & (files.c.updated < now - days * 86400))
                | ((files.c.upload != STORED) & (files.c.updated < stale_upload)))).all()
        pilots = set()
        for r in old:
            d = self.pilot_dir(r.entry, r.pilot_id)
            _unlink(d / (r.name if r.upload == STORED else f".{r.name}.{r.upload}.part"))
            pilots.add((r.entry, r.pilot_id))
            with st.begin() as conn:
                conn.execute(delete(files).where(files.c.entry == r.entry, files.c.pilot_id == r.pilot_id,
                                                 files.c.name == r.name, files.c.upload == r.upload))
        for entry, pilot_id in pilots:
            with st.begin() as conn:
                left = conn.execute(select(func.count()).select_from(files).where(
                    files.c.entry == entry, files.c.pilot_id == pilot_id)).scalar_one()
            if not left:
                _rmdir(self.pilot_dir(entry, pilot_id))
        return {"logs": sum(r.upload == STORED for r in old), "uploads": sum(r.upload != STORED for r in old)}


class _Sink:
    """Where an upload goes: memory first (a small log is written in one go), its temporary object once
    more than BUFFER bytes are held; ``finish`` puts it in place, ``discard`` drops it."""

    def __init__(self, folder: Any, part: Any) -> None:
        self.folder, self.part, self.f = folder, part, None
        self.held: list[bytes] = []
        self.size = 0

    def add(self, chunk: bytes) -> bool:
        """Hold ``chunk``; True when the held bytes should be flushed."""
        self.held.append(chunk)
        self.size += len(chunk)
        return self.size >= BUFFER

    def flush(self) -> None:
        if self.f is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.f = self.part.open("wb")
        self.f.write(b"".join(self.held))
        self.held, self.size = [], 0

    def finish(self, target: Any) -> None:
        self.flush()
        self.f.close()
        self.f = None
        self.part.rename(target)

    def discard(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        _unlink(self.part)


def _unlink(path: Any) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _rmdir(path: Any) -> None:
    try:
        path.rmdir()
    except OSError:  # not empty (a log from before the quota table), or object storage without directories
        pass
