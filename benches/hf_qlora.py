"""The QLoRA peer (issue 27): HF transformers + PEFT + bitsandbytes, the way its docs set up a
4-bit LoRA run: BitsAndBytesConfig(nf4, double quantization, bf16 compute),
prepare_model_for_kbit_training (with gradient checkpointing when asked), LoRA on the given
modules; AdamW lr 1e-4, weight decay 0.01, clipping at 0.3, random rows of exactly --seq tokens
with labels = ids, as ../shared/bench/hf_peft_lora.py trains. --liger patches Qwen2 with
Liger-Kernel's layers first (its fused linear cross-entropy included). --bf16 leaves the base in
bf16 (plain HF + PEFT LoRA, the long-sequence peer of issue 22). Prints one JSON line.

  python3 benches/hf_qlora.py --load-model DIR --batch 2 --seq 512 --rank 16 --targets all --grad-ckpt
"""
import argparse
import json
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--load-model", required=True)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--targets", default="all", help="all (every linear layer) or q_proj,k_proj,...")
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--liger", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="no quantization: LoRA on the bf16 base")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if args.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2
        apply_liger_kernel_to_qwen2()
    torch.manual_seed(0)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(args.load_model,
                                                 quantization_config=None if args.bf16 else bnb,
                                                 dtype=torch.bfloat16, device_map={"": 0},
                                                 attn_implementation="sdpa")
    cfg = model.config
    if args.bf16:
        if args.grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    else:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=args.grad_ckpt,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
               if args.targets == "all" else args.targets.split(","))
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=args.rank, lora_alpha=args.alpha,
                                             lora_dropout=args.dropout, target_modules=targets,
                                             bias="none"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)
    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(dev)
               for _ in range(4)]

    def step(i):
        ids = batches[i % len(batches)]
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    for i in range(args.warmup):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loss = None
    for i in range(args.steps):
        loss = step(i)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    tokens = args.batch * args.seq
    print(json.dumps({
        "system": ("hf-lora" if args.bf16 else "hf-qlora") + ("-liger" if args.liger else ""),
        "seq": args.seq,
        "batch": args.batch, "rank": args.rank, "targets": args.targets, "grad_ckpt": args.grad_ckpt,
        "step_ms": round(dt * 1000, 2), "tokens_per_s": round(tokens / dt, 1),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "loss": round(float(loss), 4), "torch": torch.__version__,
    }), flush=True)


if __name__ == "__main__":
    sys.exit(main())
