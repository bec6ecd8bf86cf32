# MailGrave — developer entry points.  See README.md.
#   make run    the whole chain in the foreground, dev config under ./run/
#   make test   install what the tests need, then lint, type-check and test
#   make deb    build/deb/mailgrave_*.deb (dpkg-buildpackage), then lintian
#   make system-test  the .deb on Debian 12 and 13 booted with systemd-nspawn (root)
SHELL := /bin/bash
PY := /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
DEBIAN_PATH := /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Debian packages the programs and the tests use.
DEB_PKGS := python3-yaml python3-systemd python3-dnspython python3-idna python3-venv \
	python3-pytest python3-hypothesis python3-aiosmtpd python3-dnslib python3-argon2 \
	python3-spf python3-authres python3-dkim python3-publicsuffix2 publicsuffix \
	python3-nacl python3-cryptography \
	swaks msmtp fail2ban s-nail mutt dnsmasq-base openssl procps iproute2 passwd \
	systemd opendkim-tools dovecot-core
RUN_PORT ?= 2525
LINT_DIRS := mailgrave tests $(wildcard bench)

# $(call apt_ensure,PACKAGES): install those of PACKAGES that are missing (as root).
define apt_ensure
	@missing=$$(for p in $(1); do \
		dpkg-query -W -f='$${db:Status-Abbrev}' $$p 2>/dev/null | grep -q '^ii' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages (run as root): $$missing"; exit 1; fi; \
		echo "installing: $$missing"; \
		env PATH=$(DEBIAN_PATH) DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		env PATH=$(DEBIAN_PATH) DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
endef

.PHONY: all deps venv lint-tools run test lint unit integration check-config clean bench \
	smtp-source pkg-deps deb system-test stress

all: venv

deps: $(VENV)/.deps-stamp
$(VENV)/.deps-stamp: Makefile
	$(call apt_ensure,$(DEB_PKGS))
	@mkdir -p $(VENV) && touch $@

venv: $(VENV)/.venv-stamp
$(VENV)/.venv-stamp: pyproject.toml packaging/bin/mailgrave-smtpd.in $(VENV)/.deps-stamp
	test -x $(BIN)/python || $(PY) -m venv --system-site-packages $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e .
	# As the .deb does: mailgrave-smtpd (started per connection) through the
	# python -S launcher (-S only: the bench's --source still uses PYTHONPATH).
	sed -e 's|@PYTHON@|$(CURDIR)/$(BIN)/python|' -e 's|@FLAGS@|-S|' -e 's|@PKGDIR@|$(CURDIR)|' \
		packaging/bin/mailgrave-smtpd.in > $(BIN)/mailgrave-smtpd
	chmod 755 $(BIN)/mailgrave-smtpd
	@touch $@

run: venv
	$(BIN)/python -m mailgrave.admin.devrun --port $(RUN_PORT)

# The lint tools: only for `make lint` and `make test`, never for `make run`.
lint-tools: $(VENV)/.lint-stamp
$(VENV)/.lint-stamp: $(VENV)/.venv-stamp
	$(BIN)/python -m pip install -q --disable-pip-version-check ruff mypy import-linter
	@touch $@

lint: venv lint-tools
	$(BIN)/ruff check $(LINT_DIRS)
	$(BIN)/ruff format --check $(LINT_DIRS)
	$(BIN)/mypy
	# The package's structure (.importlinter): no stage imports another stage,
	# the floor imports no stage.
	$(BIN)/lint-imports --no-cache

unit: venv
	$(BIN)/python -m pytest -q tests/unit

integration: venv smtp-source
	$(BIN)/python -m pytest -q tests/integration

# Postfix's smtp-source, for the tests: taken out of Debian's postfix package
# without installing it (installing would start Postfix and take port 25).
SMTP_SOURCE := $(VENV)/postfix/usr/sbin/smtp-source
smtp-source: $(SMTP_SOURCE)
$(SMTP_SOURCE): $(VENV)/.deps-stamp
	@if command -v /usr/sbin/smtp-source >/dev/null; then mkdir -p $(dir $@) && ln -sf /usr/sbin/smtp-source $@; \
	else tmp=$$(mktemp -d) && chmod 755 $$tmp && \
		(cd $$tmp && env PATH=$(DEBIAN_PATH) apt-get download -qq postfix) && \
		dpkg-deb -x $$tmp/postfix_*.deb $(VENV)/postfix && rm -rf $$tmp; fi
	@touch $@

test: venv lint smtp-source
	$(BIN)/python -m pytest -q tests/unit tests/integration

# Packaging and the system test need more than the unit tests: installed by
# their own targets so that `make test` stays light.
PKG_DEB_PKGS := debhelper dh-python python3-all python3-setuptools pybuild-plugin-pyproject \
	lintian groff-base man-db debootstrap systemd-container swaks iproute2 python3-aiosmtpd
DEB_OUT := build/deb

pkg-deps:
	$(call apt_ensure,$(PKG_DEB_PKGS))

# The .deb, built from a copy of the working tree (tracked and new files, not
# what .gitignore excludes) so the checkout gets no build debris; then lintian.
deb: pkg-deps
	rm -rf $(DEB_OUT) && mkdir -p $(DEB_OUT)/src
	git ls-files -z --cached --others --exclude-standard \
		| tar --null -T - --ignore-failed-read -cf - | tar -C $(DEB_OUT)/src -xf -
	cd $(DEB_OUT)/src && env -i PATH=$(DEBIAN_PATH) HOME=/root LANG=C.UTF-8 \
		dpkg-buildpackage -us -uc -b >../build.log 2>&1 \
		|| { tail -40 ../build.log; exit 1; }
	env PATH=$(DEBIAN_PATH) lintian --fail-on error,warning --display-info \
		$(DEB_OUT)/mailgrave_*.changes
	@ls $(DEB_OUT)/*.deb

# Boots Debian 12, then Debian 13, under systemd-nspawn; installs the one .deb on each,
# sends mail (root).  Both roots are cached in /var/cache/mailgrave-systest.
system-test: venv deb
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/system

clean:
	rm -rf $(VENV) run build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# MailGrave against Postfix on loopback (root): installs Postfix without starting
# it, runs both side by side, prints the table; Postfix is stopped at the end.
# Then what one smtpd connection costs, and BDAT against DATA in mailgrave-remote
# (about 20 s; BDAT_ARGS="--rounds 9 --scale 2" for more).
bench: venv
	bench/install-postfix.sh
	$(BIN)/python -m pip install -q --disable-pip-version-check py-spy
	$(BIN)/python bench/bench.py --profile build/bench/profile $(BENCH_ARGS)
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -S bench/forkfloor.py
	$(BIN)/python bench/bdat.py $(BDAT_ARGS)

# Faults and hostile input (issue 13; root for the tmpfs parts): the relay
# battery, the hostile corpus, slowness and floods, a full disk,
# STRESS_FUZZ (1,000,000) fuzzed inputs to the protocol core, and kill -9 of
# each stage during STRESS_KILL (10,000) messages, split among the stages; one table.
STRESS_FUZZ ?= 1000000
STRESS_KILL ?= 10000
stress: venv
	$(BIN)/python bench/stress.py --fuzz $(STRESS_FUZZ) --kill-messages $(STRESS_KILL)
