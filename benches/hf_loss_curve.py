#!/usr/bin/env python3
"""The main recipe's training as HF Trainer + PEFT run it, for the loss-curve check: seed 000's
data processing (ChatML prompt with its system message, labels -100 on the prompt, MAX_LENGTH;
the assistant turn ends with "<|im_end|>\n" as the chat template renders it and qscript trains it),
LoRA r8 / alpha 32 / dropout 0.1 on q/k/v/o, cosine schedule with 3% warmup, clipping 0.3, weight
decay 0.01, bf16, gradient checkpointing, length grouping, padding to a multiple of 8. Prints one
JSON line per logged step ({"step", "loss"}, the mean over the logging window as HF logs it).

  python3 benches/hf_loss_curve.py MODEL_DIR huanhuan.json --max-steps 200 --batch 4 --accum 4 \\
      --lr 5e-4 --max-length 128
"""
import argparse, inspect, json, math

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                          TrainerCallback, TrainingArguments)

ap = argparse.ArgumentParser()
ap.add_argument("model_dir")
ap.add_argument("data")
ap.add_argument("--max-steps", type=int, default=200)
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--accum", type=int, default=4)
ap.add_argument("--lr", type=float, default=5e-4)
ap.add_argument("--max-length", type=int, default=128)
ap.add_argument("--logging-steps", type=int, default=10)
args = ap.parse_args()

tok = AutoTokenizer.from_pretrained(args.model_dir)
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
model = AutoModelForCausalLM.from_pretrained(args.model_dir, device_map="cuda", dtype=torch.bfloat16)
SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛"


def process(example):
    prompt = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
              f"{example['instruction'] + example['input']}<|im_end|>\n<|im_start|>assistant\n")
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    # The assistant turn as the tokenizer's chat template renders it, "<|im_end|>\n" included:
    # what qscript's data::sft trains on (seed 000's own script stops at "<|im_end|>").
    r = tok(example["output"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
    ids, labels = p + r, [-100] * len(p) + r
    n = args.max_length
    return {"input_ids": ids[:n], "attention_mask": [1] * len(ids[:n]), "labels": labels[:n]}


rows = [process(r) for r in json.load(open(args.data, encoding="utf-8"))]
model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=32,
                                         lora_dropout=0.1, bias="none",
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
fields = inspect.signature(TrainingArguments.__init__).parameters
grouping = ({"group_by_length": True} if "group_by_length" in fields else
            {"train_sampling_strategy": "group_by_length"} if "train_sampling_strategy" in fields else {})
warmup = ({"warmup_ratio": 0.03} if "warmup_ratio" in fields else
          {"warmup_steps": math.ceil(0.03 * args.max_steps)})


class Log(TrainerCallback):
    def on_log(self, _args, state, _control, logs=None, **_):
        if logs and "loss" in logs:
            print(json.dumps({"step": state.global_step, "loss": logs["loss"]}), flush=True)


targs = TrainingArguments(**grouping, **warmup, output_dir="/tmp/hf_loss_curve", max_steps=args.max_steps,
                          per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.accum,
                          logging_steps=args.logging_steps, save_strategy="no", learning_rate=args.lr,
                          bf16=True, gradient_checkpointing=True,
                          gradient_checkpointing_kwargs={"use_reentrant": False}, optim="adamw_torch",
                          report_to="none", remove_unused_columns=False, lr_scheduler_type="cosine",
                          max_grad_norm=0.3, weight_decay=0.01, seed=42, disable_tqdm=True)
collate = DataCollatorForSeq2Seq(tokenizer=tok, padding=True, pad_to_multiple_of=8, return_tensors="pt")
Trainer(model=model, args=targs, train_dataset=rows, data_collator=collate, callbacks=[Log()]).train()
