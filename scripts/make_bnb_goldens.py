"""Golden fixtures for qscript's 4-bit quantization (issue 27), made with bitsandbytes itself.

Writes tests/fixtures/bnb/:
- quant.safetensors: for NF4 and FP4, with and without double quantization, over shapes with a
  partial last block and an odd element count: the bf16 input `<case>.w`, what
  `bitsandbytes.functional.quantize_4bit` stores (`.packed`, `.absmax`, `.quant_map`, and with
  double quantization `.nested_absmax`, `.nested_quant_map`, `.offset`), and what
  `dequantize_4bit` gives back in bf16 (`.deq`).
- tiny-bf16/ and tiny-nf4/: a tiny random Qwen2 checkpoint in bf16, and the same loaded by
  transformers with BitsAndBytesConfig (nf4, double quantization, bf16 compute) and saved: a
  pre-quantized checkpoint as bitsandbytes writes it.
- lora_step.json: one PEFT LoRA step on the 4-bit model (r 4, all linear layers, B set to
  fixed values so every gradient is non-zero): the loss and every adapter gradient.

Runs on the CPU (bitsandbytes >= 0.49 has CPU kernels), or on the GPU machine. Usage:
  python scripts/make_bnb_goldens.py [OUT_DIR]
"""
import json
import os
import sys

import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F
from safetensors.torch import save_file

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "bnb")
os.makedirs(OUT, exist_ok=True)
torch.manual_seed(0)

tensors = {}
cases = []
for qt in ["nf4", "fp4"]:
    for dq in [False, True]:
        for shape in [(64, 128), (37, 51), (3, 300), (40, 704)]:
            name = f"{qt}_{'dq' if dq else 'plain'}_{shape[0]}x{shape[1]}"
            w = (torch.randn(shape) * 0.05).to(torch.bfloat16)
            if shape == (40, 704):
                # An outlier block and an all-zero block.
                w[0, :64] = 0
                w[1, 5] = 3.0
            q, st = F.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type=qt)
            deq = F.dequantize_4bit(q, st)
            tensors[f"{name}.w"] = w
            tensors[f"{name}.packed"] = q.reshape(-1).contiguous()
            tensors[f"{name}.absmax"] = st.absmax.contiguous()
            tensors[f"{name}.quant_map"] = st.code.float().contiguous()
            if dq:
                tensors[f"{name}.nested_absmax"] = st.state2.absmax.contiguous()
                tensors[f"{name}.nested_quant_map"] = st.state2.code.float().contiguous()
                tensors[f"{name}.offset"] = st.offset.reshape(1).float().contiguous()
            tensors[f"{name}.deq"] = deq.contiguous()
            cases.append(name)
save_file(tensors, os.path.join(OUT, "quant.safetensors"), metadata={"cases": json.dumps(cases)})

# A tiny checkpoint, in bf16 and as bitsandbytes saves it quantized.
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Qwen2Config

cfg = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=False, rms_norm_eps=1e-6)
torch.manual_seed(1)
m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
bf16_dir = os.path.join(OUT, "tiny-bf16")
m.save_pretrained(bf16_dir)
bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
q = AutoModelForCausalLM.from_pretrained(bf16_dir, quantization_config=bnb_cfg, device_map="cpu")
q.save_pretrained(os.path.join(OUT, "tiny-nf4"))

# One PEFT LoRA step on the 4-bit model, in f32 compute for a tight comparison.
from peft import LoraConfig, get_peft_model

bnb_cfg32 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
q32 = AutoModelForCausalLM.from_pretrained(bf16_dir, quantization_config=bnb_cfg32, device_map="cpu",
                                           dtype=torch.float32)
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
pm = get_peft_model(q32, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
gen = torch.Generator().manual_seed(2)
for n, p in pm.named_parameters():
    if "lora_B" in n:
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
ids = torch.tensor([[5, 17, 42, 7, 88, 3, 11, 60], [9, 1, 33, 70, 2, 45, 8, 19]])
out = pm(input_ids=ids, labels=ids)
out.loss.backward()
grads = {}
weights = {}
for n, p in pm.named_parameters():
    if p.requires_grad:
        key = n.replace(".default", "")
        grads[key] = p.grad.float().tolist()
        weights[key] = p.detach().float().tolist()
json.dump({"input_ids": ids.tolist(), "r": 4, "alpha": 8, "targets": targets,
           "loss": out.loss.item(), "weights": weights, "grads": grads},
          open(os.path.join(OUT, "lora_step.json"), "w"))
print("wrote", OUT, len(cases), "cases")
