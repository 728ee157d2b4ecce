#!/usr/bin/env bash
# The end-to-end check of issue 9 on the GPU machine: 200 LoRA steps of recipes/huanhuan_lora.rhai
# on a random Qwen2.5-0.5B (written by the peer) with the real Qwen2.5 tokenizer and huanhuan.json,
# beside HF + PEFT (benches/hf_loss_curve.py) on the same weights, data and schedule. Prints both
# logged curves and the mean loss of the last 50 steps of each.
#   BIN=/tmp/qs PEER=.devbin bash benches/loss_curve.sh [STEPS]
set -uo pipefail
BIN=${BIN:-/tmp/qs}; PEER=${PEER:-.devbin}; WORK=${WORK:-/tmp/qsbench}; OUT=${OUT:-/tmp}
steps=${1:-200}
dir=$WORK/qwen2.5-0.5b
mkdir -p "$WORK"
[ -f "$dir/config.json" ] || python3 "$PEER/hf_peft_lora.py" --model qwen2.5-0.5b --save-model "$dir" > /dev/null
cp "$PEER"/tokenizer.json "$PEER"/tokenizer_config.json "$dir/"
common=(--max-steps "$steps" --batch 4 --accum 4 --lr 5e-4 --max-length 128)
python3 benches/hf_loss_curve.py "$dir" "$PEER/huanhuan.json" "${common[@]}" > "$OUT/curve-peer.jsonl" 2> "$OUT/curve-peer.err"
rm -rf "$WORK/curve-runs"
"$BIN/qscript" recipes/huanhuan_lora.rhai --allow-read "$WORK" --allow-read "$PWD/$PEER" \
  --output-dir "$WORK/curve-runs" --set model="$dir" --set data="$PWD/$PEER/huanhuan.json" \
  --set max_length=128 --set batch_size=4 --set accumulation=4 --set learning_rate=5e-4 \
  --set max_steps="$steps" > "$OUT/curve-qscript.log" 2>&1
find "$WORK/curve-runs" -name metrics.jsonl -exec cp {} "$OUT/curve-qscript.jsonl" \;
python3 - "$OUT/curve-peer.jsonl" "$OUT/curve-qscript.jsonl" "$steps" <<'PY'
import json, sys
def curve(path):
    out = {}
    for line in open(path):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if "loss" in r and "step" in r and "eval_loss" not in r:
            out[int(r["step"])] = float(r["loss"])
    return out
peer, qs = curve(sys.argv[1]), curve(sys.argv[2])
steps = int(sys.argv[3])
print("step   HF+PEFT  qscript")
for s in sorted(set(peer) | set(qs)):
    print(f"{s:4d}  {peer.get(s, float('nan')):8.4f} {qs.get(s, float('nan')):8.4f}")
last = lambda c: [v for s, v in c.items() if s > steps - 50]
mp, mq = sum(last(peer)) / max(len(last(peer)), 1), sum(last(qs)) / max(len(last(qs)), 1)
print(json.dumps({"check": "loss curve", "steps": steps, "peer_last50_mean": round(mp, 4),
                  "qscript_last50_mean": round(mq, 4), "rel_diff": round(abs(mq - mp) / mp, 4)}))
PY
