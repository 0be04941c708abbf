"""Decode-time presses over a long generation: needle recall afterwards and greedy agreement with the full cache.

Every sample is an essay context (``--tokens``, default 1024) holding one needle sentence, "The special magic
number is: NNNNNNN.", at a depth spread over the samples, in a chat prompt that asks the model to retell
the text. All samples run as one batch (every prompt has the same length):

1. reference: the full-cache model greedily generates ``--steps`` tokens (end-of-turn suppressed);
2. every press prefills the same prompt and is teacher-forced along the reference continuation, one token
   per step: **agreement** is the share of steps at which its greedy token equals the reference's;
3. after the continuation, a new user turn asks "What is the special magic number mentioned in the text?"
   (fed as one chunk, as a multi-turn follow-up) and the answer is generated greedily: **recall** is the
   share of samples whose answer contains the number.

Every press keeps the same number of tokens per layer (``--budgets``) and evicts every 16 steps (``--interval``):
pikvpress's AdaptiveSchedulingPress (``adaptive``, ``h2o``) against kvpress's ``DecodingPress`` with
``knorm``, ``expected_attention`` and ``streaming_llm``. The table also gives the largest cache each press
held (tokens per layer) while decoding.

    python benchmarks/long_generation.py                                  # default model, 8 samples, 256 steps
    python benchmarks/long_generation.py --samples 4 --steps 64 --budgets 256   # quicker
"""

from __future__ import annotations

import logging
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from kvpress import DecodingPress, ExpectedAttentionPress, KnormPress, PrefillDecodingPress, StreamingLLMPress
from tabulate import tabulate
from tqdm.auto import tqdm
from transformers import DynamicCache

from pikvpress_eval.benchmark_cli import benchmark_parser, load_benchmark_model
from pikvpress_eval.haystack import essays_text
from pikvpress import AdaptiveSchedulingPress, ExpertRoutingPress

logger = logging.getLogger(__name__)

NEEDLE = " The special magic number is: {}. "
INSTRUCTION = "\n\nRetell the text above in detail."
QUESTION = "What is the special magic number mentioned in the text?"
ANSWER_PREFIX = "The special magic number mentioned in the text is"


def presses(budget: int, interval: int, prompt_tokens: int) -> dict[str, object]:
    """Every decode-time press at one budget (tokens per layer kept after an eviction)."""

    def decoding(base) -> DecodingPress:
        return DecodingPress(base_press=base, compression_interval=interval, target_size=budget)

    # PiKV's chain: the routing press leaves `budget` tokens of every layer after the prefill, and its scores
    # become the scheduler's prior
    routing = ExpertRoutingPress(compression_ratio=1 - budget / prompt_tokens, layer_budget="uniform")
    return {
        "AdaptiveSchedulingPress(adaptive)": AdaptiveSchedulingPress(budget=budget, interval=interval),
        "AdaptiveSchedulingPress(h2o)": AdaptiveSchedulingPress(budget=budget, policy="h2o", interval=interval),
        "ExpertRoutingPress -> AdaptiveSchedulingPress(adaptive)": PrefillDecodingPress(
            prefilling_press=routing,
            decoding_press=AdaptiveSchedulingPress(budget=budget, interval=interval, prior_from=routing),
        ),
        "DecodingPress(knorm)": decoding(KnormPress()),
        "DecodingPress(expected_attention)": decoding(ExpectedAttentionPress()),
        "DecodingPress(streaming_llm)": decoding(StreamingLLMPress()),
    }


@dataclass
class Prompts:
    """A batch of same-length needle prompts and what to ask after the continuation."""

    ids: torch.Tensor  # (B, L)
    numbers: list[str]
    question_ids: torch.Tensor  # (1, Q): end of the assistant turn, the question turn, the answer prefix


def build_prompts(tokenizer, samples: int, tokens: int, seed: int = 0) -> Prompts:
    """``samples`` prompts of ``tokens`` context tokens each, the needle at depths spread over [0.1, 0.9]."""
    marker = "\x00CONTEXT\x00"
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker + INSTRUCTION}], tokenize=False, add_generation_prompt=True
    )
    before, after = chat.split(marker)
    encode = lambda text: tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    prefix, suffix = encode(before), encode(after)
    haystack = encode(essays_text())
    rng = random.Random(seed)
    rows, numbers = [], []
    for i in range(samples):
        number = str(rng.randint(1_000_000, 9_999_999))
        needle = encode(NEEDLE.format(number))
        span = tokens - len(needle)
        start = (i * 7919 * 13) % (len(haystack) - span)  # a different stretch of essays per sample
        text = haystack[start : start + span]
        depth = int(span * (0.1 + 0.8 * i / max(samples - 1, 1)))
        rows.append(torch.cat([prefix, text[:depth], needle, text[depth:], suffix]))
        numbers.append(number)
    follow_up = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False)
    follow_up = follow_up.split("<|im_start|>user")[-1]  # without the default system turn
    question = encode("<|im_end|>\n<|im_start|>user" + follow_up + "<|im_start|>assistant\n" + ANSWER_PREFIX).unsqueeze(
        0
    )
    return Prompts(torch.stack(rows), numbers, question)


@dataclass
class Outcome:
    tokens: torch.Tensor  # (B, steps) greedy tokens (the reference's own, or the press's predictions)
    answers: list[str]
    peak_cache: int  # the largest cache length (tokens per layer) seen after a step
    seconds: float


@torch.no_grad()
def run(
    model,
    tokenizer,
    prompts: Prompts,
    steps: int,
    press=None,
    reference: torch.Tensor | None = None,
    answer_tokens: int = 12,
) -> Outcome:
    """Greedy decoding of ``steps`` tokens (teacher-forced along ``reference`` when given), then the question."""
    ids = prompts.ids.to(model.device)
    b, length = ids.shape
    banned = [t for t in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")} if t is not None]
    cache = DynamicCache()
    chosen, peak = [], 0
    start = time.perf_counter()

    def step(input_ids: torch.Tensor, position: int) -> torch.Tensor:
        nonlocal peak
        n = input_ids.shape[1]
        cached = cache.get_seq_length()
        logits = (
            model(
                input_ids=input_ids,
                past_key_values=cache,
                position_ids=torch.arange(position, position + n, device=model.device).expand(b, n),
                cache_position=torch.arange(cached, cached + n, device=model.device),
            )
            .logits[:, -1]
            .float()
        )
        peak = max(peak, max(layer.keys.shape[2] for layer in cache.layers))
        return logits

    with press(model) if press is not None else nullcontext():
        logits = model(input_ids=ids, past_key_values=cache).logits[:, -1].float()
        for s in range(steps):
            logits[:, banned] = float("-inf")
            chosen.append(logits.argmax(-1))
            token = chosen[-1] if reference is None else reference[:, s].to(model.device)
            logits = step(token[:, None], length + s)
        question = prompts.question_ids.to(model.device).expand(b, -1)
        logits = step(question, length + steps)
        answer = []
        for s in range(answer_tokens):
            answer.append(logits.argmax(-1))
            logits = step(answer[-1][:, None], length + steps + question.shape[1] + s)
    seconds = time.perf_counter() - start
    answers = tokenizer.batch_decode(torch.stack(answer, dim=1), skip_special_tokens=True)
    return Outcome(torch.stack(chosen, dim=1).cpu(), answers, peak, seconds)


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--tokens", type=int, default=1024, help="context tokens per prompt")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=256, help="generated tokens before the question")
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--interval", type=int, default=16)
    parser.add_argument("--only", nargs="+", default=None, help="run only these presses (names as in the table)")
    args = parser.parse_args(argv)
    model, tokenizer = load_benchmark_model(args)
    prompts = build_prompts(tokenizer, args.samples, args.tokens)
    configs = [
        (budget, name, press)
        for budget in args.budgets
        for name, press in presses(budget, args.interval, prompts.ids.shape[1]).items()
        if args.only is None or name in args.only
    ]
    progress = tqdm(total=len(configs) + 1, desc="long generation", unit="press")
    full = run(model, tokenizer, prompts, args.steps)
    progress.update()

    def recall(outcome: Outcome) -> float:
        return 100 * sum(n in a for n, a in zip(prompts.numbers, outcome.answers)) / len(prompts.numbers)

    rows = [["full cache", "", f"{recall(full):.1f}", "100.0", full.peak_cache, f"{full.seconds:.0f}"]]
    for budget, name, press in configs:
        outcome = run(model, tokenizer, prompts, args.steps, press=press, reference=full.tokens)
        progress.update()
        # the first token comes from the prefill, which no decode-time press changes: compare the steps after it
        agreement = 100 * (outcome.tokens[:, 1:] == full.tokens[:, 1:]).float().mean().item()
        rows.append(
            [name, budget, f"{recall(outcome):.1f}", f"{agreement:.1f}", outcome.peak_cache, f"{outcome.seconds:.0f}"]
        )
        logger.info("%s @ %d: answers %s", name, budget, outcome.answers)
    progress.close()
    print(
        f"{args.samples} prompts of {prompts.ids.shape[1]} tokens ({args.tokens} of context), {args.steps} generated "
        f"tokens, then the question; interval {args.interval}; {torch.get_num_threads()} threads"
    )
    print(tabulate(rows, headers=["press", "budget", "needle recall %", "greedy agreement %", "peak cache", "seconds"]))


if __name__ == "__main__":
    main()
