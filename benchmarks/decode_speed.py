"""Decode time per token with the packed KV cache against the dense cache (and transformers' QuantizedCache).

One prefill per context length fills a dense cache; every configuration's cache is built from that
same prefill (the packed layers exactly as QuantizationPress builds them, transformers'
``QuantizedCache`` by its own quantization), then the configurations decode in interleaved rounds,
one token per step, so machine noise hits them alike. The table reports the median step time and its
ratio to the dense cache measured in the same run, and the KV bytes each cache holds.

    python benchmarks/decode_speed.py                           # default model, 1k and 4k tokens
    python benchmarks/decode_speed.py --tokens 1024 --steps 16  # quicker
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time

import torch
from tabulate import tabulate
from tqdm.auto import tqdm
from transformers import DynamicCache, QuantizedCache

from pikvpress import QuantizationPress, cache_nbytes, load_model
from pikvpress.attention import enable_packed_attention

logger = logging.getLogger(__name__)


def packed_copy(model, dense: DynamicCache, press: QuantizationPress) -> DynamicCache:
    """What ``press`` leaves after the prefill that produced ``dense``."""
    cache = copy.deepcopy(dense)
    for idx, layer in enumerate(cache.layers):
        if getattr(layer, "is_sliding", False):
            continue
        cache.layers[idx] = press.pack(layer.keys, layer.values, model.config)
    return cache


def quanto_copy(model, dense: DynamicCache, bits: int) -> DynamicCache | None:
    try:
        cache = QuantizedCache(backend="quanto", config=model.config, nbits=bits)
    except Exception as err:  # noqa: BLE001 - optional backend; report why it is missing
        logger.warning("transformers QuantizedCache (quanto) unavailable: %s", err)
        return None
    for idx, layer in enumerate(dense.layers):
        cache.update(layer.keys.clone(), layer.values.clone(), idx)
    return cache


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or path (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--steps", type=int, default=24, help="decode steps per configuration")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds the steps are split into")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model(args.model) if args.model else load_model()
    model.eval()
    enable_packed_attention(model)
    configs = ["dense", "int8", "int4", "int2", "quanto int4"]
    rows = []
    for tokens in args.tokens:
        ids = torch.randint(100, model.config.vocab_size - 100, (1, tokens), generator=torch.Generator().manual_seed(0))
        dense = DynamicCache(config=model.config)
        start = time.perf_counter()
        model(input_ids=ids, past_key_values=dense)
        prefill_s = time.perf_counter() - start
        caches = {"dense": dense}
        for bits in (8, 4, 2):
            caches[f"int{bits}"] = packed_copy(model, dense, QuantizationPress(bits=bits))
        quanto = quanto_copy(model, dense, 4)
        if quanto is not None:
            caches["quanto int4"] = quanto
        nbytes = {name: cache_nbytes(c) if name != "quanto int4" else None for name, c in caches.items()}
        times: dict[str, list[float]] = {name: [] for name in caches}
        per_round = max(1, args.steps // args.rounds)
        token = torch.tensor([[42]])
        for name, cache in caches.items():  # warm-up step (first-call overheads, kernel caches)
            model(input_ids=token, past_key_values=cache)
        bar = tqdm(total=args.rounds * per_round * len(caches), desc=f"decode @ {tokens} tokens", unit="step")
        for _ in range(args.rounds):
            for name, cache in caches.items():
                for _ in range(per_round):
                    start = time.perf_counter()
                    model(input_ids=token, past_key_values=cache)
                    times[name].append(time.perf_counter() - start)
                    bar.update()
        bar.close()
        base = statistics.median(times["dense"])
        for name in configs:
            if name not in caches:
                rows.append([tokens, name, "not installed", "", ""])
                continue
            med = statistics.median(times[name])
            mib = f"{nbytes[name] / 2**20:.2f}" if nbytes[name] is not None else "n/a"
            rows.append([tokens, name, f"{med * 1e3:.1f}", f"{med / base:.2f}x", mib])
        logger.info("prefill of %d tokens: %.1f s", tokens, prefill_s)
    print(
        f"Decode time per token, {model.config.name_or_path}, {model.dtype}, {torch.get_num_threads()} threads, "
        f"median of {args.rounds * per_round} steps, interleaved"
    )
    print(tabulate(rows, headers=["context", "cache", "ms / token", "vs dense", "KV MiB"], tablefmt="github"))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
