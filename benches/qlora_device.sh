#!/usr/bin/env bash
# One device call for QLoRA (issue 27): the binaries shipped in .devbin/, the wheels in .whl/,
# the GPU tests of the 4-bit path, PEFT loading a 4-bit adapter (scripts/verify_exports.py), then
# the harness's QLoRA configs given (default qlora-7b).
set -uo pipefail
mkdir -p /tmp/qs
for f in .devbin/*.xz; do xz -dc "$f" > "/tmp/qs/$(basename "$f" .xz)" && chmod +x "/tmp/qs/$(basename "$f" .xz)"; done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
/tmp/qs/gpu --test-threads=1 ${GPU_TESTS:-dequant qlora} > "${OUT:-/tmp}/gpu-tests.log" 2>&1
echo "gpu tests: exit $?"; grep -E "^test |test result|panicked" "${OUT:-/tmp}/gpu-tests.log" | tail -6
# PEFT loads an adapter trained on qscript's NF4 base onto bitsandbytes' NF4 base on the GPU:
# logits and greedy text (the real stories260K checkpoint, carried in .devbin/stories260K).
if [ -f .devbin/stories260K/config.json ]; then
  rm -rf /tmp/qs-export
  if /tmp/qs/model_bench export .devbin/stories260K /tmp/qs-export --4bit > /dev/null; then
    python3 scripts/verify_exports.py .devbin/stories260K /tmp/qs-export --4bit 2> "${OUT:-/tmp}/peft-4bit.err" |
      tee "${OUT:-/tmp}/peft-4bit.json"
    echo "peft 4-bit check: exit ${PIPESTATUS[0]}"
  else
    echo "peft 4-bit check: model_bench export failed"
  fi
fi
BIN=/tmp/qs PEER=.devbin bash benches/gpu.sh "${@:-qlora-7b}"
cp /tmp/qsbench/results.jsonl "${OUT:-/tmp}/" 2>/dev/null
for f in /tmp/qsbench/*.err; do tail -20 "$f" > "${OUT:-/tmp}/$(basename "$f")"; done 2>/dev/null
true
