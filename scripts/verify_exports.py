#!/usr/bin/env python3
"""Checks that what qscript writes loads in the ecosystem: a qscript LoRA adapter through PEFT, a
qscript merged checkpoint through transformers, each giving qscript's logits, and PEFT's greedy
continuation of the adapter equal to qscript's (exit 1 when it is not).

  model_bench export tests/fixtures/models/tiny-qwen2 OUT     # (examples/model_bench.rs)
  python3 scripts/verify_exports.py tests/fixtures/models/tiny-qwen2 OUT

With --4bit (model_bench export BASE OUT --4bit): the adapter was trained on qscript's NF4
quantization of BASE, and PEFT loads it onto bitsandbytes' NF4 quantization of the same BASE
(double quantization, f32 compute; bitsandbytes on the CPU or the GPU).
"""
import json, sys
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

base_dir, out = sys.argv[1], sys.argv[2]
four_bit = "--4bit" in sys.argv
ref = load_file(f"{out}/qscript_logits.safetensors")
ids = ref["input_ids"]
if four_bit:
    from transformers import BitsAndBytesConfig
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager",
                                                quantization_config=bnb, device_map={"": dev})
    ids = ids.to(dev)
    ref = {k: v.to(dev) for k, v in ref.items()}
    # Train mode with every dropout off: bitsandbytes' CPU inference kernel (eval mode) is not the
    # dequantize-and-multiply its training and GPU paths run.
    peft = PeftModel.from_pretrained(base, f"{out}/adapter").train()
    for mod in peft.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
else:
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    peft = PeftModel.from_pretrained(base, f"{out}/adapter").eval()
merged = AutoModelForCausalLM.from_pretrained(f"{out}/merged", dtype=torch.float32, attn_implementation="eager").eval()
merged = merged.to(ids.device)


def greedy(model, ids, n):
    """n new tokens by argmax over the whole context each step (no cache, no stop token)."""
    ctx = ids
    for _ in range(n):
        nxt = model(input_ids=ctx).logits[:, -1].argmax(-1, keepdim=True)
        ctx = torch.cat([ctx, nxt], dim=1)
    return ctx[0, ids.shape[1]:].tolist()


with torch.no_grad():
    a = (peft(input_ids=ids).logits - ref["adapter_logits"]).abs().max().item()
    m = (merged(input_ids=ids).logits - ref["merged_logits"]).abs().max().item()
    want = ref["greedy_ids"].tolist()
    got = greedy(peft, ids, len(want))
same = next((i for i, (x, y) in enumerate(zip(want, got)) if x != y), len(want))
print(json.dumps({"peft_loads_qscript_adapter_max_abs_diff": a, "transformers_loads_qscript_merged_max_abs_diff": m,
                  "greedy_tokens": len(want), "greedy_tokens_equal": same, "qscript_greedy": want, "peft_greedy": got,
                  "device": str(ids.device),
                  "adapter_config": json.load(open(f"{out}/adapter/adapter_config.json"))["target_modules"]}))
sys.exit(0 if same == len(want) else 1)
