"""Simulated VMs: every new instance at the EC2 emulator boots the real pilot wrapper here.

The simulator watches moto (every ``poll`` s) and "boots" each new instance: a metadata stand-in
(IMDSv2) serves the instance's own UserData and id, and the real ``glidein-wrapper.sh`` runs under
``sh`` with every metadata URL, path and the power-off command pointed at this machine: it checks
the envelope, fetches the startup script from the bootstrap service behind the load balancer,
exchanges its token, and runs the soak's startd stand-in (``startd.py``) as condor_master, which
joins the pool stand-in and runs jobs from its queue. When the startd leaves (idle, retired, end of
life) the startup script uploads the logs and the wrapper "powers off": the simulator terminates the
instance, as EC2 does for an instance launched to terminate on shutdown. An instance the factory
terminates shuts its VM down: the wrapper gets SIGTERM, as systemd stops the pilot's unit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.soak.cloud import Cloud, tags, userdata
from tests.standins.metadata import MetadataServer

REPO = Path(__file__).resolve().parents[2]
WRAPPER = REPO / "airflow_glidein" / "pilot" / "glidein-wrapper.sh"
STARTD = Path(__file__).resolve().parent / "startd.py"
LIVE = ("pending", "running")


@dataclass
class VM:
    region: str
    instance_id: str
    tags: dict[str, str]
    root: Path
    booted: float = 0.0
    proc: subprocess.Popen | None = None
    exit_code: int | None = None
    powered_off: float | None = None  # the wrapper powered the VM off
    shut_down: float | None = None  # the provider terminated it (the VM got SIGTERM)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def entry(self) -> str:
        return self.tags.get("glidein:entry", "")


class VMSimulator:
    def __init__(self, cloud: Cloud, regions: list[str], root: Path, pubkey: str, pool_url: str,
                 poll: float = 1.0, shutdown_grace: float = 60.0, boot_delay: float = 10.0) -> None:
        self.cloud, self.regions, self.root = cloud, regions, root
        self.pubkey = root / "factory.pub"
        root.mkdir(parents=True, exist_ok=True)
        self.pubkey.write_text(pubkey)
        self.pool_url, self.poll, self.shutdown_grace = pool_url, poll, shutdown_grace
        self.boot_delay = boot_delay  # s from "running" to the wrapper's start (firmware, kernel, systemd)
        self.vms: dict[str, VM] = {}
        self.terminated_at: dict[str, float] = {}  # instance id -> when the simulator first saw it gone
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="vmsim")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        for vm in self.vms.values():
            if vm.proc and vm.proc.poll() is None:
                _signal(vm.proc, signal.SIGKILL)

    def _watch(self) -> None:
        while not self._stop.is_set():
            for region in self.regions:
                for inst in self.cloud.instances(region):
                    state = inst.state
                    vm = self.vms.get(inst.id)
                    if state not in LIVE:
                        self.terminated_at.setdefault(inst.id, time.time())
                        if vm and not vm.done.is_set() and vm.shut_down is None and vm.powered_off is None:
                            vm.shut_down = time.time()
                            threading.Thread(target=self._shutdown, args=(vm,), daemon=True).start()
                        continue
                    if vm is None and tags(inst).get("glidein:factory"):
                        vm = self.vms[inst.id] = VM(region, inst.id, tags(inst), self.root / inst.id)
                        threading.Thread(target=self._boot, args=(vm, userdata(inst)), daemon=True,
                                         name=f"vm-{inst.id}").start()
            self._stop.wait(self.poll)

    def _boot(self, vm: VM, data: bytes) -> None:
        if self._stop.wait(self.boot_delay) or vm.shut_down is not None:
            vm.done.set()  # terminated before its OS came up: nothing ran, nothing to upload
            return
        vm.root.mkdir(parents=True)
        bin_dir = vm.root / "bin"
        bin_dir.mkdir()
        master = bin_dir / "condor_master"
        master.write_text(f"#!{sys.executable}\n" + STARTD.read_text())
        master.chmod(0o755)
        dead = "http://127.0.0.1:9"
        env = {
            "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(vm.root),
            "AWS_EC2_METADATA_DISABLED": "true",
            "GLIDEIN_WRAPPER_CONF": str(vm.root / "no-wrapper.conf"),
            "GLIDEIN_WORKDIR": str(vm.root / "var-lib-glidein"),
            "GLIDEIN_OPENSTACK_METADATA_URL": f"{dead}/openstack/latest",
            "GLIDEIN_CONFIG_DRIVE_DIR": str(vm.root / "no-config-drive"),
            "GLIDEIN_ONE_CONTEXT": str(vm.root / "no-context.sh"),
            "GLIDEIN_USERDATA_SOURCES": "imdsv2",
            "GLIDEIN_PUBKEY_FILE": str(self.pubkey),
            "GLIDEIN_POWEROFF_CMD": f"touch {vm.root / 'poweroff'}",
            "GLIDEIN_CONNECT_TIMEOUT": "5",
            "GLIDEIN_HTTP_TIMEOUT": "60",
            "GLIDEIN_SOAK_POOL_URL": self.pool_url,
        }
        with MetadataServer("imdsv2", data, vm.instance_id) as imds:
            env["GLIDEIN_IMDS_URL"] = imds.url
            vm.booted = time.time()
            with open(vm.root / "console.log", "wb") as console:
                vm.proc = subprocess.Popen(["sh", str(WRAPPER)], env=env, stdout=console, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
                vm.exit_code = vm.proc.wait()
        if (vm.root / "poweroff").exists():
            vm.powered_off = time.time()
            try:
                self.cloud.terminate(vm.region, vm.instance_id)
            except Exception:  # already terminated by the factory
                pass
        vm.done.set()

    def _shutdown(self, vm: VM) -> None:
        """The provider terminated the instance: the VM shuts down (SIGTERM, then off after a grace)."""
        while vm.proc is None and not vm.done.is_set():
            time.sleep(0.1)
        if vm.proc is not None and vm.proc.poll() is None:
            _signal(vm.proc, signal.SIGTERM)
            if not vm.done.wait(self.shutdown_grace):
                _signal(vm.proc, signal.SIGKILL)

    def live(self) -> list[VM]:
        return [vm for vm in self.vms.values() if not vm.done.is_set()]


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
