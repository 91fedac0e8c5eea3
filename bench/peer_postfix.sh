#!/usr/bin/env bash
# Sluice side by side with Postfix, same load generator (Postfix's smtp-source;
# bench/tls_source.py for the STARTTLS figure, which smtp-source cannot do).
# Figures: accept10k, accept100k (mail held in the queue), accept-tls (the same
# with STARTTLS on every connection, one certificate for both), accept-dkim
# (every message DKIM-signed: Sluice's [dkim], Postfix through an OpenDKIM
# milter), relay (end to end to smtp-sink), purge (100,000 queued).
#
#   bench/peer_postfix.sh                 # the whole run (about 15 minutes)
#   bench/peer_postfix.sh --only relay    # one figure; options go to peer_postfix.py
#   bench/peer_postfix.sh --only accept-tls --n-tls 3000 --repeat 1   # a quick one
#   KEEP=1 bench/peer_postfix.sh          # keep the work dir (spools, logs, outputs)
#   SLUICE_REF=HEAD bench/peer_postfix.sh # measure a commit's src/ (git archive into the
#                                         # work dir, put first on PYTHONPATH), not the work tree
#
# Installs Postfix and OpenDKIM from Debian if absent (debconf: "No
# configuration", so Postfix's default instance stays unconfigured; services
# are kept from starting during the install, so no system opendkim runs), then
# runs bench/peer_postfix.py, which starts a private Postfix instance (its own
# config dir, queue dir and log file under the work dir, 127.0.0.1 only), for
# accept-dkim a private opendkim in the foreground (127.0.0.1 only; its config
# file and the keys in a root-only dir under /run, see below), and its own
# `sluice serve`. Whatever happens, the trap stops that Postfix instance and
# every process the run started, and removes the work dir and the key dir.
# Must run as root (postfix start, smtp-sink -u nobody, opendkim reading the
# root-owned key).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
py="${PYTHON:-$root/.venv/bin/python}"

if [ "$(id -u)" != 0 ]; then
    echo "peer_postfix.sh: must run as root" >&2
    exit 2
fi

need=()
for f in /usr/sbin/postfix /usr/sbin/postsuper /usr/sbin/postconf /usr/sbin/postqueue /usr/sbin/postcat \
         /usr/sbin/smtp-source /usr/sbin/smtp-sink; do
    [ -x "$f" ] || { need+=(postfix); break; }
done
[ -x /usr/sbin/opendkim ] || need+=(opendkim)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]} from Debian ..." >&2
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    # No service starts during the install (invoke-rc.d asks policy-rc.d):
    # a system opendkim left running would share the machine with the run.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod 755 "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    apt-get update -qq
    rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2 || rc=$?
    if [ -n "$policy" ]; then rm -f "$policy"; trap - EXIT; fi
    [ "$rc" = 0 ] || exit "$rc"
fi
[ -x "$py" ] || { echo "no python at $py (make the venv first, or set PYTHON)" >&2; exit 2; }

work="$(mktemp -d "${WORKDIR:-/var/tmp}/peer-postfix.XXXXXX")"
chmod 755 "$work"
# The private keys (TLS, DKIM) and opendkim's config: opendkim refuses files
# with a world-writable directory (/var/tmp) anywhere above them, so they get
# a root-only directory in /run.
keys="$(mktemp -d /run/peer-postfix-keys.XXXXXX)"
export PEER_KEYDIR="$keys"

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    # The driver first: on TERM it stops what it started, in its own finally.
    if [ -n "${pypid:-}" ] && kill -0 "$pypid" 2>/dev/null; then
        kill -TERM "$pypid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pypid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pypid" 2>/dev/null || true
    fi
    # The private Postfix instance, if one is still up.
    if [ -f "$work/postfix/etc/main.cf" ] && [ -f "$work/postfix/spool/pid/master.pid" ]; then
        postfix -c "$work/postfix/etc" stop >/dev/null 2>&1 || postfix -c "$work/postfix/etc" abort >/dev/null 2>&1 || true
    fi
    # Every process the run started and has not reaped (sluice serve,
    # smtp-sink, smtp-source, tls_source.py, opendkim, the Postfix master),
    # listed as "pid starttime";
    # a pid is signalled only while its start time still matches.
    if [ -f "$work/pids" ]; then
        local sig pid start
        for sig in TERM KILL; do
            while read -r pid start; do
                [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || continue
                [ "$(sed 's/.*) //' "/proc/$pid/stat" | cut -d' ' -f20)" = "$start" ] || continue
                kill "-$sig" "$pid" 2>/dev/null || true
            done < "$work/pids"
            if [ "$sig" = TERM ]; then sleep 1; fi
        done
    fi
    if [ -n "${KEEP:-}" ]; then
        echo "work dir kept: $work (keys: $keys)" >&2
    else
        rm -rf "$work" "$keys"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ -n "${SLUICE_REF:-}" ]; then
    # A read-only export of that commit's src/; the venv's editable install is
    # a plain path in a .pth file, so PYTHONPATH comes before it.
    commit="$(git -C "$root" rev-parse --short "$SLUICE_REF^{commit}")"
    mkdir -p "$work/sluice-src"
    git -C "$root" archive --format=tar "$commit" src | tar -x -C "$work/sluice-src"
    export PYTHONPATH="$work/sluice-src/src${PYTHONPATH:+:$PYTHONPATH}"
    export PEER_SLUICE_COMMIT="$commit (src/ exported with git archive)"
    echo "sluice from $SLUICE_REF = $commit" >&2
fi

# In the background, so that a signal to this shell runs the trap at once.
"$py" "$here/peer_postfix.py" --workdir "$work" "$@" &
pypid=$!
wait "$pypid"
