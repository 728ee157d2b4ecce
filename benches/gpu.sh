#!/usr/bin/env bash
# The GPU benchmark harness: for each config, one random-weight checkpoint written by the peer,
# then the peer (HF transformers + PEFT, ../shared/bench/hf_peft_lora.py) and qscript
# (`model_bench train`) train on it, one after the other, in the same call. Peak device memory of
# each process is sampled the same way for both (the driver's per-process figure from
# nvidia-smi every 0.2 s). Prints one JSON line per run and a table at the end.
#
# On the GPU machine, from the repo root (see benches/README.md for building and shipping):
#   BIN=/tmp/qs PEER=.devbin bash benches/gpu.sh [CONFIG...]
# CONFIG: 05b 05b-ckpt 7b-ckpt q15-7b 05b-full seed000 seed000-packed seed000-4bit seed000-16g dpo-05b dpo-7b
# qlora-05b qlora-7b qlora-7b-long qlora-32b long-7b-K (K thousand tokens; LONG_PEER=1|hf|liger adds the
# peers) seed001 (default: 05b to seed000). dpo-*: TRL's DPOTrainer + PEFT (benches/trl_dpo.py; trl, datasets,
# dill and multiprocess carried as wheels in .whl/, see benches/README.md) against
# `model_bench train --dpo`, 4 pairs of a 256-token prompt and two 256-token answers, checkpointing.
# BASE=/tmp/qs-old: also run that build's binaries after this one's on each config (rows
# `NAME-base`), so two builds are compared in one call; SKIP_PEER=1: no peer runs (the peer
# still writes the random-weight checkpoints).
set -uo pipefail
BIN=${BIN:-/tmp/qs}
PEER=${PEER:-.devbin}
WORK=${WORK:-/tmp/qsbench}
RESULTS=${RESULTS:-$WORK/results.jsonl}
mkdir -p "$WORK"
: > "$RESULTS"

# peak MiB of process $1 and its children (driver's per-process used memory; RUN_LIMIT's
# `timeout` is the process, the run its child), written to $2 when it exits
sample() {
  local pid=$1 out=$2 max=0 v tree
  while kill -0 "$pid" 2>/dev/null; do
    tree=" $pid $(pgrep -P "$pid" | tr '\n' ' ')"
    v=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null |
      awk -F', *' -v t="$tree" 'index(t, " " $1 " ") { s += $2 } END { if (s) print s }')
    if [ -n "$v" ] && [ "$v" -gt "$max" ]; then max=$v; fi
    sleep 0.2
  done
  echo "$max" > "$out"
}

# run NAME CONFIG CMD...: runs CMD, samples its peak memory, appends its JSON line + peak.
# RUN_LIMIT=SECONDS stops a run that takes longer (a failed row; the device call goes on to the
# next); each run's last log lines are copied to $OUT as it ends, so a call cut short keeps them.
run() {
  local name=$1 config=$2; shift 2
  local log=$WORK/$name.log
  if [ -n "${RUN_LIMIT:-}" ]; then set -- timeout --signal=INT --kill-after=20 "$RUN_LIMIT" "$@"; fi
  "$@" > "$log" 2> "$log.err" &
  local pid=$!
  sample "$pid" "$log.mem" &
  local sp=$!
  wait "$pid"; local rc=$?
  wait "$sp"
  local line
  line=$(grep '^{' "$log" | tail -1)
  if [ -z "$line" ]; then
    # a recipe run: its summary line says how long training took
    line=$(python3 - "$log.err" <<'EOF'
import json, re, sys
m = re.search(r"trained (\d+) steps in ([\d.]+) s: .*?, ([\d.]+) examples/s, (\d+) tokens/s", open(sys.argv[1]).read())
if m:
    print(json.dumps({"system": "qscript-recipe", "max_steps": int(m[1]), "train_runtime_s": float(m[2]),
                      "examples_per_s": float(m[3]), "tokens_per_s_unpadded": int(m[4])}))
EOF
)
  fi
  if [ -z "$line" ]; then
    echo "$name ($config) failed (exit $rc):" >&2
    tail -5 "$log.err" >&2
    line='{"failed": true}'
  elif [ "$rc" -ne 0 ]; then
    # Trained and said so, then stopped (a recipe's saving or answers after training cut off by
    # RUN_LIMIT): the row stands, with the exit beside it.
    line=$(python3 -c 'import json, sys; r = json.loads(sys.argv[1]); r["exit_after_training"] = int(sys.argv[2]); print(json.dumps(r))' "$line" "$rc")
  fi
  python3 - "$line" "$config" "$(cat "$log.mem")" "$name" >> "$RESULTS" <<'EOF'
import json, sys
rec = json.loads(sys.argv[1])
rec["config"] = sys.argv[2]
rec["run"] = sys.argv[4]
rec["peak_driver_gib"] = round(int(sys.argv[3] or 0) / 1024, 2)
print(json.dumps(rec))
EOF
  tail -1 "$RESULTS"
  if [ -n "${OUT:-}" ]; then tail -c 4000 "$log.err" > "$OUT/$name.err.txt"; fi
}

# config NAME MODEL BATCH SEQ STEPS WARMUP [--ckpt] [--full]
config() {
  local name=$1 model=$2 batch=$3 seq=$4 steps=$5 warmup=$6; shift 6
  local dir=$WORK/$model
  if [ ! -f "$dir/config.json" ]; then
    python3 "$PEER/hf_peft_lora.py" --model "$model" --save-model "$dir" > /dev/null || return
  fi
  local peer_flags=() qs_flags=()
  for f in "$@"; do
    case $f in
      --ckpt) peer_flags+=(--grad-ckpt); qs_flags+=(--ckpt) ;;
      --full) peer_flags+=(--full); qs_flags+=(--full) ;;
    esac
  done
  [ "${SKIP_PEER:-0}" = 1 ] || run "$name-peer" "$name" python3 "$PEER/hf_peft_lora.py" --model "$model" --load-model "$dir" \
    --batch "$batch" --seq "$seq" --steps "$steps" --warmup "$warmup" "${peer_flags[@]}"
  local bin
  for bin in "$BIN" ${BASE:+"$BASE"}; do
    run "$name-$( [ "$bin" = "$BIN" ] && echo qscript || echo base)" "$name" "$bin/model_bench" train "$dir" \
      --batch "$batch" --seq "$seq" --steps "$steps" --warmup "$warmup" "${qs_flags[@]}"
  done
}

# Seed 000's model in DIR: Qwen1.5-7B random weights (written by the peer script once), the
# Qwen2.5 tokenizer beside them.
seed000_model() {
  if [ ! -f "$1/config.json" ]; then
    python3 "$PEER/hf_peft_lora.py" --model qwen1.5-7b --save-model "$1" > /dev/null || return
  fi
  cp "$PEER"/tokenizer.json "$PEER"/tokenizer_config.json "$1/"
}

# seed 000 as written: Qwen1.5-7B (random weights, the Qwen2.5 tokenizer from the fixtures) on
# huanhuan.json, batch 1 x accumulation 16, 20 optimizer steps; the peer is hf_seed000.py.
seed000() {
  local dir=$WORK/qwen1.5-7b
  seed000_model "$dir" || return
  [ "${SKIP_PEER:-0}" = 1 ] || run seed000-peer seed000 python3 "$PEER/hf_seed000.py" "$dir" "$PEER/huanhuan.json" --max-steps 20
  local bin
  for bin in "$BIN" ${BASE:+"$BASE"}; do
    rm -rf "$WORK/runs"
    run "seed000-$( [ "$bin" = "$BIN" ] && echo qscript || echo base)" seed000 "$bin/qscript" recipes/huanhuan_lora.rhai --allow-read "$WORK" \
      --allow-read "$PWD/$PEER" --output-dir "$WORK/runs" --set model="$dir" \
      --set data="$PWD/$PEER/huanhuan.json" --set max_length=128 --set batch_size=1 \
      --set accumulation=16 --set learning_rate=1e-4 --set max_steps=20
  done
}

# seed 000 under a 16 GiB budget (issue 22): `qscript check --fit` with `max_memory` 16 GiB for
# GPU 0 (the plan, before anything loads, in $OUT/seed000-16g-check.txt), then the run with
# `--fit`; its row's driver and pool peaks show whether it kept to the budget.
seed000_16g() {
  local dir=$WORK/qwen1.5-7b
  seed000_model "$dir" || return
  local args=(recipes/huanhuan_lora.rhai --fit --allow-read "$WORK" --allow-read "$PWD/$PEER"
    --set model="$dir" --set data="$PWD/$PEER/huanhuan.json" --set max_length=128
    --set batch_size=1 --set accumulation=16 --set learning_rate=1e-4 --set max_steps=20
    --set max_memory=16GiB)
  "$BIN/qscript" check "${args[@]}" > "${OUT:-$WORK}/seed000-16g-check.txt" 2>&1
  echo "check: exit $?"; grep -E "total|auto_fit|fits|error" "${OUT:-$WORK}/seed000-16g-check.txt" | head -8
  rm -rf "$WORK/runs-16g"
  run seed000-16g-qscript seed000-16g "$BIN/qscript" "${args[0]}" --output-dir "$WORK/runs-16g" "${args[@]:1}"
}

# seed 000 as written with its model in 4 bits: the peer is hf_seed000.py loading with bitsandbytes'
# NF4 (benches/hf_seed000_4bit.py); qscript runs the recipe with --set load_in_4bit=true.
seed000_4bit() {
  local dir=$WORK/qwen1.5-7b
  seed000_model "$dir" || return
  [ "${SKIP_PEER:-0}" = 1 ] || run seed000-4bit-peer seed000-4bit python3 benches/hf_seed000_4bit.py \
    "$PEER/hf_seed000.py" "$dir" "$PEER/huanhuan.json" --max-steps 20
  rm -rf "$WORK/runs-4bit"
  run seed000-4bit-qscript seed000-4bit "$BIN/qscript" recipes/huanhuan_lora.rhai --allow-read "$WORK" \
    --allow-read "$PWD/$PEER" --output-dir "$WORK/runs-4bit" --set model="$dir" \
    --set data="$PWD/$PEER/huanhuan.json" --set max_length=128 --set batch_size=1 \
    --set accumulation=16 --set learning_rate=1e-4 --set max_steps=20 --set load_in_4bit=true
}

# seed 000 with TRL's packing (rows of 1024 tokens, batch 1 x accumulation 1: about the 16
# examples of a seed 000 step per step), qscript only: compare its unpadded tokens/s with seed000's.
seed000_packed() {
  local dir=$WORK/qwen1.5-7b
  seed000_model "$dir" || return
  run seed000-packed-qscript seed000-packed "$BIN/qscript" recipes/huanhuan_lora.rhai --allow-read "$WORK" \
    --allow-read "$PWD/$PEER" --output-dir "$WORK/runs-packed" --set model="$dir" \
    --set data="$PWD/$PEER/huanhuan.json" --set max_length=128 --set batch_size=1 \
    --set accumulation=1 --set learning_rate=1e-4 --set max_steps=20 --set packing=true
}

# dpo NAME MODEL PAIRS SEQ STEPS WARMUP: DPO (sigmoid, beta 0.1, LoRA r8 q/k/v/o, checkpointing)
# on pairs of two SEQ-token rows (the prompt SEQ/2); the peer runs the reference forward in each
# step, qscript's reference pass over the timed steps' pairs is timed with them.
dpo() {
  local name=$1 model=$2 pairs=$3 seq=$4 steps=$5 warmup=$6
  local dir=$WORK/$model
  if [ ! -f "$dir/config.json" ]; then
    python3 "$PEER/hf_peft_lora.py" --model "$model" --save-model "$dir" > /dev/null || return
  fi
  [ "${SKIP_PEER:-0}" = 1 ] || run "$name-peer" "$name" python3 benches/trl_dpo.py --load-model "$dir" \
    --pairs "$pairs" --prompt $((seq / 2)) --answer $((seq - seq / 2)) --steps "$steps" --warmup "$warmup" --grad-ckpt
  # TRL with Liger's layer kernels (its log-probabilities already come from a chunked LM head),
  # when liger-kernel is carried: a second peer row, `NAME-liger` in the table.
  if [ "${SKIP_PEER:-0}" != 1 ] && python3 -c "import liger_kernel" 2> /dev/null; then
    run "$name-liger-peer" "$name-liger" python3 benches/trl_dpo.py --load-model "$dir" --liger \
      --pairs "$pairs" --prompt $((seq / 2)) --answer $((seq - seq / 2)) --steps "$steps" --warmup "$warmup" --grad-ckpt
  fi
  local bin
  for bin in "$BIN" ${BASE:+"$BASE"}; do
    run "$name-$( [ "$bin" = "$BIN" ] && echo qscript || echo base)" "$name" "$bin/model_bench" train "$dir" \
      --dpo --batch "$pairs" --seq "$seq" --steps "$steps" --warmup "$warmup" --ckpt
  done
  # `gradient_checkpointing: "auto"`: only the blocks the GPU needs recomputed (a row of its own,
  # `NAME-auto`: the peers above recompute every block).
  run "$name-auto-qscript" "$name-auto" "$BIN/model_bench" train "$dir" --dpo --batch "$pairs" \
    --seq "$seq" --steps "$steps" --warmup "$warmup" --auto-ckpt
}

# qlora NAME MODEL BATCH SEQ STEPS WARMUP: QLoRA r16 on every linear layer with checkpointing;
# the peers are HF + PEFT + bitsandbytes (nf4, double quantization, bf16 compute;
# benches/hf_qlora.py) and the same with Liger-Kernel when liger-kernel is carried; qscript runs
# `--4bit`, and its own bf16 LoRA of the same shape (`NAME-bf16` in the table), and `--4bit` with
# offloaded checkpointing (`NAME-offload`).
qlora() {
  local name=$1 model=$2 batch=$3 seq=$4 steps=$5 warmup=$6
  local dir=$WORK/$model
  if [ ! -f "$dir/config.json" ]; then
    python3 "$PEER/hf_peft_lora.py" --model "$model" --save-model "$dir" > /dev/null || return
  fi
  if [ "${SKIP_PEER:-0}" != 1 ]; then
    run "$name-peer" "$name" python3 benches/hf_qlora.py --load-model "$dir" --batch "$batch" \
      --seq "$seq" --steps "$steps" --warmup "$warmup" --rank 16 --targets all --grad-ckpt
    if python3 -c "import liger_kernel" 2> /dev/null; then
      run "$name-liger-peer" "$name-liger" python3 benches/hf_qlora.py --load-model "$dir" --liger \
        --batch "$batch" --seq "$seq" --steps "$steps" --warmup "$warmup" --rank 16 --targets all --grad-ckpt
    fi
  fi
  run "$name-qscript" "$name" "$BIN/model_bench" train "$dir" --4bit --rank 16 --all-linear \
    --batch "$batch" --seq "$seq" --steps "$steps" --warmup "$warmup" --ckpt
  run "$name-bf16-qscript" "$name-bf16" "$BIN/model_bench" train "$dir" --rank 16 --all-linear \
    --batch "$batch" --seq "$seq" --steps "$steps" --warmup "$warmup" --ckpt
  # Checkpointing with the block inputs offloaded (`NAME-offload`): 26 of 28 inputs off the GPU.
  run "$name-offload-qscript" "$name-offload" "$BIN/model_bench" train "$dir" --4bit --rank 16 \
    --all-linear --batch "$batch" --seq "$seq" --steps "$steps" --warmup "$warmup" --offload
}

# qlora-32b: issue 27's Qwen3-32B row (seed 003's model): QLoRA r8 q/k/v/o, batch 1 x 1,024
# tokens, checkpointing, one GPU; HF + PEFT + bitsandbytes beside it. Its bf16 weights (65 GB)
# would not fit the machine's disk: the checkpoint is sparse (benches/write_sparse.py: the large
# matrices read as zeros; a throughput and peak-memory run only), from .devbin/qwen3-32b/config.json.
qlora32() {
  local dir=$WORK/qwen3-32b-sparse
  if [ ! -f "$dir/config.json" ]; then
    python3 benches/write_sparse.py "$PEER/qwen3-32b" "$dir" > /dev/null || return
  fi
  [ "${SKIP_PEER:-0}" = 1 ] || run qlora-32b-peer qlora-32b python3 benches/hf_qlora.py --load-model "$dir" \
    --batch 1 --seq 1024 --steps 3 --warmup 1 --rank 8 --targets q_proj,k_proj,v_proj,o_proj --grad-ckpt
  run qlora-32b-qscript qlora-32b "$BIN/model_bench" train "$dir" --4bit --rank 8 --batch 1 --seq 1024 \
    --steps 3 --warmup 1 --ckpt
}

# long NAME MODEL SEQ: one row of SEQ tokens a step (batch 1), LoRA r8 q/k/v/o, qscript with
# checkpointing (`--ckpt`) and with activation offload (`NAME-offload`), or only the modes in
# LONG_MODES ("ckpt offload"; `auto-ckpt` too), LONG_STEPS timed steps (3) after LONG_WARMUP (1); LONG_FLAGS are added to
# qscript's (`--4bit`: QLoRA); the peers (benches/hf_qlora.py: HF + PEFT with checkpointing, and
# with Liger) only with LONG_PEER=1 (both), hf or liger (HF + PEFT runs out of memory from 32k
# tokens on a 7B). benches/max_seq.sh searches the longest row each trains.
long() {
  local name=$1 model=$2 seq=$3 steps=${LONG_STEPS:-3} mode
  local dir=$WORK/$model
  if [ ! -f "$dir/config.json" ]; then
    python3 "$PEER/hf_peft_lora.py" --model "$model" --save-model "$dir" > /dev/null || return
  fi
  # The peers: HF + PEFT (and + Liger when carried) with the same LoRA and checkpointing, in 4
  # bits when qscript runs `--4bit`.
  local quant=--bf16
  case " ${LONG_FLAGS:-} " in *" --4bit "*) quant="" ;; esac
  local peers=${LONG_PEER:-0}
  if [ "$peers" = 1 ] || [ "$peers" = hf ]; then
    run "$name-peer" "$name" python3 benches/hf_qlora.py $quant --load-model "$dir" --batch 1 \
      --seq "$seq" --steps "$steps" --warmup "${LONG_WARMUP:-1}" --rank 8 --targets q_proj,k_proj,v_proj,o_proj --grad-ckpt
  fi
  if [ "$peers" = 1 ] || [ "$peers" = liger ]; then
    if python3 -c "import liger_kernel" 2> /dev/null; then
      run "$name-liger-peer" "$name-liger" python3 benches/hf_qlora.py $quant --liger --load-model "$dir" \
        --batch 1 --seq "$seq" --steps "$steps" --warmup "${LONG_WARMUP:-1}" --rank 8 \
        --targets q_proj,k_proj,v_proj,o_proj --grad-ckpt
    fi
  fi
  # Modes: ckpt, offload, auto-ckpt (`gradient_checkpointing: "auto"`: rows NAME-MODE).
  local tag
  for mode in ${LONG_MODES-ckpt offload}; do
    tag=$( [ "$mode" = ckpt ] || echo "-$mode")
    run "$name$tag-qscript" "$name$tag" "$BIN/model_bench" train "$dir" --batch 1 \
      --seq "$seq" --steps "$steps" --warmup "${LONG_WARMUP:-1}" "--$mode" ${LONG_FLAGS:-}
  done
}

# seed 001 on one GPU (issue 22): Qwen3-4B-sized full fine-tuning (random weights from the real
# config, benches/write_random.py; Qwen3's tokenizer) on EmoLLM's multi-turn counselling
# conversations, recipes/psychology_full_sft.rhai as written, 200 steps of 1 x 4 rows of at most
# 1,024 tokens: with 8-bit AdamW states and offloaded checkpointing (`seed001`), and with f32
# states and plain checkpointing (`seed001-f32`), whose losses the 8-bit run must follow within
# 2%. The files come from .devbin/qwen3/ (config.json, tokenizer.json.xz, tokenizer_config.json)
# and .devbin/emollm_firefly.jsonl.xz (compressed: the carried files stay under the tool's limit).
seed001() {
  local dir=$WORK/qwen3-4b
  mkdir -p "$WORK/qwen3-files"
  xz -dc "$PEER/qwen3/tokenizer.json.xz" > "$WORK/qwen3-files/tokenizer.json" || return
  cp "$PEER/qwen3/config.json" "$PEER/qwen3/tokenizer_config.json" "$WORK/qwen3-files/"
  xz -dc "$PEER/emollm_firefly.jsonl.xz" > "$WORK/emollm_firefly.jsonl" || return
  if [ ! -f "$dir/config.json" ]; then
    python3 benches/write_random.py "$WORK/qwen3-files" "$dir" "$WORK/qwen3-files/tokenizer.json" \
      "$WORK/qwen3-files/tokenizer_config.json" > /dev/null || return
  fi
  local name optim ckpt
  for name in seed001 seed001-f32; do
    if [ "$name" = seed001 ]; then optim=adamw_8bit; ckpt=offload; else optim=adamw_torch; ckpt=true; fi
    # No checkpoints (a 4B's weights and states are tens of GB of disk writes a save, which the
    # device call's time cannot spare); the loss curves and the peak are what is compared.
    printf 'optim: %s\ngradient_checkpointing: %s\nsave_strategy: "no"\nload_best_model_at_end: false\n' \
      "$optim" "$ckpt" > "$WORK/$name.yaml"
    rm -rf "$WORK/runs-$name"
    run "$name-qscript" "$name" "$BIN/qscript" recipes/psychology_full_sft.rhai --allow-read "$WORK" \
      --allow-read "$PWD/$PEER" --output-dir "$WORK/runs-$name" --config "$WORK/$name.yaml" \
      --set model="$dir" --set data="$WORK/emollm_firefly.jsonl" --set max_length=1024 \
      --set batch_size=1 --set accumulation=4 --set max_steps=200 --set learning_rate=1e-5 \
      --set eval_steps=100
    cp "$WORK/runs-$name/metrics.jsonl" "${OUT:-$WORK}/$name-metrics.jsonl" 2>/dev/null
  done
}

configs=("$@")
[ ${#configs[@]} -eq 0 ] && configs=(05b 05b-ckpt 7b-ckpt q15-7b 05b-full seed000)
for c in "${configs[@]}"; do
  case $c in
    05b) config 05b qwen2.5-0.5b 8 512 10 3 ;;
    05b-ckpt) config 05b-ckpt qwen2.5-0.5b 8 512 10 3 --ckpt ;;
    7b-ckpt) config 7b-ckpt qwen2.5-7b 4 512 6 2 --ckpt ;;
    q15-7b) config q15-7b qwen1.5-7b 4 512 6 2 ;;
    05b-full) config 05b-full qwen2.5-0.5b 8 512 10 3 --full ;;
    seed000) seed000 ;;
    seed000-16g) seed000_16g ;;
    seed000-packed) seed000_packed ;;
    seed000-4bit) seed000_4bit ;;
    dpo-05b) dpo dpo-05b qwen2.5-0.5b 4 512 10 3 ;;
    dpo-7b) dpo dpo-7b qwen2.5-7b 4 512 6 2 ;;
    qlora-05b) qlora qlora-05b qwen2.5-0.5b 2 512 10 3 ;;
    qlora-7b) qlora qlora-7b qwen2.5-7b 2 512 6 2 ;;
    qlora-7b-long) qlora qlora-7b-long qwen2.5-7b 8 2048 4 1 ;;
    long-7b-*) long "$c" qwen2.5-7b $(( ${c#long-7b-} * 1024 )) ;;   # long-7b-64: 64k tokens
    seed001) seed001 ;;
    qlora-32b) qlora32 ;;
    *) echo "unknown config $c" >&2 ;;
  esac
done

python3 - "$RESULTS" <<'EOF'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    side = "qscript" if str(r.get("system", "")).startswith("qscript") else "peer"
    if str(r.get("run", "")).endswith("-base"):
        side = "base"
    rows.setdefault(r["config"], {})[side] = r
print("(seed000: examples/s; the rest: tokens/s)")
print(f"{'config':10} {'peer tok/s':>11} {'qscript tok/s':>14} {'ratio':>6} {'peer GiB':>9} {'qs GiB':>7} {'mem ratio':>9} {'peer MFU':>8} {'qs MFU':>7}")
for name, r in rows.items():
    p, q = r.get("peer", {}), r.get("qscript", {})
    unit = "tokens_per_s" if "tokens_per_s" in p else "examples_per_s"
    pt, qt = p.get(unit, 0), q.get(unit, 0)
    pm, qm = p.get("peak_driver_gib", 0), q.get("peak_driver_gib", 0)
    ratio = qt / pt if pt else 0
    mratio = qm / pm if pm else 0
    print(f"{name:10} {pt:11.0f} {qt:14.0f} {ratio:6.2f} {pm:9.2f} {qm:7.2f} {mratio:9.2f} {p.get('mfu', 0):8.3f} {q.get('mfu', 0):7.3f}")
bases = {n: r for n, r in rows.items() if "base" in r}
if bases:
    print("(this build against BASE, same call)")
    print(f"{'config':10} {'base':>11} {'this':>11} {'ratio':>6} {'base GiB':>9} {'this GiB':>9} {'mem ratio':>9}")
    for name, r in bases.items():
        b, q = r["base"], r.get("qscript", {})
        unit = "tokens_per_s" if "tokens_per_s" in b else "examples_per_s"
        bt, qt = b.get(unit, 0), q.get(unit, 0)
        bm, qm = b.get("peak_driver_gib", 0), q.get("peak_driver_gib", 0)
        print(f"{name:10} {bt:11.1f} {qt:11.1f} {qt / bt if bt else 0:6.3f} {bm:9.2f} {qm:9.2f} {qm / bm if bm else 0:9.3f}")
EOF
