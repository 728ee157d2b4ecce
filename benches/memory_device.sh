#!/usr/bin/env bash
# One device call for the memory work (issues 22 and 27): the binaries shipped in .devbin/, the
# wheels in .whl/; the GPU tests of activation offload, the tiled MLP and the 4-bit path; then the
# harness configs given (default: qlora-7b, and a 7B at 64k tokens with checkpointing and with
# offload). Results and logs go to $OUT.
set -uo pipefail
mkdir -p /tmp/qs
for f in .devbin/*.xz; do xz -dc "$f" > "/tmp/qs/$(basename "$f" .xz)" && chmod +x "/tmp/qs/$(basename "$f" .xz)"; done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# GPU_TESTS: the GPU tests to run first (names or parts of names).
/tmp/qs/gpu --test-threads=1 ${GPU_TESTS:-offload tiled dequant qlora} > "${OUT:-/tmp}/gpu-tests.log" 2>&1
echo "gpu tests: exit $?"; grep -E "^test |test result|panicked" "${OUT:-/tmp}/gpu-tests.log" | tail -8
[ $# -eq 0 ] && set -- qlora-7b long-7b-64
# Rows land in $OUT as they come (a call cut off at its limit keeps the ones done).
RESULTS=${OUT:-/tmp}/results.jsonl BIN=/tmp/qs PEER=.devbin bash benches/gpu.sh "$@"
true
