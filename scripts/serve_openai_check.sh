#!/usr/bin/env bash
# `qscript serve` checked with the official `openai` Python client (installed from the registry
# into a venv): builds qscript, saves a tiny model with a LoRA adapter, serves both, runs
# scripts/serve_openai_check.py against it. Needs the network for pip; not part of CI (the same
# behaviour is tested in Rust by tests/serve.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/qscript-openai-venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q openai
cargo build -q --release
work=$(mktemp -d)
pid=
trap 'kill $pid 2>/dev/null; rm -rf "$work"' EXIT
cat > "$work/make.rhai" <<'RHAI'
let tok = tokenizer::builtin();
let base = model::tiny(#{ seed: 3 });
base.save(io::output_dir() + "/base", tok);
let peft = lora::attach(base, #{ r: 4, lora_alpha: 16, target_modules: "all-linear" });
io::write_text("d.json", `[{"instruction": "hi", "output": "hello there, friend"}]`);
let ds = data::sft(data::to_messages(data::load(io::output_dir() + "/d.json")), tok);
train::fit(peft, ds, #{ max_steps: 10, learning_rate: 5e-2, save_steps: 0, logging_steps: 100 }).save(io::output_dir() + "/adapter");
RHAI
./target/release/qscript "$work/make.rhai" --output-dir "$work/out" > /dev/null
./target/release/qscript serve "$work/out/base" --served-model-name tiny \
  --lora-modules "mine=$work/out/adapter" --port 0 --api-key sk-check --max-model-len 512 \
  2> "$work/serve.log" &
pid=$!
for _ in $(seq 100); do grep -q "http://" "$work/serve.log" 2>/dev/null && break; sleep 0.1; done
url=$(grep -o "http://[0-9.:]*" "$work/serve.log" | head -1)
"$VENV/bin/python" scripts/serve_openai_check.py "$url" sk-check
