#!/usr/bin/env python3
"""A random-weight checkpoint of a real architecture, for the GPU harness: the config.json in
CONFIG_DIR (e.g. ../shared/fixtures/configs/Qwen3-4B), weights drawn small (normal, std 0.02;
norms 1) in bf16 on the GPU, saved with save_pretrained to OUT. Tokenizer files given after OUT
are copied beside it.

  python3 benches/write_random.py CONFIG_DIR OUT [TOKENIZER_FILE ...]
"""
import os, shutil, sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main(config_dir, out, *tokenizer_files):
    cfg = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.save_pretrained(out, safe_serialization=True)
    for f in tokenizer_files:
        shutil.copy(f, os.path.join(out, os.path.basename(f)))
    print(out, sum(p.numel() for p in model.parameters()), "parameters")


if __name__ == "__main__":
    main(*sys.argv[1:])
