#!/usr/bin/env bash
# Brings up a local demo: a three-node pgwarden cluster of real PostgreSQL hosts (network
# namespaces as root, loopback ports otherwise) with pgwarden-server (embedded SQLite store) on
# its own host, every agent enrolled with a join token, and prints how to reach it.
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
"$bin/pgwarden-lab" up --nodes "${NODES:-3}" --server "${vip[@]}" > /var/tmp/pgwarden-demo.json
cat /var/tmp/pgwarden-demo.json
field() { python3 -c "import json,sys; d=json.load(open('/var/tmp/pgwarden-demo.json')); print(d['server']['$1'])"; }
url=$(field url); ca=$(field ca_file); user=$(field user); password=$(field password); token=$(field token)
cat <<MSG

The demo cluster is up, with its control plane:
  server    $url   (CA $ca)
  user      $user / $password   (role admin)
  API token $token

  export PATH=$bin:\$PATH PGWARDEN_SERVER=$url PGWARDEN_CA=$ca PGWARDEN_TOKEN=$token
  pgwardenctl list                             # every cluster and node, from the server
  pgwardenctl events --follow                  # the live event log
  pgwardenctl switchover --cluster lab         # through the server and the agents' vote
  curl -s --cacert $ca -H "Authorization: Bearer $token" $url/api/v1/clusters

The agents directly (works while the server is down). Try:
  export PATH=$bin:\$PATH
  pgwarden-lab status                          # roles, timelines, lag
  pgwarden-lab exec n1 -- psql -c 'select 1'   # psql inside host n1
  pgwarden-lab exec client -- psql -c 'select inet_server_addr()'   # through the VIP
  PGWARDEN_TOKEN=<agent token> pgwardenctl --ca $ca --agent https://<node host>:8443 list
  pgwarden-probe --seconds 10                  # write gap, lost writes, split brain
  curl -s -o /dev/null -w '%{http_code}\n' http://<node host>:8008/primary
  pgwarden-lab fault kill-postgres n1          # the agent restarts it in place
  PGWARDEN_TOKEN=<agent token> pgwardenctl --ca $ca --agent https://<node host>:8443 switchover
  pgwarden-lab fault stop-node n1              # host down: another node takes over in ~4 s
  pgwarden-lab fault start-node n1             # it comes back as a replica
  pgwarden-lab down                            # remove everything
The agents' API token is the top-level "token" of the JSON above.
MSG
