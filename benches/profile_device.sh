#!/usr/bin/env bash
# Where a step's GPU time goes, qscript and the peer on the same random weights (one device call;
# see benches/README.md). qscript: `QSCRIPT_PROFILE=1 model_bench train` (synchronized spans);
# the peer: benches/peer_profile.py (torch.profiler kernel table). Logs go to $OUT.
#   BIN=/tmp/qs PEER=.devbin bash benches/profile_device.sh MODEL BATCH SEQ [--ckpt] [--full]
set -uo pipefail
BIN=${BIN:-/tmp/qs}; PEER=${PEER:-.devbin}; WORK=${WORK:-/tmp/qsbench}; OUT=${OUT:-/tmp}
model=$1 batch=$2 seq=$3; shift 3
dir=$WORK/$model
mkdir -p "$WORK"
[ -f "$dir/config.json" ] || python3 "$PEER/hf_peft_lora.py" --model "$model" --save-model "$dir" > /dev/null
tag=$model-b$batch-s$seq$(printf '%s' "$@" | tr -d ' ')
peer_flags=(); for f in "$@"; do case $f in --ckpt) peer_flags+=(--grad-ckpt) ;; *) peer_flags+=("$f") ;; esac; done
QSCRIPT_PROFILE=1 "$BIN/model_bench" train "$dir" --batch "$batch" --seq "$seq" --steps 4 --warmup 2 "$@" \
  > "$OUT/prof-qs-$tag.log" 2>&1
echo "== qscript $tag"; tail -25 "$OUT/prof-qs-$tag.log"
python3 benches/peer_profile.py "$PEER/hf_peft_lora.py" --model "$model" --load-model "$dir" \
  --batch "$batch" --seq "$seq" --steps 4 --warmup 2 "${peer_flags[@]}" > "$OUT/prof-peer-$tag.log" 2>&1
echo "== peer $tag"; head -30 "$OUT/prof-peer-$tag.log" | cut -c1-200
