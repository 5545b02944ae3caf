#!/usr/bin/env bash
# Prints a new directory of links that makes the tilert source tree TREE
# importable as the packages tilert and tilert_client: put it first on
# PYTHONPATH (gpu_run.sh where pip cannot install; run_base.sh for another tree).
#   ns=$(bash benchmarks/site_links.sh TREE)
set -eu
tree=$(cd "$1" && pwd)
ns=$(mktemp -d)/site
mkdir -p "$ns/tilert"
ln -s "$tree/engine" "$ns/tilert/engine"
ln -s "$tree/service" "$ns/tilert/service"
ln -s "$tree/client/tilert_client" "$ns/tilert_client"
echo "$ns"
