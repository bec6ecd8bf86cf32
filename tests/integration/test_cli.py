"""The mailgrave admin command: check, and the queue tools on a real spool."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import SAME_USER, Instance, Processes, program
from tests.integration.test_queue import start_queue


def test_check_reports_every_problem_by_key(tmp_path: Path) -> None:
    cfg = tmp_path / "mailgrave.yaml"
    cfg.write_text("smtpd:\n  max_recipients: lots\n  bogus: 1\nqueue:\n  lifetime: 3x\n")
    res = subprocess.run([program("mailgrave"), "check", "--config", str(cfg)], capture_output=True)
    assert res.returncode != 0
    lines = res.stderr.decode().splitlines()
    assert f'{cfg}: smtpd.max_recipients: expected an integer, got "lots"' in lines
    assert f"{cfg}: smtpd.bogus: unknown key" in lines
    assert any(line.startswith(f"{cfg}: queue.lifetime:") for line in lines)


def test_check_unreadable_and_good(tmp_path: Path, instance: Instance) -> None:
    res = subprocess.run(
        [program("mailgrave"), "check", "--config", str(tmp_path / "nope.yaml")],
        capture_output=True,
    )
    assert res.returncode != 0 and b"nope.yaml: cannot read" in res.stderr
    res = subprocess.run(
        [program("mailgrave"), "check", "--config", str(instance.config_path)], capture_output=True
    )
    assert res.returncode == 0, res.stderr


def test_daemons_exit_111_on_a_bad_config(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("spool: [1]\n")
    for name in ("mailgrave-queue", "mailgrave-send"):
        res = subprocess.run(
            [program(name), "--config", str(cfg)], capture_output=True, stdin=subprocess.DEVNULL
        )
        assert res.returncode == 111, name
        assert f"{cfg}: spool: expected a string".encode() in res.stderr


def _queue_three(inst: Instance, processes: Processes) -> list[str]:
    """Three messages to remote recipients, all deferred (no delivery agents are running)."""
    start_queue(inst, processes)
    for i in range(3):
        res = inst.sendmail(f"user{i}@remote.test", data=f"Subject: m{i}\n\nx\n".encode())
        assert res.returncode == 0
    assert inst.run("mailgrave-send", *SAME_USER).returncode == 0
    qids = sorted(os.listdir(inst.spool / "info"))
    assert len(qids) == 3
    return qids


def test_queue_tools_hold_release_retry_delete(instance: Instance, processes: Processes) -> None:
    a, b, c = _queue_three(instance, processes)
    # One more, new (still in todo/): the list shows it too.
    assert instance.sendmail("new@remote.test", data=b"Subject: new\n\nx\n").returncode == 0
    listing = instance.run("mailgrave", "queue").stdout.decode()
    assert listing.count("pending") == 4 and "new@remote.test> pending, new" in listing
    assert "1 attempt(s), next in" in listing
    assert "delivery agent unreachable (remote.ctrl)" in listing  # the last reply

    assert instance.run("mailgrave", "queue", "hold", a).returncode == 0
    assert f"{a}" in instance.run("mailgrave", "queue").stdout.decode()
    shown = instance.run("mailgrave", "queue", "show", a).stdout.decode()
    assert (
        "(held)" in shown
        and "Subject: m0" in shown
        and "Recipient: <user0@remote.test> pending" in shown
    )

    assert instance.run("mailgrave", "queue", "delete", b).returncode == 0
    assert b not in instance.run("mailgrave", "queue").stdout.decode()
    assert not (instance.spool / "mess" / b).exists()

    # retry makes the deferred message due now; a send run attempts it again.
    assert instance.run("mailgrave", "queue", "retry", c).returncode == 0
    assert instance.run("mailgrave-send", *SAME_USER).returncode == 0
    shown = instance.run("mailgrave", "queue", "show", c).stdout.decode()
    assert "attempts=2" in shown
    # The held one was not attempted.
    assert "attempts=1" in instance.run("mailgrave", "queue", "show", a).stdout.decode()
    assert instance.run("mailgrave", "queue", "release", a).returncode == 0
    assert "(held)" not in instance.run("mailgrave", "queue", "show", a).stdout.decode()

    res = instance.run("mailgrave", "queue", "delete", "000000000000000")
    assert res.returncode != 0 and b"no message" in res.stderr
    res = instance.run("mailgrave", "queue", "retry", "../../etc")
    assert res.returncode == 64


def test_queue_tools_defer_to_a_running_send(instance: Instance, processes: Processes) -> None:
    a, _b, _c = _queue_three(instance, processes)
    import fcntl

    fd = os.open(instance.spool / "send.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a send run is busy
        res = instance.run("mailgrave", "queue", "hold", a)
        assert res.returncode == 0 and b"requested" in res.stdout
        assert (instance.spool / "ctl" / f"{a}.hold").exists()
    finally:
        os.close(fd)
    assert instance.run("mailgrave-send", *SAME_USER).returncode == 0  # applies the request
    assert not (instance.spool / "ctl" / f"{a}.hold").exists()
    assert "(held)" in instance.run("mailgrave", "queue", "show", a).stdout.decode()


def test_check_parses_the_file_and_renews_the_cache(instance: Instance) -> None:
    from mailgrave import config as configmod

    cfg = instance.config_path
    check = [program("mailgrave"), "check", "--config", str(cfg)]
    assert subprocess.run(check, capture_output=True).returncode == 0
    key = configmod._cache_key(str(cfg), cfg.stat())
    assert configmod.read_cache(key, configmod.cache_dir()) is not None
    # A stale cache is no excuse: check reads the file itself.
    cfg.write_text(cfg.read_text() + "smtpd: {max_errors: many}\n")
    res = subprocess.run(check, capture_output=True)
    assert res.returncode == 1 and b"max_errors" in res.stderr


def _attempts(inst: Instance, qid: str) -> int:
    shown = inst.run("mailgrave", "queue", "show", qid).stdout.decode()
    return int(shown.split("attempts=")[1].split()[0])


def test_retry_all_leaves_held_messages_held(instance: Instance, processes: Processes) -> None:
    a, b, c = _queue_three(instance, processes)
    assert instance.run("mailgrave", "queue", "hold", a).returncode == 0
    assert instance.run("mailgrave", "queue", "retry", "--all").returncode == 0
    assert instance.run("mailgrave-send", *SAME_USER).returncode == 0
    assert "(held)" in instance.run("mailgrave", "queue", "show", a).stdout.decode()
    assert [_attempts(instance, q) for q in (a, b, c)] == [1, 2, 2]
    # sendmail -q is retry --all too
    assert instance.sendmail("-q", data=b"").returncode == 0
    assert instance.run("mailgrave-send", *SAME_USER).returncode == 0
    assert [_attempts(instance, q) for q in (a, b, c)] == [1, 3, 3]
    # retry of that one message releases it (as documented in mailgrave(8))
    assert instance.run("mailgrave", "queue", "retry", a).returncode == 0
    assert instance.run("mailgrave-send", *SAME_USER).returncode == 0
    assert "(held)" not in instance.run("mailgrave", "queue", "show", a).stdout.decode()
    assert _attempts(instance, a) == 2


def test_send_stays_for_a_retry_due_soon(instance: Instance, processes: Processes) -> None:
    """Under systemd the timer ticks once a minute: a send run stays while the next
    attempt is near, so queue.retry: [2s] is honoured (one run, two attempts)."""
    instance.settings["queue"] = {"retry": ["2s", "1h"]}
    instance.write_config()
    start_queue(instance, processes)
    assert instance.sendmail("user@remote.test", data=b"Subject: soon\n\nx\n").returncode == 0
    assert instance.run("mailgrave-send", *SAME_USER, timeout=120).returncode == 0
    [qid] = os.listdir(instance.spool / "info")
    assert _attempts(instance, qid) == 2
    assert "next in 59m" in instance.run("mailgrave", "queue").stdout.decode()


def test_queue_without_a_spool_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "mailgrave.yaml"
    cfg.write_text(f"spool: {tmp_path / 'nowhere'}\n")
    for args in (["queue"], ["queue", "retry", "--all"], ["queue", "show", "0" * 15]):
        res = subprocess.run(
            [program("mailgrave"), "--config", str(cfg), *args], capture_output=True, timeout=60
        )
        assert res.returncode == 1, args
        assert res.stderr.decode().splitlines() == [
            f"mailgrave: no spool at {tmp_path / 'nowhere'} (see --config)"
        ]


def test_second_mailgrave_run_refuses_and_leaves_the_first_alone(
    instance: Instance, processes: Processes
) -> None:
    instance.start(processes)
    res = instance.run("mailgrave", "run", timeout=30)
    assert res.returncode == 1
    [line] = res.stderr.decode().splitlines()
    assert "not starting a second one" in line
    # the first still takes mail
    assert instance.sendmail("alice@example.org", data=b"Subject: x\n\ny\n").returncode == 0


def _selfsigned(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    req = "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=mx.example.org".split()
    subprocess.run(
        [*req, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_check_reports_what_would_fail_at_delivery_all_in_one_run(tmp_path: Path) -> None:
    cert, _key = _selfsigned(tmp_path, "one")
    _cert, other_key = _selfsigned(tmp_path, "two")
    cfg = tmp_path / "mailgrave.yaml"
    cfg.write_text(
        f"""hostname: mx.example.org
spool: {tmp_path}/spool
queue: {{retry: 5}}
smtpd:
  max_recipent: 5
  tls: {{certificate: {cert}, key: {other_key}}}
local:
  forward: true
  forward: false
remote:
  ca_file: {tmp_path}/no-ca.pem
  routes:
    a.example: "[127.0.0.1]:99999"
    b.example: "[not an ip!]"
    c.example: "[192.0.2.1]:2525"
  smarthost: {{password_file: {tmp_path}/no-password}}
  dns: {{nameservers: [127.0.0.1]}}
"""
    )
    res = subprocess.run([program("mailgrave"), "check", "--config", str(cfg)], capture_output=True)
    assert res.returncode == 1
    lines = res.stderr.decode().splitlines()
    want = [
        f"{cfg}: forward: given twice (line 8 and line 9); YAML would keep only the last",
        f"{cfg}: queue.retry: expected a list, got 5",  # a type error hides nothing after it
        f"{cfg}: smtpd.max_recipent: unknown key (did you mean max_recipients?)",
        f'{cfg}: remote.routes: a.example: port 99999 is not 1-65535: "[127.0.0.1]:99999"',
        f"{cfg}: remote.routes: b.example: [not an ip!] is neither an IP address nor a host"
        ' name: "[not an ip!]"',
        f"{cfg}: remote.ca_file: cannot read {tmp_path}/no-ca.pem",
        f"{cfg}: remote.smarthost.password_file: cannot read {tmp_path}/no-password",
        f"{cfg}: smtpd.tls: {cert} and {other_key} do not load: key values mismatch",
    ]
    assert sorted(lines) == sorted(want), lines
    # A certificate with its own key is fine.
    cfg.write_text(
        f"hostname: mx.example.org\nspool: {tmp_path}/spool\nsmtpd:\n"
        f"  tls: {{certificate: {cert}, key: {tmp_path}/one.key}}\n"
    )
    res = subprocess.run([program("mailgrave"), "check", "--config", str(cfg)], capture_output=True)
    assert res.returncode == 0, res.stderr


def test_a_route_port_out_of_range_given_by_hand_is_a_clear_deferral(tmp_path: Path) -> None:
    inst = Instance(tmp_path)
    res = inst.run(
        "mailgrave-remote",
        *SAME_USER,
        "--host",
        "[127.0.0.1]:99999",
        "x@example.net",
        input=b"Subject: x\n\nx\n",
    )
    assert res.returncode == 111
    assert res.stdout.decode() == (
        "Z4.3.5 route [127.0.0.1]:99999: port 99999 is not 1-65535  <x@example.net>\n"
    )
    assert b"Traceback" not in res.stderr


@pytest.mark.skipif(os.path.exists("/etc/mailgrave/mailgrave.yaml"), reason="a real config")
def test_check_without_the_default_file_checks_the_defaults_as_every_program_uses_them() -> None:
    res = subprocess.run([program("mailgrave"), "check"], capture_output=True)
    err = res.stderr.decode()
    assert "/etc/mailgrave/mailgrave.yaml: no such file: every program uses the defaults" in err
    assert "cannot read" not in err


def test_config_before_or_after_every_sub_command(tmp_path: Path, processes: Processes) -> None:
    inst = Instance(tmp_path, auth={"users_file": str(tmp_path / "users")})
    [qid] = _queue_three(inst, processes)[:1]
    cfg = str(inst.config_path)

    def mg(*args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([program("mailgrave"), *args], capture_output=True, input=data)

    for args in (
        ["--config", cfg, "queue"],
        ["queue", "--config", cfg],
        ["queue", "list", "--config", cfg],
    ):
        res = mg(*args)
        assert res.returncode == 0 and qid in res.stdout.decode(), (args, res.stderr)
    assert mg("queue", "show", "--config", cfg, qid).returncode == 0
    assert mg("queue", "hold", "--config", cfg, qid).returncode == 0
    assert "(held)" in mg("queue", "show", qid, "--config", cfg).stdout.decode()
    assert mg("queue", "release", qid, "--config", cfg).returncode == 0
    assert "(held)" not in mg("--config", cfg, "queue", "show", qid).stdout.decode()
    assert mg("check", "--config", cfg).returncode == 0
    assert mg("--config", cfg, "check").returncode == 0
    res = mg("user", "add", "--config", cfg, "alice", "--stdin", data=b"a long secret\n")
    assert res.returncode == 0, res.stderr
    assert mg("user", "list", "--config", cfg).stdout == b"alice\n"
    assert mg("user", "del", "alice", "--config", cfg).returncode == 0


def test_queue_json_lines_for_scripts(instance: Instance, processes: Processes) -> None:
    a, _b, _c = _queue_three(instance, processes)
    assert instance.sendmail("new@remote.test", data=b"Subject: new\n\nx\n").returncode == 0
    assert instance.run("mailgrave", "queue", "hold", a).returncode == 0
    for argv in (("queue", "--json"), ("queue", "list", "--json"), ("queue", "--json", "list")):
        res = instance.run("mailgrave", *argv)
        assert res.returncode == 0, res.stderr
        lines = res.stdout.decode().splitlines()
        records = {r["queue_id"]: r for r in map(json.loads, lines)}
        assert len(lines) == len(records) == 4
        held = records[a]
        assert (held["queue_name"], held["held"]) == ("hold", True) and "@" in held["sender"]
        [new] = [r for r in records.values() if r["recipients"][0]["address"] == "new@remote.test"]
        assert new["queue_name"] == "active" and new["recipients"][0]["attempts"] == 0
        assert new["recipients"][0]["next_attempt"] is None
        deferred = [r for r in records.values() if r["queue_name"] == "deferred"]
        assert len(deferred) == 2
        for r in deferred:
            [rcpt] = r["recipients"]
            assert rcpt["state"] == "pending" and rcpt["attempts"] == 1
            assert rcpt["next_attempt"] > r["arrival_time"]
            assert "delivery agent unreachable (remote.ctrl)" in rcpt["delay_reason"]
            assert r["message_size"] > 0 and r["age_seconds"] >= 0
    res = instance.run("mailgrave", "queue", "--json", "show", a)
    assert res.returncode == 64 and b"--json is for queue list" in res.stderr
    # An empty queue prints nothing (not "Mail queue is empty"): `| jq` sees no object.
    assert instance.run("mailgrave", "queue", "delete", "--all").returncode == 0
    res = instance.run("mailgrave", "queue", "--json")
    assert (res.returncode, res.stdout) == (0, b"")
