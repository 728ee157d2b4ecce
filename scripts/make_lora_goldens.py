#!/usr/bin/env python3
"""Golden fixtures for qscript's LoRA: PEFT adapters on the tiny checkpoints of
make_model_goldens.py, with PEFT's outputs and LoRA gradients (CPU, float32, eager attention).

  python3 scripts/make_lora_goldens.py OUTDIR    # then copy OUTDIR/* to tests/fixtures/lora/

Per case, OUTDIR/<case>/ holds the adapter as PEFT saves it (adapter_config.json,
adapter_model.safetensors) and golden.safetensors with the inputs of the model goldens, logits,
loss and grad.<PEFT tensor name> for every LoRA weight; print_trainable_parameters.txt holds what
PEFT prints. lora_B is random (not PEFT's zeros) so the adapters change the outputs.
"""
import contextlib, io, os, sys
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "..", "tests", "fixtures", "models")
CASES = {
    "qwen2-qkvo-r4": ("tiny-qwen2", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    "llama3-all-linear-rslora": ("tiny-llama3", dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True)),
    "qwen3-regex-r2": ("tiny-qwen3", dict(r=2, lora_alpha=4, target_modules=r".*\.mlp\.(gate|up)_proj")),
}

def main(out):
    for case, (model_name, kw) in CASES.items():
        d = os.path.join(out, case)
        os.makedirs(d, exist_ok=True)
        mdir = os.path.join(MODELS, model_name)
        base = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32, attn_implementation="eager")
        torch.manual_seed(0)
        model = get_peft_model(base, LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **kw))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.1 * torch.randn_like(p))
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            model.print_trainable_parameters()
        open(os.path.join(d, "print_trainable_parameters.txt"), "w").write(buf.getvalue())
        model.save_pretrained(d)
        g = load_file(os.path.join(mdir, "golden.safetensors"))
        ids, mask, labels = g["input_ids"], g["attention_mask"], g["labels"]
        model.eval()
        res = model(input_ids=ids, attention_mask=mask, labels=labels)
        res.loss.backward()
        outs = {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "logits": res.logits.detach(), "loss": res.loss.detach()}
        for n, p in model.named_parameters():
            if p.requires_grad:
                # PEFT's saved names drop the adapter name: ...q_proj.lora_A.default.weight -> ...q_proj.lora_A.weight
                outs["grad." + n.replace(".default", "")] = p.grad.detach().clone()
        save_file({k: v.contiguous() for k, v in outs.items()}, os.path.join(d, "golden.safetensors"))
        print(case, buf.getvalue().strip(), "loss", float(res.loss.detach()))

if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "tests", "fixtures", "lora"))
