#!/usr/bin/env bash
# Times source trees side by side in one GPU run: bench_trace.py (the untraced
# step, then the per-block timeline with its records kept) for this tree and
# for each NAME=DIR given (another tree of tilert, say the base commit unpacked
# with `git archive REV | tar -x -C DIR`), on each workload of WORKLOADS. This
# tree runs first and again last, so drift on the card shows. One line per
# (tree, workload): the step and, per launch kind, blocks/inc/post in us. Logs,
# JSON and records go to $OUT as one archive, ab.tgz (a device run returns few
# files). AB_TESTS (say "kernels graph_executor") names GPU test modules that
# each other tree must pass first; a tree that fails them (or hangs past two
# minutes) is not timed. Run it after gpu_run.sh has installed and built this
# tree:
#   BENCHES= bash benchmarks/gpu_run.sh && bash benchmarks/ab_trace.sh base=.ab/base
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export TILERT_CACHE=${TILERT_CACHE:-/tmp/tilert-cache} PYTHONUNBUFFERED=1
[ -d /tmp/tilert-site ] && export PYTHONPATH="/tmp/tilert-site${PYTHONPATH:+:$PYTHONPATH}"
WORKLOADS=${WORKLOADS:-llama-3.2-1b smollm2-135m}

one() {  # one NAME DIR WORKLOAD
  local f="$OUT/ab_$1_$3"
  local args=(bench_trace.py --workload "$3" --json "$f.json" --raw "$f.npz")
  if [ "$2" = . ]; then
    (cd benchmarks && timeout -k 10 150 python3 "${args[@]}") >"$f.log" 2>&1
  else
    timeout -k 10 180 bash benchmarks/run_base.sh "$2" python3 "${args[@]}" >"$f.log" 2>&1
  fi
  echo "$1 $3: $(grep 'step untraced' "$f.log")" \
    "$(grep -E '^(qkv|attn|o_proj|gate_up|down|lm_head) ' "$f.log" |
      awk '{printf "%s %s/%s/%s  ", $1, $3, $4, $6}')"
}

# Every other tree's kernel library built at once before any timing (a tree
# builds on first use otherwise, one after another inside the device's time).
for spec in "$@"; do
  timeout -k 10 300 bash benchmarks/run_base.sh "${spec#*=}" python3 -m tilert.engine.cuda.build \
    >"$OUT/ab_build_${spec%%=*}.log" 2>&1 &
done
wait
passed() {  # passed NAME DIR: the AB_TESTS modules on that tree
  [ -z "${AB_TESTS:-}" ] && return 0
  local mods=() m
  for m in $AB_TESTS; do mods+=("../tests/gpu/test_$m.py"); done
  timeout -k 10 120 bash benchmarks/run_base.sh "$2" python3 -m pytest -m gpu "${mods[@]}" \
    --confcutdir=../tests/gpu -p no:cacheprovider -q -x -o addopts="" >"$OUT/ab_tests_$1.log" 2>&1
  local rc=$?
  echo "$1 tests: $(tail -n 1 "$OUT/ab_tests_$1.log") (rc=$rc)"
  return $rc
}
for w in $WORKLOADS; do one this . "$w"; done
for spec in "$@"; do
  passed "${spec%%=*}" "${spec#*=}" || continue
  for w in $WORKLOADS; do one "${spec%%=*}" "${spec#*=}" "$w"; done
done
for w in $WORKLOADS; do one this-again . "$w"; done
(cd "$OUT" && tar czf ab.tgz ab_* && rm -f ab_*)
