#!/usr/bin/env bash
# Installs everything, starts the server on the embedded model, streams one
# generation through tilert-client, then stops the server.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
port_file=$(mktemp)
log=${TILERT_DEMO_LOG:-$(mktemp -t tilert-server-XXXX.log)}
tilert serve --port 0 --port-file "$port_file" 2>"$log" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null; rm -f "$port_file"' EXIT
echo "server log: $log" >&2
until [ -s "$port_file" ]; do
  kill -0 $server 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.2
done
export TILERT_TARGET="127.0.0.1:$(cat "$port_file")"
until tilert-client health >/dev/null 2>&1; do sleep 0.5; done
tilert-client generate "${1:-Write a haiku about fast inference.}" --max-tokens 96 --temperature 0.3
