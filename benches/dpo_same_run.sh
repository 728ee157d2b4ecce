#!/usr/bin/env bash
# DPO step by step beside TRL: recipes/dpo.rhai and TRL's DPOTrainer + PEFT (benches/trl_dpo_curve.py)
# on the same weights, LLaMA-Factory's dpo_en_demo pairs in the file's order (qscript's
# `disable_shuffling`, TRL with a sequential sampler) and the same initial LoRA adapter (PEFT's,
# saved by the peer and loaded by the recipe), so their logged loss, rewards and margins can be
# compared record by record rather than as two curves of different runs.
#   cpu: f32 on the CPU, a tiny random Qwen2 (2 layers, hidden 64) with the real Qwen2.5
#        tokenizer; needs torch, transformers, peft, trl and datasets in PY (e.g. a venv) and
#        qscript built (BIN, default target/release/qscript).
#   gpu: bf16 on the GPU machine, a random Qwen2.5-0.5B (as benches/dpo_curve.sh; BIN=/tmp/qs
#        PEER=.devbin).
#   PY=/tmp/venv/bin/python bash benches/dpo_same_run.sh cpu [STEPS]
set -euo pipefail
mode=${1:-cpu}; steps=${2:-30}
PY=${PY:-python3}; WORK=${WORK:-/tmp/qsbench-same}; OUT=${OUT:-$WORK}
FIX=${QSCRIPT_FIXTURES:-../shared/fixtures}
mkdir -p "$WORK" "$OUT"
if [ "$mode" = cpu ]; then
  BIN=${BIN:-target/release/qscript}
  dir=$WORK/tiny-qwen2
  data=$FIX/datasets/llamafactory
  if [ ! -f "$dir/config.json" ]; then
    "$PY" - "$dir" "$FIX/tokenizers/qwen2.5" <<'PY'
import shutil, sys, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
out, tok = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
cfg = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  tie_word_embeddings=True, dtype="float32")
Qwen2ForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(f"{tok}/{f}", f"{out}/{f}")
PY
  fi
  peer_flags=(--cpu)
else
  BIN=${BIN:-/tmp/qs}/qscript; PEER=${PEER:-.devbin}
  dir=$WORK/qwen2.5-0.5b
  data=$PEER/lf
  [ -f "$dir/config.json" ] || python3 "$PEER/hf_peft_lora.py" --model qwen2.5-0.5b --save-model "$dir" > /dev/null
  cp "$PEER"/tokenizer.json "$PEER"/tokenizer_config.json "$dir/"
  peer_flags=()
fi
rm -rf "$WORK/init-adapter" "$WORK/runs"
"$PY" benches/trl_dpo_curve.py "$dir" "$data/dpo_en_demo.json" --max-steps "$steps" --batch 4 \
  --lr 5e-4 --max-length 512 --init-adapter "$WORK/init-adapter" --in-order "${peer_flags[@]}" \
  > "$OUT/same-run-peer.jsonl" 2> "$OUT/same-run-peer.err"
"$BIN" recipes/dpo.rhai --allow-read "$WORK" --allow-read "$(cd "$data" && pwd)" \
  --output-dir "$WORK/runs" --set model="$dir" --set data="$(cd "$data" && pwd)/dataset_info.json" \
  --set entry=dpo_en_demo --set sft_steps=0 --set dpo_steps="$steps" --set batch_size=4 \
  --set learning_rate=5e-4 --set max_length=512 --set adapter="$WORK/init-adapter" \
  --set disable_shuffling=true > "$OUT/same-run-qscript.log" 2>&1
find "$WORK/runs" -path '*dpo/metrics.jsonl' -exec cp {} "$OUT/same-run-qscript.jsonl" \;
"$PY" - "$OUT/same-run-peer.jsonl" "$OUT/same-run-qscript.jsonl" <<'PY'
import json, sys
keys = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
        "rewards/margins", "logps/chosen", "logps/rejected"]
def records(path):
    out = {}
    for line in open(path):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if "rewards/margins" in r:
            out[int(r["step"])] = {k: float(r[k]) for k in keys if k in r}
    return out
peer, qs = records(sys.argv[1]), records(sys.argv[2])
steps = sorted(set(peer) & set(qs))
print("step  " + "  ".join(f"{k:>24}" for k in keys))
worst = {k: 0.0 for k in keys}
for s in steps:
    cells = []
    for k in keys:
        p, q = peer[s].get(k), qs[s].get(k)
        if p is None or q is None:
            cells.append(f"{'-':>24}")
            continue
        rel = abs(q - p) / max(abs(p), 1e-3)
        worst[k] = max(worst[k], rel)
        cells.append(f"{p:11.5g} / {q:<11.5g}")
    print(f"{s:4d}  " + "  ".join(cells))
print(json.dumps({"check": "dpo same run", "records": len(steps),
                  "max_rel_diff": {k: round(v, 6) for k, v in worst.items()}}))
PY
