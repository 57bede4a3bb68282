"""Hedgehog's linear attention against softmax attention, one attention call, forward + backward.

Three ways of computing causal attention for the same ``[1, 4, n, 64]`` queries, keys and values
(the ``micro`` preset's heads), timed in alternation over ``--repeats`` rounds at each length:

- ``softmax``: PyTorch's fused ``scaled_dot_product_attention(is_causal=True)`` (the baseline:
  what the trainer uses for softmax models past short lengths);
- ``hedgehog_quadratic``: the Hedgehog feature map, then the normalised ``n x n`` matrix (the
  form used under a padding or packing mask and while distilling);
- ``hedgehog_chunked``: the same map, then the chunked linear-time form (every training step).

Both Hedgehog forms go through ``components.model.linear_attention.linear_attention_forward``, so
what is timed is what trains; the two must agree within 1e-4 at every length (checked). Reported:
the median time of each, and the ratio of the medians to softmax's, with every round's ratio.

    python benchmarks/bench_linear_attention.py [--repeats 5]  -> benchmarks/results/linear_attention.{json,md}
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._provenance import commit_and_cpu  # noqa: E402
from components.model.linear_attention import FeatureMap, linear_attention_forward  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
HEADS, HEAD_DIM = 4, 64


def _module() -> torch.nn.Module:
    module = torch.nn.Module()
    module.feature_map = FeatureMap("hedgehog", HEADS, HEAD_DIM)
    return module


def _run(way: str, module, q, k, v) -> torch.Tensor:
    if way == "softmax":
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        mask = None if way == "hedgehog_chunked" else torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool).tril()
        out, _ = linear_attention_forward(module, q, k, v, mask, scaling=HEAD_DIM ** -0.5)
    return out


def _time(way: str, module, q, k, v) -> float:
    for t in (q, k, v):
        t.grad = None
    start = time.perf_counter()
    _run(way, module, q, k, v).sum().backward()
    return time.perf_counter() - start


def length_workload(n: int, repeats: int) -> dict:
    torch.manual_seed(0)
    module = _module()
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        agree = float((_run("hedgehog_quadratic", module, q, k, v).transpose(1, 2)
                       - _run("hedgehog_chunked", module, q, k, v).transpose(1, 2)).abs().max())
    ways = ("softmax", "hedgehog_quadratic", "hedgehog_chunked")
    for way in ways:  # warm-up
        _time(way, module, q, k, v)
    times = {way: [] for way in ways}
    for _ in range(repeats):
        for way in ways:
            times[way].append(_time(way, module, q, k, v))
    med = {way: statistics.median(t) for way, t in times.items()}
    return {"length": n, "median_s": med, "max_abs_diff_quadratic_vs_chunked": agree,
            "ratio_to_softmax": {w: med[w] / med["softmax"] for w in ways[1:]},
            "round_ratios": {w: [a / b for a, b in zip(times[w], times["softmax"])] for w in ways[1:]}}


def markdown(result: dict) -> str:
    lines = [f"At {result['commit']} on {result['cpu']}, {result['repeats']} alternating rounds, one causal "
             f"attention call (forward + backward), batch 1, {HEADS} heads of {HEAD_DIM}; ratio = median time / "
             "median time of fused softmax SDPA (below 1: faster).", "",
             "| length | softmax SDPA | Hedgehog quadratic / softmax | Hedgehog chunked / softmax | rounds (chunked) "
             "| max diff quadratic vs chunked |", "|---|---|---|---|---|---|"]
    for r in result["lengths"]:
        rounds = ", ".join(f"{x:.2f}" for x in r["round_ratios"]["hedgehog_chunked"])
        lines.append(f"| {r['length']} | {1000 * r['median_s']['softmax']:.1f} ms "
                     f"| {r['ratio_to_softmax']['hedgehog_quadratic']:.2f} "
                     f"| **{r['ratio_to_softmax']['hedgehog_chunked']:.2f}** | {rounds} "
                     f"| {r['max_abs_diff_quadratic_vs_chunked']:.1e} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048, 8192])
    args = parser.parse_args()
    lengths = [length_workload(n, args.repeats) for n in args.lengths]
    commit, cpu = commit_and_cpu()
    result = {"commit": commit, "cpu": cpu, "repeats": args.repeats, "lengths": lengths}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "linear_attention.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "linear_attention.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return 0 if all(r["max_abs_diff_quadratic_vs_chunked"] < 1e-4 for r in lengths) else 1


if __name__ == "__main__":
    raise SystemExit(main())
