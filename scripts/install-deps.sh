#!/usr/bin/env bash
# Installs what pgwarden's build, lab and tests need on a Debian 12 machine (run as root).
# Idempotent: only missing packages are installed.
set -euo pipefail

need=()
[ -x /usr/lib/postgresql/15/bin/postgres ] || need+=(postgresql-15)
command -v ip >/dev/null || need+=(iproute2)
command -v nft >/dev/null || need+=(nftables)
command -v ping >/dev/null || need+=(iputils-ping)
[ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v psql >/dev/null || need+=(postgresql-client-15)
command -v curl >/dev/null || need+=(curl)
command -v python3 >/dev/null || need+=(python3)
# The EC2 emulator's venv needs the venv module (a separate package on Debian).
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)

if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing packages: ${need[*]} (run as root, or install them)" >&2
        exit 1
    fi
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Debian may start daemons from packages on some machines; the lab runs its own.
for svc in haproxy postgresql; do
    if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
        systemctl stop "$svc" || true
    fi
done

if ! command -v cargo >/dev/null; then
    echo "cargo is not installed: install the Rust toolchain (rustup) first" >&2
    exit 1
fi

# The EC2 emulator (tests/fixtures/ec2): moto in its own venv, outside the clone.
PGWARDEN_VENV="${PGWARDEN_VENV:-/var/tmp/pgwarden-venv}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! "$PGWARDEN_VENV/bin/python" -c 'import moto' >/dev/null 2>&1; then
    echo "installing the EC2 emulator's Python packages into $PGWARDEN_VENV"
    [ -x "$PGWARDEN_VENV/bin/pip" ] || python3 -m venv --clear "$PGWARDEN_VENV"
    "$PGWARDEN_VENV/bin/pip" install --quiet -r "$repo/tests/fixtures/ec2/requirements.txt"
fi

# The API fuzz pass (tests/tests/server_fuzz.rs): schemathesis in a venv of its own, so its
# dependencies never meet moto's. Reinstalled when the pinned requirements change.
PGWARDEN_FUZZ_VENV="${PGWARDEN_FUZZ_VENV:-/var/tmp/pgwarden-fuzz-venv}"
fuzz_req="$repo/tests/fixtures/fuzz/requirements.txt"
if ! cmp -s "$fuzz_req" "$PGWARDEN_FUZZ_VENV/requirements.txt"; then
    echo "installing the API fuzzer's Python packages into $PGWARDEN_FUZZ_VENV"
    [ -x "$PGWARDEN_FUZZ_VENV/bin/pip" ] || python3 -m venv --clear "$PGWARDEN_FUZZ_VENV"
    "$PGWARDEN_FUZZ_VENV/bin/pip" install --quiet --disable-pip-version-check -r "$fuzz_req"
    cp "$fuzz_req" "$PGWARDEN_FUZZ_VENV/requirements.txt"
fi
