#!/usr/bin/env bash
# One device call for QLoRA (issue 27): the binaries shipped in .devbin/, the wheels in .whl/,
# the GPU tests of the 4-bit path, then the harness's QLoRA configs given (default qlora-7b).
set -uo pipefail
mkdir -p /tmp/qs
for f in .devbin/*.xz; do xz -dc "$f" > "/tmp/qs/$(basename "$f" .xz)" && chmod +x "/tmp/qs/$(basename "$f" .xz)"; done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
/tmp/qs/gpu --test-threads=1 dequant qlora > "${OUT:-/tmp}/gpu-tests.log" 2>&1
echo "gpu tests: exit $?"; grep -E "^test |test result|panicked" "${OUT:-/tmp}/gpu-tests.log" | tail -6
BIN=/tmp/qs PEER=.devbin bash benches/gpu.sh "${@:-qlora-7b}"
cp /tmp/qsbench/results.jsonl "${OUT:-/tmp}/" 2>/dev/null
for f in /tmp/qsbench/*.err; do tail -20 "$f" > "${OUT:-/tmp}/$(basename "$f")"; done 2>/dev/null
true
