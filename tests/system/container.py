"""Debian 12 and 13 containers booted with systemd-nspawn, in a network namespace of their own.

One root file system per release is debootstrapped once and cached on the
machine (``MAILGRAVE_SYSTEST_CACHE``, default /var/cache/mailgrave-systest,
one ``RELEASE/rootfs`` each); every boot runs it with ``--volatile=overlay``,
so the cache stays pristine and each run starts from the same state.  The
mirror is the one this machine's apt uses, read at run time.  Commands run
inside with ``nsenter`` (there is no host systemd for ``machinectl``).  See
../../../shared/SYSTEMD-TESTING.md.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

CACHE = Path(os.environ.get("MAILGRAVE_SYSTEST_CACHE", "/var/cache/mailgrave-systest"))
# Debian 12 (systemd 252, Python 3.11) and Debian 13 (systemd 257, Python 3.13).
RELEASES = ("bookworm", "trixie")
# Before there was one root per release, the Debian 12 root lived here.
OLD_BOOKWORM_ROOTFS = CACHE / "rootfs"
SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
SOURCES_LIST = Path("/etc/apt/sources.list")
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


def mirror_from_sources(deb822: str | None, one_line: str | None) -> str:
    """The Debian mirror apt uses: the first ``URIs:`` of the first stanza of
    debian.sources, else the URL of the first ``deb`` line of sources.list."""
    if deb822:
        stanza = re.split(r"\n\s*\n", deb822.strip(), maxsplit=1)[0]
        m = re.search(r"^URIs:[ \t]*(\S+)", stanza, re.M | re.I)
        if m:
            return m.group(1)
    for line in (one_line or "").splitlines():
        words = line.split("#", 1)[0].split()
        if words[:1] == ["deb"]:
            words = words[1:]
            if words and words[0].startswith("["):  # options: [arch=amd64 signed-by=...]
                while words and not words[0].endswith("]"):
                    words = words[1:]
                words = words[1:]
            if words:
                return words[0]
    raise RuntimeError(f"no Debian mirror in {SOURCES} or {SOURCES_LIST}")


def mirror() -> str:
    def read(path: Path) -> str | None:
        try:
            return path.read_text()
        except OSError:
            return None

    return mirror_from_sources(read(SOURCES), read(SOURCES_LIST))


def rootfs_path(release: str) -> Path:
    return CACHE / release / "rootfs"


def _bootable(root: Path) -> bool:
    return (root / "usr/lib/systemd/systemd").exists()


CONTROL = Path(__file__).resolve().parents[2] / "debian" / "control"


def runtime_depends(control: str | None = None) -> list[str]:
    """The Debian packages the .deb depends on (debian/control), without the
    substitution variables: the container has no network to fetch them at
    install time, so the cached root must already hold them."""
    text = CONTROL.read_text() if control is None else control
    m = re.search(r"^Package:.*?^Depends:(.*?)^\S", text, re.S | re.M)
    assert m, "no Depends: in debian/control"
    names = [item.split()[0] for item in m.group(1).replace("\n", " ").split(",") if item.strip()]
    return [n for n in names if not n.startswith("$")]


def ensure_packages(root: Path) -> None:
    """Install into the cached ``root`` whatever of :func:`runtime_depends` it
    lacks (a root made before the package gained a dependency), over the host's
    network, in a non-booted nspawn."""
    wanted = runtime_depends()
    query = host(
        "chroot",
        str(root),
        "dpkg-query",
        "-W",
        "-f=${Package} ${db:Status-Abbrev}\n",
        *wanted,
        check=False,
    ).stdout
    installed = {f.split()[0] for f in query.splitlines() if f.split()[1:2] == ["ii"]}
    missing = [p for p in wanted if p not in installed]
    if not missing:
        return
    nspawn = ["systemd-nspawn", "-q", "-D", str(root), "--register=no", "--keep-unit"]
    env = ["env", "DEBIAN_FRONTEND=noninteractive"]
    host(*nspawn, *env, "apt-get", "update", "-qq", timeout=900)
    host(
        *nspawn,
        *env,
        "apt-get",
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        *missing,
        timeout=1800,
    )


def ensure_rootfs(release: str) -> Path:
    """The cached root of ``release``, debootstrapped on first use (about 90 s alone),
    with the package's runtime dependencies installed."""
    root = rootfs_path(release)
    if _bootable(root):
        ensure_packages(root)
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    if release == "bookworm" and _bootable(OLD_BOOKWORM_ROOTFS):
        OLD_BOOKWORM_ROOTFS.rename(root)  # the cache's old layout: keep it, do not fetch again
        ensure_packages(root)
        return root
    tmp = root.parent / "rootfs.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    host(
        "debootstrap",
        "--variant=minbase",
        f"--include={INCLUDE}",
        release,
        str(tmp),
        mirror(),
        timeout=1800,
    )
    tmp.rename(root)
    ensure_packages(root)
    return root


def ensure_rootfs_all(releases: tuple[str, ...] = RELEASES) -> dict[str, Path]:
    """Every release's root; the missing ones are debootstrapped side by side."""
    errors: list[BaseException] = []

    def one(release: str) -> None:
        try:
            ensure_rootfs(release)
        except BaseException as exc:  # reported below, in this thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(r,)) for r in releases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {r: rootfs_path(r) for r in releases}


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
        self.release = ""  # the Debian release booted, set by the test

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
