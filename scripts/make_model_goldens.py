#!/usr/bin/env python3
"""Golden fixtures for qscript's decoder: tiny random Qwen2, Qwen3 and Llama checkpoints saved as
HF directories, with transformers' outputs on fixed inputs (CPU, float32, eager attention).

  python3 scripts/make_model_goldens.py OUTDIR      # then copy OUTDIR/* to tests/fixtures/models/

Per model, OUTDIR/<name>/ holds config.json, generation_config.json, model.safetensors and
golden.safetensors with:
  input_ids [2, 7] i64, attention_mask [2, 7] i64 (row 1 left-padded by 2),
  logits [2, 7, vocab]       model(input_ids, attention_mask).logits
  prefill_logits [1, 4, V]   row 0, first 4 tokens, use_cache=True
  step_logits [3, V]         then one token at a time through the KV cache
  labels [2, 7] i64          input_ids with -100 on padding
  loss []                    model(input_ids, attention_mask, labels=labels).loss
  grad.<param name>          d loss / d param for every parameter (tied ones once)
Tested by tests/models.rs. Needs torch, transformers and safetensors.
"""
import os, sys
import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config
from safetensors.torch import save_file

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
              attn_implementation="eager")
CONFIGS = {
    "tiny-qwen2": Qwen2Config(**COMMON, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6,
                              tie_word_embeddings=True, use_sliding_window=False),
    "tiny-qwen3": Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=16, rope_theta=1000000.0,
                              rms_norm_eps=1e-6, tie_word_embeddings=False),
    "tiny-llama3": LlamaConfig(**COMMON, num_key_value_heads=1, rope_theta=500000.0, rms_norm_eps=1e-5,
                               tie_word_embeddings=False,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    # Last, so the models above keep their random draws.
    "tiny-qwen2-yarn": Qwen2Config(**COMMON, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6,
                                   tie_word_embeddings=True, use_sliding_window=False,
                                   rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 16}),
    # Dynamic NTK past 4 positions: the 7-token inputs and the cached decoding steps (positions
    # 4..6, each with the base of the length it reaches) go through the scaled base.
    "tiny-llama-dynamic": LlamaConfig(**{**COMMON, "max_position_embeddings": 4}, num_key_value_heads=2,
                                      rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                      rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
}

def fresh_rope(model):
    """Dynamic RoPE keeps the longest length it saw and uses its base for every shorter forward
    until one is under `max_position_embeddings`: start the cached decoding from a fresh state, as
    a newly loaded model decodes (each step then uses the base of the length it reaches)."""
    for m in model.modules():
        if getattr(m, "rope_type", None) == "dynamic" and hasattr(m, "original_inv_freq"):
            m.register_buffer("inv_freq", m.original_inv_freq.clone(), persistent=False)
            m.max_seq_len_cached = m.original_max_seq_len


def main(out, only=None):
    torch.manual_seed(0)
    for name, cfg in CONFIGS.items():
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "norm" in pname:
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                else:
                    p.copy_(0.15 * torch.randn_like(p))
        model.eval()
        model.save_pretrained(d, safe_serialization=True)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, cfg.vocab_size, (2, 7), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :2] = 0
        labels = ids.masked_fill(mask == 0, -100)
        out_t = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        with torch.no_grad():
            out_t["logits"] = model(input_ids=ids, attention_mask=mask).logits
            fresh_rope(model)
            pre = model(input_ids=ids[:1, :4], use_cache=True)
            out_t["prefill_logits"] = pre.logits
            past, steps = pre.past_key_values, []
            for t in range(4, 7):
                o = model(input_ids=ids[:1, t:t + 1], past_key_values=past, use_cache=True)
                past = o.past_key_values
                steps.append(o.logits[0, -1])
            out_t["step_logits"] = torch.stack(steps)
        model.zero_grad()
        res = model(input_ids=ids, attention_mask=mask, labels=labels)
        res.loss.backward()
        out_t["loss"] = res.loss.detach()
        for pname, p in model.named_parameters():
            out_t["grad." + pname] = p.grad.detach().clone()
        save_file({k: v.contiguous() for k, v in out_t.items()}, os.path.join(d, "golden.safetensors"),
                  metadata={"transformers": transformers.__version__, "torch": torch.__version__})
        print(name, "loss", float(res.loss), "params", sum(p.numel() for p in model.parameters()))

if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/models")
