#!/usr/bin/env bash
# The multi-GPU measurements of issue 11, for a machine of 2 or more GPUs (kinds nvidia-h200-x2 and
# up), qscript and the peers in the same call on the same random weights. Per-GPU peak memory is
# the driver's figure for each GPU (nvidia-smi every 0.2 s; the machine runs nothing else).
#
# On the GPU machine, from the repo root, with the binaries unpacked into $BIN (benches/on_device.sh
# does that) and the peers' files in $PEER:
#   BIN=/tmp/qs PEER=.devbin bash benches/multi_gpu.sh [CONFIG...]
# CONFIG:
#   ddp     LoRA on a 7B (b4 s512, checkpointing) on 1, 2 (and 4) GPUs: qscript under torchrun
#           against torchrun + HF + PEFT DDP; scaling = tokens/s on N GPUs / on 1
#   pipe    the same 7B placed over 2 GPUs (`device_map: auto`), 8 micro-batches a step: qscript's
#           pipeline against its naive schedule (`pipeline: false`) and HF's device_map training
#   curve   the huanhuan recipe on 2 ranks (`qscript --nproc-per-node 2`, batch 1 each) against one
#           process with batch 2: the same global batch, the loss curves side by side
#   seed001 seed 001's full fine-tuning (recipes/psychology_full_sft.rhai, a Qwen3-4B of random
#           weights, EmoLLM conversations) on 4 ranks with ZeRO-1: per-GPU memory against the estimate
#           (ship its inputs first: mkdir -p /tmp/multi/qwen3 && cp ../shared/fixtures/tokenizers/qwen3/
#           tokenizer*.json /tmp/multi/qwen3/ && cp ../shared/fixtures/configs/Qwen3-4B/config.json
#           /tmp/multi/qwen3-4b-config.json && cp ../shared/fixtures/datasets/emollm/emollm_firefly.jsonl
#           /tmp/multi/ && chmod -R u+w /tmp/multi && tar -C /tmp/multi -cJf .devbin/multi.tar.xz .)
set -uo pipefail
BIN=${BIN:-/tmp/qs}
PEER=${PEER:-.devbin}
WORK=${WORK:-/tmp/qsmulti}
RESULTS=${RESULTS:-$WORK/results.jsonl}
MODEL=${MODEL:-qwen2.5-7b}   # ddp and pipe (a smaller one to try the harness on one GPU)
NS=${NS:-2 4 8}              # ddp: the GPU counts tried beside 1 (those the machine has)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$WORK"
: > "$RESULTS"
GPUS=$(nvidia-smi -L | wc -l)
echo "$GPUS GPUs"

# per-GPU peak MiB over the life of process $1, written to $2 as "i:MiB,..."
sample_gpus() {
  local pid=$1 out=$2
  python3 - "$pid" "$out" <<'EOF'
import os, subprocess, sys, time
pid, out = int(sys.argv[1]), sys.argv[2]
peak = {}
while True:
    try:
        os.kill(pid, 0)
    except OSError:
        break
    q = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                       capture_output=True, text=True).stdout
    for line in q.splitlines():
        i, v = (int(x) for x in line.split(","))
        peak[i] = max(peak.get(i, 0), v)
    time.sleep(0.2)
open(out, "w").write(",".join(f"{i}:{v}" for i, v in sorted(peak.items())))
EOF
}

# run NAME CONFIG CMD...: runs CMD, samples per-GPU memory, appends its last JSON line + peaks
run() {
  local name=$1 config=$2; shift 2
  local log=$WORK/$name.log
  "$@" > "$log" 2> "$log.err" &
  local pid=$!
  sample_gpus "$pid" "$log.mem" &
  local sp=$!
  wait "$pid"; local rc=$?
  wait "$sp"
  local line
  line=$(grep '^{' "$log" | tail -1)
  if [ "$rc" -eq 0 ] && [ -z "$line" ]; then
    line='{"system": "qscript-recipe"}'   # a recipe run: its log says what it did
  fi
  if [ "$rc" -ne 0 ] || [ -z "$line" ]; then
    echo "$name ($config) failed (exit $rc):" >&2
    tail -8 "$log.err" >&2
    line='{"failed": true}'
  fi
  python3 - "$line" "$name" "$config" "$(cat "$log.mem" 2>/dev/null)" >> "$RESULTS" <<'EOF'
import json, sys
rec = json.loads(sys.argv[1])
rec["run"], rec["config"] = sys.argv[2], sys.argv[3]
rec["peak_driver_gib_per_gpu"] = [round(int(kv.split(":")[1]) / 1024, 2)
                                  for kv in sys.argv[4].split(",") if kv]
print(json.dumps(rec))
EOF
  tail -1 "$RESULTS"
}

model_dir() {  # model_dir NAME: a random-weight checkpoint written by the peer
  local dir=$WORK/$1
  [ -f "$dir/config.json" ] || python3 "$PEER/hf_peft_lora.py" --model "$1" --save-model "$dir" > /dev/null
  echo "$dir"
}

ddp() {
  local dir; dir=$(model_dir "$MODEL")
  local common=(--batch 4 --seq 512 --steps 6 --warmup 2)
  run ddp1-peer ddp python3 benches/hf_multi_gpu.py --load-model "$dir" "${common[@]}" --grad-ckpt
  run ddp1-qscript ddp "$BIN/model_bench" train "$dir" "${common[@]}" --ckpt
  local n
  for n in $NS; do
    [ "$n" -le "$GPUS" ] || continue
    run "ddp$n-peer" ddp torchrun --standalone --nproc-per-node "$n" benches/hf_multi_gpu.py \
      --load-model "$dir" "${common[@]}" --grad-ckpt
    run "ddp$n-qscript" ddp torchrun --standalone --nproc-per-node "$n" --no-python \
      "$BIN/model_bench" train "$dir" "${common[@]}" --ckpt
  done
}

pipe() {
  local dir; dir=$(model_dir "$MODEL")
  local common=(--batch 4 --seq 512 --accum 8 --steps 3 --warmup 1)
  export CUDA_VISIBLE_DEVICES=0,1
  run pipe-peer pipe python3 benches/hf_multi_gpu.py --load-model "$dir" "${common[@]}" --device-map auto
  run pipe-qscript pipe "$BIN/model_bench" train "$dir" "${common[@]}" --device-map auto
  run pipe-naive-qscript pipe "$BIN/model_bench" train "$dir" "${common[@]}" --device-map auto --no-pipeline
  unset CUDA_VISIBLE_DEVICES
}

curve() {
  local dir; dir=$(model_dir qwen1.5-7b)
  cp "$PEER"/tokenizer.json "$PEER"/tokenizer_config.json "$dir/"
  local args=(--allow-read "$WORK" --allow-read "$PWD/$PEER" --set model="$dir"
    --set data="$PWD/$PEER/huanhuan.json" --set max_length=128 --set accumulation=8
    --set learning_rate=1e-4 --set max_steps=30)
  rm -rf "$WORK/curve-1" "$WORK/curve-2"
  "$BIN/qscript" recipes/huanhuan_lora.rhai "${args[@]}" --output-dir "$WORK/curve-1" \
    --set batch_size=2 > "$WORK/curve-1.log" 2>&1
  "$BIN/qscript" --nproc-per-node 2 recipes/huanhuan_lora.rhai "${args[@]}" \
    --output-dir "$WORK/curve-2" --set batch_size=1 > "$WORK/curve-2.log" 2>&1
  python3 - "$WORK" >> "$RESULTS" <<'EOF'
import glob, json, sys
def losses(d):
    out = {}
    for f in glob.glob(f"{d}/**/metrics.jsonl", recursive=True):
        for line in open(f):
            r = json.loads(line)
            if "loss" in r and "step" in r:
                out[r["step"]] = r["loss"]
    return out
one, two = losses(f"{sys.argv[1]}/curve-1"), losses(f"{sys.argv[1]}/curve-2")
steps = sorted(set(one) & set(two))
rel = [abs(one[s] - two[s]) / abs(one[s]) for s in steps]
print(json.dumps({"config": "curve", "steps": len(steps), "max_rel_diff": max(rel) if rel else None,
                  "mean_rel_diff": sum(rel) / len(rel) if rel else None,
                  "one": [one[s] for s in steps], "two_ranks": [two[s] for s in steps]}))
EOF
  tail -1 "$RESULTS"
  tail -3 "$WORK/curve-2.log"
}

seed001() {
  # The Qwen3 tokenizer, Qwen3-4B's config.json and EmoLLM's conversations, shipped as
  # .devbin/multi.tar.xz (from ../shared/fixtures: tokenizers/qwen3, configs/Qwen3-4B,
  # datasets/emollm/emollm_firefly.jsonl).
  mkdir -p "$WORK/multi" && tar -C "$WORK/multi" -xJf "$PEER/multi.tar.xz" || return
  local extra=$WORK/multi
  local dir=$WORK/qwen3-4b
  if [ ! -f "$dir/config.json" ]; then
    python3 - "$dir" "$extra/qwen3-4b-config.json" <<'EOF'
import json, sys, torch
from transformers import Qwen3Config, Qwen3ForCausalLM
cfg = Qwen3Config(**{k: v for k, v in json.load(open(sys.argv[2])).items()
                     if k not in ("architectures", "transformers_version", "torch_dtype")})
torch.manual_seed(0)
with torch.device("cuda"):
    m = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
m.save_pretrained(sys.argv[1], safe_serialization=True)
EOF
    cp "$extra"/qwen3/* "$dir/"
  fi
  local n=$(( GPUS < 4 ? GPUS : 4 ))
  run "seed001-$n-ranks" seed001 "$BIN/qscript" --nproc-per-node "$n" recipes/psychology_full_sft.rhai \
    --allow-read "$WORK" --allow-read "$PWD/$PEER" --output-dir "$WORK/seed001" \
    --set model="$dir" --set data="$extra/emollm_firefly.jsonl" --set max_length=1024 \
    --set batch_size=2 --set learning_rate=1e-5 --set max_steps=20 --set eval_steps=10 \
    --set zero_stage=1
  grep -iE "memory|estimate|GiB" "$WORK/seed001-$n-ranks.log.err" | head -12
}

configs=("$@")
[ ${#configs[@]} -eq 0 ] && configs=(ddp pipe curve seed001)
for c in "${configs[@]}"; do
  case $c in
    ddp) ddp ;;
    pipe) pipe ;;
    curve) curve ;;
    seed001) seed001 ;;
    *) echo "unknown config $c" >&2 ;;
  esac
done
cat "$RESULTS"
