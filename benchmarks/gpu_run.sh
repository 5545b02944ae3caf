#!/usr/bin/env bash
# One GPU run: environment, offline install, kernel build, GPU tests, decode
# benchmark. Logs go to $OUT (or ./out); a short table is printed last.
# Every step has its own time limit so that one hang cannot eat the run.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export PYTHONUNBUFFERED=1 TILERT_CACHE=${TILERT_CACHE:-/tmp/tilert-cache}
TEST_TIMEOUT=${TEST_TIMEOUT:-240}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-240}
status=()

step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2
  shift 2
  echo "=== $name (limit ${secs}s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$secs" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  status+=("$name rc=$rc $((SECONDS - t0))s")
  return $rc
}

step env 60 bash -c 'nvidia-smi; python3 -c "import torch,grpc,google.protobuf,transformers,sys;
print(sys.version); print(\"torch\", torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0));
print(\"grpc\", grpc.__version__, \"protobuf\", google.protobuf.__version__, \"transformers\", transformers.__version__)"; nvcc --version | tail -2'

# The committed gRPC stubs need grpcio >= 1.85 and protobuf >= 7.35; GPU images
# may have older ones and no package index: use wheels carried in .whl/ if any.
if ! python3 -c "import grpc, google.protobuf as p, sys
g = tuple(map(int, grpc.__version__.split('.')[:2])); q = tuple(map(int, p.__version__.split('.')[:2]))
sys.exit(0 if g >= (1, 85) and q >= (7, 35) else 1)" && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/tilert-site .whl/*.whl
  export PYTHONPATH="/tmp/tilert-site${PYTHONPATH:+:$PYTHONPATH}"
  echo "using carried wheels: $(ls .whl)"
fi

# Offline editable install; if pip cannot, put a namespace of links on PYTHONPATH.
if ! step install 120 python3 -m pip install --no-deps --no-build-isolation --no-index -e client -e .; then
  ns=$(bash benchmarks/site_links.sh .)
  export PYTHONPATH="$ns${PYTHONPATH:+:$PYTHONPATH}"
  echo "install failed: using PYTHONPATH=$PYTHONPATH"
fi

step build 300 env TILERT_DUMP_SASS=1 python3 -m tilert.engine.cuda.build
cp "$TILERT_CACHE"/libtilert_*.so.log "$OUT/ptxas.log" 2>/dev/null

for t in ${TESTS-deepseek_prep_kernels deepseek_graph kernels graph_executor serve_gpu deepseek_kernels mla_kernels}; do
  step "tests_$t" "$TEST_TIMEOUT" python3 -m pytest -m gpu "tests/gpu/test_$t.py" --confcutdir=tests/gpu \
    -p no:cacheprovider -q -rfEs --tb=short --durations=5 --timeout=120 -o addopts=""
done

# BENCHES: which benchmarks run (default: both decode benchmarks; "" for none).
for b in ${BENCHES-decode deepseek}; do
  case $b in
    decode) step bench "$BENCH_TIMEOUT" python3 benchmarks/bench_decode.py \
      --json "$OUT/bench_decode.json" ${BENCH_ARGS:-} ;;
    # DeepSeek-V3.2 whole layers at the real geometry, through the graph executor.
    deepseek) step bench_deepseek "$BENCH_TIMEOUT" python3 benchmarks/bench_deepseek_decode.py \
      --json "$OUT/bench_deepseek.json" ;;
    # Marginal cost of each launch kind inside the PDL step (Llama-3.2-1B geometry).
    marginal) step bench_marginal "$BENCH_TIMEOUT" bash -c "cd benchmarks && python3 bench_marginal.py \
      --json $OUT/bench_marginal.json" ;;
    # Per-block timeline of the Llama-3.2-1B / SmolLM2 step and the GEMV L2-prefetch sweep.
    trace) step bench_trace "$BENCH_TIMEOUT" bash -c "cd benchmarks && python3 bench_trace.py \
      --json $OUT/bench_trace.json --raw $OUT/trace_llama.npz ${TRACE_ARGS:-}" ;;
    trace_smollm) step bench_trace_smollm "$BENCH_TIMEOUT" bash -c "cd benchmarks && python3 \
      bench_trace.py --workload smollm2-135m --json $OUT/bench_trace_smollm.json --raw $OUT/trace_smollm.npz ${TRACE_ARGS:-}" ;;
    # The MoE block and FP8 GEMVs alone (tilings).
    moe) step bench_deepseek_layer "$BENCH_TIMEOUT" python3 benchmarks/bench_deepseek_layer.py \
      --json "$OUT/bench_deepseek_layer.json" ;;
  esac
done

# AB: other source trees to time against this one, NAME=DIR ... (benchmarks/ab_trace.sh).
if [ -n "${AB:-}" ]; then
  # shellcheck disable=SC2086  # NAME=DIR words
  step compare 900 bash benchmarks/ab_trace.sh $AB
fi

echo
echo "=== summary"
printf '%s\n' "${status[@]}"
for f in "$OUT"/tests_*.log; do
  [ -f "$f" ] || continue
  echo "$(basename "$f" .log): $(grep -hE "^[0-9]+ (passed|failed)|^=+ .*(passed|failed|error)" "$f" | tail -n 1)"
  grep -hE "^(FAILED|ERROR) " "$f" | head -n 10
done
[ -f "$OUT/bench.log" ] && sed -n '/^NVIDIA\|^H100\|^H200\|GB\/s (read/,$p' "$OUT/bench.log" | tail -n 20
[ -f "$OUT/bench_deepseek.log" ] && sed -n "/copy bandwidth/,\$p" "$OUT/bench_deepseek.log"
[ -f "$OUT/bench_marginal.log" ] && sed -n "/context/,\$p" "$OUT/bench_marginal.log"
for f in "$OUT"/bench_trace*.log; do [ -f "$f" ] && sed -n "/context/,\$p" "$f"; done
[ -f "$OUT/compare.log" ] && grep -E "untraced| tests: " "$OUT/compare.log"
# A device run returns at most 8 files: the logs travel as one archive.
(cd "$OUT" && ls ./*.log >/dev/null 2>&1 && tar czf logs.tgz ./*.log && rm -f ./*.log)
true  # the run's outcome is in the summary above, not in the last test of a listing
