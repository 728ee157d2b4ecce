#!/usr/bin/env python3
"""Where the peer's GPU time goes: runs ../shared/bench/hf_peft_lora.py (same arguments) under
torch.profiler and prints its CUDA kernels by total time (a measurement aid, never a speed figure:
the profiler slows the run down).

  python3 benches/peer_profile.py PEER_DIR/hf_peft_lora.py --model qwen1.5-7b --load-model DIR ...
"""
import runpy
import sys

import torch
from torch.profiler import ProfilerActivity, profile

script = sys.argv[1]
sys.argv = sys.argv[1:]
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit:
        pass
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))
