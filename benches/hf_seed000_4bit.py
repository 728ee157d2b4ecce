"""Seed 000 as written, with its model loaded in 4 bits (the QLoRA peer of `seed000-4bit` in
benches/gpu.sh): runs the seed-000 peer (../shared/bench/hf_seed000.py, PEER_SCRIPT) unchanged,
except that `AutoModelForCausalLM.from_pretrained` gets bitsandbytes' NF4 config (double
quantization, bf16 compute), as a user adds `load_in_4bit` to the seed.

  python3 benches/hf_seed000_4bit.py PEER_SCRIPT MODEL_DIR DATA [--max-steps N]
"""
import runpy
import sys

import torch
import transformers

_load = transformers.AutoModelForCausalLM.from_pretrained


def _load_4bit(*args, **kwargs):
    kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16)
    return _load(*args, **kwargs)


transformers.AutoModelForCausalLM.from_pretrained = _load_4bit
peer = sys.argv[1]
sys.argv = [peer] + sys.argv[2:]
runpy.run_path(peer, run_name="__main__")
