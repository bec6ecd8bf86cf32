#!/bin/bash
# Install Postfix for the benchmark without letting it start or take port 25.
# debconf answers "No configuration"; a policy-rc.d that exits 101 stops
# invoke-rc.d from starting it during the install (an existing policy-rc.d is
# put back afterwards). The bench runs Postfix from its own config dir only.
set -euo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
if dpkg-query -W -f='${db:Status-Abbrev}' postfix 2>/dev/null | grep -q '^ii'; then
	exit 0
fi
if [ "$(id -u)" != 0 ]; then
	echo "postfix is not installed; run make bench as root" >&2
	exit 1
fi
policy=/usr/sbin/policy-rc.d
saved=""
if [ -e "$policy" ]; then
	saved=$(mktemp)
	cp -p "$policy" "$saved"
fi
restore() {
	if [ -n "$saved" ]; then cp -p "$saved" "$policy" && rm -f "$saved"; else rm -f "$policy"; fi
}
trap restore EXIT
printf '#!/bin/sh\nexit 101\n' >"$policy"
chmod 755 "$policy"
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends postfix >/dev/null
# The package's own instance must not run (it has no main.cf with "No configuration").
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
	systemctl stop postfix.service 2>/dev/null || true
	systemctl disable postfix.service 2>/dev/null || true
fi
