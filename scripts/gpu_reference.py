#!/usr/bin/env python3
"""Random-weight checkpoints from a real config, and transformers' bf16 logits on them (GPU).

  python3 scripts/gpu_reference.py CONFIG_DIR OUT [--no-logits]

Writes OUT/model (an HF checkpoint, bf16, random weights from seed 0) and, unless --no-logits,
OUT/ref.safetensors with input_ids [1, 64], logits (bf16 forward on cuda, as float32) and
logits_f32 (the same weights in float32, for the size of bf16 noise). qscript's side:
`model_bench logits OUT/model OUT/ref.safetensors` (examples/model_bench.rs).
"""
import os, sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from safetensors.torch import save_file

cfg_dir, out = sys.argv[1], sys.argv[2]
logits = "--no-logits" not in sys.argv
cfg = AutoConfig.from_pretrained(cfg_dir)
torch.manual_seed(0)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
model.eval()
model.save_pretrained(os.path.join(out, "model"), safe_serialization=True)
if logits:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (1, 64), generator=g)
    with torch.no_grad():
        bf16 = model(input_ids=ids.cuda()).logits.float().cpu()
        f32 = model.float()(input_ids=ids.cuda()).logits.float().cpu()
    save_file({"input_ids": ids, "logits": bf16, "logits_f32": f32}, os.path.join(out, "ref.safetensors"))
print("wrote", out, sum(p.numel() for p in model.parameters()), "params", flush=True)
