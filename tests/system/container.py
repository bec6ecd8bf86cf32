"""A Debian 12 container booted with systemd-nspawn, in a network namespace of its own.

The root file system is debootstrapped once and cached on the machine
(``MAILGRAVE_SYSTEST_CACHE``, default /var/cache/mailgrave-systest); every
boot runs it with ``--volatile=overlay``, so the cache stays pristine and each
run starts from the same state.  Commands run inside with ``nsenter`` (there
is no host systemd for ``machinectl``).  See ../../../shared/SYSTEMD-TESTING.md.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

CACHE = Path(os.environ.get("MAILGRAVE_SYSTEST_CACHE", "/var/cache/mailgrave-systest"))
ROOTFS = CACHE / "rootfs"
MIRROR = "http://deb.debian.org/debian"
INCLUDE = (
    "systemd,systemd-sysv,dbus,python3,python3-systemd,python3-yaml,python3-dnspython,"
    "iproute2,procps"
)
DEBIAN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
}

NETNS = "mgsys"
VETH_HOST = "mgh"
VETH_CONTAINER = "mgc"
HOST_ADDR = "10.77.0.1"
CONTAINER_ADDR = "10.77.0.2"
MACHINE = "mgtest"


def host(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a command on the host with Debian's PATH."""
    return subprocess.run(
        list(args), env=DEBIAN_ENV, capture_output=True, text=True, check=check, timeout=timeout
    )


def ensure_rootfs() -> Path:
    """The cached Debian 12 root, debootstrapped on first use (about 90 s)."""
    if (ROOTFS / "usr/lib/systemd/systemd").exists():
        return ROOTFS
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / "rootfs.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    host(
        "debootstrap",
        "--variant=minbase",
        f"--include={INCLUDE}",
        "bookworm",
        str(tmp),
        MIRROR,
        timeout=1800,
    )
    tmp.rename(ROOTFS)
    return ROOTFS


def remove_network() -> None:
    host("ip", "netns", "del", NETNS, check=False)
    host("ip", "link", "del", VETH_HOST, check=False)


def make_network() -> None:
    """A namespace with a veth pair: the host is 10.77.0.1, the container 10.77.0.2."""
    remove_network()
    host("ip", "netns", "add", NETNS)
    host("ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_CONTAINER)
    host("ip", "link", "set", VETH_CONTAINER, "netns", NETNS)
    host("ip", "addr", "add", f"{HOST_ADDR}/24", "dev", VETH_HOST)
    host("ip", "link", "set", VETH_HOST, "up")
    ns = ("ip", "netns", "exec", NETNS)
    host(*ns, "ip", "addr", "add", f"{CONTAINER_ADDR}/24", "dev", VETH_CONTAINER)
    host(*ns, "ip", "link", "set", VETH_CONTAINER, "up")
    host(*ns, "ip", "link", "set", "lo", "up")


class Container:
    """One booted container; ``run()`` executes inside it."""

    def __init__(self, rootfs: Path, binds: dict[str, str], log: Path) -> None:
        self.rootfs = rootfs
        self.binds = binds
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self.deb = ""  # the package's path inside, set by the test

    def boot(self, timeout: float = 90) -> None:
        make_network()
        args = [
            "systemd-nspawn",
            "-D",
            str(self.rootfs),
            "-M",
            MACHINE,
            "--register=no",
            "--keep-unit",
            "--volatile=overlay",
            f"--network-namespace-path=/run/netns/{NETNS}",
            "-b",
        ]
        args += [f"--bind-ro={src}:{dst}" for src, dst in self.binds.items()]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=DEBIAN_ENV,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        state = ""
        while state not in ("running", "degraded"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"container did not boot ({state}):\n{self.log.read_text()}")
            time.sleep(0.3)
            # nspawn's first child may be a short-lived helper: the leader is its
            # child that runs systemd (looked up again until the state answers).
            self.leader = self._find_leader()
            if self.leader:
                result = self.run("systemctl", "is-system-running", check=False)
                state = result.stdout.strip()

    def _find_leader(self) -> int:
        assert self.proc is not None
        children = host("pgrep", "-P", str(self.proc.pid), check=False).stdout.split()
        for pid in children:
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if comm == "systemd":
                return int(pid)
        return 0

    def run(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (all its namespaces), Debian's PATH, no host env."""
        cmd = ["nsenter", "-t", str(self.leader), "-a", "env", "-i"]
        cmd += [f"{k}={v}" for k, v in DEBIAN_ENV.items()]
        cmd += ["DEBIAN_FRONTEND=noninteractive", *args]
        result = subprocess.run(
            cmd, input=input, capture_output=True, text=True, timeout=timeout, env=DEBIAN_ENV
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"inside: {' '.join(args)} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def shutdown(self) -> None:
        """Stop nspawn by its PID (SIGTERM powers the container off), then the network."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        remove_network()
