"""Goldens for 8-bit AdamW (`optim: "adamw_8bit"`): bitsandbytes' `AdamW8bit` (its CPU backend)
over a tensor of 8-bit states (5,000 elements: 19 blocks of 256 and one of 136) and one under
`min_8bit_size` (f32 states), five steps of fixed gradients, weight decay on the first only.
Writes tests/fixtures/bnb8/adamw8bit.safetensors: the code books, the initial parameters, each
step's gradients, and after each step the parameters and states.

    python scripts/make_bnb8_goldens.py   # torch, bitsandbytes 0.50 (CPU is enough)
"""

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch
from safetensors.torch import save_file

torch.manual_seed(0)
big = torch.nn.Parameter(torch.randn(50, 100) * 0.5)
small = torch.nn.Parameter(torch.randn(300) * 0.5)
out = {
    "map_signed": F.create_dynamic_map(signed=True),
    "map_unsigned": F.create_dynamic_map(signed=False),
    "big.init": big.detach().clone(),
    "small.init": small.detach().clone(),
}
opt = bnb.optim.AdamW8bit(
    [{"params": [big], "weight_decay": 0.1}, {"params": [small], "weight_decay": 0.0}],
    lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
)
for step in range(5):
    # Gradients of mixed scales, so blocks' absmax differ.
    gb = torch.randn(50, 100) * torch.linspace(0.01, 2.0, 5000).reshape(50, 100)
    gs = torch.randn(300) * 0.3
    out[f"big.grad.{step}"] = gb
    out[f"small.grad.{step}"] = gs
    big.grad, small.grad = gb.clone(), gs.clone()
    opt.step()
    # Each step's parameters and states, so a test can take one step from bitsandbytes' own.
    st = opt.state[big]
    out[f"big.after.{step}"] = big.detach().clone()
    out[f"small.after.{step}"] = small.detach().clone()
    for k in ("state1", "state2", "absmax1", "absmax2"):
        out[f"big.{k}.{step}"] = st[k].clone()
    for k in ("state1", "state2"):
        out[f"small.{k}.{step}"] = opt.state[small][k].clone()
sb, ss = opt.state[big], opt.state[small]
assert sb["state1"].dtype == torch.uint8 and ss["state1"].dtype == torch.float32
out.update({
    "big.final": big.detach().clone(),
    "small.final": small.detach().clone(),
    "big.state1": sb["state1"].clone(),
    "big.state2": sb["state2"].clone(),
    "big.absmax1": sb["absmax1"].clone(),
    "big.absmax2": sb["absmax2"].clone(),
    "small.state1": ss["state1"].clone(),
    "small.state2": ss["state2"].clone(),
})
save_file({k: v.contiguous() for k, v in out.items()}, "tests/fixtures/bnb8/adamw8bit.safetensors")
print("wrote tests/fixtures/bnb8/adamw8bit.safetensors", bnb.__version__)
