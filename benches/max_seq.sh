#!/usr/bin/env bash
# The longest row a system trains (issue 22's "longest trainable sequence", one H100): one
# training step of one row at each probed length (thousands of tokens), doubling from START until
# a step fails, then halving the gap down to STEP; each probe is a `gpu.sh long` run of one mode.
#
#   bash benches/max_seq.sh MODE [START=64] [STEP=16]
#
# MODE: offload | ckpt (qscript; LONG_FLAGS=--4bit for QLoRA) | peer | liger-peer (HF + PEFT,
# HF + PEFT + Liger, bf16 or, with LONG_FLAGS=--4bit, bitsandbytes 4-bit). Prints one JSON line:
# the longest that trained and the shortest that did not. Needs BIN and PEER as gpu.sh does.
set -uo pipefail
mode=$1 lo=0 hi=0 k=${2:-64} step=${3:-16}
WORK=${WORK:-/tmp/qsbench}
# Without Liger every probe would "fail" at once (gpu.sh skips a peer it cannot import).
if [ "$mode" = liger-peer ] && ! python3 -c "import liger_kernel" 2> /dev/null; then
  echo "max_seq.sh liger-peer: liger_kernel cannot be imported; install the wheels carried in .whl/ (benches/on_device.sh does)" >&2
  exit 1
fi
probe() {   # probe K: 0 when a step of K thousand tokens trained
  local out
  out=$(mktemp)
  case $mode in
    offload|ckpt) LONG_MODES=$mode LONG_STEPS=1 LONG_WARMUP=0 LONG_PEER=0 RESULTS=$out bash benches/gpu.sh "long-7b-$1" > /dev/null 2>&1 ;;
    peer) LONG_MODES="" LONG_STEPS=1 LONG_WARMUP=0 LONG_PEER=hf RESULTS=$out bash benches/gpu.sh "long-7b-$1" > /dev/null 2>&1 ;;
    liger-peer) LONG_MODES="" LONG_STEPS=1 LONG_WARMUP=0 LONG_PEER=liger RESULTS=$out bash benches/gpu.sh "long-7b-$1" > /dev/null 2>&1 ;;
  esac
  local want=qscript
  [ "$mode" = peer ] && want=long-7b-$1-peer
  [ "$mode" = liger-peer ] && want=long-7b-$1-liger-peer
  python3 - "$out" "$want" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
want = sys.argv[2]
ok = [r for r in rows if (r.get("run", "").endswith("qscript") if want == "qscript" else r.get("run") == want)
      and not r.get("failed")]
sys.exit(0 if ok else 1)
PY
  local rc=$?
  echo "probe ${1}k: $([ $rc = 0 ] && echo trained || echo failed)" >&2
  return $rc
}
# Double until a failure, then bisect.
while probe "$k"; do lo=$k; k=$((k * 2)); done
hi=$k
while [ $((hi - lo)) -gt "$step" ]; do
  mid=$(( (lo + hi) / 2 / step * step ))
  [ "$mid" -le "$lo" ] && break
  if probe "$mid"; then lo=$mid; else hi=$mid; fi
done
echo "{\"measure\": \"max-seq\", \"mode\": \"$mode\", \"flags\": \"${LONG_FLAGS:-}\", \"longest_k\": $lo, \"failed_k\": $hi}"
