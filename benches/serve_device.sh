#!/usr/bin/env bash
# One device call for serving (issue 24): Qwen2.5-7B random weights in bf16 (written by the HF
# peer script), `qscript serve` measured by benches/serve_bench.py (one client against the
# bandwidth limit; 32 concurrent clients), then serving while training
# (benches/serve_train.rhai, with and without a client asking once a second).
set -uo pipefail
mkdir -p /tmp/qs
rm -f /tmp/qs/qscript-base  # a warm machine's earlier call may have left one
for f in .devbin/qscript.xz .devbin/qscript-base.xz .devbin/gpu.xz; do [ -f "$f" ] || continue; xz -dc "$f" > "/tmp/qs/$(basename "$f" .xz)" && chmod +x "/tmp/qs/$(basename "$f" .xz)"; done
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# The GPU tests of decoding's kernels (GPU_TESTS picks others).
/tmp/qs/gpu --test-threads=1 ${GPU_TESTS:-decode} > "$OUT/gpu-tests.log" 2>&1
echo "gpu tests: exit $?"; grep -E "^test |test result|panicked" "$OUT/gpu-tests.log" | tail -6
dir=/tmp/qsbench/qwen2.5-7b
if [ ! -f "$dir/config.json" ]; then
  python3 .devbin/hf_peft_lora.py --model qwen2.5-7b --save-model "$dir" > /dev/null || exit 1
fi
cp .devbin/tokenizer.json .devbin/tokenizer_config.json "$dir/"
# serve BIN LOG [BENCH ARGS]: serve_bench.py against BIN's server.
serve() {
  local bin=$1 log=$2; shift 2
  $bin serve "$dir" --served-model-name m --port 8011 --max-num-seqs 32 --max-model-len 1024 \
    --dtype bf16 2> "$OUT/$log.log" &
  local pid=$!
  for _ in $(seq 600); do grep -q "http://" "$OUT/$log.log" && break; kill -0 $pid 2>/dev/null || break; sleep 0.5; done
  python3 benches/serve_bench.py http://127.0.0.1:8011 --model m --weights "$dir" "$@" | tee "$OUT/$log.jsonl"
  kill -INT $pid; wait $pid
  tail -3 "$OUT/$log.log"
}
# The build in .devbin/qscript-base.xz first (one client only), so the two compare in one call.
[ -x /tmp/qs/qscript-base ] && { echo "base build:"; serve /tmp/qs/qscript-base serve-base --one-client; }
# Decoding's projection groups, kernels against cuBLAS (when model_bench is carried), and one
# client with q/k/v alone through the matrix-vector kernel (`QSCRIPT_DECODE_GEMV=qkv`) and with
# no CUDA graphs before the default's whole run (every kernel, graphs on).
if [ -f .devbin/model_bench.xz ]; then
  xz -dc .devbin/model_bench.xz > /tmp/qs/model_bench && chmod +x /tmp/qs/model_bench
  /tmp/qs/model_bench decode-ops 2>&1 | tee "$OUT/decode-ops.jsonl"
fi
echo "q/k/v alone through the kernel:"
QSCRIPT_DECODE_GEMV=qkv serve /tmp/qs/qscript serve-qkv --one-client
echo "no CUDA graphs:"
QSCRIPT_DECODE_GRAPH=0 serve /tmp/qs/qscript serve-eager --one-client
serve /tmp/qs/qscript serve
# serving while training: alone, then with a client asking once a second
# Each run's whole stderr goes to $OUT/train-N.err, and the GPU's used memory every 0.3 s beside
# it to $OUT/train-N.mem (a run that fails shows how its memory grew).
# run_train NAME [--set ...]: its logs are $OUT/train-NAME.* (a name, not a counter: the runs
# are called in $(...) subshells).
run_train() {
  local runs=$1; shift
  ( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.3; done ) \
    > "$OUT/train-$runs.mem" &
  local smi=$!
  RUST_BACKTRACE=1 /tmp/qs/qscript benches/serve_train.rhai --allow-read /tmp/qsbench --allow-read "$PWD/.devbin" \
    --output-dir /tmp/qsbench/serve-train --set model="$dir" --set data="$PWD/.devbin/huanhuan.json" "$@" \
    2> "$OUT/train-$runs.err" > /dev/null
  kill $smi 2>/dev/null
  grep -E "^trained|error" -A4 "$OUT/train-$runs.err" | grep -v "^ *[0-9]*: \|^ *at " | tail -8
  echo "  (peak GPU memory used: $(sort -n "$OUT/train-$runs.mem" | tail -1) MiB)"
}
# A short run first: on a fresh machine the driver compiles our kernels' PTX once (~13 s), which
# would land in the first timed run. Then 120 steps each (16 left the client a window of ~3 s).
run_train warmup --set steps=4 > /dev/null
echo "train alone: $(run_train alone --set steps=120)"
: > "$OUT/client.codes"
( while true; do
    curl -s -o /dev/null -w '%{http_code}\n' -m 30 http://127.0.0.1:8012/v1/completions \
      -H 'Content-Type: application/json' \
      -d '{"model": "m", "prompt": "hello", "max_tokens": 32, "temperature": 0}' >> "$OUT/client.codes"
    sleep 1; done ) &
cl=$!
echo "train serving: $(run_train serving --set steps=120 --set serve=true)"
kill $cl 2>/dev/null
echo "client requests answered 200 while the recipe ran: $(grep -c '^200' "$OUT/client.codes")"
true
