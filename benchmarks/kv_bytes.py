"""Bytes per token per layer of the packed KV cache against bf16, read from the tensors.

Builds a :class:`pikvpress.cache.PackedKVLayer` from random bf16 keys and values of a model's
geometry (batch 1) at several context lengths and reports ``layer.nbytes`` (packed codes, scales,
zero points and the full-precision residual) divided by the bf16 bytes of the same tokens. The
"packed only" column leaves the residual out: the cost of a packed token, scales and zeros included.

    python benchmarks/kv_bytes.py                      # SmolLM2-135M geometry (3 kv heads x 64)
    python benchmarks/kv_bytes.py --kv-heads 4 --head-dim 128
"""

from __future__ import annotations

import argparse

import torch
from tabulate import tabulate

from pikvpress.cache import PackedKVLayer

TARGETS = {8: 0.53, 4: 0.28, 2: 0.16}


def measure(
    bits: int, tokens: int, kv_heads: int, head_dim: int, group_size: int, key_group_size: int, residual_length: int
) -> tuple[float, float]:
    """(whole layer / bf16, packed part per token / bf16 per token)."""
    gen = torch.Generator().manual_seed(tokens + bits)
    k = torch.randn(1, kv_heads, tokens, head_dim, generator=gen).to(torch.bfloat16)
    v = torch.randn(1, kv_heads, tokens, head_dim, generator=gen).to(torch.bfloat16)
    layer = PackedKVLayer.from_dense(
        k,
        v,
        bits=bits,
        group_size=group_size,
        key_group_size=key_group_size,
        residual_length=residual_length,
        stats_dtype=torch.bfloat16,
    )
    dense_per_token = 2 * kv_heads * head_dim * 2  # keys + values, bf16
    packed_bytes = layer.packed_keys.nbytes + layer.packed_values.nbytes if layer.packed_keys is not None else 0
    per_packed_token = packed_bytes / max(1, layer.packed_length) / dense_per_token
    return layer.nbytes / (tokens * dense_per_token), per_packed_token


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--key-group-size", type=int, default=128)
    parser.add_argument("--residual-length", type=int, default=128)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    args = parser.parse_args(argv)
    rows = []
    for bits in (8, 4, 2):
        row = [f"int{bits}", f"<= {TARGETS[bits]:.2f}x"]
        per_token = None
        for tokens in args.tokens:
            whole, per_token = measure(
                bits, tokens, args.kv_heads, args.head_dim, args.group_size, args.key_group_size, args.residual_length
            )
            row.append(f"{whole:.3f}x")
        row.append(f"{per_token:.3f}x")
        rows.append(row)
    headers = ["bits", "target", *[f"{t} tokens" for t in args.tokens], "packed token"]
    print(
        f"KV bytes per token per layer vs bf16 ({args.kv_heads} kv heads x {args.head_dim}, value groups "
        f"{args.group_size} channels, key groups {args.key_group_size} tokens, bf16 scales+zeros, residual "
        f"{args.residual_length} tokens in bf16 counted)"
    )
    print(tabulate(rows, headers=headers, tablefmt="github"))


if __name__ == "__main__":
    main()
