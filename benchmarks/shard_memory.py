"""KV bytes each rank holds as the shards spread over 1, 2, 4 torch.distributed ranks (gloo on CPU).

For each world size W, launches ``torchrun --nproc_per_node=W`` on this script; every rank loads the default
model, prefills a ``--context``-token prompt under ``PiKVPress(sharding={"num_shards": --shards}, process_group="default")``
(with ``--budget N``, also ``scheduling=AdaptiveSchedulingPress(budget=N)``: every rank evicts inside its own
shards) and decodes ``--steps`` greedy tokens. Each rank reports the bytes it holds (its shards, the replicated
tail and shard summaries, from the tensors), the bytes it contributed to the collectives per decode step
((output, lse), and with a scheduler its statistics and kept indices), the decode step time, its peak resident
memory and the tokens it generated. The driver prints one row per world size, measured in one run, with whether
the ranks generated the tokens one rank did.

    python benchmarks/shard_memory.py                      # W = 1, 2, 4; 4096-token context, 8 shards
    python benchmarks/shard_memory.py --budget 1024 --steps 32   # the same, evicting down to 1024 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 2**20


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from transformers import DynamicCache

    from pikvpress_eval.benchmark_cli import load_benchmark_model
    from pikvpress import AdaptiveSchedulingPress, PiKVPress
    from pikvpress.cache import ShardedKVLayer, cache_nbytes

    torch.set_num_threads(max(1, args.threads // int(os.environ["WORLD_SIZE"])))
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, tokenizer = load_benchmark_model(argparse.Namespace(model=args.model, threads=None))
    text = Path(args.text).read_text() if args.text else "The grass is green. The sky is blue. " * 2000
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.context]
    scheduling = None if args.budget is None else AdaptiveSchedulingPress(budget=args.budget)
    press = PiKVPress(
        scheduling=scheduling, process_group="default", sharding={"num_shards": args.shards, "tail_length": 32}
    )
    cache = DynamicCache(config=model.config)
    step_times = []

    def timer(module, a, kw, out):
        step_times.append(time.perf_counter())

    handle = model.register_forward_hook(timer, with_kwargs=True)
    with torch.no_grad(), press(model):
        press.group.reset_counters()
        out = model.generate(
            ids, past_key_values=cache, max_new_tokens=args.steps, min_new_tokens=args.steps, do_sample=False
        )
    handle.remove()
    layers = [layer for layer in cache.layers if isinstance(layer, ShardedKVLayer)]
    shard_bytes = sum(shard.nbytes for layer in layers for _, shard in layer.local_shards)
    steps = len(step_times) - 1
    report = {
        "rank": rank,
        "kv_bytes": cache_nbytes(cache),
        "shard_bytes": shard_bytes,
        "replicated_bytes": cache_nbytes(cache) - shard_bytes,
        "payload_per_step": press.group.payload_bytes / steps,
        "collectives_per_step": press.group.collectives / steps,
        "ms_per_step": 1000 * (step_times[-1] - step_times[0]) / steps,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "context": ids.shape[1],
        "cache_length": max(layer.get_seq_length() for layer in layers),
        "tokens": out[0, ids.shape[1] :].tolist(),
    }
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--budget", type=int, default=None, help="evict while decoding, down to this many tokens")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads, split over the ranks")
    parser.add_argument("--model", default=None)
    parser.add_argument("--text", default=None, help="a text file for the prompt (default: a repeated sentence)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
            cmd += [__file__, "--worker", "--out", out, "--context", str(args.context), "--shards", str(args.shards)]
            cmd += ["--steps", str(args.steps), "--threads", str(args.threads)]
            cmd += ["--budget", str(args.budget)] if args.budget else []
            cmd += ["--model", args.model] if args.model else []
            cmd += ["--text", args.text] if args.text else []
            env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
            subprocess.run(cmd, check=True, env=env)
            reports = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
        rows.append((world, reports))
    context = rows[0][1][0]["context"]
    scheduler = "" if args.budget is None else f", evicting down to {args.budget} tokens per layer"
    print(f"\n{context}-token context, {args.shards} shards per layer, {args.steps} decode steps{scheduler}\n")
    print(
        "| ranks | KV held per rank (max) | of which shards | replicated tail + summaries | sent per step "
        "| ms / step | peak RSS per rank | cache length | tokens as 1 rank |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    reference = rows[0][1][0]["tokens"]
    for world, reports in rows:
        worst = max(reports, key=lambda r: r["kv_bytes"])
        print(
            f"| {world} | {worst['kv_bytes'] / MIB:.1f} MiB | {worst['shard_bytes'] / MIB:.1f} MiB "
            f"| {worst['replicated_bytes'] / MIB:.2f} MiB | {worst['payload_per_step'] / 1024:.1f} KiB "
            f"| {max(r['ms_per_step'] for r in reports):.0f} | {max(r['peak_rss'] for r in reports) / MIB:.0f} MiB "
            f"| {worst['cache_length']} | {'same' if all(r['tokens'] == reference for r in reports) else 'differ'} |"
        )


if __name__ == "__main__":
    main()
