"""The serving benchmark's client (issue 24), standard library only: against a running
`qscript serve`, one client's greedy decode rate (128 new tokens) beside the memory-bandwidth
limit (the weights' bytes read once a token), then N concurrent streaming clients (256 new tokens
each): aggregate tokens/s and time to first token. Prints one JSON line per measure."""

import argparse
import json
import os
import statistics
import subprocess
import threading
import time
import urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("url")
ap.add_argument("--model", default="m")
ap.add_argument("--weights", help="model dir: its safetensors bytes give the bandwidth limit")
ap.add_argument("--clients", type=int, default=32)
ap.add_argument("--single-tokens", type=int, default=128)
ap.add_argument("--tokens", type=int, default=256)
ap.add_argument("--one-client", action="store_true", help="the one-client measure only")
args = ap.parse_args()

WORDS = "the quick brown fox jumps over a lazy dog while seven wise owls watch from an old oak tree".split()


def prompt(i, n=32):
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


def stream(i, n):
    body = {"model": args.model, "prompt": prompt(i), "max_tokens": n, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(args.url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            c = json.loads(data)
            now = time.perf_counter()
            if c.get("usage"):
                tokens = c["usage"]["completion_tokens"]
                continue
            if first is None:
                first = now
            last = now
    return {"ttft": first - t0, "decode_s": last - first, "tokens": tokens, "start": t0, "end": last}


def gpu_bandwidth():
    name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip().splitlines()[0]
    # HBM peak bandwidth of the cards the device machine lends.
    return name, 4.8e12 if "H200" in name else 3.35e12


stream(0, 8)  # warm-up
stream(1, 8)
single = [stream(100 + k, args.single_tokens) for k in range(3)]
rate = statistics.median((s["tokens"] - 1) / s["decode_s"] for s in single)
rec = {"measure": "serve-one-client", "new_tokens": args.single_tokens, "tokens_per_s": round(rate, 1),
       "ttft_s": round(statistics.median(s["ttft"] for s in single), 4)}
if args.weights:
    wbytes = sum(os.path.getsize(os.path.join(args.weights, f))
                 for f in os.listdir(args.weights) if f.endswith(".safetensors"))
    name, bw = gpu_bandwidth()
    limit = bw / wbytes
    rec.update({"gpu": name, "weights_gib": round(wbytes / 2**30, 2),
                "bandwidth_limit_tokens_per_s": round(limit, 1), "of_limit": round(rate / limit, 3)})
print(json.dumps(rec), flush=True)
if args.one_client:
    raise SystemExit(0)

results = [None] * args.clients
barrier = threading.Barrier(args.clients)


def client(i):
    barrier.wait()
    results[i] = stream(200 + i, args.tokens)


threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
wall = max(r["end"] for r in results) - min(r["start"] for r in results)
total = sum(r["tokens"] for r in results)
ttfts = sorted(r["ttft"] for r in results)
p99 = ttfts[min(len(ttfts) - 1, int(round(0.99 * (len(ttfts) - 1))))]
print(json.dumps({"measure": "serve-concurrent", "clients": args.clients, "new_tokens": args.tokens,
                  "aggregate_tokens_per_s": round(total / wall, 1),
                  "vs_one_client": round(total / wall / rate, 2),
                  "ttft_p50_s": round(ttfts[len(ttfts) // 2], 3), "ttft_p99_s": round(p99, 3)}), flush=True)
