#!/usr/bin/env bash
# The GPU checks in one pass, each stage under its own time limit so one that hangs or fails
# leaves the others' results. The default pass (what the next lent machine should answer first,
# as of 2026-12-06): the kernel and engine tests with the kernels compiled (tests), the engine on
# the default model's shape (smollm2) and on a ~0.89B random-weight Llama at context 2048
# (engine), Pallas, each with its host split, a host profile and EngineOptions.launch_thread off
# and on; the 8B shape's step costs with drafted steps beside plain ones (profile:
# tools/profile_engine.py); the kernel grid's mixed column at long contexts (mixed: a mixed
# step's decodes through the split-K decode kernel); the default model's shape with XLA's
# command buffers off and widened (graphs: is the step launch-bound?); speculation at batch
# 1/8/32 on the embedded test model, drafts in flight and not, with what time is left (spec:
# tools/bench_spec.py).
#
#   OUT=results tools/gpu_checks.sh                    # logs and tables land in $OUT
#   OUT=results STAGES="suite" tools/gpu_checks.sh      # the whole default test run instead
#   OUT=results STAGES="kernels sweep" tools/gpu_checks.sh   # the kernel grid and block sweep
#
# The device tool brings back at most 8 files: every stage but kernels leaves its table in its log
# only (each tool prints its table), so that the default pass's 8 files fit (env.txt and 7 logs).
#
# STAGES names the stages to run, in order (env always runs first). ENGINE_BACKENDS and
# ENGINE_CONTEXTS pick the engine stage's backends and contexts (default pallas and 2048);
# ENGINE_EXTRA adds flags to it and to smollm2's (default: --host_profile
# --launch_thread=false,true); TESTS_K narrows the tests stage (pytest -k). "kernels" is the
# kernel grid (tools/bench_kernels.py) with the KV-write comparison, "sweep" the block-size
# sweep. "suite" is the whole `make test` selection (not slow) less the tests marked
# multi_device, in 14 workers, under SUITE_S (540 s): one device command of its own. Stage
# limits in seconds (TESTS_S, KERNELS_S, ENGINE_S, SWEEP_S, SMOLLM2_S, MIXED_S, GRAPHS_S (each of
# its two runs), SPEC_S, PROFILE_S override them); DEADLINE_S (seconds from the start, default 570) cuts
# every stage's limit to what is left before it, so the default pass ends inside one 10-minute
# device command with the wheels' install (spec, last, takes what is left).
# Each test also has a limit of its own (TEST_TIMEOUT_S, where pytest-timeout is installed) so
# that one hung test cannot hold a test stage; a stage that reaches its own limit is killed
# without pytest's summary, so the per-test lines of the log (-v) are the record.
#
# Runs from the repository root under the machine's python3 (JAX with CUDA); PYTHON overrides.
# Packages the machine lacks can sit as wheels in .whl/ (installed into /tmp/site first):
# tools/gpu_wheels.sh, run here, writes the ones the H200 image (2026-11, 2026-12) lacks
# (ml_collections for tools/generate.py's tests; the serving, HTTP and notebook packages for
# the suite).
set -u
OUT=${OUT:-gpu_results}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
STAGES=${STAGES:-tests smollm2 engine profile mixed graphs spec}
DEADLINE_S=${DEADLINE_S-570}
ENGINE_EXTRA=${ENGINE_EXTRA---host_profile --launch_thread=false,true}
for name in $STAGES; do
  case $name in tests|suite|kernels|engine|smollm2|mixed|graphs|spec|profile|sweep) ;;
    *) echo "unknown stage '$name' in STAGES (tests suite kernels engine smollm2 mixed graphs spec profile sweep)" >&2
       exit 2;;
  esac
done
mkdir -p "$OUT"
start=$SECONDS
stage() { echo "== $1 at $((SECONDS - start)) s" | tee -a "$OUT/env.txt"; }
# A stage's limit, cut to what is left before DEADLINE_S (seconds from the start; empty: none).
limit() {
  local want=$1
  [ -n "${DEADLINE_S:-}" ] && want=$(( want < DEADLINE_S - (SECONDS - start) ? want : DEADLINE_S - (SECONDS - start) ))
  echo $(( want > 1 ? want : 1 ))
}
if ls .whl/*.whl >/dev/null 2>&1; then
  stage wheels
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$OUT/env.txt" 2>&1 && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD

stage env
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY - <<'EOF'
import importlib
import jax
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy", "torch", "transformers", "grpc",
             "google.protobuf", "ml_collections", "starlette", "uvicorn", "pydantic", "openai", "nbclient",
             "ipykernel", "jupytext", "hypothesis", "prometheus_client", "httpx", "xdist", "pytest_timeout"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as err:  # noqa: BLE001
        print(name, "import failed:", err)
print(jax.devices(), jax.default_backend())
import jinfer.engine  # noqa: F401  the package imports here
print("jinfer imports")
EOF
} >>"$OUT/env.txt" 2>&1

# A test stage's pytest runs in a session of its own, so that the workers of a run that hits
# its limit (they outlive pytest) are ended with it instead of holding the GPU through the
# benchmarks. Tests need no timing; their compiles are exact (matmul precision highest).
pytest_stage() {  # limit log pytest-args...
  local limit=$1 log=$2
  shift 2
  local per_test=()  # pytest-timeout is on the GPU images, not in the test extra
  $PY -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout="${TEST_TIMEOUT_S:-120}")
  XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest setsid timeout "$limit" \
    $PY -m pytest -p no:cacheprovider -v -rfE ${per_test[@]+"${per_test[@]}"} -n 14 "$@" >"$OUT/$log" 2>&1 &
  local pid=$!
  wait $pid
  kill -- -$pid 2>/dev/null
}

run_tests() {
  # The kernel tests and the engine-level ones in one run. Tests marked multi_device (tensor
  # parallelism over several devices; this machine has one GPU) are left out. On an H100 six
  # workers per set did not finish either set in 120 s; one run with 14 workers takes both. On an H200, 14 workers
  # finished 138 of the 162 cases in 130 s and 161 in 215 s (the benchmark tests, which spawn
  # processes, are the slowest); that run included the slow set, which this one leaves out as
  # make test does.
  # TESTS_K narrows them (pytest -k).
  pytest_stage "$(limit "${TESTS_S:-80}")" tests.log -m "not slow and not multi_device" ${TESTS_K:+-k "$TESTS_K"} \
    tests/test_pallas_kernels.py tests/test_pallas_backend.py tests/test_engine.py tests/test_greedy.py \
    tests/test_runner.py tests/test_xla_attention.py tests/test_drafts_in_flight.py
}

run_suite() {
  # What `make test` selects, every file, less the 24 multi_device cases (they need several
  # devices; CI runs them on 8 fake CPU devices). Not yet run on a GPU: its length there is
  # unknown (on the 2-core CPU machine two workers take about 11 minutes for all 687).
  pytest_stage "$(limit "${SUITE_S:-540}")" suite.log -m "not slow and not multi_device" --dist loadfile tests
}

run_kernels() {
  timeout "$(limit "${KERNELS_S:-140}")" $PY tools/bench_kernels.py --write --out="$OUT/kernels.md" \
    >"$OUT/kernels.log" 2>&1
}

run_engine() {
  # Pallas only by default (the xla rows were measured on both GPUs). A step budget of 1024
  # tokens compiled in 18 s on an H100 where 2048 took 88 s. All four rows and the parts line
  # took 246 s on an H200 before the pipeline probe; the two pallas rows with it, 61 s on an H100.
  timeout "$(limit "${ENGINE_S:-110}")" $PY tools/bench_engine.py --backends="${ENGINE_BACKENDS:-pallas}" \
    --hidden_size=2048 --num_layers=16 --vocab_size=32000 \
    --dtype=bfloat16 --decode_batch=64 --decode_steps=32 --backend_contexts="${ENGINE_CONTEXTS:-2048}" \
    --max_num_batched_tokens=1024 --repeats=3 ${ENGINE_EXTRA:-} >"$OUT/engine.log" 2>&1
}

run_smollm2() {
  # The engine against its bare loop on the default model's shape (random weights: the GGUF file
  # is larger than what may travel to the machine), bf16, Pallas, batch 64.
  timeout "$(limit "${SMOLLM2_S:-100}")" $PY tools/bench_engine.py --backends="${SMOLLM2_BACKENDS:-pallas}" \
    --preset=smollm2-135m --dtype=bfloat16 --decode_batch=64 --decode_steps=32 --backend_contexts=2048,128 \
    --max_num_batched_tokens=1024 --repeats=3 ${ENGINE_EXTRA:-} >"$OUT/smollm2.log" 2>&1
}

run_mixed() {
  # Mixed steps (decodes at a long context beside a 512-token chunk, 128 sequence slots) through
  # the ragged kernel and through mixed_paged_attention (the pallas_split backend's).
  timeout "$(limit "${MIXED_S:-40}")" $PY tools/bench_kernels.py --mixed --batches=1,8 --contexts=8192,32768 \
    --iters=10 >"$OUT/mixed.log" 2>&1
}

run_graphs() {
  # Is the step launch-bound? The default model's shape at context 128 (the shortest device
  # step) with XLA's command buffers (CUDA graphs) off, then with more op kinds in them than by
  # default and no minimum graph size; the smollm2 stage's rows are XLA's defaults.
  local flags
  for flags in "--xla_gpu_enable_command_buffer=" \
      "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL,+CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"; do
    echo "== XLA_FLAGS=$flags" >>"$OUT/graphs.log"
    XLA_FLAGS="$flags" timeout "$(limit "${GRAPHS_S:-40}")" $PY tools/bench_engine.py --backends=pallas \
      --preset=smollm2-135m --dtype=bfloat16 --decode_batch=64 --decode_steps=32 --backend_contexts=128 \
      --max_num_batched_tokens=1024 --repeats=3 >>"$OUT/graphs.log" 2>&1
  done
}

run_spec() {
  # Speculation on the GPU: the embedded test model (trained, so drafts are accepted) at batch
  # 1/8/32, a repetitive workload and the fresh control, suffix chains with drafts in flight
  # and without (@sync: each drafted step read before the next is planned); rows print as they
  # finish.
  timeout "$(limit "${SPEC_S:-120}")" $PY tools/bench_spec.py --models=default --workloads=repeat,fresh \
    --batches=1,8,32 --methods=off,suffix,suffix@sync,suffix_tree --repeats=2 >"$OUT/spec.log" 2>&1
}

run_profile() {
  # Step costs of the 8B shape (random weights, bf16, Pallas) on a grid of prefill chunks and
  # decode batches, fitted as the router's and the simulator's cost model; each decode batch again
  # with a 4-token draft per sequence (a drafted step's cost beside the plain one's).
  timeout "$(limit "${PROFILE_S:-120}")" $PY tools/profile_engine.py --config=configs/llama3_8b.py \
    --config.engine.compilation_cache= --prefill=64,256,1024 --cached=0 --batch=1,8,32,64 --context=512,2048 \
    --drafts=4 --repeats=3 >"$OUT/profile.log" 2>&1  # the fitted model's JSON is in the log
}

run_sweep() {
  timeout "$(limit "${SWEEP_S:-20}")" $PY tools/bench_kernels.py --sweep >"$OUT/sweep.log" 2>&1
}

for name in $STAGES; do
  stage "$name"
  "run_$name"
done
stage done
