#!/usr/bin/env python3
"""Whether an upload from pageable host memory makes the host wait for the GPU's queue.

The pipelined schedule (runtime/src/train/engine.rs `window_pipelined`) keeps several GPUs busy
only while the host never waits for one of them; the engine's per-pass uploads (label chunks,
attention lengths, position indices) come from pageable memory. Run on the GPU machine:
  python3 benches/h2d_probe.py
2026-12-02, H200, CUDA 13 driver 580: uploads of up to 1 MiB returned in 0.1-0.3 ms while
~64 ms of products were queued; a 4 MiB upload waited for the queue (64.7 ms).
"""
import torch, time
a = torch.randn(8192, 8192, device='cuda')
torch.cuda.synchronize()
for n in [1024, 16384, 65536, 262144, 1 << 20, 4 << 20]:
    h = torch.ones(n // 4, dtype=torch.float32)  # pageable host memory
    for _ in range(3):
        b = a @ a
    t = time.perf_counter(); d = h.to('cuda', non_blocking=True); dt = time.perf_counter() - t
    t = time.perf_counter(); torch.cuda.synchronize(); rest = time.perf_counter() - t
    print(f"{n:>8} bytes: upload returned after {dt*1e3:.3f} ms, the queue drained {rest*1e3:.1f} ms later", flush=True)
