#!/usr/bin/env bash
# Per-kernel GPU time of qscript's training step, from Nsight Compute (`ncu`, one metric, so one
# pass per kernel): the kernels of `model_bench train` grouped by name, their time per step, and
# their share. Where the synchronized spans of profile_device.sh say which part of a layer is
# slow, this says which kernel. One device call; logs go to $OUT.
# With LAYERS=N the model keeps only N of its layers (the per-layer kernels are the same, the
# profile takes a fraction of the time), and the peer's torch.profiler table of the same model
# (benches/peer_profile.py) is printed beside it.
#   BIN=/tmp/qs PEER=.devbin [LAYERS=4] bash benches/kernel_table.sh MODEL BATCH SEQ [--ckpt] [--full]
set -uo pipefail
BIN=${BIN:-/tmp/qs}; PEER=${PEER:-.devbin}; WORK=${WORK:-/tmp/qsbench}; OUT=${OUT:-/tmp}
model=$1 batch=$2 seq=$3; shift 3
dir=$WORK/$model${LAYERS:+-l$LAYERS}
mkdir -p "$WORK"
if [ ! -f "$dir/config.json" ]; then
  if [ -n "${LAYERS:-}" ]; then
    python3 - "$PEER" "$model" "$LAYERS" "$dir" <<'PY'
import sys, torch
sys.path.insert(0, sys.argv[1])
from hf_peft_lora import MODELS
from transformers import Qwen2Config, Qwen2ForCausalLM
cfg = dict(MODELS[sys.argv[2]], num_hidden_layers=int(sys.argv[3]))
torch.manual_seed(0)
with torch.device("cuda"):
    m = Qwen2ForCausalLM(Qwen2Config(**cfg, max_position_embeddings=32768, rms_norm_eps=1e-6, use_cache=False))
m.to(torch.bfloat16).save_pretrained(sys.argv[4], safe_serialization=True)
PY
  else
    python3 "$PEER/hf_peft_lora.py" --model "$model" --save-model "$dir" > /dev/null
  fi
fi
tag=$model${LAYERS:+-l$LAYERS}-b$batch-s$seq$(printf '%s' "$@" | tr -d ' ')
csv=$OUT/ncu-$tag.csv
# Two steps (one warm-up): kernels that run once at load or in the first step only show as such.
timeout ${NCU_TIMEOUT:-300} ncu --clock-control none --metrics gpu__time_duration.sum --print-units base --csv --log-file "$csv" \
  "$BIN/model_bench" train "$dir" --batch "$batch" --seq "$seq" --steps 1 --warmup 1 "$@" \
  > "$OUT/ncu-$tag.log" 2>&1
echo "== kernels of $tag (ncu exit $?)"
python3 - "$csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head, rows = rows[0], rows[1:]
name, metric, value = head.index("Kernel Name"), head.index("Metric Name"), head.index("Metric Value")
t, n = collections.Counter(), collections.Counter()
for r in rows:
    if r[metric] == "gpu__time_duration.sum":
        k = r[name][:90]
        t[k] += float(r[value].replace(",", ""))
        n[k] += 1
total = sum(t.values())
print(f"{len(rows)} launches, {total / 1e6:.1f} ms of kernel time over 2 steps and load")
for k, v in t.most_common(40):
    print(f"{v / 2e6:9.2f} ms/step {100 * v / total:5.1f}% {n[k] / 2:7.0f}/step  {k}")
PY
if [ -n "${LAYERS:-}" ]; then
  peer_flags=(); for f in "$@"; do case $f in --ckpt) peer_flags+=(--grad-ckpt) ;; *) peer_flags+=("$f") ;; esac; done
  python3 benches/peer_profile.py "$PEER/hf_peft_lora.py" --model "$model" --load-model "$dir" \
    --batch "$batch" --seq "$seq" --steps 2 --warmup 1 "${peer_flags[@]}" > "$OUT/prof-peer-$tag.log" 2>&1
  echo "== peer $tag"; head -45 "$OUT/prof-peer-$tag.log" | cut -c1-200
fi
