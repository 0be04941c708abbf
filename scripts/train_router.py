"""Train ExpertRoutingPress's learned router for a model, offline, on text this project generates.

    python scripts/train_router.py                                   # the default model -> shipped weights
    python scripts/train_router.py --model Qwen/Qwen3-0.6B --output qwen3-router.safetensors

Training contexts: RULER-style haystacks of the *dev* split (essays with needles, variable chains, word
lists; see evaluation/benchmarks/ruler/splits.py: the leaderboard's test split shares no essay, random stream
or needle value with them) and plain passages of the dev essays, each wrapped in the model's chat template the
way kvpress's pipeline wraps a context. Each context is scored by kvpress's KVzipPress (a prefill plus
the "repeat the context" passes); a ridge regression per layer maps each token's attention-input
hidden state to log(KVzip score). KVzip's global budget (one top-k over every layer and
head) is recorded too, as each layer's share of the kept tokens at compression ratios 5%..95%; the
press uses it as per-layer budgets. Held-out contexts report the Spearman correlation of the
predictions with KVzip's scores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
from pikvpress_eval.benchmarks.ruler import generate_ruler
from pikvpress_eval.haystack import essays_text
from tqdm import tqdm

from pikvpress.models import DEFAULT_MODEL, load_model
from pikvpress.routing.learned import SHIPPED_DIR, model_geometry, model_name_of
from pikvpress.routing.training import (
    KVzipSample,
    LayerBudgetFit,
    MlpFit,
    RidgeFit,
    kvzip_targets,
    linear_router,
    prefill_hidden_states,
    router_agreement,
)

TRAINING_SPLIT = "dev"  # never the leaderboard's test split
TASKS = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "vt", "fwe"]


def training_contexts(tokenizer, lengths: list[int], per_length: int, seed: int) -> list[str]:
    """RULER-style haystack contexts and plain essay passages (half and half) of the dev split, deterministic
    for ``seed``."""
    rng = random.Random(seed)
    contexts = []
    essays = essays_text(TRAINING_SPLIT)
    words = essays.split(" ")
    for length in lengths:
        n_ruler = per_length - per_length // 2
        frame = generate_ruler(
            tokenizer, length, tasks=TASKS, num_samples=max(1, n_ruler // len(TASKS) + 1), seed=seed,
            split=TRAINING_SPLIT,
        )
        rows = frame.sample(n=min(n_ruler, len(frame)), random_state=seed)
        contexts += [row.context for row in rows.itertuples()]
        for _ in range(per_length // 2):  # ~0.75 tokens per word in English prose
            start = rng.randrange(0, len(words) - length)
            contexts.append(" ".join(words[start : start + int(length * 0.72)]))
    return contexts


def training_record(argv: list[str] | None, contexts: list[str], tokenizer, fitted: int, held: int) -> dict:
    """What the weights file records about its training: the command, the commit, the split and a SHA-256 of
    the training contexts' token ids (fitted and held out, in order)."""
    digest = hashlib.sha256()
    for text in contexts:
        digest.update(json.dumps(tokenizer(text, add_special_tokens=False)["input_ids"]).encode())
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    args = sys.argv[1:] if argv is None else argv
    return {
        "command": " ".join(["python scripts/train_router.py", *args]),
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "split": TRAINING_SPLIT,
        "contexts": len(contexts),
        "fitted": fitted,
        "held_out": held,
        "data_sha256": digest.hexdigest(),
        "date": time.strftime("%Y-%m-%d"),
    }


def context_ids(pipe, context: str) -> torch.Tensor:
    return pipe.preprocess(context, [""], "", int(1e10))["context_ids"]


def scored(model, ids: torch.Tensor, samples_dir: Path | None) -> KVzipSample:
    """KVzip targets of ``ids``; with ``samples_dir``, KVzip's scores are kept there and reused by later
    runs (a refit then only re-runs plain prefills for the hidden states)."""
    if samples_dir is None:
        return kvzip_targets(model, ids)
    key = hashlib.sha1(f"{model_name_of(model)}:{ids.tolist()}".encode()).hexdigest()[:16]
    path = samples_dir / f"{key}.pt"
    if path.is_file():
        saved = torch.load(path)
        return KVzipSample(prefill_hidden_states(model, ids), saved["scores"], saved["start"])
    sample = kvzip_targets(model, ids)
    samples_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"scores": sample.scores, "start": sample.start}, path)
    return sample


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--output", type=Path, default=None, help="default: the package's shipped weights path")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--contexts-per-length", type=int, default=24)
    parser.add_argument("--holdout", type=int, default=4, help="contexts kept out of the fit, for the report")
    parser.add_argument("--ridge", type=float, default=1.0)
    parser.add_argument("--hidden-dim", type=int, default=0, help="0: linear (ridge, closed form); else an MLP")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples-dir", type=Path, default=None, help="keep KVzip's scores here for later refits")
    return parser


def shuffled_training_contexts(tokenizer, args: argparse.Namespace) -> list[str]:
    """The training contexts in the order the script splits them (the first ``--holdout`` are held out)."""
    contexts = training_contexts(tokenizer, args.lengths, args.contexts_per_length, args.seed)
    random.Random(args.seed).shuffle(contexts)
    return contexts


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from transformers import pipeline

    model, tokenizer = load_model(args.model, device=args.device)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device=model.device)
    output = args.output or SHIPPED_DIR / f"{model_name_of(model)}.safetensors"
    contexts = shuffled_training_contexts(tokenizer, args)
    held, train = contexts[: args.holdout], contexts[args.holdout :]

    start = time.perf_counter()
    fit = RidgeFit(*model_geometry(model)) if not args.hidden_dim else MlpFit(*model_geometry(model), args.hidden_dim)
    budgets = LayerBudgetFit(model_geometry(model)[0])
    for text in tqdm(train, desc="KVzip targets", unit="context"):
        sample = scored(model, context_ids(pipe, text), args.samples_dir)
        fit.add(sample)
        budgets.add(sample)
    scoring_s = time.perf_counter() - start
    router = linear_router(model, *fit.solve(args.ridge)) if not args.hidden_dim else fit.fit(model, seed=args.seed)
    router.set_layer_budget(budgets.ratios, budgets.weights())
    train_s = time.perf_counter() - start
    router.training_record = training_record(argv, contexts, tokenizer, len(train), len(held))
    path = router.save(output)

    agreement = torch.stack(
        [router_agreement(router, scored(model, context_ids(pipe, t), args.samples_dir)) for t in held]
    ).mean(0)
    print(f"trained on {len(train)} contexts ({'ridge' if not args.hidden_dim else f'MLP {args.hidden_dim}'})")
    print(f"time: {train_s:.1f} s ({scoring_s:.1f} s KVzip scoring, {train_s - scoring_s:.1f} s fit)")
    print(f"weights: {path} ({path.stat().st_size / 1024:.1f} KiB on disk)")
    print(f"held-out Spearman vs KVzip, mean over layers: {agreement.mean():.3f}")
    print("per layer: " + " ".join(f"{v:.2f}" for v in agreement.tolist()))
    for ratio in (0.25, 0.5, 0.75):
        print(f"layer budget at {ratio:.0%}: " + " ".join(f"{v:.2f}" for v in router.layer_weights(ratio).tolist()))


if __name__ == "__main__":
    main()
