#!/usr/bin/env bash
# Installs the real peers the test suite talks to, from Debian, when absent:
# Postfix (a destination and a client; its default instance stays
# unconfigured and is not started) with the SASL modules its client uses,
# swaks (an SMTP client) and OpenDKIM's tools (a second DKIM verifier).
set -euo pipefail
need=()
[ -x /usr/sbin/postfix ] && [ -x /usr/sbin/postqueue ] || need+=(postfix)
command -v swaks >/dev/null || need+=(swaks)
command -v opendkim-testmsg >/dev/null || need+=(opendkim-tools)
ls /usr/lib/*/sasl2/libplain.so* >/dev/null 2>&1 || need+=(libsasl2-modules)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "install-peers: the tests need ${need[*]} (Debian packages); run as root or install them" >&2
    exit 1
fi
echo "installing ${need[*]} from Debian ..." >&2
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2
