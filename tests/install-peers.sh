#!/usr/bin/env bash
# Installs the real peers the test suite talks to, from Debian, when absent:
# Postfix (a destination and a client; its default instance stays
# unconfigured and is not started) with the SASL modules its client uses,
# swaks (an SMTP client), OpenDKIM's tools (a second DKIM verifier) and
# redis-server (the tests start their own instances; the packages' services
# are kept from starting while they are installed).
set -euo pipefail
need=()
[ -x /usr/sbin/postfix ] && [ -x /usr/sbin/postqueue ] || need+=(postfix)
command -v swaks >/dev/null || need+=(swaks)
command -v opendkim-testmsg >/dev/null || need+=(opendkim-tools)
command -v redis-server >/dev/null || need+=(redis-server)
ls /usr/lib/*/sasl2/libplain.so* >/dev/null 2>&1 || need+=(libsasl2-modules)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "install-peers: the tests need ${need[*]} (Debian packages); run as root or install them" >&2
    exit 1
fi
echo "installing ${need[*]} from Debian ..." >&2
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
apt-get update -qq
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2
