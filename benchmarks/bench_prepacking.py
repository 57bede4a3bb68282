"""Prepacking against the evaluate stage's current batching, in one run, on the stage's own workloads.

Three workloads, each timed both ways in alternation (``--repeats`` rounds; the ratio of the
medians is reported, with every round's ratio so the noise is visible):

1. ``arithmetic_exact_match`` generation (``components/eval/arithmetic_eval.py``): 256 held-out
   problems per format, 64 per call; ``by_length`` (one ``generate`` call per prompt length, the
   default) against ``prepacked`` (64 packed rows per call).
2. The standard evaluation's lm-eval task (``components/eval/lm_eval_task.py``): 64 arithmetic
   questions, batch 16; lm-eval's ``HFLM`` (left-padded ``generate``) against ``PrepackedHFLM``.
3. Prefill only, the paper's measure (time to first token): 256 prompts cut from held-out prose and
   code documents at lengths spread over 8..127 tokens, 16 per forward; a right-padded batch
   (one causal forward, logits read at each prompt's last token) against packed rows.

Every workload also checks the two ways agree: the same texts, the same exact match, and
next-token logits within 1e-4. Pad tokens are counted as slots computed that hold no token.

The model is the ``micro`` preset (the catalogue's base size) with its weights as initialised:
timing does not depend on what the weights learned, and greedy answers run to their budgets.

    python benchmarks/bench_prepacking.py [--repeats 5]   -> benchmarks/results/prepacking.{json,md}
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._provenance import commit_and_cpu  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SEQ_LEN = 128


def build_setup():
    from components.data.byte_bpe import ByteBpeTokenizer
    from components.data.standard_corpus import StandardCorpus
    from components.model.presets import build_model

    sources = [{"type": "pydoc_topics"}, {"type": "stdlib_code"}]
    sources += [{"type": "arithmetic_formatted", "format": fmt, "n_docs": 400, "examples_per_doc": 1,
                 "max_digits": 3, "domain": f"arith_{fmt}"} for fmt in ("plain", "scratchpad_simple")]
    docs = StandardCorpus(StandardCorpus.Params(sources=sources, split={"validation": 0.1, "test": 0.1},
                                                seed=0)).build()
    train = docs[docs["split"] == "train"]["text"].tolist()
    tokenizer = ByteBpeTokenizer(ByteBpeTokenizer.Params(vocab_size=1024, seq_len=SEQ_LEN)).train(train)
    model = build_model("micro", vocab_size=len(tokenizer), max_seq_len=SEQ_LEN, seed=0).eval()
    return docs, tokenizer, model


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def compare(name: str, baseline, candidate, repeats: int) -> dict:
    """Alternate the two; ratio = median candidate / median baseline (below 1: prepacking is faster)."""
    base_t, cand_t = [], []
    base_v = cand_v = None
    for _ in range(repeats):
        t, base_v = timed(baseline)
        base_t.append(t)
        t, cand_v = timed(candidate)
        cand_t.append(t)
    ratio = statistics.median(cand_t) / statistics.median(base_t)
    print(f"{name}: prepacked / baseline = {ratio:.3f} (rounds {[round(c / b, 3) for b, c in zip(base_t, cand_t)]})",
          flush=True)
    return {"baseline_s": base_t, "prepacked_s": cand_t, "ratio": ratio,
            "round_ratios": [c / b for b, c in zip(base_t, cand_t)]}, base_v, cand_v


def arithmetic_workload(docs, tokenizer, model, fmt: str, repeats: int) -> dict:
    from components.eval.arithmetic_eval import _encode, format_prompt, generate_answers, heldout_problems
    from components.eval.prepacking import first_fit_decreasing

    heldout = docs[docs["split"] != "train"]
    fmt, problems = heldout_problems(heldout, f"arith_{fmt}", "test", fmt, limit=None)
    problems = (problems * (256 // len(problems) + 1))[:256]  # 256: the evaluator's default limit
    lengths = [1 + len(_encode(tokenizer, format_prompt(fmt, a, b))) for a, b in problems]
    r, by_length, prepacked = compare(
        f"arithmetic {fmt}",
        lambda: generate_answers(model, tokenizer, fmt, problems, 64, batching="by_length"),
        lambda: generate_answers(model, tokenizer, fmt, problems, 64, batching="prepacked"), repeats)
    groups = {n: sum(1 for m in lengths if m == n) for n in set(lengths)}
    r.update(workload=f"arithmetic_exact_match generation, {fmt}", problems=len(problems),
             prompt_lengths=[min(lengths), max(lengths)],
             baseline_generate_calls=sum((c + 63) // 64 for c in groups.values()),
             prepacked_rows=len(first_fit_decreasing(lengths, max(lengths))),
             same_texts=by_length == prepacked)
    return r


def lm_eval_workload(docs, tokenizer, model, repeats: int, work: Path) -> dict:
    from components.eval.lm_eval_task import arithmetic_examples, run_lm_eval, write_arithmetic_task

    examples = arithmetic_examples(docs[docs["domain"] == "arith_plain"]["text"], limit=64)
    write_arithmetic_task(work / "task", examples)
    r, padded, packed = compare(
        "lm-eval arithmetic",
        lambda: run_lm_eval(model, tokenizer, work / "task", "paperdag_arithmetic", batch_size=16, limit=64),
        lambda: run_lm_eval(model, tokenizer, work / "task", "paperdag_arithmetic", batch_size=16, limit=64,
                            prepacked=True), repeats)
    r.update(workload="standard evaluation's lm-eval task (generate_until, batch 16)", questions=len(examples),
             same_exact_match=padded == packed, exact_match=[padded["exact_match"], packed["exact_match"]])
    return r


def prefill_workload(docs, tokenizer, model, repeats: int) -> dict:
    import torch

    from components.eval.prepacking import prepacked_next_token_logits

    rng = random.Random(0)
    held = [t for t in docs[(docs["split"] == "test") & ~docs["domain"].str.startswith("arith")]["text"]]
    encoded = [ids for ids in (tokenizer(t, add_special_tokens=False)["input_ids"] for t in held) if len(ids) >= 8]
    prompts = []
    while len(prompts) < 256:
        ids = encoded[rng.randrange(len(encoded))]
        prompts.append(ids[:rng.randint(8, min(len(ids), SEQ_LEN - 1))])

    def padded():
        out = []
        with torch.no_grad():
            for start in range(0, len(prompts), 16):
                batch = prompts[start:start + 16]
                width = max(map(len, batch))
                ids = torch.zeros(len(batch), width, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, p in enumerate(batch):
                    ids[row, :len(p)] = torch.tensor(p)
                    mask[row, :len(p)] = 1
                logits = model(input_ids=ids, attention_mask=mask).logits
                out += [logits[row, len(p) - 1] for row, p in enumerate(batch)]
        return torch.stack(out)

    r, base, (packed, stats) = compare("prefill", padded, lambda: prepacked_next_token_logits(model, prompts,
                                                                                           rows_per_batch=16),
                                       repeats)
    padded_slots = sum(len(prompts[s:s + 16]) * max(map(len, prompts[s:s + 16]))
                       for s in range(0, len(prompts), 16))
    r.update(workload="prefill of 256 prose/code prompts, 8..127 tokens, 16 rows per forward",
             prompt_tokens=stats.prompt_tokens, baseline_pad_tokens=padded_slots - stats.prompt_tokens,
             prepacked_pad_tokens=stats.prefill_pad, baseline_forwards=(len(prompts) + 15) // 16,
             prepacked_forwards=stats.forwards, max_abs_logit_diff=float((base - packed).abs().max()))
    return r


def markdown(result: dict) -> str:
    lines = [f"At {result['commit']} on {result['cpu']}, {result['repeats']} alternating rounds; ratio = median "
             "prepacked time / median baseline time (below 1: prepacking is faster).", "",
             "| workload | baseline | prepacked / baseline | rounds | agreement |", "|---|---|---|---|---|"]
    for key, r in result["workloads"].items():
        if key.startswith("arithmetic"):
            base = f"by_length: {r['baseline_generate_calls']} generate calls"
            agree = f"same texts: {r['same_texts']}; {r['prepacked_rows']} packed rows"
        elif key == "lm_eval":
            base = "HFLM left-padded generate"
            em = r["exact_match"]
            agree = (f"exact match {em[0]:.3f} / {em[1]:.3f}" + (" (an untrained model answers nothing right: no "
                     "agreement check; tests/components/eval/test_lm_eval_task.py is)" if em == [0.0, 0.0] else ""))
        else:
            base = (f"right-padded batches: {r['baseline_pad_tokens']} pad of {r['prompt_tokens']} tokens, "
                    f"{r['baseline_forwards']} forwards")
            agree = (f"prepacked: {r['prepacked_pad_tokens']} pad, {r['prepacked_forwards']} forwards; max logit "
                     f"diff {r['max_abs_logit_diff']:.1e}")
        rounds = ", ".join(f"{x:.2f}" for x in r["round_ratios"])
        lines.append(f"| {r['workload']} | {base} | **{r['ratio']:.2f}** | {rounds} | {agree} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    docs, tokenizer, model = build_setup()
    workloads = {}
    with tempfile.TemporaryDirectory() as work:
        for fmt in ("plain", "scratchpad_simple"):
            workloads[f"arithmetic_{fmt}"] = arithmetic_workload(docs, tokenizer, model, fmt, args.repeats)
        workloads["lm_eval"] = lm_eval_workload(docs, tokenizer, model, args.repeats, Path(work))
    workloads["prefill"] = prefill_workload(docs, tokenizer, model, args.repeats)
    commit, cpu = commit_and_cpu()
    result = {"commit": commit, "cpu": cpu, "repeats": args.repeats, "workloads": workloads}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "prepacking.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "prepacking.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    checks = [r.get("same_texts", r.get("same_exact_match", True)) for r in workloads.values()]
    checks.append(workloads["prefill"]["max_abs_logit_diff"] < 1e-4)
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
