#!/usr/bin/env bash
# CPU training speed with a real vocabulary (issue: a tiny model with Qwen2.5's 152k-token
# vocabulary trained at 32-46 tokens/s on 2 cores): recipes/sharegpt_sft.rhai on its demo data with
# the real Qwen2.5 tokenizer, full fine-tuning of a tiny model whose embedding and head are
# 151,936 x 64. Prints the trainer's summary line (tokens/s) and the process's user/system time.
#   bash benches/cpu_vocab.sh [STEPS]          (needs a release build: cargo build --release)
set -euo pipefail
FX=$(cd "${QSCRIPT_FIXTURES:-../shared/fixtures}" && pwd)
out=$(mktemp -d)
/usr/bin/time -f "user %U s, system %S s, max RSS %M KiB" target/release/qscript recipes/sharegpt_sft.rhai \
  --allow-read "$FX" --output-dir "$out" --set tokenizer="$FX/tokenizers/qwen2.5" \
  --set max_steps="${1:-40}" 2>&1 | grep -E "^trained|^user"
rm -rf "$out"
