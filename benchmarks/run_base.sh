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
ns=$(bash "$(dirname "$0")/site_links.sh" "$base")
export PYTHONPATH="$ns${PYTHONPATH:+:$PYTHONPATH}"
export TILERT_CACHE="${TILERT_CACHE:-/tmp/tilert-cache}-base"
cd "$base/benchmarks"
exec "$@"
