#!/usr/bin/env bash
# The DPO quality check of issue 23 on the GPU machine: STEPS DPO steps of recipes/dpo.rhai (no SFT
# first: the weights are random) on a random Qwen2.5-0.5B (written by the peer) with the real
# Qwen2.5 tokenizer and LLaMA-Factory's dpo_en_demo pairs, beside TRL's DPOTrainer + PEFT
# (benches/trl_dpo_curve.py) on the same weights, data and schedule. Prints both reward-accuracy and
# margin curves and the means of the last 100 steps. Needs .devbin/lf/ (dpo_en_demo.json and
# dataset_info.json from ../shared/fixtures/datasets/llamafactory) and TRL's wheels in .whl/.
#   BIN=/tmp/qs PEER=.devbin bash benches/dpo_curve.sh [STEPS]
set -uo pipefail
BIN=${BIN:-/tmp/qs}; PEER=${PEER:-.devbin}; WORK=${WORK:-/tmp/qsbench}; OUT=${OUT:-/tmp}
steps=${1:-200}
dir=$WORK/qwen2.5-0.5b
mkdir -p "$WORK"
[ -f "$dir/config.json" ] || python3 "$PEER/hf_peft_lora.py" --model qwen2.5-0.5b --save-model "$dir" > /dev/null
cp "$PEER"/tokenizer.json "$PEER"/tokenizer_config.json "$dir/"
python3 benches/trl_dpo_curve.py "$dir" "$PEER/lf/dpo_en_demo.json" --max-steps "$steps" --batch 4 \
  --lr 5e-4 --max-length 512 > "$OUT/dpo-curve-peer.jsonl" 2> "$OUT/dpo-curve-peer.err"
rm -rf "$WORK/dpo-curve-runs"
"$BIN/qscript" recipes/dpo.rhai --allow-read "$WORK" --allow-read "$PWD/$PEER" \
  --output-dir "$WORK/dpo-curve-runs" --set model="$dir" --set data="$PWD/$PEER/lf/dataset_info.json" \
  --set entry=dpo_en_demo --set sft_steps=0 --set dpo_steps="$steps" --set batch_size=4 \
  --set learning_rate=5e-4 --set max_length=512 > "$OUT/dpo-curve-qscript.log" 2>&1
find "$WORK/dpo-curve-runs" -path '*dpo/metrics.jsonl' -exec cp {} "$OUT/dpo-curve-qscript.jsonl" \;
python3 - "$OUT/dpo-curve-peer.jsonl" "$OUT/dpo-curve-qscript.jsonl" "$steps" <<'PY'
import json, sys
def curve(path):
    out = {}
    for line in open(path):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if "rewards/accuracies" in r:
            out[int(r["step"])] = (float(r["rewards/accuracies"]), float(r["rewards/margins"]), float(r["loss"]))
    return out
peer, qs = curve(sys.argv[1]), curve(sys.argv[2])
steps = int(sys.argv[3])
print("step   TRL acc  qs acc   TRL margin  qs margin   TRL loss  qs loss")
nan = (float("nan"),) * 3
for s in sorted(set(peer) | set(qs)):
    p, q = peer.get(s, nan), qs.get(s, nan)
    print(f"{s:4d}  {p[0]:7.3f} {q[0]:7.3f}   {p[1]:9.4f} {q[1]:9.4f}   {p[2]:8.4f} {q[2]:8.4f}")
def mean(c, k):
    v = [x[k] for s, x in c.items() if s > steps - 100]
    return sum(v) / max(len(v), 1)
res = {"check": "dpo curve", "steps": steps}
for k, name in ((0, "accuracy"), (1, "margin"), (2, "loss")):
    mp, mq = mean(peer, k), mean(qs, k)
    res[f"trl_{name}_last100"] = round(mp, 4)
    res[f"qscript_{name}_last100"] = round(mq, 4)
    res[f"{name}_rel_diff"] = round(abs(mq - mp) / abs(mp), 4) if mp else None
print(json.dumps(res))
PY
