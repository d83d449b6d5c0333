set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 REQUIRE_REAL_GPU=1
export WORKER_ORCD_TOKENIZER_DONOR=$PWD/.devdata/qwen05-tokenizer.gguf
M=/tmp/models; mkdir -p $M
(python3 benchmarks/synth.py $M/7b.gguf --shape qwen2.5-7b --type Q4_K_M --vocab 151936 --tokenizer-from $WORKER_ORCD_TOKENIZER_DONOR >/dev/null; touch $M/done) > $M/synth.log 2>&1 &
timeout 220 python3 benchmarks/tune_wide.py --budget-s 190 2>&1 | grep -E "^\|"
timeout 120 python3 -m pytest -q -m gpu tests/test_dense_matmul.py -p no:cacheprovider 2>&1 | tail -4
for i in $(seq 1 60); do [ -f $M/done ] && break; sleep 3; done; tail -3 $M/synth.log
timeout 150 python3 benchmarks/profile_step.py --model $M/7b.gguf --batch 1 64 2>&1 | grep -E "^\||prefill"
