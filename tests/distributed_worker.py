"""One rank of the multi-process tests in test_distributed.py (launched by torchrun, or with RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT set by the test).

Every rank builds the same tiny MoE model, decodes ``--new-tokens`` greedy tokens single-process with a dense
cache (the reference), then again with PiKVPress sharding the cache over the process group (gloo on CPU; with
``--backend nccl``, one GPU per rank: ``torchrun --nproc_per_node=2 tests/distributed_worker.py --out DIR
--backend nccl``), and writes what it saw
to ``<out>/rank<r>.json``: the largest logit difference to the reference, the generated tokens, the bytes this
rank contributed to collectives per decode step, the collectives per step, and the bytes it holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
from transformers import DynamicCache

from pikvpress import tiny_model
from pikvpress.cache import ShardedKVLayer, cache_nbytes
from pikvpress.presses import ExpertRoutingPress, PiKVPress, QuantizationPress

#: the scheduler of ``--scheduling``: from the 96-token context it evicts at the first decode step, then every 8
SCHEDULING = {"budget": 64, "interval": 8, "sink_tokens": 4, "recent_window": 8}


def pipeline_answers(args) -> dict:
    """kvpress's pipeline with two questions (the first answer is cropped off the cache before the second), dense
    on this rank alone and sharded over the group; the sharded cache's tail is short, so the question and answer
    flush to the shards and every crop takes tokens back from the shards of every rank."""
    from kvpress import PrefillDecodingPress
    from transformers import pipeline

    from pikvpress import tiny_tokenizer

    model = tiny_model(args.family)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tiny_tokenizer(), device="cpu")
    context = "The quick brown fox jumps over the lazy dog. " * 6
    questions = ["Who jumps over the dog, and what colour is the fox?", "Over what does the quick fox jump?"]

    def press(**where):  # with a scheduler, the press runs on both sides of a PrefillDecodingPress (as the harness)
        scheduling = {"budget": 40, "interval": 4, "sink_tokens": 2, "recent_window": 4} if args.scheduling else None
        pikv = PiKVPress(
            scheduling=scheduling, **where, sharding={"num_shards": args.shards, "tail_length": 2, "flush_tokens": 1}
        )
        return PrefillDecodingPress(prefilling_press=pikv, decoding_press=pikv) if args.scheduling else pikv

    if args.scheduling:
        questions = questions[:1]  # kvpress runs a decoding press for one question at a time
    # the reference: dense on this rank alone, or with a scheduler the same press with every shard on this rank
    reference = {"press": press()} if args.scheduling else {}
    dense = pipe(context, questions=questions, max_new_tokens=args.new_tokens, **reference)["answers"]
    cache = DynamicCache()
    sharded = pipe(
        context, questions=questions, press=press(process_group="default"), max_new_tokens=args.new_tokens, cache=cache
    )["answers"]
    context_len = len(pipe.preprocess(context, [""], "", 10**6)["context_ids"][0])
    return {
        "answers": sharded,
        "dense_answers": dense,
        "context_len": context_len,
        "cache_lengths": [layer.get_seq_length() for layer in cache.layers],
        "sharded_lengths": [getattr(layer, "sharded_length", -1) for layer in cache.layers],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--family", default="qwen3_moe")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--context", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--routing", action="store_true")
    parser.add_argument("--packed", action="store_true")
    parser.add_argument("--scheduling", action="store_true", help="evict while decoding; the reference is sharded too")
    parser.add_argument("--die-at-step", type=int, default=-1, help="rank 1 exits at this decode step")
    parser.add_argument("--mismatch", action="store_true", help="rank 1 asks for a different num_shards")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--pipeline", action="store_true", help="kvpress's pipeline, two questions, instead")
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"], help="nccl: one GPU per rank")
    args = parser.parse_args()

    torch.set_num_threads(1)
    if args.backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=max(args.timeout, 10)))
    rank = dist.get_rank()
    result: dict = {"rank": rank, "world_size": dist.get_world_size()}
    try:
        result |= pipeline_answers(args) if args.pipeline else decode_report(args, rank)
    except Exception as error:  # noqa: BLE001 - reported to the test, which checks the message
        result["error"] = f"{type(error).__name__}: {error}"
        result["traceback"] = traceback.format_exc()
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if "error" not in result:
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0 if "error" not in result else 1)


def decode_report(args, rank: int) -> dict:
    """Greedy decoding dense on this rank alone, then sharded over the group: what the test checks."""
    device = f"cuda:{torch.cuda.current_device()}" if args.backend == "nccl" else "cpu"
    model = tiny_model(args.family).to(device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.context), generator=gen).to(device)
    kwargs = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False}
    kwargs |= {"output_logits": True, "return_dict_in_generate": True}
    routing = ExpertRoutingPress(compression_ratio=0.5, router="gate", num_experts=4, window_size=8)
    shards = args.shards * 2 if args.mismatch and rank == 1 else args.shards

    def sharded_press(**where) -> PiKVPress:  # fresh component presses each time
        return PiKVPress(
            routing=dataclasses.replace(routing) if args.routing else None,
            compression=QuantizationPress(bits=8, group_size=4, key_group_size=8) if args.packed else None,
            scheduling=SCHEDULING if args.scheduling else None,
            timeout=args.timeout,
            **where,
            sharding={"num_shards": shards, "tail_length": 4, "flush_tokens": 1},
        )

    reference_cache = DynamicCache(config=model.config)
    if args.scheduling:  # the reference: the same press with every shard in this process
        with torch.no_grad(), sharded_press()(model):
            dense = model.generate(ids, past_key_values=reference_cache, **kwargs)
    elif args.routing:
        with torch.no_grad(), dataclasses.replace(routing)(model):  # a fresh press with the same fields
            dense = model.generate(ids, past_key_values=reference_cache, **kwargs)
    else:
        with torch.no_grad():
            dense = model.generate(ids, past_key_values=reference_cache, **kwargs)
    press = sharded_press(process_group="default")
    steps = {"n": 0}

    def count_steps(module, args_, kwargs_, output):
        if kwargs_["hidden_states"].shape[1] == 1:
            steps["n"] += 1
            if steps["n"] == args.die_at_step and rank == 1:
                os._exit(3)  # a rank dies mid-decode

    first = model.model.layers[0].self_attn
    handle = first.register_forward_hook(count_steps, with_kwargs=True)
    cache = DynamicCache(config=model.config)
    try:
        with torch.no_grad(), press(model):
            press.group.reset_counters()
            sharded = model.generate(ids, past_key_values=cache, **kwargs)
    finally:
        handle.remove()
    diff = max(float((a - b).abs().max()) for a, b in zip(dense.logits, sharded.logits))
    layers = [layer for layer in cache.layers if isinstance(layer, ShardedKVLayer)]
    return {
        "max_logit_diff": diff,
        "tokens": sharded.sequences[:, args.context :].tolist(),
        "dense_tokens": dense.sequences[:, args.context :].tolist(),
        "decode_steps": steps["n"],
        "payload_bytes_per_step": press.group.payload_bytes / max(1, steps["n"]),
        "collectives_per_step": press.group.collectives / max(1, steps["n"]),
        "sharded_layers": len(layers),
        "local_shards": [len(layer.local_shards) for layer in layers],
        "cache_nbytes": cache_nbytes(cache),
        "cache_lengths": [layer.get_seq_length() for layer in cache.layers],
        "reference_cache_lengths": [layer.get_seq_length() for layer in reference_cache.layers],
        "heads": model.config.num_attention_heads,
        "value_dim": model.config.head_dim,
    }


if __name__ == "__main__":
    main()
