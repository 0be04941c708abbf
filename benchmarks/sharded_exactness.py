"""Sharded attention with every shard read against dense attention: max |logit difference| over greedy decoding.

For each model (tiny random models of several families, and the default model) and dtype, decodes ``--steps``
greedy tokens from the same prompt twice in one run: with a plain ``DynamicCache`` (the model's own attention)
and with an ``ExpertShardedCache`` whose full-attention layers hold their tokens in ``--shards`` shards (key
clusters; decode tokens flushed to the shards as they come), read by pikvpress's attention, every shard
chosen, teacher-forced along the dense run's tokens. Prints the largest absolute logit difference over all
steps, the largest logit, and whether every step's greedy token is the same.

    python benchmarks/sharded_exactness.py
"""

from __future__ import annotations

import torch
from tqdm import tqdm
from transformers import DynamicCache

from pikvpress_eval.benchmark_cli import benchmark_parser, load_benchmark_model
from pikvpress import ExpertShardedCache, enable_packed_attention, tiny_model

TINY = ("llama", "qwen3_moe", "mixtral", "olmoe", "gpt_oss", "deepseek_v3")


@torch.no_grad()
def compare(model, ids: torch.Tensor, steps: int, shards: int) -> tuple[float, float, bool]:
    """(max |logit diff|, max |logit|, same greedy tokens) of sharded against dense decoding.

    The sharded run is teacher-forced along the dense run's tokens, so every step compares the two attentions on
    the same inputs even where a near-tie flips a greedy token (random bf16 models)."""
    enable_packed_attention(model)
    kwargs = {"max_new_tokens": steps, "min_new_tokens": steps, "do_sample": False}
    kwargs |= {"output_logits": True, "return_dict_in_generate": True}
    dense = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kwargs)
    cache = ExpertShardedCache(num_shards=shards, tail_length=8, flush_tokens=4, config=model.config)
    n = ids.shape[1]
    logits = [model(ids, past_key_values=cache).logits[:, -1]]
    for t in range(steps - 1):
        token = dense.sequences[:, n + t : n + t + 1]
        position = torch.full((ids.shape[0], 1), n + t)
        logits.append(model(token, past_key_values=cache, position_ids=position).logits[:, -1])
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(dense.logits, logits))
    scale = max(float(a.float().abs().max()) for a in dense.logits)
    same = all(bool(torch.equal(a.argmax(-1), b.argmax(-1))) for a, b in zip(dense.logits, logits))
    return diff, scale, same


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--context", type=int, default=512)
    args = parser.parse_args()
    rows = []
    cases = [(family, dtype) for family in TINY for dtype in (torch.float32, torch.bfloat16)]
    cases += [("default", torch.float32), ("default", torch.bfloat16)]
    default = None
    for family, dtype in tqdm(cases, desc="models"):
        if family == "default":
            if default is None:
                default = load_benchmark_model(args)
            model, tokenizer = default
            model = model.to(dtype)
            text = "The grass is green. The sky is blue. The sun is yellow. " * 200
            ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.context]
        else:
            model = tiny_model(family, dtype=dtype)
            ids = torch.randint(3, 259, (2, args.context), generator=torch.Generator().manual_seed(0))
        diff, scale, same = compare(model, ids, args.steps, args.shards)
        name = "SmolLM2-135M" if family == "default" else f"tiny {family}"
        rows.append((name, str(dtype).removeprefix("torch."), ids.shape[0], diff, scale, same))
    print(f"\n{args.shards} shards, every shard read; {args.context}-token prompt, {args.steps} greedy steps\n")
    print("| model | dtype | batch | max abs logit diff | max abs logit | same greedy tokens |")
    print("|---|---|---:|---:|---:|---|")
    for name, dtype, batch, diff, scale, same in rows:
        print(f"| {name} | {dtype} | {batch} | {diff:.2e} | {scale:.1f} | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
