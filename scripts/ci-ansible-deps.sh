#!/bin/sh
# Install what ansible/ and tests/system/test_ansible.py need, idempotently and quietly:
#   ansible/.venv   ansible (ansible-core + community.general, ansible.posix), ansible-lint, yamllint, as pinned
#                   in ansible/requirements.txt (a virtualenv of its own: ansible's dependencies stay out of .venv)
#   nftables        nft: the role's firewall rule is applied for real (inside the test guest's own network
#                   namespace; the host's ruleset is never touched)
# Does nothing (and needs no network) when all of it is in place already; prints pip's or apt's output only
# when they fail. PYTHON (default python3, >= 3.11) builds the virtualenv.
set -eu
cd "$(dirname "$0")/.."

venv=ansible/.venv
stamp="$venv/.requirements.sha256"
want=$(sha256sum ansible/requirements.txt | cut -d' ' -f1)
log=$(mktemp)
trap 'rm -f "$log"' EXIT

if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    if ! {
        { [ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"; } &&
            "$venv/bin/pip" install -q --disable-pip-version-check -r ansible/requirements.txt
    } >"$log" 2>&1; then
        cat "$log" >&2
        echo "ci-ansible-deps: pip failed installing ansible/requirements.txt into $venv" >&2
        exit 1
    fi
    echo "$want" >"$stamp"
    echo "ci-ansible-deps: installed ansible/requirements.txt into $venv"
fi

if ! command -v nft >/dev/null 2>&1 && [ ! -x /usr/sbin/nft ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "ci-ansible-deps: root needed to install nftables" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends nftables; } >"$log" 2>&1; then
        cat "$log" >&2
        echo "ci-ansible-deps: apt-get failed installing nftables" >&2
        exit 1
    fi
    echo "ci-ansible-deps: installed nftables"
fi
