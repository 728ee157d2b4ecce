#!/usr/bin/env bash
# Hot reload on the GPU: device memory over several edit-and-re-run cycles under `--watch`.
#
# Runs recipes/huanhuan_lora.rhai (a copy) on a random Qwen2.5-0.5B on the GPU under `--watch`,
# then edits its training cell N times (each edit re-runs the training and the last cell with the
# model still resident), and once edits twice in a row so the second save cancels a run in
# flight. The driver's per-process memory is sampled every 0.2 s; the table gives, per cycle, the
# memory when the run ended and the peak during it. Hot reload keeps the model resident and gives
# the cancelled run's memory back, so every row should stay at the first run's level.
#
# On the GPU machine, from the repo root (the model dir is made by benches/gpu.sh's 05b config):
#   BIN=/tmp/qs PEER=.devbin bash benches/watch_gpu.sh [CYCLES]
set -uo pipefail
BIN=${BIN:-/tmp/qs}
PEER=${PEER:-.devbin}
WORK=${WORK:-/tmp/qsbench}
CYCLES=${1:-4}
W=$WORK/watch
MODEL=${MODEL:-$WORK/qwen2.5-0.5b}   # MODEL=tiny tries the script on a CPU
mkdir -p "$W"
if [ "$MODEL" != tiny ]; then
  if [ ! -f "$MODEL/config.json" ]; then
    python3 "$PEER/hf_peft_lora.py" --model qwen2.5-0.5b --save-model "$MODEL" > /dev/null || exit 1
  fi
  cp "$PEER"/tokenizer.json "$PEER"/tokenizer_config.json "$MODEL/"
fi
cp recipes/huanhuan_lora.rhai "$W/recipe.rhai"
mkdir -p "$W/data" && cp "$PEER/huanhuan.json" "$W/data/"

"$BIN/qscript" "$W/recipe.rhai" --watch --allow-read "$WORK" --output-dir "$W/runs" \
  --set model="$MODEL" --set data=data/huanhuan.json --set max_length=128 --set batch_size=8 \
  --set accumulation=2 --set learning_rate=1e-4 --set max_steps=60 \
  > "$W/out.log" 2> "$W/err.log" &
pid=$!

# "epoch-seconds MiB" every 0.2 s while qscript runs
(while kill -0 "$pid" 2>/dev/null; do
  v=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null |
    awk -F', *' -v p="$pid" '$1 == p { print $2 }')
  echo "$(date +%s.%N) ${v:-0}"
  sleep 0.2
done) > "$W/mem.log" &
sampler=$!

now() { date +%s.%N; }
# how many runs have logged their 10th step so far
tenth() { cat "$W/out.log" "$W/err.log" | grep -c '^step 10,'; }
# waits until the watcher has ended N runs (it prints "[watch] watching" after each, cancelled or not)
runs_done() {
  local n=$1 t=0
  while [ "$(grep -c '^\[watch\] watching' "$W/err.log")" -lt "$n" ]; do
    sleep 0.2; t=$((t + 1))
    if [ $t -gt 1500 ] || ! kill -0 "$pid" 2>/dev/null; then
      echo "watch run $n did not finish" >&2; tail -20 "$W/err.log" >&2; return 1
    fi
  done
}
# edits the training cell: a new learning rate (the cell's text changes, earlier cells do not)
edit() { sed -i "s/learning_rate: p.learning_rate[^,]*,/learning_rate: p.learning_rate * $1,/" "$W/recipe.rhai"; }

marks=("$(now) start")
runs_done 1 || exit 1
marks+=("$(now) first-run")
n=1
for i in $(seq 1 "$CYCLES"); do
  edit "1.0$i"; n=$((n + 1)); runs_done "$n" || exit 1
  marks+=("$(now) edit-$i")
done
# a save while a run is in flight cancels it; the next run must not stack on the cancelled one
seen=$(tenth); edit "0.9"
while [ "$(tenth)" -le "$seen" ] && kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
edit "0.8"
n=$((n + 2)); runs_done "$n" || exit 1   # the cancelled run and its re-run both end with "watching"
marks+=("$(now) cancel+rerun")
kill -INT "$pid"; sleep 1; kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; wait "$sampler"

echo "runs cancelled: $(grep -c 'run cancelled' "$W/err.log"); training summaries:"
grep -E "trained [0-9]+ steps" "$W/err.log" "$W/out.log" | sed 's/^[^:]*://' | cut -c1-170
python3 - "$W/mem.log" "${marks[@]}" <<'EOF'
import sys
mem = [tuple(map(float, l.split())) for l in open(sys.argv[1]) if len(l.split()) == 2]
marks = [(float(m.split()[0]), m.split()[1]) for m in sys.argv[2:]]
print(f"{'cycle':14} {'end MiB':>8} {'peak MiB':>9}")
for (t0, _), (t1, name) in zip(marks, marks[1:]):
    seg = [m for t, m in mem if t0 <= t <= t1] or [0]
    end = [m for t, m in mem if t <= t1][-3:] or [0]
    print(f"{name:14} {max(end):8.0f} {max(seg):9.0f}")
EOF
