#!/usr/bin/env python3
"""The DPO quality check's peer: TRL's DPOTrainer + PEFT on LLaMA-Factory's dpo_en_demo pairs
(ShareGPT ranking records in TRL's conversational form), on a checkpoint directory that holds the
tokenizer, with the options recipes/dpo.rhai passes qscript (LoRA r16 alpha 32 on every linear
layer, sigmoid loss, beta 0.1, cosine schedule with 10% warmup). Prints each log record as JSON.

  python3 benches/trl_dpo_curve.py MODEL_DIR dpo_en_demo.json --max-steps 200 --batch 4 --lr 5e-4

For a run qscript can repeat step by step: `--init-adapter DIR` saves the LoRA adapter as PEFT
initialized it (qscript's recipe loads it with `--set adapter=DIR`), `--in-order` trains on the
pairs in the file's order (qscript's `disable_shuffling`), `--cpu` runs on the CPU in f32.
"""
import argparse, json

import torch
from torch.utils.data import SequentialSampler
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer


class Log(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kw):
        if logs:
            print(json.dumps({"step": state.global_step, **logs}), flush=True)


class InOrder(DPOTrainer):
    """The pairs in the file's order, every epoch."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--init-adapter")
    ap.add_argument("--in-order", action="store_true")
    ap.add_argument("--cpu", action="store_true")
    args = ap.parse_args()
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    msg = lambda m: {"role": roles[m["from"]], "content": m["value"]}
    rows = [{"prompt": [msg(m) for m in r["conversations"]], "chosen": [msg(r["chosen"])],
             "rejected": [msg(r["rejected"])]} for r in json.load(open(args.data))]
    tok = AutoTokenizer.from_pretrained(args.model)
    dtype, device = (torch.float32, "cpu") if args.cpu else (torch.bfloat16, "cuda")
    torch.manual_seed(42)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules="all-linear"))
    if args.init_adapter:
        model.save_pretrained(args.init_adapter)
    conf = DPOConfig(output_dir="/tmp/trl-dpo-curve", report_to=[], per_device_train_batch_size=args.batch,
                     max_steps=args.max_steps, learning_rate=args.lr, lr_scheduler_type="cosine",
                     warmup_steps=max(1, round(0.1 * args.max_steps)), bf16=not args.cpu, use_cpu=args.cpu,
                     logging_steps=10, save_strategy="no",
                     max_length=args.max_length, beta=0.1, loss_type=["sigmoid"], seed=42)
    trainer_class = InOrder if args.in_order else DPOTrainer
    trainer_class(model=model, ref_model=None, args=conf, train_dataset=Dataset.from_list(rows),
                  processing_class=tok, callbacks=[Log()]).train()


if __name__ == "__main__":
    main()
