"""Shared test fixtures: free ports, MailGrave instances in temp dirs, process clean-up by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import settings

BIN = Path(sys.executable).parent

# The property tests check behaviour, not speed: on a loaded machine (CI, or a
# system test beside them) an example may take longer than hypothesis's
# default 200 ms deadline, which would fail a correct test.
settings.register_profile("mailgrave", deadline=None)
settings.load_profile("mailgrave")
ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """Delivery runs as other users (never root), so test dirs must be reachable by them.

    pytest makes its shared /tmp/pytest-of-USER private again at every run;
    give this run a base directory of its own that other uids can traverse.
    """
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        import tempfile

        base = tempfile.mkdtemp(prefix="mailgrave-tests-")
        os.chmod(base, 0o711)
        config.option.basetemp = base
        config._mailgrave_basetemp = base  # type: ignore[attr-defined]


def pytest_unconfigure(config: pytest.Config) -> None:
    base = getattr(config, "_mailgrave_basetemp", None)
    if base and not os.environ.get("MAILGRAVE_KEEP_TEST_DIRS"):
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now, chosen by the kernel."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def program(name: str) -> str:
    """Path of one of the project's console scripts in the test venv."""
    path = BIN / name
    assert path.exists(), f"{path} missing: run the tests through `make test`"
    return str(path)


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll ``predicate()`` until it returns something true; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        time.sleep(interval)


class Processes:
    """Processes a test started; all are killed (by PID, whole process group) at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(args, **kwargs)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()


@pytest.fixture
def processes() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.stop_all()


class Instance:
    """A MailGrave configuration in a temp dir: spool, run dir, mailboxes."""

    def __init__(self, base: Path, **overrides: Any) -> None:
        self.base = base
        self.spool = base / "spool"
        self.run_dir = base / "run"
        self.mail = base / "mail"
        self.config_path = base / "mailgrave.yaml"
        self.settings: dict[str, Any] = {
            "hostname": "mx.example.org",
            "spool": str(self.spool),
            "run_dir": str(self.run_dir),
            "local_domains": ["example.org"],
            "local": {
                "aliases": str(base / "aliases"),
                "mbox_dir": str(self.mail / "spool"),
                # Delivery never runs as root: as root, virtual mail goes as nobody.
                "virtual_user": VIRTUAL_USER,
                "virtual": {
                    "alice@example.org": str(self.mail / "alice" / "Maildir") + "/",
                    "bob@example.org": str(self.mail / "bob" / "Maildir") + "/",
                    "postmaster@example.org": str(self.mail / "postmaster" / "Maildir") + "/",
                },
            },
            # Never let a test's lookups reach the machine's resolver.
            "remote": {"dns": {"nameservers": ["127.0.0.1"], "port": 9, "timeout": "2s"}},
            # Sender checks ask DNS (here: nobody) for every client outside
            # relay_networks; the tests of the checks turn them on.
            "checks": {"spf": "off", "dkim": "off", "dmarc": "off"},
        }
        _merge(self.settings, overrides)
        (base / "aliases").touch()
        make_traversable(base)
        self.mail.mkdir(exist_ok=True)
        if os.getuid() == 0:
            import pwd

            pw = pwd.getpwnam(VIRTUAL_USER)
            os.chown(self.mail, pw.pw_uid, pw.pw_gid)
        self.write_config()

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.settings))

    def maildir(self, user: str) -> Path:
        return self.mail / user / "Maildir"

    def messages(self, user: str) -> list[bytes]:
        """Messages delivered to a virtual user's Maildir (new/), oldest first."""
        new = self.maildir(user) / "new"
        if not new.is_dir():
            return []
        # By arrival: names sort by second only (two in one second may not be in order).
        files = sorted(new.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [p.read_bytes() for p in files]

    def start(
        self, processes: Processes, listen: str | None = None, retry_interval: float = 1.0
    ) -> subprocess.Popen[bytes]:
        """Run the whole chain (`mailgrave run`) for this instance; wait until it listens."""
        args = [program("mailgrave"), "--config", str(self.config_path), "run"]
        args += ["--retry-interval", str(retry_interval)]
        if listen:
            args += ["--listen", listen]
        self.log = self.base / "run.log"
        with self.log.open("wb") as log:
            proc = processes.start(args, stdout=subprocess.DEVNULL, stderr=log)
        wait_for(lambda: (self.run_dir / "queue.ctrl").exists() or proc.poll() is not None)
        assert proc.poll() is None, self.log.read_text()[-3000:]
        if listen:
            host, _, port = listen.rpartition(":")
            wait_for(lambda: _connectable(host.strip("[]"), int(port)))
        return proc

    def sendmail(
        self, *args: str, data: bytes, **kwargs: Any
    ) -> subprocess.CompletedProcess[bytes]:
        """mailgrave-inject (sendmail interface) with this instance's config."""
        return self.run("mailgrave-inject", *args, input=data, **kwargs)

    def spool_entries(self) -> list[str]:
        """Every file left in the spool's message directories."""
        found = []
        for sub in ("tmp", "todo", "mess", "info"):
            d = self.spool / sub
            if d.is_dir():
                found += [f"{sub}/{n}" for n in os.listdir(d)]
        return found

    def queued(self) -> list[tuple[str, bytes, bytes]]:
        """(queue id, envelope, message) of every new entry in todo/, oldest first."""
        todo = self.spool / "todo"
        return [(n, *read_spool_file(todo / n)) for n in sorted(os.listdir(todo))]

    def run(self, name: str, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("timeout", 60)
        return subprocess.run([program(name), "--config", str(self.config_path), *args], **kwargs)


def read_spool_file(path: Path) -> tuple[bytes, bytes]:
    """(envelope, message) of a spool file, parsed as docs/queue.md describes it:
    ``MGQ1 <length>`` LF, that many bytes of envelope, then the message."""
    data = path.read_bytes()
    line, newline, rest = data.partition(b"\n")
    assert newline and line.startswith(b"MGQ1 ") and line[5:].isdigit(), data[:40]
    length = int(line[5:])
    assert rest[length - 2 : length] == b"\0\0"  # text0: the envelope ends with NUL NUL
    return rest[:length], rest[length:]


def write_spool_file(path: Path, message: bytes, envelope: bytes = b"F\0Tx@y.z\0\0") -> Path:
    """A spool file as docs/queue.md describes it (the form every delivery agent
    reads): ``MGQ1 <length>`` LF, the envelope, then ``message``."""
    path.write_bytes(b"MGQ1 %d\n" % len(envelope) + envelope + message)
    return path


def _connectable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


VIRTUAL_USER = "nobody" if os.getuid() == 0 else _current_user()
# As root, smtpd, queue, send and remote refuse to start by hand without --user
# (mailgrave-smtpd(8)): a test that starts one by hand stays who it is, on purpose.
SAME_USER = ("--user", _current_user())


def make_traversable(path: Path) -> None:
    """Let other users (the delivery uids) reach ``path`` inside the temp dir."""
    import stat
    import tempfile

    top = Path(tempfile.gettempdir()).resolve()
    for p in [path.resolve(), *path.resolve().parents]:
        if p == top or top not in p.parents:
            break
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode & 0o011 != 0o011:
            p.chmod(mode | 0o011)


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


needs_root = pytest.mark.skipif(os.getuid() != 0, reason="creates users, switches uid")


@pytest.fixture
def user(tmp_path: Path) -> Iterator[Any]:
    """A system user made for this test (pwd entry), removed afterwards by name."""
    import pwd
    import uuid

    name = f"mgt{uuid.uuid4().hex[:8]}"
    home = tmp_path / "home" / name
    home.parent.mkdir()
    os.chmod(home.parent, 0o755)
    subprocess.run(
        ["useradd", "--create-home", "--home-dir", str(home), "--shell", "/bin/sh", name],
        check=True,
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", "--remove", name], capture_output=True)
        for leftover in (Path("/var/mail") / name, Path(f"/var/mail/{name}.lock")):
            leftover.unlink(missing_ok=True)


@pytest.fixture
def instance(tmp_path: Path) -> Instance:
    return Instance(tmp_path)
