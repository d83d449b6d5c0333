set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 REQUIRE_REAL_GPU=1
export WORKER_ORCD_TOKENIZER_DONOR=$PWD/.devdata/qwen05-tokenizer.gguf
M=/tmp/models; mkdir -p $M
synth() { [ -f "$M/$1-$2.gguf" ] || python3 benchmarks/synth.py "$M/$1-$2.gguf" --shape "$1" --type "$2" --vocab 151936 --tokenizer-from "$WORKER_ORCD_TOKENIZER_DONOR" >/dev/null; }
[ -f /tmp/llama.cpp/done ] || bash .devdata/build-llama-cpp.sh .devdata/llama.cpp-0c1e570.tgz /tmp/llama.cpp --background >/dev/null 2>&1
[ -f $M/done ] || (synth qwen2.5-0.5b F16; synth qwen2.5-7b Q4_K_M; synth qwen2.5-7b F16; touch $M/done) >$M/synth.log 2>&1 &
timeout 300 python3 -m pytest -q -m gpu -rf --tb=short -p no:cacheprovider tests/test_engine_batching.py tests/test_kernels_attention.py \
  tests/test_kernels_checksum.py tests/test_kernels_paged_attention.py tests/test_kernels_rmsnorm.py tests/test_kernels_rope.py \
  tests/test_kernels_sampling.py tests/test_kernels_sampling_batched.py tests/test_privileges.py tests/test_qmatmul.py 2>&1 | tee "$OUT/gpu_tests4.log" | tail -30
timeout 60 python3 benchmarks/profile_step.py --shape qwen2.5-0.5b --type F16 --batch 1 64 2>&1 | grep -E "^\|"
