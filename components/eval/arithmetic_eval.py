"""Exact match on held-out addition problems by greedy generation, plus the train/held-out loss gap.

Follows the reference evaluator of Lee et al. 2023 (``lee-ny/teaching_arithmetic``,
``evaluate_addition_batch``): prompts of one token length are generated as one batch (so no
padding), the answer is read from the generated text by the format's rule (``parse_answer``) and
compared with ``a + b``. Different: decoding is greedy (the code samples with temperature 0.8,
top-k 200), and the new-token budget is the gold completion's token count plus a margin instead
of the code's fixed 80 / 320 characters. Each prompt starts with the eos token, which separates
documents in the packed training blocks, so the model sees a problem where a document starts.

The gap metrics (``loss_train``, ``loss_heldout``, ``loss_gap``) measure memorization, as the
Masked Thought paper's train/validation comparison does: the mean next-token loss on an evenly
spaced, capped set of the domain's training blocks against the loss on its held-out test blocks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from tqdm import tqdm

from components.data.arithmetic_formats import (
    PAPER, ArithmeticFormat, ArithmeticFormatError, detect_format, format_completion, format_prompt, parse_answer,
    parse_example, split_examples,
)
from components.eval.evaluator import Evaluator
from components.eval.perplexity import evaluate_perplexity
from components.eval.prepacking import prepacked_greedy_generate, supports_prepacking
from components.eval.standard import perplexity_metrics, size_metrics
from components.registry import MethodParams


class ArithmeticEvalError(ValueError):
    """The held-out data or the inputs do not fit the arithmetic evaluation."""


def heldout_problems(heldout: pd.DataFrame, domain: str, split: str, fmt: str | None = None,
                     limit: int | None = None) -> tuple[str, list[tuple[int, int]]]:
    """(format, [(a, b), ...]) of the held-out documents of ``domain`` and ``split``, in table order.

    ``fmt=None`` detects the format; every example must be well formed in it.
    """
    docs = heldout[(heldout["split"] == split) & (heldout["domain"] == domain)]
    if docs.empty:
        found = sorted(set(zip(heldout["domain"], heldout["split"])))
        raise ArithmeticEvalError(f"no held-out {split!r} documents in domain {domain!r}; held-out (domain, split) "
                                  f"pairs: {found}")
    if fmt is None:
        detected = {detect_format(text) for text in docs["text"]}
        if len(detected) != 1 or None in detected:
            raise ArithmeticEvalError(f"cannot tell the arithmetic format of domain {domain!r}: documents look like "
                                      f"{sorted(map(str, detected))}; set the evaluator's `format`")
        fmt = detected.pop()
    problems: list[tuple[int, int]] = []
    for doc_id, text in zip(docs["id"], docs["text"]):
        for example in split_examples(fmt, text):
            try:
                problems.append(parse_example(fmt, example))
            except ArithmeticFormatError as err:
                raise ArithmeticEvalError(f"held-out document {doc_id!r} (domain {domain!r}): {err}") from None
            if limit is not None and len(problems) >= limit:
                return fmt, problems
    return fmt, problems


def exact_match(fmt: str, problems: Sequence[tuple[int, int]], texts: Sequence[str]) -> dict[str, float]:
    """Score generated texts (prompt + generation) against ``a + b``: ``exact_match`` and ``parsed``
    (the share whose final answer could be read at all)."""
    if len(problems) != len(texts):
        raise ArithmeticEvalError(f"{len(problems)} problems but {len(texts)} generated texts")
    if not problems:
        raise ArithmeticEvalError("no problems to score")
    correct = parsed = 0
    for (a, b), text in zip(problems, texts):
        try:
            got = parse_answer(fmt, text)
        except ArithmeticFormatError:
            continue
        if got.answer is None:
            continue
        parsed += 1
        correct += (got.a, got.b, got.answer) == (a, b, a + b)
    return {"exact_match": correct / len(problems), "parsed": parsed / len(problems)}


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def generate_answers(model, tokenizer, fmt: str, problems: Sequence[tuple[int, int]], batch_size: int = 64,
                     extra_new_tokens: int = 4, progress: bool = False,
                     batching: Literal["by_length", "prepacked"] = "by_length", temperature: float | None = None,
                     seed: int = 0) -> list[str]:
    """Greedy prompt + generation texts, in problem order; sampled at ``temperature`` (no top-k)
    instead when it is set, from a generator seeded by ``seed`` (the global RNG is left as it was).

    ``by_length``: batches of up to ``batch_size`` prompts that share one token length (no padding,
    but as many ``generate`` calls as there are lengths). ``prepacked``: prompts of all lengths
    packed into rows as long as the longest prompt (``components/eval/prepacking.py``), ``batch_size``
    rows per forward: the tensor of a padded batch, holding more prompts.
    Both give every prompt its own token budget, so the texts do not depend on the batching. A
    model that cannot be prepacked (a wrapper such as EFT's) is generated by_length.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ArithmeticEvalError("the tokenizer has no eos token (documents are packed between eos tokens)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    prompts = [format_prompt(fmt, a, b) for a, b in problems]
    encoded = [[eos] + _encode(tokenizer, p) for p in prompts]
    budgets = [len(_encode(tokenizer, format_completion(fmt, a, b))) + 1 + extra_new_tokens for a, b in problems]
    if max_positions:
        longest = max(range(len(problems)), key=lambda i: len(encoded[i]) + budgets[i] - extra_new_tokens)
        needed = len(encoded[longest]) + budgets[longest] - extra_new_tokens
        if needed > max_positions:  # the answer could not be generated, nor was it seen whole in training
            a, b = problems[longest]
            raise ArithmeticEvalError(
                f"a {fmt} example ({a}+{b}) takes {needed} tokens with its eos but the model's context is "
                f"{max_positions}; raise the tokenize stage's seq_len")
    texts: list[str] = [""] * len(problems)
    budgets = [min(b, max_positions - len(ids)) if max_positions else b for ids, b in zip(encoded, budgets)]

    def finish(index: int, generated: list[int]) -> None:
        if eos in generated:
            generated = generated[:generated.index(eos)]
        texts[index] = prompts[index] + tokenizer.decode(generated, skip_special_tokens=False,
                                                         clean_up_tokenization_spaces=False)

    if batching == "prepacked" and temperature is None and supports_prepacking(model):
        generated, _ = prepacked_greedy_generate(model, encoded, budgets, eos_token_id=eos,
                                                 rows_per_batch=batch_size, progress=progress)
        for index, tokens in enumerate(generated):
            finish(index, tokens)
        return texts
    by_length: dict[int, list[int]] = {}
    for index, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(index)
    chunks = [group[i:i + batch_size] for _, group in sorted(by_length.items())
              for i in range(0, len(group), batch_size)]
    decoding = dict(do_sample=False) if temperature is None else dict(do_sample=True, temperature=temperature,
                                                                      top_k=0, top_p=1.0)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for chunk in tqdm(chunks, desc="arithmetic generate", disable=not progress):
                ids = torch.tensor([encoded[i] for i in chunk], dtype=torch.long, device=device)
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=max(budgets[i] for i in chunk), pad_token_id=pad,
                                     eos_token_id=eos, **decoding)
                for row, index in enumerate(chunk):
                    # each row keeps its own budget, so batching never changes a greedy answer
                    finish(index, out[row, ids.shape[1]:ids.shape[1] + budgets[index]].tolist())
    finally:
        model.train(was_training)
    return texts


def evenly_spaced(n: int, cap: int) -> np.ndarray:
    """At most ``cap`` distinct indices spread over ``range(n)``, first and last included."""
    if n <= cap:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, cap).round().astype(np.int64))


class ArithmeticExactMatch(Evaluator):
    """Greedy exact match on held-out problems, per-domain perplexity and the train/held-out gap."""

    key = "arithmetic_exact_match"
    paper = PAPER
    #: tasks/evaluate.py passes ``train_blocks`` ({domain: blocks}) and ``heldout`` (documents).
    needs_train_blocks = True
    needs_heldout = True
    needs_model_facts = True  # tasks/evaluate.py passes the model's artifact facts (its train_domain)

    class Params(MethodParams):
        format: ArithmeticFormat | None = Field(None, description="None: detect from the held-out documents")
        domain: str | None = Field("arithmetic", min_length=1, description=(
            "domain holding the problems; null = each model's own `train_domain` (one corpus holding "
            "every format as its own domain, one model per format)"))
        split: Literal["test", "validation"] = Field("test", description="held-out split the problems come from")
        limit: int | None = Field(256, ge=1, description="problems to generate for (the first ones); None = all")
        gen_batch_size: int = Field(64, ge=1, description="prompts (by_length) or packed rows (prepacked) per "
                                    "generate call")
        batching: Literal["by_length", "prepacked"] = Field("prepacked", description=(
            "prepacked: prompts of all lengths packed into rows with a block-diagonal mask (Prepacking, Zhao "
            "et al. 2024); by_length: one generate call per prompt length. The same texts either way; "
            "benchmarks/bench_prepacking.py times both"))
        extra_new_tokens: int = Field(4, ge=0, description="new-token budget beyond the gold completion's length")
        ppl_batch_size: int = Field(8, ge=1, description="blocks per forward pass for losses")
        max_blocks_per_domain: int | None = Field(None, ge=1, description="test blocks per domain (the first "
                                                  "ones); None scores the whole test split")
        max_train_blocks: int = Field(64, ge=1, description="train blocks for loss_train (evenly spaced)")
        eft_beta: float = Field(1.0, description="EFT only: weight of the small models' fine-tuning difference")

    def evaluate(self, model, tokenizer, model_dir: Path | None, blocks_by_domain: dict[str, np.ndarray],
                 task_examples: list[dict], work_dir: Path, quant_meta: dict | None = None,
                 progress: bool = False, train_blocks: dict[str, np.ndarray] | None = None,
                 heldout: pd.DataFrame | None = None, facts: dict | None = None) -> dict[str, float]:
        p = self.params
        if heldout is None or train_blocks is None:
            raise ArithmeticEvalError(f"{self.key} needs the held-out documents and the train blocks")
        domain = p.domain or (facts or {}).get("train_domain")
        if domain is None:
            raise ArithmeticEvalError(f"{self.key}: domain is null but the model {model_dir} has no train_domain; "
                                      f"set the evaluate stage's params.domain")
        out = perplexity_metrics(model, blocks_by_domain, p.ppl_batch_size, p.max_blocks_per_domain, progress)
        fmt, problems = heldout_problems(heldout, domain, p.split, p.format, p.limit)
        texts = generate_answers(model, tokenizer, fmt, problems, p.gen_batch_size, p.extra_new_tokens, progress,
                                 p.batching)
        score = exact_match(fmt, problems, texts)
        out.update(exact_match=score["exact_match"], arith_parsed=score["parsed"], arith_n=len(problems))
        out.update(self._gap(model, out, domain, blocks_by_domain, train_blocks, progress))
        out.update(size_metrics(model_dir, quant_meta))
        return out

    def _gap(self, model, out: dict, domain: str, test_blocks: dict[str, np.ndarray],
             train_blocks: dict[str, np.ndarray], progress: bool) -> dict[str, float]:
        p = self.params
        train = train_blocks.get(domain)
        test = test_blocks.get(domain)
        if train is None or len(train) == 0 or test is None or len(test) == 0:
            raise ArithmeticEvalError(
                f"domain {domain!r} needs train and test token blocks for the loss gap; train blocks: "
                f"{sorted(d for d, b in train_blocks.items() if len(b))}, test blocks: "
                f"{sorted(d for d, b in test_blocks.items() if len(b))}")
        held = out[f"loss_{domain}"]  # the same test blocks as every domain's perplexity
        seen = evaluate_perplexity(model, np.asarray(train[evenly_spaced(len(train), p.max_train_blocks)]),
                                   batch_size=p.ppl_batch_size, progress=progress)["loss"]
        return {"loss_train": seen, "loss_heldout": held, "loss_gap": held - seen}
