#!/usr/bin/env python3
"""The peer of `cargo bench --bench tokenize`: HF `datasets.map` + a transformers tokenizer doing
the same work as qscript's `data::to_messages` + `data::sft` (ChatML via the model's chat template,
labels -100 on everything but the assistant turn, truncation at 1024).

  pip install datasets transformers tokenizers jinja2
  python3 scripts/bench_tokenize_hf.py $QSCRIPT_FIXTURES

Prints one JSON line per dataset with the wall time of load + map.
"""
import json, os, sys, time

fx = sys.argv[1] if len(sys.argv) > 1 else "../shared/fixtures"
t_import = time.perf_counter()
from datasets import load_dataset, disable_caching
from transformers import AutoTokenizer
disable_caching()
t_import = time.perf_counter() - t_import
tok = AutoTokenizer.from_pretrained(os.path.join(fx, "tokenizers/qwen2.5"))
SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛"
MAX = 1024

def process(r):
    user = r["instruction"] + ("\n" + r["input"] if r["input"] else "")
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": r["output"]}], tokenize=False)
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    a = tok(full[len(prompt):], add_special_tokens=False)["input_ids"]
    ids, labels = (p + a)[:MAX], ([-100] * len(p) + a)[:MAX]
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}

for name, path in [("huanhuan", "datasets/huanhuan/huanhuan.json"), ("alpaca_zh_demo", "datasets/llamafactory/alpaca_zh_demo.json")]:
    t0 = time.perf_counter()
    ds = load_dataset("json", data_files=os.path.join(fx, path), split="train")
    out = ds.map(process, remove_columns=ds.column_names)
    dt = time.perf_counter() - t0
    n_tok = sum(len(x) for x in out["input_ids"])
    print(json.dumps({"system": "hf-datasets", "dataset": name, "records": len(out), "tokens": n_tok, "seconds": round(dt, 3), "import_s": round(t_import, 2)}), flush=True)
