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
- qlora-adapter/ and qlora_step.safetensors: a PEFT LoRA adapter on the 4-bit model (r 4, all
  linear layers, B set to fixed values so every gradient is non-zero), and one step of it in f32
  compute: the input ids, the loss and every adapter gradient.

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

# Every input width a multiple of 64: bitsandbytes 0.50's CPU kernels mis-index blocks that
# straddle rows (a 64x160 down_proj dequantizes up to 0.03 off in f32); its CUDA kernels do not.
cfg = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
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
# The weights the step runs on are bitsandbytes' formula's (codes times the blockwise absmax).
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

for layer in q32.model.layers:
    for lin in [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]:
        qs = lin.weight.quant_state
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        ref = _dequantize_4bit_compute(lin.weight.data.reshape(-1), absmax, qs.code, qs.blocksize,
                                       qs.shape, torch.float32)
        assert torch.equal(F.dequantize_4bit(lin.weight.data, qs), ref), "bitsandbytes CPU kernel"
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
pm = get_peft_model(q32, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
gen = torch.Generator().manual_seed(2)
for n, p in pm.named_parameters():
    if "lora_B" in n:
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
# Train mode: bitsandbytes' CPU inference path (eval mode) runs another kernel than training's
# dequantize-then-matmul.
pm.train()
ids = torch.tensor([[5, 17, 42, 7, 88, 3, 11, 60], [9, 1, 33, 70, 2, 45, 8, 19]])
out = pm(input_ids=ids, labels=ids)
out.loss.backward()
grads = {}
for n, p in pm.named_parameters():
    if p.requires_grad:
        grads[n.replace(".default", "")] = p.grad.float().contiguous()
pm.save_pretrained(os.path.join(OUT, "qlora-adapter"))
os.remove(os.path.join(OUT, "qlora-adapter", "README.md"))  # PEFT's model card
grads["input_ids"] = ids
grads["loss"] = out.loss.detach().reshape(1)
save_file(grads, os.path.join(OUT, "qlora_step.safetensors"))
print("wrote", OUT, len(cases), "cases")
