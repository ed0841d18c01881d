#!/usr/bin/env bash
# Brings up a local demo: a three-node pgwarden cluster of real PostgreSQL hosts (network
# namespaces as root, loopback ports otherwise) and prints how to reach it.
# Stop it with: pgwarden-lab down
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/pgwarden-target}"

scripts/install-deps.sh
cargo build --release --bins
bin="$CARGO_TARGET_DIR/release"
if [ -f /var/tmp/pgwarden-lab/lab/lab.json ]; then
    "$bin/pgwarden-lab" down || true
fi
vip=()
# The VIP needs network namespaces (root); without root the lab runs on loopback ports.
[ "$(id -u)" -eq 0 ] && vip=(--vip 10.77.0.100/24)
"$bin/pgwarden-lab" up --nodes "${NODES:-3}" "${vip[@]}" | tee /var/tmp/pgwarden-demo.json
cat <<MSG

The demo cluster is up. Try:
  export PATH=$bin:\$PATH
  pgwarden-lab status                          # roles, timelines, lag
  pgwarden-lab exec n1 -- psql -c 'select 1'   # psql inside host n1
  pgwarden-lab exec client -- psql -c 'select inet_server_addr()'   # through the VIP
  PGWARDEN_TOKEN=<token> pgwardenctl --ca /var/tmp/pgwarden-lab/lab/ca/ca.pem --agent https://<node host>:8443 list
  pgwarden-probe --seconds 10                  # write gap, lost writes, split brain
  curl -s -o /dev/null -w '%{http_code}\n' http://<node host>:8008/primary
  pgwarden-lab fault kill-postgres n1          # the agent restarts it in place
  PGWARDEN_TOKEN=<token> pgwardenctl --ca /var/tmp/pgwarden-lab/lab/ca/ca.pem --agent https://<node host>:8443 switchover
  pgwarden-lab fault stop-node n1              # host down: another node takes over in ~4 s
  pgwarden-lab fault start-node n1             # it comes back as a replica
  pgwarden-lab down                            # remove everything
The agent API token is in the JSON above ("token").
MSG
