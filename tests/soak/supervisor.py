"""Restart what dies, as systemd would (Restart=always, RestartSec, KillMode=control-group).

Each service runs in a process group of its own; when its main process dies, whatever is left of
the group is killed before the service starts again, as systemd stops a unit's cgroup.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    restart_sec: float = 2.0
    proc: subprocess.Popen | None = None
    starts: int = 0
    exits: list[tuple[float, int]] = field(default_factory=list)  # (when, return code)


class Supervisor:
    def __init__(self) -> None:
        self.services: dict[str, Service] = {}
        self.events: list[tuple[float, str, str]] = []  # (time, service, what)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="supervisor")

    def add(self, name: str, argv: list[str], env: dict[str, str], log: Path, restart_sec: float = 2.0) -> Service:
        self.services[name] = Service(name, argv, env, log, restart_sec)
        return self.services[name]

    def start(self, name: str) -> None:
        svc = self.services[name]
        with open(svc.log, "ab") as out:
            svc.proc = subprocess.Popen(svc.argv, env=svc.env, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        svc.starts += 1
        self.events.append((time.time(), name, f"started (pid {svc.proc.pid})"))

    def run(self) -> None:
        for name in self.services:
            self.start(name)
        self._thread.start()

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """A crash: the service's main process gets ``sig``; the watcher restarts the service."""
        svc = self.services[name]
        self.events.append((time.time(), name, f"sent {signal.Signals(sig).name}"))
        os.kill(svc.proc.pid, sig)

    def _watch(self) -> None:
        while not self._stopping.is_set():
            for svc in list(self.services.values()):
                rc = svc.proc.poll() if svc.proc else None
                if rc is None or self._stopping.is_set():
                    continue
                svc.exits.append((time.time(), rc))
                self.events.append((time.time(), svc.name, f"exited {rc}; restarting in {svc.restart_sec} s"))
                _kill_group(svc.proc.pid, signal.SIGKILL)
                time.sleep(svc.restart_sec)
                if not self._stopping.is_set():
                    self.start(svc.name)
            self._stopping.wait(0.5)

    def restarts(self) -> dict[str, int]:
        return {name: svc.starts - 1 for name, svc in self.services.items()}

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        for svc in self.services.values():
            if svc.proc and svc.proc.poll() is None:
                _kill_group(svc.proc.pid, signal.SIGTERM)
        deadline = time.time() + timeout
        for svc in self.services.values():
            if svc.proc:
                try:
                    svc.proc.wait(max(0.1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    pass
                _kill_group(svc.proc.pid, signal.SIGKILL)


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
