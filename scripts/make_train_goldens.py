#!/usr/bin/env python3
"""Golden numbers for the trainer: transformers' LR schedules, torch's clip_grad_norm_ and AdamW.

  python3 scripts/make_train_goldens.py > tests/fixtures/train_goldens.json
"""
import json
import torch
from transformers import get_scheduler

out = {"torch": torch.__version__, "schedules": {}}
for name in ["linear", "cosine", "constant", "constant_with_warmup"]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    s = get_scheduler(name, opt, num_warmup_steps=3, num_training_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(s.get_last_lr()[0])
        opt.step(); s.step()
    out["schedules"][name] = lrs
a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
a.grad, b.grad = torch.tensor([3.0, -1.5]), torch.tensor([4.0, 0.25, -2.0])
norm = torch.nn.utils.clip_grad_norm_([a, b], max_norm=1.0)
out["clip"] = {"grads": [[3.0, -1.5], [4.0, 0.25, -2.0]], "max_norm": 1.0, "norm": norm.item(),
               "clipped": [a.grad.tolist(), b.grad.tolist()]}
w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
opt = torch.optim.AdamW([w], lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
steps = []
for g in ([0.5, -0.25, 0.0], [0.1, 0.3, -0.2], [-0.4, 0.05, 0.6]):
    w.grad = torch.tensor(g)
    opt.step()
    steps.append({"grad": g, "param": w.detach().tolist()})
out["adamw"] = {"lr": 0.01, "weight_decay": 0.1, "init": [1.0, -2.0, 0.5], "steps": steps}
print(json.dumps(out, indent=1))
