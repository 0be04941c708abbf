"""Head-wise presses held ragged against their masked kvpress versions and no press: bytes held, decode time.

For every ratio, one context (the essays, ``--tokens`` long, in the default model's chat template) is prefilled
under each press twice: kvpress's masked version (the cache keeps every token; the others are hidden from
attention) and ``RaggedPress`` over the same press (each KV head holds its kept tokens). Then every cache answers
the same question greedily, the configurations interleaved step by step so that machine noise hits them alike. The
table gives the KV bytes held after the prefill as a fraction of a bf16 cache of the same tokens (no press), the
median time per answered token against no press and against the masked version measured in the same run, and
whether the ragged answer's tokens are the masked one's.

    python benchmarks/ragged_bytes.py                                   # 2k tokens, 25/50/75/87.5% removed
    python benchmarks/ragged_bytes.py --tokens 1024 --ratios 0.5 --steps 8 --presses adakv_snapkv
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import torch
from kvpress import AdaKVPress, BasePress, CompactorPress, KVzipPress, SnapKVPress
from pikvpress_eval.haystack import essay_context_ids
from tabulate import tabulate
from tqdm.auto import tqdm
from transformers import DynamicCache, pipeline

from pikvpress import ExpertRoutingPress, RaggedPress, cache_nbytes, load_model
from pikvpress.attention import enable_packed_attention
from pikvpress.models.adapter import language_model

logger = logging.getLogger(__name__)

#: the head-wise presses (their masked versions), kvpress's and ours
PRESSES: dict[str, Callable[[float], BasePress]] = {
    "adakv_snapkv": lambda r: AdaKVPress(SnapKVPress(compression_ratio=r)),
    "adakv_compactor": lambda r: AdaKVPress(CompactorPress(compression_ratio=r)),
    "kvzip": lambda r: KVzipPress(compression_ratio=r),
    "routing_heads": lambda r: ExpertRoutingPress(compression_ratio=r, head_budget="adaptive_masked"),
}
QUESTION = "\n\nWhat is the main topic of the essays above? Answer in a few sentences."


def _modules(model) -> list:
    return [layer.self_attn for layer in language_model(model).layers]


@torch.no_grad()
def _prefill(model, ids: torch.Tensor, press: BasePress | None) -> tuple[DynamicCache, list]:
    """The cache ``press`` leaves after the prefill of ``ids``, and the head-wise masks it left on the modules."""
    modules = _modules(model)
    for module in modules:
        module.masked_key_indices = None
    cache = DynamicCache(config=model.config)
    if press is None:
        model.model(input_ids=ids, past_key_values=cache)
    else:
        with press(model):
            model.model(input_ids=ids, past_key_values=cache)
    masks = [getattr(module, "masked_key_indices", None) for module in modules]
    return cache, masks


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or path (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.875])
    parser.add_argument("--presses", nargs="+", default=list(PRESSES), choices=list(PRESSES))
    parser.add_argument("--steps", type=int, default=24, help="answer tokens per configuration")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model) if args.model else load_model()
    model.eval()
    enable_packed_attention(model)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device=model.device)
    ids = essay_context_ids(pipe, args.tokens)
    question = tokenizer(QUESTION, return_tensors="pt", add_special_tokens=False).input_ids
    modules = _modules(model)
    base_cache, _ = _prefill(model, ids, None)
    bf16_full = cache_nbytes(base_cache, torch.bfloat16)
    del base_cache
    rows = []
    for ratio in args.ratios:
        configs: dict[str, tuple[DynamicCache, list]] = {"no_press": _prefill(model, ids, None)}
        prefill_s: dict[str, float] = {}
        for name in tqdm(args.presses, desc=f"prefill @ {ratio:g}", unit="press"):
            for kind, make in (("masked", PRESSES[name]), ("ragged", lambda r, m=PRESSES[name]: RaggedPress(m(r)))):
                torch.manual_seed(0)  # Compactor's sketch: the same draw for both kinds
                start = time.perf_counter()
                configs[f"{name} {kind}"] = _prefill(model, ids, make(ratio))
                prefill_s[f"{name} {kind}"] = time.perf_counter() - start
        held = {key: cache_nbytes(cache, torch.bfloat16) for key, (cache, _) in configs.items()}
        # answer: the question's forward, then greedy steps, the configurations interleaved step by step
        times: dict[str, list[float]] = {key: [] for key in configs}
        tokens: dict[str, list[int]] = {key: [] for key in configs}
        position = args.tokens
        for step in tqdm(range(args.steps), desc=f"answer @ {ratio:g}", unit="step"):
            for key, (cache, masks) in configs.items():
                for module, mask in zip(modules, masks, strict=True):
                    module.masked_key_indices = mask
                inputs = question if step == 0 else torch.tensor([[tokens[key][-1]]])
                start_pos = position if step == 0 else position + question.shape[1] + step - 1
                positions = torch.arange(start_pos, start_pos + inputs.shape[1])[None]
                start = time.perf_counter()
                out = model(input_ids=inputs, past_key_values=cache, position_ids=positions, logits_to_keep=1)
                if step:
                    times[key].append(time.perf_counter() - start)
                tokens[key].append(int(out.logits[0, -1].argmax()))
        for module in modules:
            module.masked_key_indices = None
        base = statistics.median(times["no_press"])
        rows.append([f"{ratio:g}", "no_press", f"{held['no_press'] / bf16_full:.3f}", f"{base * 1e3:.1f}", "1.00x", ""])
        for name in args.presses:
            masked, ragged = f"{name} masked", f"{name} ragged"
            t_masked, t_ragged = statistics.median(times[masked]), statistics.median(times[ragged])
            rows.append(
                [
                    f"{ratio:g}",
                    masked,
                    f"{held[masked] / bf16_full:.3f}",
                    f"{t_masked * 1e3:.1f}",
                    f"{t_masked / base:.2f}x",
                    "",
                ]
            )
            rows.append(
                [
                    f"{ratio:g}",
                    ragged,
                    f"{held[ragged] / bf16_full:.3f}",
                    f"{t_ragged * 1e3:.1f}",
                    f"{t_ragged / base:.2f}x ({t_ragged / t_masked:.2f}x masked)",
                    "yes"
                    if tokens[ragged] == tokens[masked]
                    else f"no (from token {_first_difference(tokens[ragged], tokens[masked])})",
                ]
            )
        logger.info("prefill seconds at %g: %s", ratio, {k: round(v, 2) for k, v in prefill_s.items()})
        del configs
    print(
        f"Head-wise presses, masked (kvpress) and ragged (RaggedPress), {model.config.name_or_path}, {model.dtype}, "
        f"{args.tokens}-token context, {torch.get_num_threads()} threads; held: KV bytes after the prefill over a bf16 "
        f"cache of the same tokens; ms / token: median of {args.steps - 1} answer steps, interleaved"
    )
    headers = ["removed", "press", "held / bf16 full", "ms / token", "vs no press", "same answer as masked"]
    print(tabulate(rows, headers=headers, tablefmt="github"))


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
