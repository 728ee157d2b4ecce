#!/usr/bin/env python3
"""The DPO peer: TRL's DPOTrainer + PEFT on one GPU, on a random-weight checkpoint written by
../shared/bench/hf_peft_lora.py --save-model (the weights qscript's `model_bench train --dpo`
loads), timed the way model_bench times qscript.

Pairs of random tokens: a prompt of --prompt tokens shared by two answers of --answer tokens
(each ending in eos, so TRL adds nothing), pre-tokenized through a word-level tokenizer whose
words are the ids. LoRA r8 alpha 32 on q/k/v/o (TRL turns dropout off), AdamW lr 1e-4, weight
decay 0.01, clipping at 0.3, constant schedule, bf16, gradient checkpointing with --grad-ckpt,
`precompute_ref_log_probs` off (the reference forward, adapters off, runs inside each step),
`max_length` none. --liger: TRL's `use_liger_kernel` (the fused DPO loss), when liger-kernel is
installed.

Prints one JSON line: tokens/s over the timed steps (both rows of each pair), step time, torch's
peak allocated memory.
"""
import argparse, json, os, time

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from trl import DPOConfig, DPOTrainer


def tokenizer(vocab):
    words = {f"<{i}>": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<0>", eos_token="<2>")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timer(TrainerCallback):
    def __init__(self, warmup):
        self.warmup, self.t0, self.steps = warmup, None, 0

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.warmup:
            sync()
            self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if self.t0 is not None:
            self.steps += 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--load-model", required=True)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--answer", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--liger", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="a smoke test of the script (f32, no timing worth reading)")
    args = ap.parse_args()
    dev = "cpu" if args.cpu else "cuda"

    model = AutoModelForCausalLM.from_pretrained(args.load_model, dtype=torch.float32 if args.cpu else torch.bfloat16,
                                                 attn_implementation="sdpa").to(dev)
    vocab = model.config.vocab_size
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()
    text = lambda xs: "".join(f" <{i}>" for i in xs)
    n = (args.warmup + args.steps) * args.pairs
    data = [{"prompt": text(ids(args.prompt)), "chosen": text(ids(args.answer - 1) + [2]),
             "rejected": text(ids(args.answer - 1) + [2])} for _ in range(n)]
    conf = DPOConfig(output_dir="/tmp/trl-dpo", report_to=[], per_device_train_batch_size=args.pairs,
                     max_steps=args.warmup + args.steps, learning_rate=1e-4, weight_decay=0.01,
                     max_grad_norm=0.3, lr_scheduler_type="constant", warmup_steps=0, bf16=not args.cpu,
                     use_cpu=args.cpu,
                     logging_steps=10**6, save_strategy="no", max_length=None, beta=0.1,
                     loss_type=["sigmoid"], precompute_ref_log_probs=False,
                     gradient_checkpointing=args.grad_ckpt,
                     gradient_checkpointing_kwargs={"use_reentrant": False},
                     use_liger_kernel=args.liger, dataloader_num_workers=0)
    timer = Timer(args.warmup)
    t = DPOTrainer(model=model, ref_model=None, args=conf, train_dataset=Dataset.from_list(data),
                   processing_class=tokenizer(vocab), callbacks=[timer])
    if not args.cpu:
        torch.cuda.reset_peak_memory_stats()
    t.train()
    sync()
    dt = (time.perf_counter() - timer.t0) / max(timer.steps, 1)
    tokens = args.pairs * 2 * (args.prompt + args.answer)
    print(json.dumps({"system": "trl-dpo-liger" if args.liger else "trl-dpo", "pairs": args.pairs,
                      "seq": args.prompt + args.answer, "grad_ckpt": args.grad_ckpt,
                      "step_ms": round(dt * 1e3, 2), "tokens_per_s": round(tokens / dt, 1),
                      "peak_mem_gib": 0 if args.cpu else round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      "steps_timed": timer.steps}))


if __name__ == "__main__":
    main()
