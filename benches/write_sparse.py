#!/usr/bin/env python3
"""A checkpoint of a real architecture that takes almost no disk: one safetensors file whose large
matrices are holes (they read as zeros) and whose small tensors (norms, biases) are ones, bf16,
with CONFIG_DIR's config.json beside it. For speed and memory on models whose bf16 weights would
not fit the GPU machine's disk (Qwen3-32B: 65 GB); the values are meaningless (a zero matrix
trains as fast as any), which is all a throughput or peak-memory run needs.

  python3 benches/write_sparse.py CONFIG_DIR OUT
"""
import json, os, shutil, struct, sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM

SMALL = 1 << 20  # elements: tensors at most this large get real bytes (ones)


def main(config_dir, out):
    cfg = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    tensors = [(n, list(p.shape)) for n, p in model.state_dict().items()]
    header, offset = {}, 0
    for name, shape in tensors:
        n = 1
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + 2 * n]}
        offset += 2 * n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "model.safetensors")
    one = struct.pack("<H", 0x3F80)  # bf16 1.0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        base = f.tell()
        for name, shape in tensors:
            start, end = header[name]["data_offsets"]
            if (end - start) // 2 <= SMALL:
                f.seek(base + start)
                f.write(one * ((end - start) // 2))
        f.truncate(base + offset)
    shutil.copy(os.path.join(config_dir, "config.json"), os.path.join(out, "config.json"))
    print(path, offset, "bytes (sparse)")


if __name__ == "__main__":
    main(*sys.argv[1:])
