#!/usr/bin/env python3
"""The multi-GPU peers: HF transformers + PEFT trained over several GPUs, the two ways users do.

  torchrun --nproc-per-node N hf_multi_gpu.py --load-model DIR ...   # DDP, one process a GPU
  python3 hf_multi_gpu.py --device-map auto --load-model DIR ...     # accelerate's device_map:
                                                                     # the layers over the GPUs,
                                                                     # one GPU working at a time

DIR is a random-weight checkpoint written by ../shared/bench/hf_peft_lora.py --save-model (the
same weights qscript loads). LoRA as there (r=8, alpha=32, dropout 0.1, q/k/v/o), or --full.
Each optimizer step is --accum micro-batches of --batch rows of --seq random tokens per rank
(DDP syncs gradients on the last micro-batch only, as HF Trainer does). Prints one JSON line
(rank 0): tokens/s over all ranks, step time, the peak memory torch saw on each GPU.
"""
import argparse
import json
import os
import time

ap = argparse.ArgumentParser()
ap.add_argument("--load-model", required=True)
ap.add_argument("--seq", type=int, default=512)
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--accum", type=int, default=1)
ap.add_argument("--steps", type=int, default=6)
ap.add_argument("--warmup", type=int, default=2)
ap.add_argument("--grad-ckpt", action="store_true")
ap.add_argument("--full", action="store_true")
ap.add_argument("--device-map", default=None, help="auto: accelerate's placement over the GPUs")
args = ap.parse_args()

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ranks = int(os.environ.get("WORLD_SIZE", "1"))
rank = int(os.environ.get("RANK", "0"))
local = int(os.environ.get("LOCAL_RANK", "0"))
if ranks > 1:
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
dev = torch.device("cuda", local)

if args.device_map:
    model = AutoModelForCausalLM.from_pretrained(args.load_model, dtype=torch.bfloat16,
                                                 device_map=args.device_map,
                                                 attn_implementation="sdpa")
    first = next(model.parameters()).device
else:
    model = AutoModelForCausalLM.from_pretrained(args.load_model, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").to(dev)
    first = dev
model.config.use_cache = False
if args.grad_ckpt:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
if not args.full:
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=32,
                                             lora_dropout=0.1, bias="none",
                                             target_modules=["q_proj", "k_proj", "v_proj",
                                                             "o_proj"]))
model.train()
trainable = [p for p in model.parameters() if p.requires_grad]
if ranks > 1:
    model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local])
opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)
vocab = (model.module if ranks > 1 else model).config.vocab_size

g = torch.Generator(device="cpu").manual_seed(rank)
batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(first)
           for _ in range(4)]


def step(i):
    loss = None
    for k in range(args.accum):
        ids = batches[(i * args.accum + k) % len(batches)]
        last = k == args.accum - 1
        ctx = model.no_sync() if ranks > 1 and not last else torch.enable_grad()
        with ctx:
            out = model(input_ids=ids, labels=ids)
            (out.loss / args.accum).backward()
        loss = out.loss
    torch.nn.utils.clip_grad_norm_(trainable, 0.3)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def sync_all():
    for d in range(torch.cuda.device_count()):
        torch.cuda.synchronize(d)


for i in range(args.warmup):
    step(i)
sync_all()
if ranks > 1:
    dist.barrier()
for d in range(torch.cuda.device_count()):
    torch.cuda.reset_peak_memory_stats(d)
t0 = time.perf_counter()
for i in range(args.steps):
    loss = step(i)
sync_all()
if ranks > 1:
    dist.barrier()
dt = (time.perf_counter() - t0) / args.steps
tokens = args.batch * args.seq * args.accum * ranks
if rank == 0:
    peaks = [round(torch.cuda.max_memory_allocated(d) / 2**30, 2)
             for d in range(torch.cuda.device_count())]
    print(json.dumps({
        "system": ("hf-full" if args.full else "hf-peft") + ("-ddp" if ranks > 1 else "")
        + ("-device-map" if args.device_map else ""),
        "ranks": ranks, "seq": args.seq, "batch": args.batch, "accum": args.accum,
        "grad_ckpt": args.grad_ckpt, "step_ms": round(dt * 1000, 2),
        "tokens_per_s": round(tokens / dt, 1), "peak_mem_gib_per_gpu": peaks,
        "loss": round(float(loss), 4), "torch": torch.__version__,
    }), flush=True)
if ranks > 1:
    dist.destroy_process_group()
