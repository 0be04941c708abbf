"""How well each press's token scores predict the attention the question will pay to the context.

For quick-RULER samples (question not seen during compression), the context is prefilled once; every
press scores the context tokens from that prefill (its own ``score``; KVzip by its reconstruction
passes); then the question is run on the full cache and the attention its tokens pay to each context
token is recorded (mean over question tokens and the query heads of a KV head). The table gives, per
layer, the Spearman correlation between each press's scores and that attention, averaged over KV
heads and samples.

    python benchmarks/score_correlation.py                     # default model, 1k tokens, 8 samples
    python benchmarks/score_correlation.py --tokens 2048 --samples 4
"""

from __future__ import annotations

import argparse
import logging
from collections import defaultdict

import torch
from kvpress import ExpectedAttentionPress, KeyDiffPress, KnormPress, SnapKVPress, StreamingLLMPress, TOVAPress
from tabulate import tabulate
from tqdm.auto import tqdm
from transformers import DynamicCache, pipeline

from pikvpress_eval.benchmarks.ruler import generate_ruler
from pikvpress_eval.prefill import capture_prefill
from pikvpress import ExpertRoutingPress, load_model
from pikvpress.scheduling.attention import window_probs
from pikvpress.models import get_adapter, language_model
from pikvpress.routing.training import kvzip_targets, spearman

TASKS = ["niah_single_1", "niah_single_2", "niah_multikey_1", "vt"]


def scorers() -> dict[str, object]:
    return {
        "snapkv": SnapKVPress(0.5),
        "expected_attention": ExpectedAttentionPress(0.5),
        "keydiff": KeyDiffPress(0.5),
        "tova": TOVAPress(0.5),
        "knorm": KnormPress(0.5),
        "streaming_llm": StreamingLLMPress(0.5),
        "expert_routing keys (50%)": ExpertRoutingPress(0.5, router="keys"),
        "expert_routing learned (50%)": ExpertRoutingPress(0.5, router="learned"),
        "learned predictor alone": ExpertRoutingPress(0.5, router="learned", num_experts=1, top_k=1, n_recent=0),
    }


@torch.no_grad()
def question_attention(model, context_ids: torch.Tensor, question_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per layer, ``(H_kv, T_context)`` mean attention of the question tokens to each context token."""
    out: dict[int, torch.Tensor] = {}
    t = context_ids.shape[1]

    def record(module, args, kwargs, output):
        hidden = kwargs["hidden_states"]
        keys = kwargs["past_key_values"].layers[module.layer_idx].keys
        probs = window_probs(module, hidden, keys, hidden.shape[1], kwargs["position_embeddings"])
        out[module.layer_idx] = probs[0, :, :, :t].mean(dim=1).float()

    cache = DynamicCache()
    lm = language_model(model)
    lm(input_ids=context_ids, past_key_values=cache)
    hooks = [layer.self_attn.register_forward_hook(record, with_kwargs=True) for layer in lm.layers]
    try:
        lm(input_ids=question_ids, past_key_values=cache)
    finally:
        for hook in hooks:
            hook.remove()
    return out


def mean_spearman(scores: torch.Tensor, truth: torch.Tensor, start: int) -> float:
    """Mean over KV heads of the rank correlation on context tokens ``start:``."""
    return sum(spearman(scores[h, start:], truth[h, start:]) for h in range(truth.shape[0])) / truth.shape[0]


def mass_kept(scores: torch.Tensor, truth: torch.Tensor, start: int, keep: float) -> float:
    """Share of the question's attention (tokens ``start:``) on the ``keep`` fraction of them scored highest."""
    s, t = scores[:, start:].float(), truth[:, start:].float()
    top = s.topk(max(1, int(keep * s.shape[-1])), dim=-1).indices
    return float((t.gather(-1, top).sum(-1) / t.sum(-1).clamp_min(1e-12)).mean())


KEEPS = (0.5, 0.25)  # compression ratios 50% and 75%


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or path (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=2, help="samples per task")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    model, tokenizer = load_model(args.model) if args.model else load_model()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device=model.device)
    rows = generate_ruler(tokenizer, args.tokens, tasks=TASKS, num_samples=args.samples, seed=args.seed)
    modules = [layer.attention for layer in get_adapter(model).layers]
    for module in modules:  # what a press's context manager attaches (ExpectedAttention reads the rotary)
        module.rotary_emb = language_model(model).rotary_emb
    presses = scorers()
    for press in presses.values():
        press.post_init_from_model(model)
    corr: dict[str, list[list[float]]] = defaultdict(list)  # press -> per sample, per layer
    kept: dict[str, list[list[float]]] = defaultdict(list)  # press -> per sample, per keep fraction (layer mean)
    for row in tqdm(list(rows.itertuples()), desc="samples", unit="sample"):
        inputs = pipe.preprocess(row.context, [row.question], row.answer_prefix or "", int(1e10))
        context_ids, question_ids = inputs["context_ids"], inputs["questions_ids"][0]
        truth = question_attention(model, context_ids, question_ids)
        prefill = capture_prefill(model, context_ids)
        start = 4  # the attention sinks every press keeps are left out
        for name, press in presses.items():
            per_layer, per_keep = [], [[] for _ in KEEPS]
            for idx, layer in sorted(prefill.layers.items()):
                kwargs = dict(layer.kwargs, past_key_values=None)
                s = press.score(modules[idx], kwargs["hidden_states"], layer.keys, layer.values, None, kwargs)
                per_layer.append(mean_spearman(s[0].float(), truth[idx], start))
                for j, keep in enumerate(KEEPS):
                    per_keep[j].append(mass_kept(s[0], truth[idx], start, keep))
            corr[name].append(per_layer)
            kept[name].append([sum(v) / len(v) for v in per_keep])
        kvzip = kvzip_targets(model, context_ids)
        first = max(start, kvzip.start)
        corr["kvzip"].append([mean_spearman(kvzip.scores[i], truth[i], first) for i in range(len(modules))])
        kept["kvzip"].append(
            [sum(mass_kept(kvzip.scores[i], truth[i], first, keep) for i in range(len(modules))) / len(modules)
             for keep in KEEPS]
        )
    n_layers = len(modules)
    shown = sorted({0, n_layers // 4, n_layers // 2, 3 * n_layers // 4, n_layers - 1})
    table = []
    for name, values in corr.items():
        mean = torch.tensor(values).mean(0)
        mass = torch.tensor(kept[name]).mean(0)
        table.append([name, f"{mean.mean():.3f}", *(f"{mean[i]:.2f}" for i in shown), *(f"{m:.3f}" for m in mass)])
    table.sort(key=lambda r: -float(r[1]))
    print(f"Spearman(press score, question attention) per layer, {len(rows)} samples at {args.tokens} tokens;")
    print("attention mass kept: share of the question's attention on the tokens a press ranks in its top 50% / 25%")
    headers = ["press", "mean", *(f"layer {i}" for i in shown), *(f"mass kept, top {k:.0%}" for k in KEEPS)]
    print(tabulate(table, headers=headers))


if __name__ == "__main__":
    main()
