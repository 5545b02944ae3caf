#!/usr/bin/env bash
# Runs a command against another source tree of tilert (say, the commit before
# a change, unpacked with `git archive REV | tar -x -C DIR`), so that a change
# and its base are measured in one GPU run, on one card:
#   bash benchmarks/run_base.sh DIR python3 DIR/benchmarks/bench_trace.py ...
# The tree gets its own kernel cache; the Python packages come from it through
# a directory of links placed first on PYTHONPATH.
set -eu
base=$(cd "$1" && pwd)
shift
ns=$(mktemp -d)/site
mkdir -p "$ns/tilert"
ln -s "$base/engine" "$ns/tilert/engine"
ln -s "$base/service" "$ns/tilert/service"
ln -s "$base/client/tilert_client" "$ns/tilert_client"
export PYTHONPATH="$ns${PYTHONPATH:+:$PYTHONPATH}"
export TILERT_CACHE="${TILERT_CACHE:-/tmp/tilert-cache}-base"
cd "$base/benchmarks"
exec "$@"
