#!/bin/sh
# Install what tests/nspawn.py and tests/system/test_systemd_unit.py need, idempotently and quietly:
#   systemd-container  systemd-nspawn: boots a real systemd 252 as PID 1 of a guest
#   systemd            systemd-analyze verify / security (normally present)
#   util-linux         nsenter, mount, mountpoint (normally present)
#   python3            /usr/bin/python3 for the small stub services inside a guest
# Does nothing (and needs no network) when all of it is installed already; prints apt's output only
# when apt fails.
set -eu

need=""
command -v systemd-nspawn >/dev/null 2>&1 || need="$need systemd-container"
command -v systemd-analyze >/dev/null 2>&1 || need="$need systemd"
for tool in nsenter mount umount mountpoint; do
    command -v "$tool" >/dev/null 2>&1 || { need="$need util-linux mount"; break; }
done
[ -x /usr/bin/python3 ] || need="$need python3"

[ -n "$need" ] || exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "ci-systemd-deps: root needed to install:$need" >&2
    exit 1
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086  # $need is a word list
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends $need; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "ci-systemd-deps: apt-get failed installing:$need" >&2
    exit 1
fi
echo "ci-systemd-deps: installed$need"
