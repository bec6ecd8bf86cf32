"""What the package ships, checked without a container: default config, man pages, units,
sysusers and tmpfiles agree with the code and with each other."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mailgrave import config as configmod
from mailgrave.record import specs
from mailgrave.spool import SUBDIRS

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted((ROOT / "systemd").iterdir())
MAN = sorted((ROOT / "docs" / "man").iterdir())
PROGRAMS = ("mailgrave", "mailgrave-smtpd", "mailgrave-inject", "mailgrave-queue")
PROGRAMS += ("mailgrave-send", "mailgrave-local", "mailgrave-remote")


def test_shipped_config_is_valid_and_its_comments_show_the_defaults() -> None:
    text = (ROOT / "etc" / "mailgrave.yaml").read_text()
    shipped = configmod.parse_text(text, "etc/mailgrave.yaml")
    defaults = configmod.Config()
    assert shipped.relay_networks == defaults.relay_networks
    # Uncomment every setting (not hostname/origin, which default to the host's name):
    # the result must parse and equal the built-in defaults, section by section.
    uncommented = re.sub(r"^#(?=[a-z_]+:|  )", "", text, flags=re.M)
    uncommented = re.sub(r"^(hostname|origin):.*$", "", uncommented, flags=re.M)
    assert uncommented.count("\n#") < text.count("\n#")
    every = configmod.parse_text(uncommented, "uncommented")
    for name in ("smtpd", "local", "queue", "remote", "relay_networks", "spool", "run_dir"):
        assert getattr(every, name) == getattr(defaults, name), name
    assert every.local_domains == ()


def _keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    for name, f in specs(cls).items():
        if f.section is not None:
            out += _keys(f.section, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def test_every_setting_is_in_the_shipped_config_and_the_man_page() -> None:
    text = (ROOT / "etc" / "mailgrave.yaml").read_text()
    page = (ROOT / "docs" / "man" / "mailgrave.yaml.5").read_text().replace("\\-", "-")
    keys = _keys(configmod.Config)
    assert len(keys) > 40
    for key in keys:
        leaf = key.rsplit(".", 1)[-1]
        assert re.search(rf"^#\s*{leaf}:", text, re.M), f"{key} not in etc/mailgrave.yaml"
        assert re.search(rf"^\.B[IR]? .*\b{leaf}\b", page, re.M), f"{key} not in mailgrave.yaml(5)"


@pytest.mark.parametrize("page", MAN, ids=lambda p: p.name)
def test_man_page_renders_without_warnings(page: Path) -> None:
    groff = shutil.which("groff", path="/usr/bin:/bin")
    if groff is None:
        pytest.fail("groff missing: run `make system-test` (it installs groff-base)")
    result = subprocess.run(
        [groff, "-man", "-Tutf8", "-ww", str(page)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and not result.stderr, result.stderr
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "FILES", "EXIT STATUS"):
        assert f"\n.SH {section}\n" in page.read_text(), (page.name, section)
    assert "\n.SH SECURITY\n" in page.read_text() and "\n.SH SEE ALSO\n" in page.read_text()


def test_every_program_has_a_man_page() -> None:
    names = {p.name for p in MAN}
    for program in PROGRAMS:
        assert f"{program}.8" in names, program
    assert {"mailgrave.yaml.5", "mailgrave.7"} <= names


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_documents_itself_and_runs_as_its_own_user(unit: Path) -> None:
    text = unit.read_text()
    pages = re.findall(r"man:([\w.@-]+)\((\d)\)", text)
    assert pages, "no Documentation=man:"
    for name, section in pages:
        assert (ROOT / "docs" / "man" / f"{name}.{section}").exists(), name
    if unit.suffix == ".service":
        assert "NoNewPrivileges=yes" in text and "ProtectSystem=strict" in text
        assert "SystemCallFilter=" in text and "RestrictAddressFamilies=" in text
        user = _unit_user(unit)
        sysusers = (ROOT / "packaging" / "sysusers.d" / "mailgrave.conf").read_text()
        assert user == "root" or f"u     {user} " in sysusers


def _unit_user(unit: Path) -> str:
    """The user a service runs as.  mailgrave-local runs as root by having no User= line:
    with User= (even root) and seccomp, systemd >= 255 drops CAP_SETUID before exec and
    NoNewPrivileges=yes keeps it dropped (docs/security.md).  Every other service names its
    own user."""
    user = re.search(r"^User=(\S+)", unit.read_text(), re.M)
    if unit.name == "mailgrave-local.service":
        assert user is None, "User= in mailgrave-local.service: setuid() fails on systemd >= 255"
        return "root"
    assert user, "no User="
    return user.group(1)


def test_tmpfiles_creates_every_spool_directory_for_the_queue() -> None:
    text = (ROOT / "packaging" / "tmpfiles.d" / "mailgrave.conf").read_text()
    defaults = configmod.Config()
    for sub in ("", *SUBDIRS):
        path = f"{defaults.spool}/{sub}".rstrip("/")
        line = re.search(rf"^d\s+{re.escape(path)}\s+(\S+)\s+(\S+)\s+(\S+)", text, re.M)
        assert line, path
        assert line.groups() == ("2770", "mailgrave-queue", "mailgrave")
    assert re.search(rf"^d\s+{re.escape(defaults.run_dir)}\s", text, re.M)


def test_control_sockets_match_the_configured_run_dir() -> None:
    run_dir = configmod.Config().run_dir
    for name in ("queue", "local", "remote"):
        text = (ROOT / "systemd" / f"mailgrave-{name}.socket").read_text()
        assert f"ListenStream={run_dir}/{name}.ctrl" in text


@pytest.mark.parametrize("unit", [u for u in UNITS if u.suffix == ".service"], ids=lambda p: p.name)
def test_each_service_may_write_its_users_config_cache(unit: Path) -> None:
    """The compiled config cache: a directory per user from tmpfiles, writable in the unit."""
    user = _unit_user(unit)
    path = f"{configmod.CACHE_ROOT}/{user}"
    assert f"ReadWritePaths=-{path}\n" in unit.read_text()
    tmpfiles = (ROOT / "packaging" / "tmpfiles.d" / "mailgrave.conf").read_text()
    line = re.search(rf"^d\s+{re.escape(path)}\s+(\S+)\s+(\S+)\s+(\S+)", tmpfiles, re.M)
    assert line and line.groups() == ("0700", user, user)


def test_the_smtpd_launcher_is_rendered_completely_by_the_deb_and_the_venv() -> None:
    template = (ROOT / "packaging" / "bin" / "mailgrave-smtpd.in").read_text()
    placeholders = set(re.findall(r"@[A-Z]+@", template))
    assert placeholders == {"@PYTHON@", "@FLAGS@", "@PKGDIR@"}
    rules = (ROOT / "debian" / "rules").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for text in (rules, makefile):
        assert all(f"s|{p}|" in text for p in placeholders)
    assert "s|@FLAGS@|-IS|" in rules and "usr/bin/mailgrave-smtpd" in rules


def test_the_mirror_comes_from_apt_sources_and_no_host_is_named_in_the_tree() -> None:
    from tests.system.container import mirror_from_sources

    deb822 = (
        "Types: deb\n# a comment\nURIs: http://mirror.invalid/debian http://other.invalid/d\n"
        "Suites: bookworm\n\nTypes: deb\nURIs: http://security.invalid/debian-security\n"
    )
    assert mirror_from_sources(deb822, None) == "http://mirror.invalid/debian"
    one_line = (
        "# deb http://commented.invalid/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://list.invalid/debian bookworm main\n"
    )
    assert mirror_from_sources(None, one_line) == "http://list.invalid/debian"
    assert mirror_from_sources("Types: deb\n", "deb http://x.invalid/d trixie main") == (
        "http://x.invalid/d"
    )
    with pytest.raises(RuntimeError):
        mirror_from_sources(None, None)
    text = (ROOT / "tests" / "system" / "container.py").read_text()
    assert not re.search(r"https?://", text), "container.py names a host: read apt's sources"
