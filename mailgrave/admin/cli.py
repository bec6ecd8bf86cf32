"""mailgrave: the administrator's command — check the config, run the chain, inspect the queue."""

from __future__ import annotations

import argparse
import base64
import grp
import importlib.util
import json
import os
import pwd
import re
import stat
import sys
import time
from pathlib import PurePath

from mailgrave import config as configmod
from mailgrave import dkimkey
from mailgrave import log as logmod
from mailgrave import users as usersmod
from mailgrave.admin.supervisor import AlreadyRunning, Supervisor
from mailgrave.errors import EXIT_OK
from mailgrave.spool import Entry, RecipientState, Spool, header_lines, is_qid

EXIT_USAGE = 64


def cmd_check(args: argparse.Namespace) -> int:
    """Report every problem in the configuration; exit non-zero when there is one."""
    path = args.config or configmod.DEFAULT_PATH
    if args.config is None and not os.path.exists(path):
        # As every program does (mailgrave.yaml(5)): no default file, all defaults.
        print(f"{path}: no such file: every program uses the defaults", file=sys.stderr)
        config, problems = configmod.load(None, cache=False), list[str]()
    else:
        try:
            # The file itself, never the compiled cache.
            config, problems = configmod.check_file(path)
        except configmod.ConfigError as exc:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            return 1
    problems += _check_files(config, path)
    if not config.hostname or "." not in config.hostname:
        problems.append(f"{path}: hostname: {config.hostname!r} is not a fully qualified name")
    tls = config.smtpd.tls
    if bool(tls.certificate) != bool(tls.key):
        problems.append(f"{path}: smtpd.tls: certificate and key go together")
    for key, value in (("smtpd.tls.certificate", tls.certificate), ("smtpd.tls.key", tls.key)):
        if value and not os.access(value, os.R_OK):
            problems.append(f"{path}: {key}: cannot read {value}")
    sts_cache = config.remote.mta_sts_cache
    if config.remote.mta_sts == "on" and os.path.exists(sts_cache) and not os.path.isdir(sts_cache):
        problems.append(f"{path}: remote.mta_sts_cache: {sts_cache} is not a directory")
    aliases = config.local.aliases
    if aliases and os.path.exists(aliases) and not os.access(aliases, os.R_OK):
        problems.append(f"{path}: local.aliases: cannot read {aliases}")
    if config.checks.spf != "off" and importlib.util.find_spec("spf") is None:
        problems.append(f"{path}: checks.spf: {config.checks.spf} needs python3-spf")
    problems += _check_auth(config, path)
    for key, mode, modules in (
        ("dkim", config.checks.dkim, ("dkim", "authres")),
        ("dmarc", config.checks.dmarc, ("dkim", "authres", "publicsuffix2")),
    ):
        for module in modules if mode != "off" else ():
            if importlib.util.find_spec(module) is None:
                problems.append(f"{path}: checks.{key}: {mode} needs python3-{module}")
    psl = "/usr/share/publicsuffix/public_suffix_list.dat"  # mailgrave.queue.authcheck's
    if config.checks.dmarc != "off" and not os.access(psl, os.R_OK):
        problems.append(f"{path}: checks.dmarc: {config.checks.dmarc} needs {psl} (publicsuffix)")
    problems += _check_dkim(config, path)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    if os.path.exists(path):
        configmod.refresh_caches(path)  # only a file without problems is cached
    print(f"{path}: ok (hostname {config.hostname}, spool {config.spool})")
    return EXIT_OK


def _check_files(config: configmod.Config, path: str) -> list[str]:
    """The files that remote and smtpd open only when they need them: missing
    there means a deferral or a dropped handshake; here it is a line each."""
    problems = []
    for key, value in (
        ("remote.ca_file", config.remote.ca_file),
        ("remote.smarthost.password_file", config.remote.smarthost.password_file),
    ):
        if value and not os.access(value, os.R_OK):
            problems.append(f"{path}: {key}: cannot read {value}")
    tls = config.smtpd.tls
    if (
        tls.certificate
        and tls.key
        and all(os.access(p, os.R_OK) for p in (tls.certificate, tls.key))
    ):
        import ssl  # only to check the pair, as smtpd will load it

        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(tls.certificate, tls.key)
        except ssl.SSLError as exc:
            reason = (exc.reason or str(exc)).replace("_", " ").lower()
            problems.append(
                f"{path}: smtpd.tls: {tls.certificate} and {tls.key} do not load: {reason}"
            )
        except OSError as exc:
            problems.append(f"{path}: smtpd.tls: cannot load {tls.certificate}: {exc.strerror}")
    return problems


SMTPD_GROUP = "mailgrave-smtpd"  # the users file's group: only smtpd may read it


def _check_auth(config: configmod.Config, path: str) -> list[str]:
    """The auth keys that need the file system: users file, rate counters."""
    problems = []
    if config.auth.dovecot_socket:
        return _check_dovecot(config, path)
    users = config.auth.users_file
    try:
        st = os.stat(users)
    except FileNotFoundError:
        st = None  # no users: AUTH is simply not offered
    except OSError as exc:
        problems.append(f"{path}: auth.users_file: cannot read {users}: {exc.strerror}")
        st = None
    if st is not None:
        if st.st_mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
            problems.append(
                f"{path}: auth.users_file: {users} must not be readable by others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}; want 0640)"
            )
        try:
            usersmod.read(users)
        except usersmod.UsersError as exc:
            problems.append(f"{path}: auth.users_file: {exc}")
        if not config.smtpd.tls.certificate:
            problems.append(
                f"{path}: auth.users_file: AUTH is offered over TLS only: set smtpd.tls"
            )
        rate = config.auth.rate_limit
        if (rate.messages or rate.recipients) and not os.path.isdir(rate.directory):
            problems.append(f"{path}: auth.rate_limit.directory: no directory {rate.directory}")
    return problems


def may_not_connect(sock: str, user: str) -> str | None:
    """Why ``user`` could not connect to the Unix socket ``sock``, or None.

    By the file modes, as the kernel decides: search on every directory above
    it, write on the socket. Only the user's own uid and gid count: under systemd
    mailgrave-smtpd runs with PrivateUsers=yes, where its other groups are
    unmapped. None also when ``user`` does not exist (nothing runs as it here).
    """
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return None

    def allowed(st: os.stat_result, owner: int, group: int, other: int) -> bool:
        if st.st_uid == pw.pw_uid:
            return bool(st.st_mode & owner)
        if st.st_gid == pw.pw_gid:
            return bool(st.st_mode & group)
        return bool(st.st_mode & other)

    path = os.path.abspath(sock)
    for d in reversed(PurePath(path).parents):  # from / down
        try:
            st = os.stat(d)
        except OSError:
            return None  # reported by the caller's own look at the socket
        if not allowed(st, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
            return f"{user} may not enter {d} (mode {stat.S_IMODE(st.st_mode):04o}) to reach {sock}"
    st = os.stat(path)
    if not allowed(st, stat.S_IWUSR, stat.S_IWGRP, stat.S_IWOTH):
        owner = f"{_user_name(st.st_uid)}:{_group_name(st.st_gid)}"
        return (
            f"{user} may not connect to {sock} ({owner}, mode {stat.S_IMODE(st.st_mode):04o}): "
            f"give Dovecot's unix_listener user = {user} (or group = {user}, mode 0660)"
        )
    return None


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _check_dovecot(config: configmod.Config, path: str) -> list[str]:
    """auth.dovecot_socket: a socket that speaks Dovecot's auth protocol and offers PLAIN.

    Dovecot not running now is a warning (AUTH answers 454 until it runs), not a problem."""
    from mailgrave import dovecot

    problems = []
    sock = config.auth.dovecot_socket
    rate = config.auth.rate_limit
    if (rate.messages or rate.recipients) and not os.path.isdir(rate.directory):
        problems.append(f"{path}: auth.rate_limit.directory: no directory {rate.directory}")
    if not config.smtpd.tls.certificate:
        problems.append(
            f"{path}: auth.dovecot_socket: AUTH is offered over TLS only: set smtpd.tls"
        )
    try:
        st = os.stat(sock)
    except OSError as exc:
        print(
            f"{path}: auth.dovecot_socket: warning: {sock}: {exc.strerror} "
            "(is Dovecot running? AUTH answers 454 until it is)",
            file=sys.stderr,
        )
        return problems
    if not stat.S_ISSOCK(st.st_mode):
        problems.append(f"{path}: auth.dovecot_socket: {sock} is not a socket")
        return problems
    denied = may_not_connect(sock, SMTPD_GROUP)
    if denied:
        problems.append(f"{path}: auth.dovecot_socket: {denied}")
    try:
        mechs = dovecot.mechanisms(sock)
    except dovecot.DovecotError as exc:
        if "cannot connect" in str(exc):
            print(f"{path}: auth.dovecot_socket: warning: {exc}", file=sys.stderr)
        else:
            problems.append(f"{path}: auth.dovecot_socket: {sock}: {exc}")
        return problems
    if "PLAIN" not in mechs:
        problems.append(f"{path}: auth.dovecot_socket: Dovecot on {sock} does not offer PLAIN")
    return problems


QUEUE_USER = "mailgrave-queue"  # signs (mailgrave/queue/dkimsign.py): only it may read the keys


def _check_dkim(config: configmod.Config, path: str) -> list[str]:
    """Each dkim.sign key: readable, a key of its algorithm, readable by the queue alone."""
    problems = []
    for domain, (_selector, key, algorithm) in sorted(config.dkim.sign.items()):
        where = f"{path}: dkim.sign.{domain}.key"
        try:
            dkimkey.check_key(key, algorithm)
            st = os.stat(key)
        except dkimkey.DkimKeyError as exc:
            problems.append(f"{where}: {exc}")
            continue
        except OSError as exc:
            problems.append(f"{where}: cannot read {key}: {exc.strerror}")
            continue
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o007:
            problems.append(
                f"{where}: {key} must not be readable by others "
                f"(mode {mode:04o}; want 0640 root:{QUEUE_USER})"
            )
        try:
            queue_uid = pwd.getpwnam(QUEUE_USER).pw_uid
        except KeyError:
            continue  # not installed (a development checkout): the queue runs as you
        try:
            queue_gid: int | None = grp.getgrnam(QUEUE_USER).gr_gid
        except KeyError:
            queue_gid = None
        by_owner = st.st_uid == queue_uid and mode & 0o400
        by_group = st.st_gid == queue_gid and mode & 0o040
        if not (by_owner or by_group):
            problems.append(
                f"{where}: {QUEUE_USER} cannot read {key} (want 0640 root:{QUEUE_USER})"
            )
        elif mode & 0o040 and st.st_gid != queue_gid:
            problems.append(f"{where}: group of {key} may read it (want 0640 root:{QUEUE_USER})")
    return problems


def cmd_dkim_keygen(args: argparse.Namespace) -> int:
    """Write a new signing key; print its DNS TXT record and the dkim.sign lines."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    from mailgrave.address import AddressError, to_ascii_domain

    try:
        domain = to_ascii_domain(args.domain)
    except AddressError as exc:
        print(f"mailgrave: {exc}: {args.domain!r}", file=sys.stderr)
        return EXIT_USAGE
    selector = args.selector.lower()
    if not re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", selector):
        print(f"mailgrave: selector must be a DNS label: {args.selector!r}", file=sys.stderr)
        return EXIT_USAGE
    if args.algorithm == "rsa-sha256":
        if not 1024 <= args.bits <= 8192:
            print("mailgrave: --bits: 1024 to 8192 (2048 recommended)", file=sys.stderr)
            return EXIT_USAGE
        rkey = rsa.generate_private_key(public_exponent=65537, key_size=args.bits)
        pem = rkey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        public = rkey.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        ktag = "rsa"
    else:
        ekey = ed25519.Ed25519PrivateKey.generate()
        pem = ekey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        public = ekey.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        ktag = "ed25519"
    path = os.path.join(args.dir, f"{domain}.{selector}.key")
    try:
        _write_key(path, pem)
    except FileExistsError:
        print(f"mailgrave: {path} exists: choose another selector", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"mailgrave: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return 1
    record = f"v=DKIM1; k={ktag}; p={base64.b64encode(public).decode()}"
    strings = " ".join(f'"{record[i : i + 255]}"' for i in range(0, len(record), 255))
    print(f"mailgrave: wrote {path}", file=sys.stderr)
    print(f"{selector}._domainkey.{domain}. IN TXT {strings}")
    print()
    print("# mailgrave.yaml:")
    print("dkim:")
    print("  sign:")
    print(f"    {domain}:")
    print(f"      selector: {selector}")
    print(f"      key: {path}")
    print(f"      algorithm: {args.algorithm}")
    return EXIT_OK


def _write_key(path: str, pem: bytes) -> None:
    """``path`` created new, 0640 root:mailgrave-queue as root (0600 otherwise), durably."""
    from mailgrave.fileio import fsync_dir

    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        if os.getuid() == 0:
            try:
                os.fchown(fd, 0, grp.getgrnam(QUEUE_USER).gr_gid)
                os.fchmod(fd, 0o640)
            except KeyError:
                pass  # no mailgrave-queue group: root alone may read it
        os.write(fd, pem)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.link(tmp, path)  # never over an existing key
    finally:
        if fd >= 0:
            os.close(fd)
        os.unlink(tmp)
    fsync_dir(directory)


def cmd_run(args: argparse.Namespace) -> int:
    logmod.setup("run", args.debug)
    config = configmod.load_or_exit(args.config, "mailgrave run", 1)
    try:
        sup = Supervisor(
            config, args.listen or [], args.retry_interval, args.submission or [], args.smtps or []
        )
    except AlreadyRunning as exc:
        print(f"mailgrave run: {exc}; not starting a second one", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"mailgrave run: cannot start: {exc}", file=sys.stderr)
        return 1
    for kind, specs in (
        ("SMTP", args.listen),
        ("submission", args.submission),
        ("SMTPS", args.smtps),
    ):
        for spec in specs or []:
            print(f"mailgrave run: {kind} on {spec}", file=sys.stderr)
    print(
        f"mailgrave run: queue.ctrl at {config.socket_path('queue.ctrl')}, spool {config.spool}; "
        "Ctrl-C stops",
        file=sys.stderr,
    )
    return sup.run()


# --- users (SMTP AUTH)


def _read_password(args: argparse.Namespace) -> str | None:
    """From stdin's first line (--stdin) or a tty prompt, asked twice."""
    if args.stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        import getpass

        if not sys.stdin.isatty():
            print("mailgrave: no terminal for the password prompt: use --stdin", file=sys.stderr)
            return None
        password = getpass.getpass(f"Password for {args.name}: ")
        if getpass.getpass("Again: ") != password:
            print("mailgrave: the passwords differ", file=sys.stderr)
            return None
    if not password:
        print("mailgrave: empty password refused", file=sys.stderr)
        return None
    return password


def cmd_user(config: configmod.Config, args: argparse.Namespace) -> int:
    path = config.auth.users_file
    try:
        users = usersmod.read(path)
        if args.action == "list":
            for name in sorted(users):
                print(name)
            return EXIT_OK
        name = usersmod.check_name(args.name)
        if args.action == "add" and name in users:
            print(f"mailgrave: user {name} exists (use passwd)", file=sys.stderr)
            return 1
        if args.action in ("passwd", "del") and name not in users:
            print(f"mailgrave: no user {name} in {path}", file=sys.stderr)
            return 1
        if args.action == "del":
            del users[name]
        else:
            password = _read_password(args)
            if password is None:
                return 1
            users[name] = usersmod.hash_password(password)
        usersmod.write(path, users, SMTPD_GROUP)
    except usersmod.UsersError as exc:
        print(f"mailgrave: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"mailgrave: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return 1
    done = {"add": "added", "passwd": "password changed", "del": "removed"}[args.action]
    print(f"mailgrave: user {name} {done} ({path})")
    return EXIT_OK


# --- queue tools ----------------------------------------------------------------


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def queue_json(obj: Entry, now: float) -> str:
    """One line of ``mailgrave queue --json`` for one message: postqueue -j's names
    where Postfix has one (queue_id, arrival_time, message_size, sender,
    recipients[].address, recipients[].delay_reason), MailGrave's own otherwise."""
    recipients = []
    for r in obj.recipients:
        waiting = r.state is RecipientState.PENDING and r.attempts > 0
        recipients.append(
            {
                "address": r.addr,
                "state": str(r.state),
                "attempts": r.attempts,
                "next_attempt": int(r.next_attempt) if waiting else None,
                "status": r.status or None,
                "remote_host": r.remote or None,
                "delay_reason": r.last_reply if waiting and r.last_reply else None,
                "last_reply": r.last_reply or None,
            }
        )
    deferred = any(r["next_attempt"] is not None for r in recipients)
    record = {
        "queue_id": obj.qid,
        # Postfix's hold and deferred queues; "active" for the rest (new, or being sent)
        "queue_name": "hold" if obj.held else "deferred" if deferred else "active",
        "arrival_time": int(obj.created),
        "age_seconds": max(0, int(now - obj.created)),
        "message_size": obj.size,
        "sender": obj.sender,
        "held": obj.held,
        "recipients": recipients,
    }
    return json.dumps(record, ensure_ascii=False)


def cmd_queue_list(config: configmod.Config, as_json: bool = False) -> int:
    entries = Spool(config.spool).entries()
    if as_json:  # JSON Lines, one message each, as postqueue -j; nothing when empty
        now = time.time()
        for obj in entries:
            print(queue_json(obj, now))
        return EXIT_OK
    if not entries:
        print("Mail queue is empty")
        return EXIT_OK
    now = time.time()
    print(f"{'Queue ID':<16} {'Age':>5} {'Size':>9}  Sender / Recipients")
    for obj in entries:
        qid = obj.qid
        flag = " (held)" if obj.held else ""
        print(f"{qid:<16} {_age(now - obj.created):>5} {obj.size:>9}  <{obj.sender}>{flag}")
        for r in obj.recipients:
            line = f"{'':34}<{r.addr}> {r.state}"
            if r.state is RecipientState.PENDING and r.attempts:
                line += f", {r.attempts} attempt(s), next in {_age(r.next_attempt - now)}"
            elif r.state is RecipientState.PENDING:
                line += ", new"
            print(line)
            if r.last_reply and r.state is not RecipientState.DELIVERED:
                print(f"{'':36}{r.last_reply[:200]}")
    print(f"-- {len(entries)} message(s)")
    return EXIT_OK


def cmd_queue_show(config: configmod.Config, qid: str) -> int:
    spool = Spool(config.spool)
    for obj in spool.entries():
        if obj.qid != qid:
            continue
        print(f"Queue ID: {qid}")
        print(f"Sender: <{obj.sender}>")
        print(f"Created: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(obj.created))}")
        print(f"Size: {obj.size}{'  (held)' if obj.held else ''}")
        if obj.ret or obj.envid:
            print(f"DSN: RET={obj.ret or '-'} ENVID={obj.envid or '-'}")
        for r in obj.recipients:
            print(f"Recipient: <{r.addr}> {r.state} attempts={r.attempts}")
            if r.notify or r.orcpt:
                print(f"  DSN: NOTIFY={r.notify or '-'} ORCPT={r.orcpt or '-'}")
            if r.last_reply:
                print(f"  Last reply: {r.last_reply}")
        if obj.transcript:
            print("Transcript of the last attempt(s):")
            for line in obj.transcript:
                print(f"  {line}")
        print("Headers:")
        with open(spool.message_path(qid), "rb") as f:
            for raw in header_lines(f.fileno()):
                print("  " + raw.decode("utf-8", "replace").rstrip("\r\n"))
        return EXIT_OK
    print(f"mailgrave: no message {qid} in the queue", file=sys.stderr)
    return 1


def cmd_queue_action(config: configmod.Config, action: str, qids: list[str], all_: bool) -> int:
    """delete / hold / release / retry: applied now, or handed to the running mailgrave-send."""
    spool = Spool(config.spool)
    if all_:
        qids = spool.targets(action)
    bad = [q for q in qids if not is_qid(q)]
    if bad:
        print(f"mailgrave: not a queue id: {bad[0]}", file=sys.stderr)
        return EXIT_USAGE

    def now() -> int:
        missing = [q for q in qids if not spool.apply(q, action)]
        for q in missing:
            print(f"mailgrave: no message {q} in the queue", file=sys.stderr)
        return 1 if missing else EXIT_OK

    result = spool.with_send_lock(blocking=False, body=now)
    if result is None:
        # mailgrave-send is running: leave the request for it (it applies them each round).
        for q in qids:
            spool.request(q, action)
        print(f"mailgrave: {action} requested; mailgrave-send is running and will apply it")
        return EXIT_OK
    if action in ("retry", "release") and result == EXIT_OK:
        _wake_send(config)
    return result


def _wake_send(config: configmod.Config) -> None:
    """Start a delivery run now (the spool's ctl/ entry wakes mailgrave-send.path)."""
    try:
        Spool(config.spool).wake()
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mailgrave", description="MailGrave administration: check, run, queue."
    )
    parser.add_argument("--config", help=f"configuration file (default: {configmod.DEFAULT_PATH})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = sub.add_parser("check", help="validate the configuration; report every problem")
    run = sub.add_parser("run", help="run the whole chain in the foreground (development, demos)")
    run.add_argument(
        "--listen", action="append", metavar="ADDR:PORT", help="SMTP listener (repeatable)"
    )
    run.add_argument(
        "--submission",
        action="append",
        metavar="ADDR:PORT",
        help="submission listener: STARTTLS, AUTH before MAIL (repeatable)",
    )
    run.add_argument(
        "--smtps",
        action="append",
        metavar="ADDR:PORT",
        help="submission listener with implicit TLS (repeatable)",
    )
    run.add_argument(
        "--retry-interval",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="start mailgrave-send at least this often, as the timer (default: %(default)s)",
    )
    run.add_argument("--debug", action="store_true", help="log debugging detail")
    queue = sub.add_parser("queue", help="list the queue, or act on messages in it")
    json_help = "one JSON object per message and line (JSON Lines, as postqueue -j)"
    queue.add_argument("--json", action="store_true", help=json_help)
    qsub = queue.add_subparsers(dest="action", metavar="ACTION")
    listing = qsub.add_parser("list", help="list queued messages (the default)")
    # SUPPRESS: `queue --json list` keeps the queue parser's value
    listing.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=json_help)
    show = qsub.add_parser("show", help="envelope, state, transcript and headers of one message")
    show.add_argument("qid")
    for action, text in (
        ("retry", "attempt delivery now"),
        ("delete", "remove from the queue without a bounce"),
        ("hold", "keep in the queue without attempting delivery"),
        ("release", "undo hold"),
    ):
        p = qsub.add_parser(action, help=text)
        p.add_argument("qids", nargs="*", metavar="QID")
        p.add_argument("--all", action="store_true", help="every message in the queue")
    user = sub.add_parser("user", help="manage the SMTP AUTH users (auth.users_file)")
    usub = user.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, text in (
        ("add", "add a user (password from a prompt, or --stdin)"),
        ("passwd", "change a user's password"),
        ("del", "remove a user"),
    ):
        p = usub.add_parser(action, help=text)
        p.add_argument("name", metavar="NAME")
        if action != "del":
            p.add_argument("--stdin", action="store_true", help="read the password from stdin")
    usub.add_parser("list", help="list the users")
    dkim = sub.add_parser("dkim", help="DKIM signing keys")
    dsub = dkim.add_subparsers(dest="action", metavar="ACTION", required=True)
    keygen = dsub.add_parser("keygen", help="write a signing key; print its DNS TXT record")
    keygen.add_argument("domain", metavar="DOMAIN")
    keygen.add_argument("--selector", required=True, metavar="S")
    keygen.add_argument(
        "--algorithm",
        choices=dkimkey.ALGORITHMS,
        default="rsa-sha256",
        help="(default: %(default)s)",
    )
    keygen.add_argument(
        "--bits", type=int, default=2048, metavar="N", help="RSA (default: %(default)s)"
    )
    keygen.add_argument("--dir", default="/etc/mailgrave/dkim", help="where (default: %(default)s)")
    # --config before or after any sub-command (mailgrave queue hold --config F ID).
    subs = (*qsub.choices.values(), *usub.choices.values(), *dsub.choices.values())
    for p in (check, run, queue, user, dkim, *subs):
        p.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command == "check":
        return cmd_check(args)
    if args.command == "dkim":
        return cmd_dkim_keygen(args)
    config = configmod.load_or_exit(args.config, "mailgrave")
    if args.command == "run":
        return cmd_run(args)
    if args.command == "user":
        return cmd_user(config, args)
    if not os.path.isdir(os.path.join(config.spool, "todo")):
        print(f"mailgrave: no spool at {config.spool} (see --config)", file=sys.stderr)
        return 1
    action = args.action or "list"
    if action == "list":
        return cmd_queue_list(config, args.json)
    if args.json:
        print(f"mailgrave: --json is for queue list, not queue {action}", file=sys.stderr)
        return EXIT_USAGE
    if action == "show":
        return cmd_queue_show(config, args.qid)
    if not args.qids and not args.all:
        print(f"mailgrave: queue {action}: name a queue id or --all", file=sys.stderr)
        return EXIT_USAGE
    return cmd_queue_action(config, action, args.qids, args.all)


if __name__ == "__main__":
    sys.exit(main())
