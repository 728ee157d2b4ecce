"""llama.cpp (llama-cpp-python) loads each GGUF qscript exported (scripts/gguf_check.rhai) and
continues greedily as transformers does on the same model saved as an HF checkpoint (qscript's
outputs equal transformers' on those: tests/models.rs); prints the logit differences too.

  qscript scripts/gguf_check.rhai --output-dir OUT && python3 scripts/verify_gguf.py OUT
"""
import sys, json, numpy as np, torch
from llama_cpp import Llama
from transformers import AutoModelForCausalLM
OUT = sys.argv[1]
ids = [12, 99, 7, 180, 33, 250]
out = {}
for arch in ["qwen2", "qwen3", "llama"]:
    hf = AutoModelForCausalLM.from_pretrained(f"{OUT}/{arch}-hf", dtype=torch.float32)
    with torch.no_grad():
        g = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        ref = hf(torch.tensor([ids])).logits[0, -1].numpy()
    for q in ["", "-q8"]:
        llm = Llama(model_path=f"{OUT}/{arch}{q}/m.gguf", n_ctx=64, logits_all=True, verbose=False, n_threads=2)
        llm.eval(ids)
        lg = np.array(llm.scores[len(ids) - 1])
        toks = []
        for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            toks.append(t)
            if len(toks) == 8:
                break
        out[arch + q] = {"greedy_equal": toks == g, "max_abs_logit_diff": float(np.abs(lg - ref).max()),
                         "logit_scale": float(np.abs(ref).max()), "llama_cpp": toks, "transformers": g}
print(json.dumps(out, indent=1))
