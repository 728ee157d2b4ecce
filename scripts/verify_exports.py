#!/usr/bin/env python3
"""Checks that what qscript writes loads in the ecosystem: a qscript LoRA adapter through PEFT, a
qscript merged checkpoint through transformers, each giving qscript's logits.

  model_bench export tests/fixtures/models/tiny-qwen2 OUT     # (examples/model_bench.rs)
  python3 scripts/verify_exports.py tests/fixtures/models/tiny-qwen2 OUT
"""
import json, sys
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

base_dir, out = sys.argv[1], sys.argv[2]
ref = load_file(f"{out}/qscript_logits.safetensors")
ids = ref["input_ids"]
base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
peft = PeftModel.from_pretrained(base, f"{out}/adapter").eval()
merged = AutoModelForCausalLM.from_pretrained(f"{out}/merged", dtype=torch.float32, attn_implementation="eager").eval()
with torch.no_grad():
    a = (peft(input_ids=ids).logits - ref["adapter_logits"]).abs().max().item()
    m = (merged(input_ids=ids).logits - ref["merged_logits"]).abs().max().item()
print(json.dumps({"peft_loads_qscript_adapter_max_abs_diff": a, "transformers_loads_qscript_merged_max_abs_diff": m,
                  "adapter_config": json.load(open(f"{out}/adapter/adapter_config.json"))["target_modules"]}))
