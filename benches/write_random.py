#!/usr/bin/env python3
"""A random-weight checkpoint of a real architecture, for the GPU harness: the config.json in
CONFIG_DIR (e.g. ../shared/fixtures/configs/Qwen3-4B), weights drawn small (normal, std 0.02;
norms 1) in bf16, written tensor by tensor into 4 GB safetensors shards with their index (the
model itself is built on the meta device for its names and shapes only: building and saving it
with transformers took minutes for a 4B). Tokenizer files given after OUT are copied beside it.

  python3 benches/write_random.py CONFIG_DIR OUT [TOKENIZER_FILE ...]
"""
import json, os, shutil, sys
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

SHARD = 4 << 30  # bytes


def main(config_dir, out, *tokenizer_files):
    cfg = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    names = [(n, tuple(p.shape)) for n, p in model.state_dict().items()]
    if getattr(cfg, "tie_word_embeddings", False):
        names = [(n, s) for n, s in names if n != "lm_head.weight"]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)
    os.makedirs(out, exist_ok=True)
    shards, shard, size, total = [], {}, 0, 0
    for name, shape in names:
        if "norm" in name:
            t = torch.ones(shape, dtype=torch.bfloat16, device=dev)
        else:
            t = torch.empty(shape, dtype=torch.bfloat16, device=dev).normal_(0.0, 0.02, generator=gen)
        nbytes = t.numel() * 2
        if shard and size + nbytes > SHARD:
            shards.append(shard)
            shard, size = {}, 0
        shard[name] = t.cpu()
        size += nbytes
        total += t.numel()
    shards.append(shard)
    weight_map = {}
    for i, s in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(s, os.path.join(out, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in s})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 2 * total}, "weight_map": weight_map}, f, indent=1)
    cfg.save_pretrained(out)
    for f in tokenizer_files:
        shutil.copy(f, os.path.join(out, os.path.basename(f)))
    print(out, total, "parameters")


if __name__ == "__main__":
    main(*sys.argv[1:])
