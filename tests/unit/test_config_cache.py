"""The compiled config cache: used when fresh, ignored when stale, foreign or broken."""

from __future__ import annotations

import os
import pwd
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgrave import config

YAML = "hostname: mx.example.org\nsmtpd:\n  max_recipients: 7\n  timeout: 90s\n"


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setattr(config, "CACHE_ROOT", str(root))
    if os.geteuid() != 0:  # only root makes its own directory; others get it from the package
        (root / pwd.getpwuid(os.geteuid()).pw_name).mkdir(parents=True)
    return root


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "mailgrave.yaml"
    path.write_text(YAML)
    return path


@pytest.fixture
def no_yaml(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make ``import yaml`` fail: a load that still works did not parse the file."""
    monkeypatch.setitem(sys.modules, "yaml", None)
    yield


def cache_file(root: Path) -> Path:
    return root / pwd.getpwuid(os.geteuid()).pw_name / "config"


def test_a_parse_writes_the_cache_and_the_next_load_needs_no_yaml(
    cache_root: Path, conf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = config.load(str(conf))
    assert first.smtpd.max_recipients == 7
    f = cache_file(cache_root)
    st = f.stat()
    assert st.st_uid == os.geteuid() and st.st_mode & 0o777 == 0o600
    monkeypatch.setitem(sys.modules, "yaml", None)
    second = config.load(str(conf))
    assert second == first and second.smtpd.timeout == 90.0 and second.path == str(conf)


@pytest.mark.parametrize("new", ["  max_recipients: 8\n", "  max_recipients: 1234\n"])
def test_an_edited_file_is_parsed_again(cache_root: Path, conf: Path, new: str) -> None:
    assert config.load(str(conf)).smtpd.max_recipients == 7
    mtime = conf.stat().st_mtime_ns
    # Same size (8 for 7) or not; even with the old mtime put back, as `touch -d` could.
    conf.write_text(YAML.replace("  max_recipients: 7\n", new))
    os.utime(conf, ns=(mtime, mtime))
    assert config.load(str(conf)).smtpd.max_recipients == int(new.split(":")[1])
    # ...and the cache now holds the new value.
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "yaml", None)
        assert config.load(str(conf)).smtpd.max_recipients == int(new.split(":")[1])


def test_a_cache_for_another_file_is_not_used(cache_root: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(YAML)
    b.write_text(YAML.replace("7", "9"))
    assert config.load(str(a)).smtpd.max_recipients == 7
    assert config.load(str(b)).smtpd.max_recipients == 9
    assert config.load(str(a)).smtpd.max_recipients == 7


def forge(root: Path, conf: Path, hostname: str) -> Path:
    """A well-formed cache for ``conf`` whose hostname the file does not say."""
    key = config._cache_key(str(conf), conf.stat())
    settings = {"hostname": hostname, "smtpd": {"max_recipients": 7, "timeout": 90.0}}
    assert config.write_cache(key, settings, str(cache_file(root).parent))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "yaml", None)
        assert config.load(str(conf)).hostname == hostname  # trusted as it is
    return cache_file(root)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_cache_owned_by_another_user_is_ignored(cache_root: Path, conf: Path) -> None:
    f = forge(cache_root, conf, "forged.example")
    nobody = pwd.getpwnam("nobody")
    os.chown(f, nobody.pw_uid, nobody.pw_gid)
    assert config.load(str(conf)).hostname == "mx.example.org"


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_a_cache_others_may_write_is_ignored(cache_root: Path, conf: Path, mode: int) -> None:
    f = forge(cache_root, conf, "forged.example")
    os.chmod(f, mode)
    assert config.load(str(conf)).hostname == "mx.example.org"


def test_a_symlinked_cache_is_ignored(cache_root: Path, conf: Path, tmp_path: Path) -> None:
    f = forge(cache_root, conf, "forged.example")
    elsewhere = tmp_path / "elsewhere"
    f.rename(elsewhere)
    f.symlink_to(elsewhere)
    assert config.load(str(conf)).hostname == "mx.example.org"


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: b"",
        lambda data: data[: len(data) // 2],
        lambda data: b"garbage" * 10,
        lambda data: data[:-3] + bytes([data[-3] ^ 0x40]) + data[-2:],
        lambda data: data[:8] + b"\xff" + data[9:],
        lambda data: data[:4] + zlib.crc32(b"\xff\x00").to_bytes(4, "big") + b"\xff\x00",
        lambda data: data[:4] + zlib.crc32(b"N").to_bytes(4, "big") + b"N",
    ],
    ids=["empty", "truncated", "garbage", "flipped-bit", "bad-first-byte", "bad-marshal", "none"],
)
def test_a_broken_cache_falls_back_to_the_yaml_and_is_rewritten(
    cache_root: Path, conf: Path, damage: object
) -> None:
    config.load(str(conf))
    f = cache_file(cache_root)
    f.write_bytes(damage(f.read_bytes()))  # type: ignore[operator]
    assert config.load(str(conf)).smtpd.max_recipients == 7
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "yaml", None)
        assert config.load(str(conf)).smtpd.max_recipients == 7


def test_a_cache_that_does_not_fit_the_records_falls_back(cache_root: Path, conf: Path) -> None:
    key = config._cache_key(str(conf), conf.stat())
    config.write_cache(key, {"smtpd": {"no_such_setting": 1}}, str(cache_file(cache_root).parent))
    assert config.load(str(conf)).smtpd.max_recipients == 7


def test_a_bad_file_is_reported_and_never_cached(cache_root: Path, conf: Path) -> None:
    conf.write_text("smtpd:\n  max_recipients: lots\n")
    with pytest.raises(config.ConfigError, match="max_recipients"):
        config.load(str(conf))
    assert not cache_file(cache_root).exists()


def test_without_a_cache_directory_the_yaml_is_parsed(
    tmp_path: Path, conf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A user whose directory the package did not create: no cache, no error.
    monkeypatch.setattr(config, "cache_dir", lambda: str(tmp_path / "absent" / "someone"))
    assert config.load(str(conf)).smtpd.max_recipients == 7
    assert not (tmp_path / "absent").exists()


def test_the_host_name_default_is_not_cached(
    cache_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "m.yaml"
    conf.write_text("smtpd:\n  max_recipients: 7\n")
    monkeypatch.setattr(config, "default_hostname", lambda: "first.example")
    assert config.load(str(conf)).hostname == "first.example"
    monkeypatch.setattr(config, "default_hostname", lambda: "second.example")
    assert config.load(str(conf)).hostname == "second.example"


@pytest.mark.skipif(os.geteuid() != 0, reason="writes other users' caches as root")
def test_refresh_as_root_writes_every_users_cache_for_that_user(
    cache_root: Path, tmp_path: Path
) -> None:
    from tests.conftest import make_traversable

    make_traversable(tmp_path)
    conf = tmp_path / "shared.yaml"
    conf.write_text(YAML)
    conf.chmod(0o644)
    nobody = pwd.getpwnam("nobody")
    (cache_root / "nobody").mkdir(parents=True, mode=0o700)
    os.chown(cache_root / "nobody", nobody.pw_uid, nobody.pw_gid)
    (cache_root / "elsewhere").symlink_to(tmp_path)  # never followed
    written = config.refresh_caches(str(conf))
    assert written == sorted([str(cache_root / "nobody"), str(cache_root / "root")])
    st = (cache_root / "nobody" / "config").stat()
    assert (st.st_uid, st.st_mode & 0o777) == (nobody.pw_uid, 0o600)
    assert not (tmp_path / "config").exists()
    # As nobody, the cache is trusted and used: the load works without YAML.
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            sys.modules["yaml"] = None  # type: ignore[assignment]
            ok = config.load(str(conf)).smtpd.max_recipients == 7
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_refresh_refuses_a_bad_file(cache_root: Path, conf: Path) -> None:
    conf.write_text("smtpd: {max_recipients: lots}\n")
    with pytest.raises(config.ConfigError, match="max_recipients"):
        config.refresh_caches(str(conf))
    assert not cache_file(cache_root).exists()
