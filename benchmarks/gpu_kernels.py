"""GPU checks and timings of the packed-KV Triton kernels (needs CUDA; prints why not otherwise).

1. correctness on the device: quantize / dequantize kernels and packed decode attention against their
   pure-torch references on fresh random inputs;
2. quantize kernel bandwidth (bytes read + written per second) against the device's measured copy
   bandwidth (``x.clone()`` of the same tensor);
3. packed int4 decode attention (Triton, split along the sequence) against bf16 SDPA on the dense
   cache, 16k-128k tokens, one decode query, 32 query heads over 8 kv heads of dim 128;
4. sharded attention (8 shards of a ShardedKVLayer, dense bf16 or packed int4, every shard or the best 2
   read) on the same shapes: its error against float32 dense attention over the stored tokens, its time
   against bf16 SDPA over the dense cache, and the bytes it read.

    python benchmarks/gpu_kernels.py
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from tabulate import tabulate

from pikvpress.kernels.attention import (
    merge_partials,
    packed_attention_split_partials,
    packed_attention_split_partials_reference,
    programs_per_split,
)
from pikvpress.kernels.quantize import (
    dequantize,
    dequantize_reference,
    quantize_keys,
    quantize_keys_reference,
    quantize_values,
    quantize_values_reference,
)


def cuda_time(fn, iters: int = 50) -> float:
    """Median seconds per call, CUDA events."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def check_correctness() -> list[list]:
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    for bits in (8, 4, 2):
        k = torch.randn(2, 4, 1000 + 24, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
        v = torch.randn(2, 4, 1024, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
        kq, vq = quantize_keys(k, bits, 128), quantize_values(v, bits, 64)
        kr, vr = quantize_keys_reference(k, bits, 128), quantize_values_reference(v, bits, 64)
        same_bytes = torch.equal(kq.packed, kr.packed) and torch.equal(vq.packed, vr.packed)
        deq = (dequantize(kq, torch.float32) - dequantize_reference(kr, torch.float32)).abs().max().item()
        q = torch.randn(2, 16, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
        out, lse = packed_attention_split_partials(q, kq, vq, 128**-0.5, 4)
        ref_out, ref_lse = packed_attention_split_partials_reference(q, kq, vq, 128**-0.5, 4)
        err = (out - ref_out).abs().max().item()
        lerr = (lse - ref_lse).abs().max().item()
        ok = same_bytes and deq < 1e-6 and err < 1e-3 and lerr < 1e-3
        rows.append([f"int{bits}", same_bytes, f"{deq:.1e}", f"{err:.1e}", f"{lerr:.1e}", "ok" if ok else "FAIL"])
    return rows


def bandwidth() -> list[list]:
    rows = []
    x = torch.randn(1, 8, 131072, 128, device="cuda", dtype=torch.bfloat16)
    copy_s = cuda_time(lambda: x.clone())
    copy_bw = 2 * x.numel() * x.element_size() / copy_s
    for bits in (8, 4, 2):
        for name, fn in (
            ("keys", lambda bits=bits: quantize_keys(x, bits, 128)),
            ("values", lambda bits=bits: quantize_values(x, bits, 64)),
        ):
            qt = fn()
            moved = x.numel() * x.element_size() + qt.nbytes
            s = cuda_time(fn)
            bw = moved / s
            rows.append(
                [
                    f"int{bits} {name}",
                    f"{s * 1e6:.0f}",
                    f"{bw / 1e9:.0f}",
                    f"{copy_bw / 1e9:.0f}",
                    f"{bw / copy_bw:.0%}",
                ]
            )
    return rows


def decode(lengths: list[int]) -> list[list]:
    rows = []
    hq, hkv, d = 32, 8, 128
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for t in lengths:
        k = torch.randn(1, hkv, t, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, hkv, t, d, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(1, hq, d, device="cuda", dtype=torch.bfloat16)
        kq, vq = quantize_keys(k, 4, 128), quantize_values(v, 4, 64)
        programs = programs_per_split(1, hq, hkv, d, d)
        splits = max(1, min(-(-2 * sms // programs), t // 256))

        def packed(q=q, kq=kq, vq=vq, splits=splits):
            out, lse = packed_attention_split_partials(q, kq, vq, d**-0.5, splits)
            return merge_partials(out, lse, dim=2)

        def dense(q=q, k=k, v=v):
            return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True)

        tp, td = cuda_time(packed), cuda_time(dense)
        rows.append([t, splits, f"{td * 1e6:.0f}", f"{tp * 1e6:.0f}", f"{td / tp:.2f}x"])
    return rows


def sharded(lengths: list[int]) -> list[list]:
    from torch import nn

    from pikvpress.attention import sharded_layer_attention
    from pikvpress.cache import ShardedKVLayer

    rows = []
    hq, hkv, d = 32, 8, 128
    int4 = {"bits": 4, "group_size": 64, "key_group_size": 128, "stats_dtype": torch.bfloat16}
    for t in lengths:
        k = torch.randn(1, hkv, t, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, hkv, t, d, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(1, hq, 1, d, device="cuda", dtype=torch.bfloat16)
        sdpa = cuda_time(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        for packing, top_k in ((None, None), (None, 2), (int4, None), (int4, 2)):
            layer = ShardedKVLayer(num_shards=8, top_k_shards=top_k, tail_length=64, packing=packing)
            layer.update(k, v)
            layer.distribute()

            def attend(layer=layer, q=q):
                return sharded_layer_attention(
                    nn.Module(), q, layer.tail_keys, layer.tail_values, None, layer, scaling=d**-0.5
                )

            err = ""
            if top_k is None:
                keys, values = layer.dequantized()
                ref = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), enable_gqa=True)
                err = f"{(attend().float() - ref.transpose(1, 2)).abs().max().item():.1e}"
            seconds = cuda_time(attend, iters=20)
            rows.append(
                [
                    t,
                    "int4" if packing else "bf16",
                    top_k or 8,
                    err,
                    f"{sdpa * 1e6:.0f}",
                    f"{seconds * 1e6:.0f}",
                    f"{layer.bytes_read / 2**20:.1f}",
                ]
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmarks need one (CPU runs use the pure-torch paths)")
        return 0
    print(f"device: {torch.cuda.get_device_name(0)}")
    print("\nCorrectness on the device (fresh random inputs)")
    rows = check_correctness()
    print(
        tabulate(
            rows,
            headers=["bits", "packed bytes == ref", "dequant err", "attn out err", "lse err", ""],
            tablefmt="github",
        )
    )
    print("\nQuantize kernel bandwidth, bf16 (1, 8, 131072, 128)")
    print(tabulate(bandwidth(), headers=["kernel", "us", "GB/s", "copy GB/s", "of copy"], tablefmt="github"))
    print("\nDecode attention, 1 query, 32 q heads / 8 kv heads x 128: bf16 SDPA vs packed int4 (Triton)")
    print(
        tabulate(
            decode(args.lengths),
            headers=["tokens", "splits", "SDPA us", "packed int4 us", "speed-up"],
            tablefmt="github",
        )
    )
    print("\nSharded attention, 8 shards, 1 query, 32 q heads / 8 kv heads x 128 (error only with every shard read)")
    print(
        tabulate(
            sharded(args.lengths),
            headers=["tokens", "shards", "read", "max err vs fp32", "SDPA us", "sharded us", "MiB read"],
            tablefmt="github",
        )
    )
    return 1 if any(r[-1] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
