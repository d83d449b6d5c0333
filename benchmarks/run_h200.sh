#!/usr/bin/env bash
# One GPU session's stages, run on the device machine from the repo root (see benchmarks/RESULTS.md):
#   bash benchmarks/run_h200.sh tests      # llama.cpp build in the background, SPEC 5000 recording, the GPU suite
#   bash benchmarks/run_h200.sh tune       # dense matmul: GPU tests, config sweep, step profile
#   bash benchmarks/run_h200.sh load       # engine and HTTP throughput, worker-orcd and llama-server, same files
#   bash benchmarks/run_h200.sh profile    # step profiles (0.5B and 7B: waited, overlapped, prefill, mixed) + tune_wide
#   bash benchmarks/run_h200.sh qtiled     # quantized residency: tiled-kernel GPU tests, tune_qtiled, 7B steps per residency
#   bash benchmarks/run_h200.sh wload      # worker-orcd alone under load (0.5B F16, 7B Q4_K_M), engine steps per level
#   bash benchmarks/run_h200.sh final      # a short call: dot-K probe, seal + batching GPU tests, worker load (7B, 0.5B)
#   bash benchmarks/run_h200.sh probe      # 7B decode-step kernels at B = 48/64, wide tiles below 64 rows, steady-state 7B load vs llama-server
#   bash benchmarks/run_h200.sh kprobe     # swapped-operand Q4_K probe, dense wide tiles from 17 rows (tests, sweep, 7B steps)
#   bash benchmarks/run_h200.sh qverify    # quantized residency (swapped form, K segments): GPU tests, tune_qtiled, 7B Q4_K_M steps
#   bash benchmarks/run_h200.sh verify7    # branch next: suite (both GPUs), SHA-256 rate, quantized prefill, one-pass ready times, ITL at 256
#   bash benchmarks/run_h200.sh qprefill   # dequantize-to-scratch prefill path: GPU tests, 7B Q4_K_M steps per residency
#   bash benchmarks/run_h200.sh itl        # 7B Q4_K_M at 64 clients, steady state, --mixed-step-tokens 384 / 256 / 192 (p99 ITL vs tok/s, TTFT)
#   bash benchmarks/run_h200.sh bench13    # issue 13: bench_engine + llama-bench on the same files (RESIDENCY=quantized|dense)
#   bash benchmarks/run_h200.sh r72        # issue 13: a 72B-shape Q4_K_M (51 GB) resident quantized, 32k KV, against llama-bench
#   bash benchmarks/run_h200.sh tp         # kind nvidia-h200-x2: NCCL tensor-parallel tests, 7B F16 load tp=1/2 vs llama -sm tensor/layer
#   bash benchmarks/run_h200.sh half2      # branch next: quantized-half2 residency: GPU tests, probe_half2.py, 7B Q4_K_M steps vs quantized
#   bash benchmarks/run_h200.sh tp12       # kind nvidia-h200-x2: 7B Q4_K_M tp=1/2, 72B Q4_K_M tp=2, llama -sm layer/tensor (issue 12's rows)
#   bash benchmarks/run_h200.sh tp72q8     # kind nvidia-h200-x2: TP GPU tests, the 72B shape Q8_0 dense (145 GB fp16) at tp=2
#   bash benchmarks/run_h200.sh verify9    # kind nvidia-h200-x2: the suite on both GPUs, then tp12's 7B half
#   bash benchmarks/run_h200.sh verify10   # kind nvidia-h200-x2: the suite on both GPUs, then bench_engine 7B Q4_K_M quantized-half2 (seal verify ms)
#   bash benchmarks/run_h200.sh sealov     # seal checks beside the steps: seal/batching GPU tests, p99 ITL at 64 (7B) vs .devdata/base (the tree before)
#   bash benchmarks/run_h200.sh gapdiag    # issue 8's p99 gaps: the engine alone under load (no HTTP), a mixed step's kernels (7B Q4_K_M dense)
#   bash benchmarks/run_h200.sh sealg      # seal checks beside steps per fingerprint program count and check interval (7B Q4_K_M dense, engine alone)
#   bash benchmarks/run_h200.sh sealfinal  # sealg's probe and engine variants (SEAL_PROGRAMS, SEAL_VARIANTS), then bench_load over HTTP at the defaults
#   bash benchmarks/run_h200.sh verify10b  # kind nvidia-h200-x2: the suite on both GPUs, then bench_load 7B Q4_K_M at 1 and 64 clients (defaults)
#   bash benchmarks/run_h200.sh diag11     # issue 8: 192-token mixed bucket tests; engine alone at 1/64 clients, caps 256/192, traced device timelines
#   bash benchmarks/run_h200.sh split11    # split attention passes: GPU tests, engine alone 1/64 clients traced, 8k-context lone stream vs .devdata/base
#   bash benchmarks/run_h200.sh http11     # issue 8 over HTTP: 1 client, 64 clients per mixed-step cap (HTTP_CAPS), client processes
#   bash benchmarks/run_h200.sh httpab     # the 0.5B at 64 clients over HTTP: this tree vs .devdata/base, alternating
#   bash benchmarks/run_h200.sh proc12     # issue 8: the engine in its own process (--engine-process on) vs in the worker's (off), HTTP 0.5B/7B, 1 and 64 clients
#   bash benchmarks/run_h200.sh caps12     # the split-slot fallback GPU test; 7B Q4_K_M over HTTP (engine process on), 64 clients per mixed-step cap, then 128 clients
#   bash benchmarks/run_h200.sh merge12    # fused split merge: attention/fallback/batching GPU tests, 0.5B lone stream over HTTP vs .devdata/base, alternating
#   bash benchmarks/run_h200.sh spy13      # py-spy on the worker process while 64 clients load the 0.5B (where the HTTP side's time goes)
#   bash benchmarks/run_h200.sh direct13   # SSE token fast path: 0.5B at 64 clients vs .devdata/base, alternating; GIL switch 0.25 ms; 7B Q4_K_M at 64
#   bash benchmarks/run_h200.sh gc13       # the worker's garbage collections under 64-client 0.5B load: stats, high thresholds, disabled
#   bash benchmarks/run_h200.sh lag13      # step channel / event-loop lag histograms: 0.5B at 64 clients vs .devdata/base (keep-alive clients); 7B Q4_K_M at 64
#   bash benchmarks/run_h200.sh final13    # issue 8 at this tree: 0.5B 1 client; 64 clients with GC pauses logged and with uvloop; 7B F16 at 1 and 64
#   bash benchmarks/run_h200.sh loop13     # uvloop + token fast path vs .devdata/base: 0.5B 64 clients alternating (+ --event-loop asyncio), 1 client; 7B Q4_K_M 64
#   bash benchmarks/run_h200.sh gcab13     # 0.5B at 64: this tree vs .devdata/base, and with the worker's GC thresholds raised (pauses logged)
#   bash benchmarks/run_h200.sh frag14     # Q4_K/Q6_K in fragment order: GPU tests, probe_fragments.py, 7B Q4_K_M half2 steps vs .devdata/base
#   bash benchmarks/run_h200.sh fbench14   # issue 13's table for Q4_K_M (1.5B, 7B) under quantized-half2 against llama-bench, same files
#   bash benchmarks/run_h200.sh verify16   # branch next-rope-store: GPU suite, 0.5B F16 / 1.5B / 7B Q4_K_M steps vs .devdata/base
#   bash benchmarks/run_h200.sh mixed18    # q/k (Q4_K) + v (Q6_K) in one launch: GPU tests, 1.5B / 7B Q4_K_M steps on/off twice
#   bash benchmarks/run_h200.sh br19       # 8 tokens per decode program up to 8 rows vs 16: GPU tests, decode steps
#   bash benchmarks/run_h200.sh dotk19     # Q4_K chain in 64-input dots vs 32: GPU tests, decode steps
#   bash benchmarks/run_h200.sh fuse19     # decode steps with the in-launch K-segment sum vs a second launch; the flaky capture test x3
#   bash benchmarks/run_h200.sh final18    # split attention idle exit: GPU tests, 1.5B/7B steps vs .devdata/base, rows vs llama-bench
#   bash benchmarks/run_h200.sh stages18   # decode pipeline depth per type/segment: GPU test, steps vs 3 stages, ncu of single launches
#   bash benchmarks/run_h200.sh seg18      # fragment-order matmuls per K-segment rule and stages (1.5B, 7B matrices, M = 1/16)
#   bash benchmarks/run_h200.sh verify17   # branch next-pdl: GPU suite, then 1.5B Q4_K_M / 0.5B F16 steps per --pdl mode
#   bash benchmarks/run_h200.sh pdl7b      # branch next-pdl: 7B Q4_K_M steps per --pdl mode (off, on, prefetch)
#   bash benchmarks/run_h200.sh ready16    # 7B Q4_K_M time to ready: cold process, then warm-cache process with its load profiled
#   bash benchmarks/run_h200.sh final16    # the GPU suite, then 1.5B / 7B Q4_K_M quantized-half2 rows vs llama-bench (ready: load beside warm-up)
#   bash benchmarks/run_h200.sh final15    # the GPU suite, then 7B Q8_0 / 7B Q4_K_M / 1.5B Q4_K_M quantized-half2 rows vs llama-bench
#   bash benchmarks/run_h200.sh pre15      # quantized prefill chains (one loop vs a loop per segment): tests, probe_prefill, 7B steps vs base, rows vs llama-bench
#   bash benchmarks/run_h200.sh verify15   # branch next-fused-segments: GPU suite, probe_fragments (in-launch segment sums), 7B Q4_K_M half2 steps vs .devdata/base
#   bash benchmarks/run_h200.sh tpq        # kind nvidia-h200-x2: quantized shards: 7B Q4_K_M tp=1/2 (TP_72B=1: the 72B shape) vs llama -sm tensor/layer
# SKIP_LLAMA=1 keeps `tests` from building llama.cpp (when no llama-server run follows); SKIP_PROFILE=1 from its 0.5B step profile.
# LOAD_DURATION=S (load, wload): steady state -- back-to-back requests for S s per level, tok/s over [LOAD_WARMUP, S].
# Chain `tests` and `load` back to back: the machine is released after ~30 s idle, and `load` reuses
# the llama.cpp build and the models `tests` started in the background.
# Needs .whl (scripts/fetch_device_wheels.sh) and .devdata (tokenizer donor, llama.cpp tarball + build script).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 REQUIRE_REAL_GPU=1
export WORKER_ORCD_TOKENIZER_DONOR=$PWD/.devdata/qwen05-tokenizer.gguf
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
M=/tmp/models; mkdir -p $M
# written under a .part name and renamed: a call killed mid-write leaves no truncated model for the next stage
synth() { [ -f "$M/$1-$2.gguf" ] || { python3 benchmarks/synth.py "$M/$1-$2.gguf.part" --shape "$1" --type "$2" --vocab 151936 \
  --tokenizer-from "$WORKER_ORCD_TOKENIZER_DONOR" >/dev/null && mv "$M/$1-$2.gguf.part" "$M/$1-$2.gguf"; }; }
# ab LABEL MODEL BENCH [ARGS...]: bench_load on this tree and .devdata/base alternating, AB_ROUNDS rounds (default 2)
ab() { local label=$1 model=$2; shift 2
  for r in $(seq 1 ${AB_ROUNDS:-2}); do for tree in . .devdata/base; do
    echo "== tree $tree, round $r"
    (cd $tree && PYTHONPATH=/tmp/site:$PWD timeout 120 python3 "$@" --model $M/$model.gguf --label $label-$r 2>&1 \
      | tee "$OUT/${label}_$(basename $tree)_$r.log" | sed -n '/^| engine |/,$p;/Error/p' | tail -1)
  done; done; }
# steps7b LABEL [ARGS...]: 7B Q4_K_M quantized-half2 steps (profile_step.py) on this tree and .devdata/base
steps7b() { local label=$1; shift
  for i in $(seq 1 100); do [ -f $M/7b.done ] && break; sleep 3; done
  for tree in . .devdata/base; do echo "== tree $tree"
    (cd $tree && PYTHONPATH=/tmp/site:$PWD timeout 150 python3 benchmarks/profile_step.py --model $M/qwen2.5-7b-Q4_K_M.gguf \
      --resident-weights quantized-half2 --batch 1 16 64 "$@" 2>&1 | tee "$OUT/${label}_step_$(basename $tree).log" | grep -E "^\||prefill")
  done; }
# qrows LABEL "shape,shape:TYPE,TYPE ...": issue 13's rows under quantized-half2 against llama-bench, same files
qrows() { local label=$1 spec
  for i in $(seq 1 80); do [ -f /tmp/llama.cpp/done ] && break; sleep 5; done; sleep 5; cat /tmp/llama.cpp/done
  for spec in $2; do
    timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_engine.py --shapes ${spec%%:*} --types ${spec##*:} \
      --resident-weights quantized-half2 --llama-bench /tmp/llama.cpp/build/bin/llama-bench \
      --tokenizer-from "$WORKER_ORCD_TOKENIZER_DONOR" --vocab 151936 2>&1 | tee -a "$OUT/$label.log" | grep -E '^\| qwen|FAILED|Error'
    cp $OUT/bench_engine.json "$OUT/${label}_$(echo $spec | tr ':,' '__').json" 2>/dev/null
  done; }
case "${1:-tests}" in
tests)
  [ -f /tmp/llama.cpp/done ] || [ -n "${SKIP_LLAMA:-}" ] || bash .devdata/build-llama-cpp.sh .devdata/llama.cpp-0c1e570.tgz /tmp/llama.cpp --background
  # the load stage's models, written while the GPU suite runs
  [ -n "${SKIP_SYNTH:-}" ] || (synth qwen2.5-0.5b F16; synth qwen2.5-7b Q4_K_M; synth qwen2.5-7b F16; touch $M/done) >$M/synth.log 2>&1 &
  timeout 120 python3 benchmarks/determinism_streams.py record tests/fixtures/determinism_streams.json 2>&1 | tail -3
  cp tests/fixtures/determinism_streams.json "$OUT/" 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  # the suite is mostly Triton compilation (CPU): xdist spreads the files over the 16 cores
  XD=""; python3 -c "import xdist" 2>/dev/null && XD="-n ${GPU_TESTS_WORKERS:-6} --dist loadfile"
  timeout ${GPU_TESTS_TIMEOUT:-450} python3 -m pytest -q -m gpu -rf --tb=short --durations=12 $XD tests/ -p no:cacheprovider 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -25
  [ -n "${SKIP_PROFILE:-}" ] || timeout 120 python3 benchmarks/profile_step.py --shape qwen2.5-0.5b --type F16 --batch 1 16 64 --cprofile 2>&1 \
    | grep -E "^\||tottime|^ +[0-9]+ " | head -30
  ;;
tune)
  timeout 150 python3 -m pytest -q -m gpu tests/test_dense_matmul.py -p no:cacheprovider 2>&1 | tail -4
  [ -n "${TUNE_BUDGET:-}" ] && timeout 260 python3 benchmarks/tune_dense.py --budget-s $TUNE_BUDGET 2>&1 | tail -75
  timeout 200 python3 -m pytest -q -m gpu tests/test_engine_batching.py -p no:cacheprovider 2>&1 | tail -4
  timeout 150 python3 benchmarks/profile_step.py --shape qwen2.5-0.5b --type F16 --batch 1 16 64 2>&1 | tail -25
  ;;
profile)
  (synth qwen2.5-7b Q4_K_M; touch $M/7b.done) >$M/synth.log 2>&1 &
  timeout 60 python3 benchmarks/profile_step.py --shape qwen2.5-0.5b --type F16 --batch 1 16 64 2>&1 | grep -E "^\||prefill"
  for i in $(seq 1 60); do [ -f $M/7b.done ] && break; sleep 3; done
  timeout 100 python3 benchmarks/profile_step.py --model $M/qwen2.5-7b-Q4_K_M.gguf --batch 1 16 64 --profile 2>&1 \
    | grep -vE "^-+|^$" | head -60
  [ -n "${TUNE_BUDGET:-}" ] && timeout 260 python3 benchmarks/tune_wide.py --budget-s $TUNE_BUDGET 2>&1 | grep -E "^\|"
  ;;
load)
  [ -n "${CLIENT_PROCS:-}" ] && : "${LOAD_DURATION:=12}"  # several client processes only in steady state (bench_load.py)
  for i in $(seq 1 60); do [ -f $M/done ] && break; sleep 5; done
  synth qwen2.5-0.5b F16; synth qwen2.5-7b Q4_K_M; synth qwen2.5-7b F16
  for i in $(seq 1 60); do [ -f /tmp/llama.cpp/done ] && break; sleep 5; done; cat /tmp/llama.cpp/done
  L=/tmp/llama.cpp/build/bin/llama-server
  C="${LOAD_LEVELS:-1 8 32 64 128}"
  for m in ${LOAD_MODELS:-qwen2.5-0.5b-F16 qwen2.5-7b-Q4_K_M qwen2.5-7b-F16}; do
    timeout ${LOAD_TIMEOUT:-170} python3 benchmarks/bench_load.py --model $M/$m.gguf --worker --llama $L \
      --concurrency $C --requests-per-client 1 ${LOAD_DURATION:+--duration $LOAD_DURATION --warmup ${LOAD_WARMUP:-2}} \
      ${CLIENT_PROCS:+--client-procs $CLIENT_PROCS} 2>&1 | tee "$OUT/load_$m.log" | grep -E '^(\| (worker|llama)|#|Trace|[A-Za-z]*Error)' | head -16
  done
  ;;
qtiled)
  # quantized residency: tiled kernel GPU tests, per-shape speed and identity vs dense, then engine steps
  (synth qwen2.5-7b Q4_K_M; touch $M/7b.done) >$M/synth.log 2>&1 &
  timeout 150 python3 -m pytest -q -m gpu -rf --tb=short tests/test_qmatmul.py tests/test_qlayout.py -p no:cacheprovider 2>&1 | tail -6
  timeout ${TUNE_TIMEOUT:-200} python3 benchmarks/tune_qtiled.py --m ${QT_M:-1 16 64 256 512} ${QT_SWEEP:---sweep} --budget-s ${QT_BUDGET:-180} 2>&1 \
    | tee "$OUT/tune_qtiled.log" | grep -E "^\||non-identical|^  |Error"
  for i in $(seq 1 60); do [ -f $M/7b.done ] && break; sleep 3; done
  for r in dense quantized; do
    echo "## 7B Q4_K_M resident $r"
    timeout 100 python3 benchmarks/profile_step.py --model $M/qwen2.5-7b-Q4_K_M.gguf --batch 1 16 64 --resident-weights $r 2>&1 \
      | grep -E "^\||prefill|Error"
  done
  ;;
wload)
  # worker-orcd alone under load (no llama.cpp build): the engine-step view of /metrics per level
  for i in $(seq 1 60); do [ -f $M/done ] && break; sleep 5; done
  synth qwen2.5-0.5b F16; synth qwen2.5-7b Q4_K_M
  for m in ${WLOAD_MODELS:-qwen2.5-0.5b-F16 qwen2.5-7b-Q4_K_M}; do
    timeout ${LOAD_TIMEOUT:-150} python3 benchmarks/bench_load.py --model $M/$m.gguf --worker --concurrency ${LOAD_LEVELS:-1 8 32 64 128} \
      --requests-per-client ${RPC:-1} ${LOAD_DURATION:+--duration $LOAD_DURATION --warmup ${LOAD_WARMUP:-2}} 2>&1 | tee "$OUT/wload_$m.log" | sed -n '/^| engine |/,$p;/Error/p'
  done
  ;;
final)
  # a short last call, most important first: seal/batching/residency GPU tests, worker load, dot-K probe, tiled sweep
  (synth qwen2.5-7b Q4_K_M; synth qwen2.5-0.5b F16; touch $M/done) >$M/synth.log 2>&1 &
  timeout ${FINAL_TESTS_TIMEOUT:-120} python3 -m pytest -q -m gpu -rf --tb=short tests/test_engine_gpu.py -k "seal or agrees_with_dense or engine_batching" \
    tests/test_engine_batching.py -p no:cacheprovider 2>&1 | tail -4
  for i in $(seq 1 60); do [ -f $M/done ] && break; sleep 3; done
  for m in ${WLOAD_MODELS:-qwen2.5-7b-Q4_K_M qwen2.5-0.5b-F16}; do
    timeout ${LOAD_TIMEOUT:-80} python3 benchmarks/bench_load.py --model $M/$m.gguf --worker --concurrency ${LOAD_LEVELS:-1 64 128} \
      --requests-per-client 1 2>&1 | tee "$OUT/wload_$m.log" | sed -n '/ready in/p;/^| engine |/,$p;/Error/p'
  done
  timeout 60 python3 benchmarks/probe_dot_k.py 2>&1 | grep -E "^\||Error"
  timeout ${FINAL_TUNE_TIMEOUT:-90} python3 benchmarks/tune_qtiled.py --m 1 --sweep --budget-s 70 \
    --only 7b:gate_up:Q4_K 7b:down:Q6_K 7b:head:Q6_K 7b:gate_up:Q8_0 2>&1 | tee "$OUT/tune_qtiled.log" | grep -E "^\||non-identical|^  "
  ;;
tp)
  # the nvidia-h200-x2 kind (issue 12): the two-GPU NCCL tests, then 7B F16 under load at tp=1 and tp=2,
  # and llama-server splitting the same file by rows over both GPUs
  [ -f /tmp/llama.cpp/done ] || bash .devdata/build-llama-cpp.sh .devdata/llama.cpp-0c1e570.tgz /tmp/llama.cpp --background
  [ -f $M/tp.done ] || (synth qwen2.5-7b F16; touch $M/tp.done; synth qwen2.5-7b Q4_K_M) >$M/synth.log 2>&1 &
  nvidia-smi --query-gpu=index,name --format=csv,noheader
  # TP_PART=tests: the tests only (models and llama.cpp keep building); TP_PART=load: the loads only
  [ "${TP_PART:-}" = load ] || REQUIRE_MULTI_GPU=1 timeout ${TP_TESTS_TIMEOUT:-300} python3 -m pytest -q -m multi_gpu -rf --tb=short \
    tests/test_tp_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/tp_tests.log" | tail -6
  [ "${TP_PART:-}" = tests ] && exit 0
  for i in $(seq 1 80); do [ -f $M/tp.done ] && [ -f /tmp/llama.cpp/done ] && break; sleep 5; done
  for tp in 1 2; do
    timeout ${LOAD_TIMEOUT:-150} python3 benchmarks/bench_load.py --model $M/qwen2.5-7b-F16.gguf --label 7b-F16-tp$tp --worker \
      --tp $tp --concurrency ${LOAD_LEVELS:-1 64} --requests-per-client 1 ${LOAD_DURATION:+--duration $LOAD_DURATION --warmup ${LOAD_WARMUP:-2}} 2>&1 | tee "$OUT/tp$tp.log" | sed -n '/ready in/p;/^| engine |/,$p;/Error/p'
  done
  # -sm row does not load on this build ("device CUDA0 does not support split buffers"): tensor and layer
  for sm in tensor layer; do
    timeout ${LOAD_TIMEOUT:-150} python3 benchmarks/bench_load.py --model $M/qwen2.5-7b-F16.gguf --label 7b-F16-llama-sm-$sm \
      --llama /tmp/llama.cpp/build/bin/llama-server --llama-arg=-sm --llama-arg=$sm --concurrency ${LOAD_LEVELS:-1 64} \
      --requests-per-client 1 ${LOAD_DURATION:+--duration $LOAD_DURATION --warmup ${LOAD_WARMUP:-2}} 2>&1 | tee "$OUT/tp_llama_$sm.log" | sed -n '/ready in/p;/^| engine |/,$p;/Error/p'
  done
  ;;
tpq)
  # quantized shards (the GGUF blocks split per rank): the two-GPU tests, then 7B Q4_K_M (TP_72B=1: the 72B shape,
  # 51 GB, written first) resident quantized at tp=1 and tp=2 against llama-server over both GPUs
  sed -i "s/-j 14/-j $(nproc)/" .devdata/build-llama-cpp.sh
  [ -f /tmp/llama.cpp/done ] || bash .devdata/build-llama-cpp.sh .devdata/llama.cpp-0c1e570.tgz /tmp/llama.cpp --background
  S=qwen2.5-7b; [ -n "${TP_72B:-}" ] && S=qwen2.5-72b
  (synth $S Q4_K_M; touch $M/tpq.done) >$M/synth.log 2>&1 &
  # what the group's sums cost per decode step (7B: d 3584, 28 layers; 72B: d 8192, 80 layers)
  timeout 120 python3 benchmarks/bench_allreduce.py --degree 2 --d-model 3584 --layers 28 2>&1 | tee "$OUT/allreduce_7b.log" | grep "^|"
  timeout 120 python3 benchmarks/bench_allreduce.py --degree 2 --d-model 8192 --layers 80 2>&1 | tee "$OUT/allreduce_72b.log" | grep "^|"
  [ -n "${TP_72B:-}" ] || REQUIRE_MULTI_GPU=1 timeout ${TP_TESTS_TIMEOUT:-300} python3 -m pytest -q -m multi_gpu -rf --tb=short \
    tests/test_tp_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/tp_tests.log" | tail -6
  for i in $(seq 1 100); do [ -f $M/tpq.done ] && [ -f /tmp/llama.cpp/done ] && break; sleep 5; done; ls -la $M
  F=$M/$S-Q4_K_M.gguf; D="${LOAD_DURATION:+--duration $LOAD_DURATION --warmup ${LOAD_WARMUP:-2}}"
  for tp in ${TP_DEGREES:-1 2}; do
    timeout ${LOAD_TIMEOUT:-200} python3 benchmarks/bench_load.py --model $F --label $S-q-tp$tp --worker --tp $tp \
      --resident-weights quantized --concurrency ${LOAD_LEVELS:-1 64} --requests-per-client 1 $D 2>&1 \
      | tee "$OUT/tpq$tp.log" | sed -n '/ready in/p;/^| engine |/,$p;/Error/p'
  done
  for sm in tensor layer; do
    timeout ${LOAD_TIMEOUT:-200} python3 benchmarks/bench_load.py --model $F --label $S-llama-sm-$sm --llama /tmp/llama.cpp/build/bin/llama-server \
      --llama-arg=-sm --llama-arg=$sm --concurrency ${LOAD_LEVELS:-1 64} --requests-per-client 1 $D 2>&1 \
      | tee "$OUT/tpq_llama_$sm.log" | sed -n '/ready in/p;/^| engine |/,$p;/Error/p'
  done
  ;;
half2)
  # branch next: the quantized-half2 residency — its GPU tests, per-matrix speed against ggml arithmetic, 7B Q4_K_M steps
  (synth qwen2.5-7b Q4_K_M; touch $M/7b.done) >$M/synth.log 2>&1 &
  timeout 240 python3 -m pytest -q -m gpu -rf --tb=short tests/test_qmatmul.py tests/test_qmatmul_prefill.py \
    tests/test_engine_gpu.py -k "half2 or tiled or prefill or quantized" -p no:cacheprovider 2>&1 | tail -5
  timeout 150 python3 benchmarks/probe_half2.py --m 1 16 64 2>&1 | tee "$OUT/probe_half2.log" | grep -E "^\||Error"
  for i in $(seq 1 60); do [ -f $M/7b.done ] && break; sleep 3; done
  for r in quantized quantized-half2; do
    timeout 120 python3 benchmarks/profile_step.py --model $M/qwen2.5-7b-Q4_K_M.gguf --batch 1 64 --resident-weights $r 2>&1 \
      | tee "$OUT/profile_7b_$r.log" | grep -E "^\||prefill|Error"
  done
  ;;
tp12)
  # issue 12's runnable rows: 7B Q4_K_M at tp=1/2, the 72B shape at tp=2 (its tp=1 and llama -sm tensor came
  # from the eighth session's first call), llama-server -sm layer/tensor on the same files; worker logs at
  # info, their tails printed when a server is not ready in time. TP12_PART=7b|72b runs one half (default both);
  # TP_RESIDENCY (default quantized-half2) is every rank's --resident-weights.
  [ -f /tmp/llama.cpp/done ] || bash .devdata/build-llama-cpp.sh .devdata/llama.cpp-0c1e570.tgz /tmp/llama.cpp --background
  P=${TP12_PART:-all}; RW=${TP_RESIDENCY:-quantized-half2}
  if [ -n "${TP12_NO_SYNTH:-}" ]; then :
  elif [ "$P" = 72b ]; then (synth qwen2.5-72b Q4_K_M; touch $M/72b.done) >$M/synth.log 2>&1 &
  else (synth qwen2.5-7b Q4_K_M; touch $M/7b.done; [ "$P" = 7b ] || { synth qwen2.5-72b Q4_K_M; touch $M/72b.done; }) >$M/synth.log 2>&1 & fi
  D="--duration ${LOAD_DURATION:-8} --warmup ${LOAD_WARMUP:-2} --requests-per-client 1 --concurrency 1 64 --worker-log-level info"
  # TP12_TESTS=1: first the two-GPU tests (the group's join, plan agreement and failure paths on NCCL)
  [ -z "${TP12_TESTS:-}" ] || REQUIRE_MULTI_GPU=1 timeout 200 python3 -m pytest -q -m multi_gpu -rf --tb=short tests/test_tp_gpu.py \
    -p no:cacheprovider 2>&1 | tee "$OUT/tp_tests.log" | tail -4
  if [ "$P" != 72b ]; then
    for i in $(seq 1 60); do [ -f $M/7b.done ] && break; sleep 2; done
    for tp in 1 2; do
      timeout $(( ${TP_READY_TIMEOUT:-120} + 50 )) python3 benchmarks/bench_load.py --model $M/qwen2.5-7b-Q4_K_M.gguf --label 7b-q4km-$RW-tp$tp \
        --worker --tp $tp --resident-weights $RW --ready-timeout ${TP_READY_TIMEOUT:-120} $D 2>&1 | tee "$OUT/tp12_7b_tp$tp.log" | grep -E "^#|^\| worker"
    done
  fi
  if [ "$P" != 7b ]; then
    for i in $(seq 1 150); do [ -f $M/72b.done ] && break; sleep 2; done; ls -la $M; df -h /tmp | tail -1
    timeout 330 python3 benchmarks/bench_load.py --model $M/qwen2.5-72b-Q4_K_M.gguf --label 72b-q4km-$RW-tp2 --worker --tp 2 \
      --resident-weights $RW --ready-timeout 240 $D 2>&1 | tee "$OUT/tp12_72b_tp2.log" | grep -E "^#|^\| worker"
  fi
  for i in $(seq 1 60); do [ -f /tmp/llama.cpp/done ] && break; sleep 3; done
  case $P in 7b) L="7b:tensor 7b:layer";; 72b) L="72b:layer";; *) L="72b:layer 7b:tensor 7b:layer";; esac
  for f in $L; do
    timeout 110 python3 benchmarks/bench_load.py --model $M/qwen2.5-${f%%:*}-Q4_K_M.gguf --label ${f%%:*}-llama-sm-${f##*:} \
      --llama /tmp/llama.cpp/build/bin/llama-server --llama-arg=-sm --llama-arg=${f##*:} --ready-timeout 80 $D 2>&1 \
      | tee "$OUT/tp12_llama_${f%%:*}_${f##*:}.log" | grep -E "^#|^\| llama"
  done
  ;;
tp72q8)
  # kind nvidia-h200-x2: the streamed shard slicing on the GPUs (tests/test_tp_gpu.py; TP72_TESTS adds files), then a
  # model larger than one GPU: the 72B shape in Q8_0 (77 GB file) resident dense (fp16, ~145 GB) at tp=2
  (synth qwen2.5-72b Q8_0; touch $M/72b-q8.done) >$M/synth.log 2>&1 &
  XD=""; python3 -c "import xdist" 2>/dev/null && XD="-n 6 --dist loadfile"
  REQUIRE_MULTI_GPU=1 timeout ${TP72_TESTS_TIMEOUT:-120} python3 -m pytest -q -m gpu -rf --tb=short $XD tests/test_tp_gpu.py \
    ${TP72_TESTS:-} -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests_tp72.log" | tail -4
  for i in $(seq 1 90); do [ -f $M/72b-q8.done ] && break; sleep 2; done; ls -la $M
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/smi_tp72q8.csv" 2>&1 &
  SMI=$!
  timeout ${TP72_LOAD_TIMEOUT:-210} python3 benchmarks/bench_load.py --model $M/qwen2.5-72b-Q8_0.gguf --label 72b-q8-dense-tp2 --worker --tp 2 \
    --resident-weights dense --kv-cache-mb 8192 --ready-timeout 170 --duration 6 --warmup 1 --requests-per-client 1 \
    --concurrency 1 16 --worker-log-level info 2>&1 | tee "$OUT/tp72q8.log" | grep -E "^#|^\| worker|Error"
  kill $SMI
  python3 - "$OUT/smi_tp72q8.csv" <<'PY'
import sys
peak = {}
for line in open(sys.argv[1]):
    try:
        i, mib = (int(x) for x in line.split(","))
    except ValueError:
        continue
    peak[i] = max(peak.get(i, 0), mib)
print("# peak memory.used MiB per GPU:", peak)
PY
  ;;
verify9)
  # kind nvidia-h200-x2 (ninth session): the whole suite on both GPUs at the submitted engine, then issue 12's 7B rows
  # (the 72B half: TP12_PART=72b bash "$0" tp12, the next call)
  [ -f /tmp/llama.cpp/done ] || bash .devdata/build-llama-cpp.sh .devdata/llama.cpp-0c1e570.tgz /tmp/llama.cpp --background
  # the 7B and (for a next call landing on this machine) the 72B written while the suite runs
  (synth qwen2.5-7b Q4_K_M; touch $M/7b.done; synth qwen2.5-72b Q4_K_M; touch $M/72b.done) >$M/synth9.log 2>&1 &
  SKIP_SYNTH=1 SKIP_LLAMA=1 SKIP_PROFILE=1 REQUIRE_MULTI_GPU=1 GPU_TESTS_TIMEOUT=${GPU_TESTS_TIMEOUT:-300} bash "$0" tests 2>&1 | tail -16
  TP12_PART=7b TP12_NO_SYNTH=1 bash "$0" tp12
  ;;
verify10)
  # kind nvidia-h200-x2 (tenth session): the whole suite at main's head, then the quantized 7B's decode and fingerprint
  SKIP_SYNTH=1 SKIP_LLAMA=1 SKIP_PROFILE=1 REQUIRE_MULTI_GPU=1 GPU_TESTS_TIMEOUT=${GPU_TESTS_TIMEOUT:-330} bash "$0" tests 2>&1 | tail -16
  timeout 240 python3 benchmarks/bench_engine.py --shapes qwen2.5-7b --types Q4_K_M --resident-weights quantized-half2 \
    --tokenizer-from "$WORKER_ORCD_TOKENIZER_DONOR" --vocab 151936 --workdir $M 2>&1 | tail -8
  ;;
sealov)
  # issue 8's p99 ITL with the seal check beside the steps; .devdata/base holds the tree before it (git archive), same call
  (synth qwen2.5-7b Q4_K_M; touch $M/7b.done) >$M/synth.log 2>&1 &
  [ -n "${SEALOV_SKIP_TESTS:-}" ] || timeout 240 python3 -m pytest -q -m gpu -rf --tb=short -p no:cacheprovider tests/test_engine_batching.py \
    tests/test_kernels_checksum.py tests/test_engine_gpu.py -k "seal or fingerprint or checksum or batch or jobs" 2>&1 | tail -6
  for i in $(seq 1 60); do [ -f $M/7b.done ] && break; sleep 3; done
  for tree in ${SEALOV_TREES:-new base}; do
    dir=$PWD; [ $tree = base ] && dir=$PWD/.devdata/base
    (cd $dir && PYTHONPATH=/tmp/site:$dir timeout ${LOAD_TIMEOUT:-150} python3 benchmarks/bench_load.py --model $M/qwen2.5-7b-Q4_K_M.gguf \
      --label 7b-$tree --worker --concurrency ${LOAD_LEVELS:-64} --duration ${LOAD_DURATION:-12} --warmup ${LOAD_WARMUP:-3} 2>&1 \
      | tee "$OUT/sealov_$tree.log" | sed -n '/ready in/p;/^| engine |/,$p;/Error/p')
  done
  ;;
gapdiag)
  (synth qwen2.5-7b Q4_K_M; touch $M/7b.done) >$M/synth.log 2>&1 &
  for i in $(seq 1 60); do [ -f $M/7b.done ] && break; sleep 3; done
  timeout 150 python3 benchmarks/bench_engine_load.py --model $M/qwen2.5-7b-Q4_K_M.gguf --concurrency ${LOAD_LEVELS:-1 64} \
    ${GAP_ARGS:-} 2>&1 | tail -5
  timeout 150 python3 benchmarks/profile_step.py --model $M/qwen2.5-7b-Q4_K_M.gguf --batch 64 --mixed-chunk ${MIXED_CHUNK:-192} \
    --profile 2>&1 | grep -v "^ *$" | tail -42
  ;;
sealg)
  (synth qwen2.5-7b Q4_K_M; touch $M/7b.done) >$M/synth.log 2>&1 &
  for i in $(seq 1 60); do [ -f $M/7b.done ] && break; sleep 3; done
  timeout 150 python3 benchmarks/probe_seal_overlap.py --model $M/qwen2.5-7b-Q4_K_M.gguf --programs ${SEAL_PROGRAMS:-0 8 16 32 64} 2>&1 \
    | grep -v "^{" | tail -10
  timeout 300 python3 benchmarks/bench_engine_load.py --model $M/qwen2.5-7b-Q4_K_M.gguf --concurrency 64 \
    --variants ${SEAL_VARIANTS:-0:0 100:0 100:16} 2>&1 | tail -6
  ;;
sealfinal)
  SEAL_PROGRAMS=${SEAL_PROGRAMS:-0 16 32} SEAL_VARIANTS=${SEAL_VARIANTS:-100:16 100:32 50:16} bash "$0" sealg
  timeout 150 python3 benchmarks/bench_load.py --model $M/qwen2.5-7b-Q4_K_M.gguf --label 7b-sealdefaults --worker \
    --concurrency 1 64 --duration 12 --warmup 3 2>&1 | sed -n '/ready in/p;/^| engine |/,$p;/Error/p'
  ;;
verify10b)
  (synth qwen2.5-7b Q4_K_M; touch $M/7b.done) >$M/synth.log 2>&1 &
  SKIP_SYNTH=1 SKIP_LLAMA=1 SKIP_PROFILE=1 REQUIRE_MULTI_GPU=1 GPU_TESTS_TIMEOUT=${GPU_TESTS_TIMEOUT:-300} bash "$0" tests 2>&1 | tail -6
  for i in $(seq 1 60); do [ -f $M/7b.done ] && break; sleep 3; done
  timeout 150 python3 benchmarks/bench_load.py --model $M/qwen2.5-7b-Q4_K_M.gguf --label 7b-final --worker \
    --concurrency 1 64 --duration 12 --warmup 3 2>&1 | sed -n '/ready in/p;/^| engine |/,$p;/Error/p'
  ;;
probe)
  # where a 7B decode step at B = 48/64 goes (kernels), wide tiles below 64 rows, steady-state load of both engines
  [ -f /tmp/llama.cpp/done ] || bash .devdata/build-llama-cpp.sh .devdata/llama.cpp-0c1e570.tgz /tmp/llama.cpp --background
  (synth qwen2.5-7b Q4_K_M; touch $M/7b.done) >$M/synth.log 2>&1 &
  timeout ${PROBE_TUNE_TIMEOUT:-110} python3 benchmarks/tune_wide.py --model 7b --m ${PROBE_M:-24 48 64 96} --budget-s 95 2>&1 \
    | tee "$OUT/tune_wide.log" | grep -E "^\|"
  for i in $(seq 1 60); do [ -f $M/7b.done ] && break; sleep 3; done
  timeout 100 python3 benchmarks/profile_step.py --model $M/qwen2.5-7b-Q4_K_M.gguf --batch 48 64 --context 600 --profile 2>&1 \
    | tee "$OUT/profile_7b.log" | grep -vE "^-+$|^$" | head -70
  for i in $(seq 1 60); do [ -f /tmp/llama.cpp/done ] && break; sleep 5; done; cat /tmp/llama.cpp/done
  timeout ${LOAD_TIMEOUT:-200} python3 benchmarks/bench_load.py --model $M/qwen2.5-7b-Q4_K_M.gguf --worker --llama /tmp/llama.cpp/build/bin/llama-server \
    --concurrency ${LOAD_LEVELS:-1 64 128} --duration ${LOAD_DURATION:-20} --warmup ${LOAD_WARMUP:-5} 2>&1 | tee "$OUT/steady_7b.log" \
    | grep -E '^(\| (worker|llama)|#|Trace|[A-Za-z]*Error)|ready in' | head -16
  ;;
kprobe)
  # issue 13's swapped-operand Q4_K probe; the dense wide tiles from 17 rows: GPU invariance tests, 0.5B/7B sweep, 7B steps
  (synth qwen2.5-7b Q4_K_M; touch $M/7b.done) >$M/synth.log 2>&1 &
  timeout ${SWAP_TIMEOUT:-170} python3 benchmarks/probe_swap_q4k.py --m ${SWAP_M:-1 16 64 256} 2>&1 | tee "$OUT/probe_swap.log" | grep -E "^\||Error"
  timeout 150 python3 -m pytest -q -m gpu -rf --tb=short tests/test_dense_matmul.py -p no:cacheprovider 2>&1 | tail -4
  timeout 80 python3 benchmarks/tune_wide.py --model 0.5b 7b --m 16 24 48 --budget-s 65 2>&1 | tee "$OUT/tune_wide.log" | grep -E "^\|"
  for i in $(seq 1 60); do [ -f $M/7b.done ] && break; sleep 3; done
  timeout 100 python3 benchmarks/profile_step.py --model $M/qwen2.5-7b-Q4_K_M.gguf --batch 1 32 48 64 --context 600 2>&1 \
    | tee "$OUT/profile_7b.log" | grep -E "^\||prefill|Error"
  ;;
verify7)
  # branch next (seventh session): the whole suite on both GPUs, the device's SHA-256 rate, the segmented
  # quantized prefill's speed, the one-pass load's ready times, issue 8 at 64 clients under the 256 cap
  SKIP_LLAMA=1 SKIP_PROFILE=1 REQUIRE_MULTI_GPU=1 GPU_TESTS_TIMEOUT=${GPU_TESTS_TIMEOUT:-300} bash "$0" tests 2>&1 | tail -16
  for i in $(seq 1 60); do [ -f $M/done ] && break; sleep 3; done
  timeout 60 python3 benchmarks/bench_validation.py $M/qwen2.5-7b-Q4_K_M.gguf --repeat 1 2>&1 | tail -3
  QP_SKIP_TESTS=1 QP_RESIDENCY=quantized bash "$0" qprefill 2>&1 | tail -4
  for m in qwen2.5-7b-Q4_K_M qwen2.5-7b-F16; do
    timeout 120 python3 benchmarks/bench_load.py --model $M/$m.gguf --label $m-ready --worker --concurrency 1 \
      --duration 3 --warmup 1 2>&1 | tee "$OUT/ready_$m.log" | sed -n '/ready in/p;/Error/p'
  done
  ITL_CAPS=${ITL_CAPS:-256} bash "$0" itl 2>&1 | tail -4
  ;;
qprefill)
  # the quantized prefill path (kernels/qmatmul_prefill.py): bitwise vs the fused kernel and across the threshold, then speed
  (synth qwen2.5-7b Q4_K_M; touch $M/7b.done) >$M/synth.log 2>&1 &
  # QP_SKIP_TESTS=1 after `tests` (the suite already ran them)
  [ -n "${QP_SKIP_TESTS:-}" ] || timeout 240 python3 -m pytest -q -m gpu -rf --tb=short tests/test_qmatmul_prefill.py tests/test_qmatmul.py \
    tests/test_quant_residency.py tests/test_engine_gpu.py -k "prefill or qmatmul or residency or agrees_with_dense" \
    -p no:cacheprovider 2>&1 | tail -6
  for i in $(seq 1 60); do [ -f $M/7b.done ] && break; sleep 3; done
  for r in ${QP_RESIDENCY:-quantized dense}; do
    timeout 120 python3 benchmarks/profile_step.py --model $M/qwen2.5-7b-Q4_K_M.gguf --batch 1 64 --resident-weights $r 2>&1 \
      | tee "$OUT/profile_7b_$r.log" | grep -E "^\||prefill|Error"
  done
  ;;
itl)
  # the mixed-step cap against issue 8's p99 inter-token latency (7B: 3 x 4.5 ms single-stream step), worker-orcd alone
  (synth qwen2.5-7b Q4_K_M; touch $M/7b.done) >$M/synth.log 2>&1 &
  for i in $(seq 1 60); do [ -f $M/7b.done ] && break; sleep 3; done
  for cap in ${ITL_CAPS:-384 256 192}; do
    timeout ${LOAD_TIMEOUT:-120} python3 benchmarks/bench_load.py --model $M/qwen2.5-7b-Q4_K_M.gguf --label 7b-q4km-mixed$cap --worker \
      --worker-arg=--mixed-step-tokens --worker-arg=$cap --concurrency ${LOAD_LEVELS:-64} --duration ${LOAD_DURATION:-12} \
      --warmup ${LOAD_WARMUP:-3} 2>&1 | tee "$OUT/itl_$cap.log" | sed -n '/ready in/p;/^| engine |/,$p;/Error/p'
  done
  ;;
bench13)
  # issue 13's table: worker-orcd and llama-bench on the same synthetic files, one row per shape x type
  [ -f /tmp/llama.cpp/done ] || bash .devdata/build-llama-cpp.sh .devdata/llama.cpp-0c1e570.tgz /tmp/llama.cpp --background
  for i in $(seq 1 80); do [ -f /tmp/llama.cpp/done ] && break; sleep 5; done; cat /tmp/llama.cpp/done
  timeout ${BENCH_TIMEOUT:-560} python3 benchmarks/bench_engine.py --shapes ${BENCH_SHAPES:-qwen2.5-0.5b,qwen2.5-1.5b,qwen2.5-7b} \
    --types ${BENCH_TYPES:-F16,Q8_0,Q4_K_M} --resident-weights ${RESIDENCY:-quantized} --llama-bench /tmp/llama.cpp/build/bin/llama-bench \
    --tokenizer-from "$WORKER_ORCD_TOKENIZER_DONOR" --vocab 151936 2>&1 | tee "$OUT/bench13.log" | grep -vE '^\{'
  ;;
r72)
  # a Qwen2.5-72B-shape Q4_K_M (51 GB) resident quantized with a 32k-token KV budget, against llama-bench
  rm -rf $M/* /tmp/worker-orcd-bench; df -h /tmp | tail -1
  [ -f /tmp/llama.cpp/done ] || bash .devdata/build-llama-cpp.sh .devdata/llama.cpp-0c1e570.tgz /tmp/llama.cpp --background
  for i in $(seq 1 80); do [ -f /tmp/llama.cpp/done ] && break; sleep 5; done; cat /tmp/llama.cpp/done
  timeout ${BENCH_TIMEOUT:-560} python3 benchmarks/bench_engine.py --shapes qwen2.5-72b --types Q4_K_M --resident-weights ${RESIDENCY:-quantized} \
    --kv-cache-mb 10752 --llama-bench /tmp/llama.cpp/build/bin/llama-bench --tokenizer-from "$WORKER_ORCD_TOKENIZER_DONOR" \
    --vocab 151936 2>&1 | tee "$OUT/r72.log" | grep -vE '^\{'
  ;;
qverify)
  # the quantized residency's swapped form + K segments: GPU tests, per-shape speed, 7B Q4_K_M steps
  (synth qwen2.5-7b Q4_K_M; touch $M/7b.done) >$M/synth.log 2>&1 &
  timeout 200 python3 -m pytest -q -m gpu -rf --tb=short tests/test_qmatmul.py tests/test_qlayout.py \
    tests/test_engine_gpu.py -k "tiled or qmatmul or qlayout or agrees_with_dense" -p no:cacheprovider 2>&1 | tail -6
  timeout 100 python3 benchmarks/tune_qtiled.py --m 1 16 64 256 --budget-s 80 2>&1 | tee "$OUT/tune_qtiled.log" | grep -E "^\||non-identical|^  "
  for i in $(seq 1 60); do [ -f $M/7b.done ] && break; sleep 3; done
  timeout 120 python3 benchmarks/profile_step.py --model $M/qwen2.5-7b-Q4_K_M.gguf --batch 1 16 64 --resident-weights quantized 2>&1 \
    | tee "$OUT/profile_7b_q.log" | grep -E "^\||prefill|Error"
  ;;
verify)
  # after a fix: the failing tests first, the load comparison with what device time is left
  bash .devdata/build-llama-cpp.sh .devdata/llama.cpp-0c1e570.tgz /tmp/llama.cpp --background >/dev/null 2>&1
  (synth qwen2.5-0.5b F16; synth qwen2.5-7b Q4_K_M; touch $M/done) >$M/synth.log 2>&1 &
  timeout 200 python3 -m pytest -q -m gpu tests/test_engine_gpu.py tests/test_engine_batching.py tests/test_determinism_across_gpus.py \
    -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests_verify.log" | tail -4
  for i in $(seq 1 60); do [ -f /tmp/llama.cpp/done ] && [ -f $M/done ] && break; sleep 5; done; cat /tmp/llama.cpp/done
  L=/tmp/llama.cpp/build/bin/llama-server
  for m in ${VERIFY_MODELS:-qwen2.5-0.5b-F16 qwen2.5-7b-Q4_K_M}; do
    timeout ${LOAD_TIMEOUT:-120} python3 benchmarks/bench_load.py --model $M/$m.gguf --worker --llama $L \
      --concurrency ${LOAD_LEVELS:-1 8 32 64 128} --requests-per-client 1 2>&1 | tee "$OUT/load_$m.log" \
      | grep -E '^(\| (worker|llama)|#|Trace|[A-Za-z]*Error)' | head -16
  done
  ;;
diag11)
  # issue 8, eleventh session: the 192-token mixed bucket (GPU tests), then the engine alone at 1 / 64 clients, cap 256
  # and 192, each level followed by a traced run (gpu_timeline.py: device busy/idle per step, the kernels)
  (synth qwen2.5-7b Q4_K_M; touch $M/7b.done) >$M/synth.log 2>&1 &
  timeout 200 python3 -m pytest -q -m gpu -rf --tb=short tests/test_engine_batching.py tests/test_runner_mixed_graphs.py \
    -p no:cacheprovider 2>&1 | tail -4
  for i in $(seq 1 80); do [ -f $M/7b.done ] && break; sleep 3; done
  timeout ${LOAD_TIMEOUT:-300} python3 benchmarks/bench_engine_load.py --model $M/qwen2.5-7b-Q4_K_M.gguf --concurrency ${LOAD_LEVELS:-1 64} \
    --variants ${DIAG_VARIANTS:-100:16 100:16:192} --trace-s ${TRACE_S:-1} 2>&1 | tee "$OUT/diag11.log" | grep -vE '^\{|USDT'
  ;;
split11)
  # split attention passes (decode graphs): GPU kernel + engine tests, the engine alone at 1 / 64 clients (traced), and a
  # long-context lone stream (8k-token prompt) against .devdata/base (the tree before: one pass only), same call
  (synth qwen2.5-7b Q4_K_M; touch $M/7b.done) >$M/synth.log 2>&1 &
  timeout 240 python3 -m pytest -q -m gpu -rf --tb=short tests/test_kernels_paged_attention.py tests/test_engine_batching.py \
    tests/test_runner_mixed_graphs.py -p no:cacheprovider 2>&1 | tail -4
  for i in $(seq 1 80); do [ -f $M/7b.done ] && break; sleep 3; done
  E="benchmarks/bench_engine_load.py --model $M/qwen2.5-7b-Q4_K_M.gguf --variants 100:16"
  timeout 200 python3 $E --concurrency ${LOAD_LEVELS:-1 64} --trace-s ${TRACE_S:-1} 2>&1 | tee "$OUT/split11.log" | grep -vE '^\{|USDT|Warn|warn'
  for tree in . .devdata/base; do
    echo "== long context, tree $tree"
    (cd $tree && PYTHONPATH=/tmp/site:$PWD timeout 120 python3 $E --concurrency 1 --prompt-min 8000 --prompt-max 8000 --out-min 256 \
      --out-max 256 --duration 10 --warmup 4 2>&1 | grep -E '^\||ready|Error')
  done
  ;;
http11)
  # issue 8 over HTTP (bench_load, 7B Q4_K_M): 1 client, then 64 clients per mixed-step cap (HTTP_CAPS), each its own server;
  # the load generator in CLIENT_PROCS processes (its event loop out of what it measures)
  (synth qwen2.5-7b Q4_K_M; touch $M/7b.done) >$M/synth.log 2>&1 &
  for i in $(seq 1 80); do [ -f $M/7b.done ] && break; sleep 3; done
  B="benchmarks/bench_load.py --model $M/qwen2.5-7b-Q4_K_M.gguf --worker --duration ${LOAD_DURATION:-12} --warmup ${LOAD_WARMUP:-3}"
  timeout 100 python3 $B --label 7b-1 --concurrency 1 --worker-log-level info 2>&1 | tee "$OUT/http11_1.log" \
    | sed -n '/ready in/p;/load stages/p;/^| engine |/,$p;/Error/p'
  for cap in ${HTTP_CAPS:-256 224 192}; do
    timeout 100 python3 $B --label 7b-64-cap$cap --concurrency 64 --client-procs ${CLIENT_PROCS:-4} --worker-arg=--mixed-step-tokens \
      --worker-arg=$cap 2>&1 | tee "$OUT/http11_$cap.log" | sed -n '/^| engine |/,$p;/Error/p'
  done
  ;;
httpab)
  # the 0.5B at 64 clients over HTTP, this tree against .devdata/base, alternating (AB_ROUNDS rounds): the server's per-token cost
  synth qwen2.5-0.5b F16
  for r in $(seq 1 ${AB_ROUNDS:-2}); do
    for tree in . .devdata/base; do
      echo "== tree $tree, round $r"
      (cd $tree && PYTHONPATH=/tmp/site:$PWD timeout 100 python3 benchmarks/bench_load.py --model $M/qwen2.5-0.5b-F16.gguf --worker \
        --label ab --concurrency ${LOAD_LEVELS:-64} --client-procs 4 --duration 12 --warmup 3 2>&1 | grep -E '^\| worker-orcd \| ab \|.*\|.*\|.*\|.*\|.*\|.*\||Error' | tail -1)
    done
  done
  ;;
caps12)
  (synth qwen2.5-7b Q4_K_M; touch $M/7b.done) >$M/synth.log 2>&1 &
  timeout 200 python3 -m pytest -q -m gpu tests/test_split_fallback_gpu.py -p no:cacheprovider -rf --tb=short 2>&1 | tail -15
  for i in $(seq 1 80); do [ -f $M/7b.done ] && break; sleep 3; done
  B="benchmarks/bench_load.py --model $M/qwen2.5-7b-Q4_K_M.gguf --worker --duration ${LOAD_DURATION:-12} --warmup ${LOAD_WARMUP:-3} --client-procs 4"
  for cap in ${HTTP_CAPS:-256 224 192}; do
    timeout 100 python3 $B --label 7b-64-cap$cap --concurrency 64 --worker-arg=--mixed-step-tokens --worker-arg=$cap 2>&1 \
      | tee "$OUT/caps12_$cap.log" | sed -n '/^| engine |/,$p;/Error/p'
  done
  timeout 120 python3 $B --label 7b-128 --concurrency 128 ${CAP128:+--worker-arg=--mixed-step-tokens --worker-arg=$CAP128} 2>&1 \
    | tee "$OUT/caps12_128.log" | sed -n '/^| engine |/,$p;/Error/p'
  ;;
merge12)
  synth qwen2.5-0.5b F16
  timeout 300 python3 -m pytest -q -m gpu tests/test_kernels_paged_attention.py tests/test_split_fallback_gpu.py tests/test_engine_batching.py \
    -p no:cacheprovider -rf --tb=short 2>&1 | tail -8
  for r in $(seq 1 ${AB_ROUNDS:-2}); do
    for tree in . .devdata/base; do
      echo "== tree $tree, round $r"
      (cd $tree && PYTHONPATH=/tmp/site:$PWD timeout 100 python3 benchmarks/bench_load.py --model $M/qwen2.5-0.5b-F16.gguf --worker \
        --label lone --concurrency 1 --duration 10 --warmup 2 2>&1 | grep -E '^\| worker-orcd \| lone \|.*\|.*\|.*\|.*\|.*\|.*\||Error' | tail -1)
    done
  done
  ;;
proc12)
  # --engine-process on (default) against off, same call, alternating per model; 1 then 64 clients from 4 client processes
  synth qwen2.5-0.5b F16
  (synth qwen2.5-7b Q4_K_M; touch $M/7b.done) >$M/synth.log 2>&1 &
  for model in ${PROC_MODELS:-qwen2.5-0.5b-F16 qwen2.5-7b-Q4_K_M}; do
    for i in $(seq 1 80); do [ -f $M/$model.gguf ] && break; sleep 3; done
    for r in $(seq 1 ${AB_ROUNDS:-1}); do
      for mode in ${PROC_MODES:-on off}; do
        timeout 150 python3 benchmarks/bench_load.py --model $M/$model.gguf --worker --label $model-$mode --concurrency ${LOAD_LEVELS:-1 64} \
          --client-procs 4 --duration ${LOAD_DURATION:-12} --warmup ${LOAD_WARMUP:-3} --worker-arg=--engine-process --worker-arg=$mode \
          --worker-log-level info 2>&1 | tee "$OUT/proc12_${model}_${mode}_$r.log" | sed -n '/ready in/p;/^| engine |/,$p;/Error/p'
      done
    done
  done
  ;;
spy13)
  # where the worker's (HTTP side's) time goes at 64 clients: py-spy (.devdata/extra) on the worker process while
  # bench_load runs the 0.5B; every thread, idle samples kept (the event loop's share idle in epoll = its headroom)
  python3 -m zipfile -e .devdata/extra/py_spy-*.whl /tmp/pyspy && SPY=$(find /tmp/pyspy -name py-spy -type f | head -1) && chmod +x $SPY
  synth qwen2.5-0.5b F16
  timeout 150 python3 benchmarks/bench_load.py --model $M/qwen2.5-0.5b-F16.gguf --worker --label spy --concurrency 64 \
    --client-procs 4 --duration ${LOAD_DURATION:-20} --warmup 3 --worker-log-level info ${SPY_ARGS:-} 2>&1 | tee "$OUT/spy13_load.log" \
    | sed -n '/ready in/p;/^| engine |/,$p;/Error/p' &
  LOADP=$!
  W=""; for i in $(seq 1 200); do W=$(pgrep -f "worker_orcd serve --worker-id bench" | head -1); [ -n "$W" ] && break; sleep 0.5; done
  for i in $(seq 1 240); do  # under load once the clients' connections are open
    [ $(ls -l /proc/$W/fd 2>/dev/null | grep -c socket) -gt 60 ] && break; sleep 0.5; done
  sleep 3
  $SPY record -p $W --threads --idle --rate 400 --duration ${SPY_S:-6} --nonblocking --format raw -o "$OUT/spy13_worker.txt" 2>&1 | tail -2
  C=$(pgrep -f "worker_orcd.engine_process.child" | head -1)
  [ -n "$C" ] && $SPY dump -p $C 2>&1 | head -40 > "$OUT/spy13_child_dump.txt"
  wait $LOADP
  ;;
direct13)
  # the SSE token fast path (http/protocol.py DirectBody): 0.5B F16 at 64 clients over HTTP, this tree against
  # .devdata/base (the tree before), alternating; then this tree with a 0.25 ms GIL switch interval in the worker
  # process only (sitecustomize); then the 7B Q4_K_M at 64 clients on this tree
  (synth qwen2.5-7b Q4_K_M; touch $M/7b.done) >$M/synth.log 2>&1 &
  synth qwen2.5-0.5b F16
  B="benchmarks/bench_load.py --worker --concurrency 64 --client-procs 4 --duration ${LOAD_DURATION:-12} --warmup ${LOAD_WARMUP:-3}"
  ab direct13_05b qwen2.5-0.5b-F16 $B
  echo "== this tree, switch interval 0.25 ms in the worker"
  SWITCH_MS=0.25 PYTHONPATH=$PWD/benchmarks/worker_diag:/tmp/site:$PWD timeout 120 python3 $B --model $M/qwen2.5-0.5b-F16.gguf --label 05b-sw 2>&1 \
    | tee "$OUT/direct13_05b_switch.log" | sed -n '/^| engine |/,$p;/Error/p' | tail -1
  for i in $(seq 1 100); do [ -f $M/7b.done ] && break; sleep 3; done
  echo "== this tree, 7B Q4_K_M"
  timeout 150 python3 $B --model $M/qwen2.5-7b-Q4_K_M.gguf --label 7b 2>&1 | tee "$OUT/direct13_7b.log" | sed -n '/^| engine |/,$p;/Error/p' | tail -1
  ;;
gc13)
  # the worker process's garbage collections under 64-client 0.5B load (benchmarks/worker_diag, worker only):
  # GC_MODES = default | 50000,50,100 (thresholds) | off (disabled after start, a bound); pauses > 1 ms logged
  synth qwen2.5-0.5b F16
  B="benchmarks/bench_load.py --worker --concurrency 64 --client-procs 4 --duration ${LOAD_DURATION:-12} --warmup ${LOAD_WARMUP:-3}"
  for mode in ${GC_MODES:-default 50000,50,100 off}; do
    echo "== gc $mode"
    GC_T=${mode#default} GC_LOG=$OUT/gc13_$mode.json PYTHONPATH=$PWD/benchmarks/worker_diag:/tmp/site:$PWD timeout 120 python3 $B \
      --model $M/qwen2.5-0.5b-F16.gguf --label 05b-gc-$mode 2>&1 | tee "$OUT/gc13_$mode.log" | sed -n '/^| engine |/,$p;/Error/p' | tail -1
    cat $OUT/gc13_$mode.json; echo
  done
  ;;
lag13)
  # where the HTTP side's token gaps come from: the step channel and event-loop lag histograms (this tree), 0.5B F16
  # at 64 clients, this tree against .devdata/base alternating (both driven by this tree's bench_load: clients keep
  # their connections); then the 7B Q4_K_M at 64 clients on this tree
  (synth qwen2.5-7b Q4_K_M; touch $M/7b.done) >$M/synth.log 2>&1 &
  synth qwen2.5-0.5b F16
  B="$PWD/benchmarks/bench_load.py --worker --concurrency 64 --client-procs 4 --duration ${LOAD_DURATION:-12} --warmup ${LOAD_WARMUP:-3}"
  ab lag13_05b qwen2.5-0.5b-F16 $B
  for i in $(seq 1 100); do [ -f $M/7b.done ] && break; sleep 3; done
  echo "== this tree, 7B Q4_K_M"
  timeout 150 python3 $B --model $M/qwen2.5-7b-Q4_K_M.gguf --label 7b 2>&1 | tee "$OUT/lag13_7b.log" | sed -n '/^| engine |/,$p;/Error/p' | tail -1
  ;;
final13)
  # issue 8 at this tree: 0.5B single stream; 0.5B at 64 clients with the worker's collector pauses logged (> 1 ms,
  # sitecustomize, worker only) and with uvloop as the worker's event loop (.devdata/extra wheel); 7B F16 at 1 and 64
  (synth qwen2.5-7b F16; touch $M/7bf16.done) >$M/synth.log 2>&1 &
  synth qwen2.5-0.5b F16
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .devdata/extra/uvloop-*.whl >/dev/null 2>&1
  B="$PWD/benchmarks/bench_load.py --worker --client-procs 4 --duration ${LOAD_DURATION:-12} --warmup ${LOAD_WARMUP:-3}"
  echo "== 0.5B single stream"
  timeout 100 python3 $B --model $M/qwen2.5-0.5b-F16.gguf --label 05b --concurrency 1 2>&1 | tee "$OUT/final13_05b_1.log" | sed -n '/^| engine |/,$p;/Error/p' | tail -1
  echo "== 0.5B 64, collector pauses logged"
  GC_LOG=$OUT/final13_gc.json PYTHONPATH=$PWD/benchmarks/worker_diag:/tmp/site:$PWD timeout 120 python3 $B --model $M/qwen2.5-0.5b-F16.gguf --label 05b-gclog \
    --concurrency 64 2>&1 | tee "$OUT/final13_05b_gclog.log" | sed -n '/^| engine |/,$p;/Error/p' | tail -1
  echo "== 0.5B 64, uvloop"
  USE_UVLOOP=1 PYTHONPATH=$PWD/benchmarks/worker_diag:/tmp/site:$PWD timeout 120 python3 $B --model $M/qwen2.5-0.5b-F16.gguf --label 05b-uvloop \
    --concurrency 64 2>&1 | tee "$OUT/final13_05b_uvloop.log" | sed -n '/^| engine |/,$p;/Error/p' | tail -1
  for i in $(seq 1 100); do [ -f $M/7bf16.done ] && break; sleep 3; done
  echo "== 7B F16"
  timeout 200 python3 $B --model $M/qwen2.5-7b-F16.gguf --label 7b-f16 --concurrency 1 64 2>&1 | tee "$OUT/final13_7bf16.log" \
    | sed -n '/^| engine |/,$p;/Error/p'
  ;;
loop13)
  # uvloop (the new default --event-loop) + the token fast path against .devdata/base (asyncio, the queue path),
  # 0.5B F16: 64 clients alternating (and this tree with --event-loop asyncio), 1 client each; 7B Q4_K_M at 64
  (synth qwen2.5-7b Q4_K_M; touch $M/7b.done) >$M/synth.log 2>&1 &
  synth qwen2.5-0.5b F16
  B="$PWD/benchmarks/bench_load.py --worker --client-procs 4 --duration ${LOAD_DURATION:-10} --warmup ${LOAD_WARMUP:-2}"
  run() { (cd $1 && PYTHONPATH=/tmp/site:$PWD timeout 100 python3 $B --model $M/qwen2.5-0.5b-F16.gguf --label $2 --concurrency $3 \
    ${4:+--worker-arg=--event-loop --worker-arg=$4} 2>&1 | tee "$OUT/loop13_$2.log" | sed -n '/^| engine |/,$p;/Error/p' | tail -1); }
  run . new-64a 64; run .devdata/base base-64a 64; run . new-asyncio-64 64 asyncio; run . new-64b 64; run .devdata/base base-64b 64
  run . new-1 1; run .devdata/base base-1 1
  for i in $(seq 1 100); do [ -f $M/7b.done ] && break; sleep 3; done
  timeout 150 python3 $B --model $M/qwen2.5-7b-Q4_K_M.gguf --label 7b-64 --concurrency 64 2>&1 | tee "$OUT/loop13_7b.log" \
    | sed -n '/^| engine |/,$p;/Error/p' | tail -1
  ;;
verify15)
  # the branch's in-launch K-segment sums and tied embeddings in fragment order: the GPU suite first, then the probe
  # and the 7B Q4_K_M quantized-half2 steps on this tree and .devdata/base (main's tree)
  (synth qwen2.5-7b Q4_K_M; touch $M/7b.done) >$M/synth.log 2>&1 &
  timeout 300 python3 -m pytest -q -m gpu -n 6 --dist loadfile tests/ -p no:cacheprovider -rfs 2>&1 | tee "$OUT/verify15_suite.log" | tail -4
  timeout 120 python3 benchmarks/probe_fragments.py --m 1 16 64 --budget-s 90 2>&1 | tee "$OUT/verify15_probe.log" | grep -E "^\| 7b|mismatch|  "
  timeout 90 python3 benchmarks/probe_prefill.py --m 256 512 2>&1 | tee "$OUT/verify15_prefill.log" | grep -E "^\|"
  steps7b verify15
  ;;
verify16)
  # branch next-rope-store (RoPE and the K/V cache write in one launch; same-type q/k/v parts in one launch): the GPU
  # suite alone, then 0.5B F16 (dense), 1.5B Q4_K_M and 7B Q4_K_M (quantized-half2) steps on this tree and
  # .devdata/base (main's tree)
  (synth qwen2.5-7b Q4_K_M; touch $M/7b.done) >$M/synth.log 2>&1 &
  timeout 300 python3 -m pytest -q -m gpu -n 6 --dist loadfile tests/ -p no:cacheprovider -rfs 2>&1 | tee "$OUT/verify16_suite.log" | tail -4
  for spec in "qwen2.5-0.5b F16 dense" "qwen2.5-1.5b Q4_K_M quantized-half2"; do set -- $spec
    for tree in . .devdata/base; do echo "== $1 $2 tree $tree"
      (cd $tree && PYTHONPATH=/tmp/site:$PWD timeout 120 python3 benchmarks/profile_step.py --shape $1 --type $2 \
        --resident-weights $3 --batch 1 16 64 2>&1 | tee "$OUT/verify16_$1_$(basename $tree).log" | grep -E "^\||prefill")
    done
  done
  steps7b verify16
  ;;
mixed18)
  # Q4_K_M's q/k (Q4_K) and v (Q6_K) in one launch (fragments.MIXED_PARTS): its GPU tests, then decode steps on vs
  # off, same call (1.5B and 7B Q4_K_M under quantized-half2; the synthetic Q4_K_M has a Q6_K v in every layer)
  timeout 200 python3 -m pytest -q -m gpu -rf --tb=short tests/test_fragments.py tests/test_engine_gpu.py \
    -k "parts or mixed or pdl" -p no:cacheprovider 2>&1 | tee "$OUT/mixed18_tests.log" | tail -4
  for spec in ${MIXED18_ROWS:-qwen2.5-1.5b:Q4_K_M qwen2.5-7b:Q4_K_M}; do
    for g in on off on off; do echo "== $spec mixed-parts $g"
      timeout 150 python3 benchmarks/profile_step.py --shape ${spec%%:*} --type ${spec##*:} --resident-weights quantized-half2 \
        --batch 1 16 --mixed-parts $g 2>&1 | tee -a "$OUT/mixed18_${spec/:/_}_$g.log" | grep -E "^\| [0-9]"
    done
  done
  ;;
br19)
  # decode launches of up to 8 rows with 8 tokens per program (fragments.MIN_BR = 8: half the x tiles in shared memory,
  # Q4_K at 3 stages 43 -> 31 KB, 5 -> 7 blocks per SM): its GPU tests, then steps 8 vs 16 at B = 1, 4, 16, same call
  timeout 200 python3 -m pytest -q -m gpu -rf --tb=short tests/test_fragments.py tests/test_engine_gpu.py \
    -k "blocks_kernel or eight_token" -p no:cacheprovider 2>&1 | tee "$OUT/br19_tests.log" | tail -3
  for spec in ${BR19_ROWS:-qwen2.5-1.5b:Q4_K_M qwen2.5-7b:Q4_K_M qwen2.5-7b:Q8_0}; do
    for g in 8 16 8 16; do echo "== $spec min-br $g"
      timeout 150 python3 benchmarks/profile_step.py --shape ${spec%%:*} --type ${spec##*:} --resident-weights quantized-half2 \
        --batch 1 4 16 --min-br $g 2>&1 | tee -a "$OUT/br19_${spec/:/_}_$g.log" | grep -E "^\| [0-9]"
    done
  done
  ;;
dotk19)
  # Q4_K's fragment-order chain in one 64-input dot per chunk (fragments.DOT_K = 64: 502 -> 475 SASS instructions per
  # super-block, half the wgmma waits; the same k16 steps): its GPU tests, then decode steps 32 vs 64, same call
  timeout 200 python3 -m pytest -q -m gpu -rf --tb=short tests/test_fragments.py tests/test_engine_gpu.py \
    -k "blocks_kernel or dots_of_64" -p no:cacheprovider 2>&1 | tee "$OUT/dotk19_tests.log" | tail -3
  for spec in ${DOTK19_ROWS:-qwen2.5-1.5b:Q4_K_M qwen2.5-7b:Q4_K_M}; do
    for g in 64 32 64 32; do echo "== $spec dot-k $g"
      timeout 150 python3 benchmarks/profile_step.py --shape ${spec%%:*} --type ${spec##*:} --resident-weights quantized-half2 \
        --batch 1 16 --dot-k $g 2>&1 | tee -a "$OUT/dotk19_${spec/:/_}_$g.log" | grep -E "^\| [0-9]"
    done
  done
  ;;
fuse19)
  # with PDL on, probe_fragments (18th session, M=1) timed the K segments' sum as a second launch faster than the
  # in-launch sum on the 7B's q/o (8.0 vs 9.9 us) and down (Q4_K 21.7 vs 28.4, Q6_K 30.6 vs 34.4): decode steps with
  # fragments.FUSE_MAX_M 16 (on) vs 0 (off), same call (bitwise the same rows); then the capture that failed once in
  # the 18th session's GPU suite, three times alone
  for spec in ${FUSE19_ROWS:-qwen2.5-1.5b:Q4_K_M qwen2.5-7b:Q4_K_M qwen2.5-7b:Q8_0}; do
    for g in on off on off; do echo "== $spec fuse-sum $g"
      timeout 150 python3 benchmarks/profile_step.py --shape ${spec%%:*} --type ${spec##*:} --resident-weights quantized-half2 \
        --batch 1 16 --fuse-sum $g 2>&1 | tee -a "$OUT/fuse19_${spec/:/_}_$g.log" | grep -E "^\| [0-9]"
    done
  done
  for i in 1 2 3; do
    timeout 100 python3 -m pytest -q -m gpu -rf --tb=short tests/test_engine_gpu.py -k mixed_type_qkv -p no:cacheprovider 2>&1 \
      | tee "$OUT/fuse19_capture_$i.log" | tail -2
  done
  ;;
final18)
  # the split attention's idle programs leave at once (a short lone row's 64 programs no longer queue 64 atomics on
  # one counter; bits unchanged): its GPU tests, then 1.5B / 7B Q4_K_M steps on this tree vs .devdata/base alternating,
  # then issue 13's rows under quantized-half2 against llama-bench (FINAL18_ROWS), same call
  [ -f /tmp/llama.cpp/done ] || bash .devdata/build-llama-cpp.sh .devdata/llama.cpp-0c1e570.tgz /tmp/llama.cpp --background
  timeout 150 python3 -m pytest -q -m gpu -rf --tb=short tests/test_kernels_paged_attention.py tests/test_split_fallback_gpu.py \
    -p no:cacheprovider 2>&1 | tee "$OUT/final18_tests.log" | tail -3
  for spec in ${FINAL18_STEPS:-qwen2.5-1.5b:Q4_K_M qwen2.5-7b:Q4_K_M}; do for r in 1 2; do for tree in . .devdata/base; do
    echo "== $spec tree $tree round $r"
    (cd $tree && PYTHONPATH=/tmp/site:$PWD timeout 120 python3 benchmarks/profile_step.py --shape ${spec%%:*} --type ${spec##*:} \
      --resident-weights quantized-half2 --batch 1 16 64 2>&1 | tee -a "$OUT/final18_${spec/:/_}_$(basename $tree).log" | grep -E "^\| [0-9]")
  done; done; done
  BENCH_TIMEOUT=${BENCH_TIMEOUT:-150} qrows final18_bench "${FINAL18_ROWS:-qwen2.5-1.5b:Q4_K_M qwen2.5-7b:Q4_K_M qwen2.5-7b:Q8_0}"
  ;;
stages18)
  # the decode launches' pipeline depth per type and K segment (fragments.swap_stages: 2 on Q6_K/Q8_0 and short Q4_K
  # segments): its GPU test (every depth gives the same bits), steps with it vs 3 everywhere, same call; then Nsight
  # Compute on single launches (occupancy, registers, DRAM throughput, stall reasons) of the matrices seg18 timed
  timeout 200 python3 -m pytest -q -m gpu -rf --tb=short tests/test_fragments.py -p no:cacheprovider 2>&1 \
    | tee "$OUT/stages18_tests.log" | tail -3
  for spec in ${STAGES18_ROWS:-qwen2.5-1.5b:Q4_K_M qwen2.5-7b:Q4_K_M qwen2.5-7b:Q8_0}; do
    for g in shape 3 shape 3; do echo "== $spec frag-stages $g"
      timeout 150 python3 benchmarks/profile_step.py --shape ${spec%%:*} --type ${spec##*:} --resident-weights quantized-half2 \
        --batch 1 16 64 --frag-stages $g 2>&1 | tee -a "$OUT/stages18_${spec/:/_}_$g.log" | grep -E "^\| [0-9]"
    done
  done
  for c in ${NCU18_CASES:-7b:gate_up:Q4_K 7b:down:Q6_K 7b:q:Q4_K 1.5b:gate_up:Q4_K 1.5b:q:Q4_K 7b:gate_up:Q8_0}; do
    echo "== ncu $c"
    timeout 90 ncu --clock-control none --kernel-name regex:fragments_kernel --launch-skip 1 --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section MemoryWorkloadAnalysis --section SchedulerStats python3 benchmarks/ncu_fragments.py --case $c 2>&1 \
      | tee "$OUT/ncu18_${c//:/_}.log" | grep -E "Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Theoretical Occ|Block Limit|Stall|Shared Memory Config|Dynamic Shared|Issued Warp|No Eligible|Memory Throughput" | head -24
  done
  ;;
seg18)
  # per-matrix latency of the fragment-order kernels at decode sizes against the K-segment rule (programs per
  # matrix) and pipeline stages: the 1.5B's matmuls run at 0.2-1.1 TB/s, the 7B's large ones at 1.8-2.1 TB/s
  timeout $((${SEG18_BUDGET:-500} + 40)) python3 benchmarks/probe_fragments.py --m 1 16 --models 1.5b 7b --sweep --budget-s ${SEG18_BUDGET:-500} \
    --segments ${SEG18_RULES:-1024:8 512:8 2048:16 4096:16} 2>&1 | tee "$OUT/seg18.log" | grep -E "^\||mismatch"
  ;;
verify17)
  # branch next-pdl (programmatic dependent launch of the decode step's kernels; fragment-order matmuls prefetch
  # their weights into L2 before waiting): the GPU suite alone (its PDL test compares logits and tokens bitwise with
  # PDL off), then steps per --pdl mode on this tree, same call (the 7B: stage pdl7b)
  timeout 300 python3 -m pytest -q -m gpu -n 6 --dist loadfile tests/ -p no:cacheprovider -rfs 2>&1 | tee "$OUT/verify17_suite.log" | tail -4
  for spec in "qwen2.5-1.5b Q4_K_M quantized-half2 off on prefetch" "qwen2.5-0.5b F16 dense off on"; do set -- $spec
    for p in "${@:4}"; do echo "== $1 $2 pdl $p"
      timeout 120 python3 benchmarks/profile_step.py --shape $1 --type $2 --resident-weights $3 --batch 1 16 64 --pdl $p 2>&1 \
        | tee "$OUT/verify17_$1_$p.log" | grep -E "^\||prefill"
    done
  done
  # the 1.5B decode graph's own kernels (PDL with prefetch): kernels per replay, busy share
  timeout 100 python3 benchmarks/profile_step.py --shape qwen2.5-1.5b --type Q4_K_M --resident-weights quantized-half2 \
    --batch 1 --profile --pdl prefetch 2>&1 | tee "$OUT/verify17_profile15b.log" | grep -A 22 "^# decode graph"
  ;;
pdl7b)
  # the 7B Q4_K_M (quantized-half2) decode steps per --pdl mode, same call
  synth qwen2.5-7b Q4_K_M
  for p in off on prefetch; do echo "== 7B Q4_K_M pdl $p"
    timeout 150 python3 benchmarks/profile_step.py --model $M/qwen2.5-7b-Q4_K_M.gguf --resident-weights quantized-half2 \
      --batch 1 16 64 --pdl $p 2>&1 | tee "$OUT/pdl7b_$p.log" | grep -E "^\||prefill"
  done
  ;;
ready16)
  # 7B Q4_K_M quantized-half2 time to ready: a cold process (compiles, fills the Triton cache), then a new process
  # with a warm cache whose loading thread is profiled (cProfile: the warm-up and graph capture beside the upload)
  for prof in 0 40; do
    timeout 120 python3 benchmarks/bench_engine.py --shapes qwen2.5-7b --types Q4_K_M --resident-weights quantized-half2 \
      --keep --decode-tokens 16 --cprofile-load $prof 2>&1 | tee "$OUT/ready16_$prof.log" | grep -E "^\| qwen|Error|FAILED"
    cp $OUT/bench_engine.json "$OUT/ready16_$prof.json"
  done
  ;;
final16)
  # the GPU suite at the submitted tree (load beside the warm-up; RoPE+K/V store; stacked q/k parts), then issue 13's
  # rows under quantized-half2 against llama-bench: the 1.5B first, so the 7B row's ready time meets a warm Triton cache
  [ -f /tmp/llama.cpp/done ] || bash .devdata/build-llama-cpp.sh .devdata/llama.cpp-0c1e570.tgz /tmp/llama.cpp --background
  timeout 330 python3 -m pytest -q -m gpu -n 6 --dist loadfile tests/ -p no:cacheprovider -rfs 2>&1 | tee "$OUT/final16_suite.log" | tail -4
  BENCH_TIMEOUT=${BENCH_TIMEOUT:-150} qrows final16_bench "${FINAL16_ROWS:-qwen2.5-1.5b:Q4_K_M qwen2.5-7b:Q4_K_M}"
  # where the 1.5B's decode step goes: its kernels one by one (eager, torch.profiler), beside the graph replay
  timeout 100 python3 benchmarks/profile_step.py --shape qwen2.5-1.5b --type Q4_K_M --resident-weights quantized-half2 \
    --batch 1 --profile 2>&1 | tee "$OUT/final16_profile15b.log" | grep -vE "^\{" | tail -45
  ;;
final15)
  # the GPU suite at the submitted tree, then issue 13's rows under quantized-half2 against llama-bench (FINAL15_ROWS)
  [ -f /tmp/llama.cpp/done ] || bash .devdata/build-llama-cpp.sh .devdata/llama.cpp-0c1e570.tgz /tmp/llama.cpp --background
  timeout 240 python3 -m pytest -q -m gpu -n 6 --dist loadfile tests/ -p no:cacheprovider -rfs 2>&1 | tee "$OUT/final15_suite.log" | tail -4
  BENCH_TIMEOUT=${BENCH_TIMEOUT:-150} qrows final15_bench "${FINAL15_ROWS:-qwen2.5-7b:Q8_0 qwen2.5-7b:Q4_K_M qwen2.5-1.5b:Q4_K_M}"
  ;;
pre15)
  # the quantized prefill's segmented chains (a loop per segment vs one loop) and the in-launch segment sums below
  # M=16: kernel GPU tests, probe_prefill, 7B Q4_K_M half2 steps (both prefill forms) against .devdata/base, then
  # issue 13's rows under quantized-half2 against llama-bench (PRE15_ROWS, default 1.5B and 7B Q4_K_M)
  [ -f /tmp/llama.cpp/done ] || bash .devdata/build-llama-cpp.sh .devdata/llama.cpp-0c1e570.tgz /tmp/llama.cpp --background
  (synth qwen2.5-7b Q4_K_M; touch $M/7b.done) >$M/synth.log 2>&1 &
  timeout 200 python3 -m pytest -q -m gpu -n 6 --dist loadfile tests/test_dense_matmul.py tests/test_fragments.py \
    tests/test_qmatmul.py -p no:cacheprovider -rf 2>&1 | tee "$OUT/pre15_tests.log" | tail -3
  timeout 100 python3 benchmarks/probe_prefill.py --m 256 512 2>&1 | tee "$OUT/pre15_prefill.log" | grep -E "^\|"
  for i in $(seq 1 100); do [ -f $M/7b.done ] && break; sleep 3; done
  for run in ".:off" ".:on" ".devdata/base:"; do tree=${run%%:*}; flat=${run##*:}; echo "== tree $tree seg-flat ${flat:-main}"
    (cd $tree && PYTHONPATH=/tmp/site:$PWD timeout 150 python3 benchmarks/profile_step.py --model $M/qwen2.5-7b-Q4_K_M.gguf \
      --resident-weights quantized-half2 --batch 1 16 64 ${flat:+--seg-flat $flat} 2>&1 \
      | tee "$OUT/pre15_step_$(basename $tree)_$flat.log" | grep -E "^\||prefill")
  done
  qrows pre15_bench "${PRE15_ROWS:-qwen2.5-1.5b,qwen2.5-7b:Q4_K_M}"
  ;;
frag14)
  # Q4_K/Q6_K weights in fragment order (kernels/fragments.py): their GPU tests and the half2 ones they must equal, the
  # per-matrix probe against the blocks' kernel, then 7B Q4_K_M quantized-half2 steps on this tree and .devdata/base
  [ -f /tmp/llama.cpp/done ] || [ -n "${SKIP_LLAMA:-}" ] || bash .devdata/build-llama-cpp.sh .devdata/llama.cpp-0c1e570.tgz /tmp/llama.cpp --background
  (synth qwen2.5-7b Q4_K_M; touch $M/7b.done; synth qwen2.5-1.5b Q4_K_M) >$M/synth.log 2>&1 &
  timeout 240 python3 -m pytest -q -m gpu -rf --tb=short tests/test_fragments.py tests/test_qmatmul.py tests/test_engine_gpu.py \
    -k "fragment or half2" -p no:cacheprovider 2>&1 | tee "$OUT/frag14_tests.log" | tail -6
  timeout 150 python3 benchmarks/probe_fragments.py --m 1 16 64 128 --sweep --budget-s 120 2>&1 | tee "$OUT/probe_fragments.log"
  steps7b frag14
  ;;
fbench14)
  # issue 13's rows under quantized-half2 (K-quants and Q8_0 in fragment order) against llama-bench on the same files;
  # FBENCH_TESTS: GPU test files to run first (while llama.cpp builds), FBENCH_K their -k expression ("a or b")
  [ -f /tmp/llama.cpp/done ] || bash .devdata/build-llama-cpp.sh .devdata/llama.cpp-0c1e570.tgz /tmp/llama.cpp --background
  [ -z "${FBENCH_TESTS:-}" ] || timeout 200 python3 -m pytest -q -m gpu -rf --tb=short $FBENCH_TESTS ${FBENCH_K:+-k "$FBENCH_K"} -p no:cacheprovider 2>&1 \
    | tee "$OUT/fbench14_tests.log" | tail -3
  BENCH_TIMEOUT=${BENCH_TIMEOUT:-500} qrows fbench14 "${FBENCH_ROWS:-qwen2.5-1.5b,qwen2.5-7b:Q4_K_M}"
  ;;
gcab13)
  # this tree (the direct path writing a drain's frames in one write per stream) against .devdata/base, 0.5B F16 at
  # 64 clients, and this tree with the worker's collector thresholds raised (sitecustomize, worker only; pauses > 1 ms logged)
  synth qwen2.5-0.5b F16
  B="$PWD/benchmarks/bench_load.py --worker --client-procs 4 --duration ${LOAD_DURATION:-10} --warmup ${LOAD_WARMUP:-2}"
  D=$PWD/benchmarks/worker_diag
  run() { (cd $1 && GC_LOG=$OUT/gcab13_$2.json GC_T=$3 PYTHONPATH=$D:/tmp/site:$PWD timeout 100 python3 $B --model $M/qwen2.5-0.5b-F16.gguf \
    --label $2 --concurrency 64 2>&1 | tee "$OUT/gcab13_$2.log" | sed -n '/^| engine |/,$p;/Error/p' | tail -1)
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); p=[x for x in d['pauses'] if x[0]>12]; print(d['threshold'], 'pauses>1ms after 12 s:', len(p), 'gen2:', [x[2] for x in p if x[1]==2], 'max gen0/1:', max([x[2] for x in p if x[1]<2] or [0]))" $OUT/gcab13_$2.json; }
  run . new-a ""; run .devdata/base base ""; run . new-t2 700,10,100; run . new-t5 5000,10,100; run . new-b ""
  ;;
esac
