"""Why BiPFT's residual estimators make the micro binary model worse, not better.

The catalogue's bipft recipe finds the estimators 30% worse in held-out perplexity than the plain
binary network (64.77 vs 49.86 at 56e3fc9), with the training loss worse too, the gap open from
the first 200 steps. This study looks at two things.

1. **Magnitudes at initialisation**, per layer, on validation blocks: the spread over keys of the
   binary attention scores ``Q_b K_b^T`` against the estimators' ``q_m k_p + q_p k_m + q_p k_p``
   (both times ``1/sqrt(d_head)``, the within-row spread that the softmax sees), and the size of the
   binary context ``P_b V_b`` against the value map's ``P_b v_p`` (one scalar per token, added to
   every channel). The maps are ``nn.Linear`` at PyTorch's default init, as in the reference.
2. **A training ablation** with the project's trainer at the recipe's settings (micro, batch 16,
   lr 2e-3, warmup 100, the schedule of 1000 steps, stopped at ``--steps``), same init and data:
   - ``binary``: no estimators (the recipe's ``pretrain_binary``);
   - ``bipft``: all five maps (the recipe's ``pretrain_bipft``);
   - ``bipft_no_value_map``: the query/key maps only (``v_p`` held at zero);
   - ``bipft_value_map_zero_init``: all five maps, ``v_p`` starting at zero.
   If dropping or zero-starting ``v_p`` closes the gap, the value map's initial noise is the cause;
   if not, the score maps are.
3. With ``--probe DIR ...``: the same magnitudes on trained model artifacts (the recipe's
   ``pretrain_bipft`` and ``pretrain_binary`` from a workspace's store), with each layer's learned
   scale of the probability binarizer: at or below its floor (1e-5) every probability rounds to
   the same code, the layer's attention output is near zero, and no gradient reaches the scale
   again (the reference clamps it the same way).

The study variants are classes here, not registered methods: no recipe can name them.

    .venv/bin/python benchmarks/bipft_estimator_study.py [--steps 300] [--seeds 0]
    .venv/bin/python benchmarks/bipft_estimator_study.py --probe WORKSPACE/artifacts/pretrain/DIGEST ...

Writes benchmarks/results/bipft_estimator_study.json and .md (``--probe``: bipft_estimator_probe.*).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bf16_vs_fp32_loss import VOCAB, SEQ, build_blocks  # noqa: E402  (sets up sys.path and offline env)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import components.model.binary_network as bn  # noqa: E402
from _provenance import commit_and_cpu, write_result  # noqa: E402
from components.eval.perplexity import evaluate_perplexity  # noqa: E402
from components.model.presets import build_model  # noqa: E402
from components.train.bipft import BiPFTTraining  # noqa: E402
from components.train.method import unwrap  # noqa: E402
from components.train.trainer import train  # noqa: E402

VALUE_MAP = bn.ESTIMATORS.index("v_p")  # the row of each attention's Linear(d, 5) that is v_p


class ValueMapStart(BiPFTTraining):
    """BiPFT whose value map starts at zero; ``frozen``: and stays there (its gradient masked)."""

    frozen = False

    def prepare(self, model):
        super().prepare(model)
        keep = torch.ones(len(bn.ESTIMATORS))
        keep[VALUE_MAP] = 0.0
        for module in bn.attention_modules(unwrap(model)):
            estimate = module.binary.estimate
            with torch.no_grad():
                estimate.weight[VALUE_MAP].zero_()
                estimate.bias[VALUE_MAP].zero_()
            if self.frozen:
                estimate.weight.register_hook(lambda g: g * keep[:, None].to(g))
                estimate.bias.register_hook(lambda g: g * keep.to(g))


class WithoutValueMap(ValueMapStart):
    frozen = True


VARIANTS = {  # name -> (method class, estimators)
    "binary": (BiPFTTraining, False),
    "bipft": (BiPFTTraining, True),
    "bipft_no_value_map": (WithoutValueMap, True),
    "bipft_value_map_zero_init": (ValueMapStart, True),
}


def magnitudes(model, blocks: np.ndarray) -> list[dict]:
    """Per layer: score spreads and context sizes of the binary terms and the estimators' terms."""
    rows: list[dict] = []
    forward = bn.binary_attention_forward

    def measured(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        side = module.binary
        hidden, cache = side.hidden, side.cache  # residual_maps consumes them; the real forward needs them
        groups = getattr(module, "num_key_value_groups", 1)
        k_all, v_all = bn.repeat_kv(key, groups), bn.repeat_kv(value, groups)
        q, k, v = side.query(query), side.key(k_all), side.value(v_all)
        binary_scores = bn.binary_product(q, k.transpose(-1, -2)).float() * scaling
        maps = side.residual_maps(module.layer_idx, k_all.shape[-2])
        if maps is None:  # the plain binary network: its estimator terms are zero
            maps = tuple(torch.zeros(q.shape[0], 1, q.shape[2], 1) for _ in bn.ESTIMATORS)
        q_p, q_m, k_p, k_m, v_p = maps
        map_scores = (q_m @ k_p.transpose(-1, -2) + q_p @ k_m.transpose(-1, -2)
                      + q_p @ k_p.transpose(-1, -2)).float() * scaling
        side.hidden, side.cache = hidden, cache
        out, probs = forward(module, query, key, value, attention_mask, scaling, dropout, **kw)
        rows.append({"layer": module.layer_idx,
                     "score_spread_binary": _row_spread(binary_scores), "score_spread_maps": _row_spread(map_scores),
                     "context_std_binary": bn.binary_product(probs, v).float().std().item(),
                     "context_std_value_map": (probs.float() @ v_p).std().item(),
                     "alpha_probs": side.probs.alpha.item()})
        return out, probs

    bn.ALL_ATTENTION_FUNCTIONS.register(bn.BINARY_ATTENTION, measured)
    try:
        with torch.no_grad():
            model(torch.as_tensor(blocks.astype(np.int64)))
    finally:
        bn.ALL_ATTENTION_FUNCTIONS.register(bn.BINARY_ATTENTION, forward)
    return rows


def _row_spread(scores: torch.Tensor) -> float:
    """Mean over query rows (past the first 8 tokens) of the std over the keys each row sees."""
    length = scores.shape[-1]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    masked = scores.masked_fill(~causal, float("nan"))
    centred = masked - torch.nanmean(masked, -1, keepdim=True)
    return torch.sqrt(torch.nanmean(centred ** 2, -1))[..., 8:].mean().item()


def run(train_blocks, val_blocks, variant: str, seed: int, args) -> dict:
    method_cls, estimators = VARIANTS[variant]
    params = method_cls.Params(steps=1000, batch_size=16, lr=2e-3, warmup_steps=100, seed=seed, estimators=estimators)
    model = build_model("micro", VOCAB, SEQ, seed=seed)
    method = method_cls(params)
    result = train(model, train_blocks, params, method, progress=False, stop_after_step=args.steps)
    bn.install_binary_network(model, estimators, method.auxiliary_tensors())
    val = evaluate_perplexity(model, val_blocks, batch_size=32)
    return {"variant": variant, "seed": seed, "precision": result.precision,
            "train_loss_last50": float(np.mean(result.losses[-50:])), "val_loss": val["loss"],
            "train_seconds": result.wall_seconds}


def probe_trained(paths: list[str], blocks: np.ndarray, out: Path) -> None:
    """Magnitudes and probability scales of trained binary models (their artifacts' directories)."""
    from safetensors.torch import load_file
    from components.model.presets import load_model

    models = {}
    for path in paths:
        facts = json.loads((Path(path) / "paperdag.json").read_text())
        model = load_model(path).eval()
        estimators = facts["binary_network"]["estimators"]
        bn.install_binary_network(model, estimators, load_file(str(Path(path) / "auxiliary.safetensors")))
        models[path] = {"stage": json.loads((Path(path) / "manifest.json").read_text()).get("stage"),
                        "estimators": estimators, "layers": magnitudes(model, blocks)}
    commit, cpu = commit_and_cpu()
    result = {"commit": commit, "cpu": cpu, "models": models,
              "command": "python benchmarks/bipft_estimator_study.py " + " ".join(sys.argv[1:])}
    lines = [f"Trained BiPFT models probed at `{commit}` on {cpu} (16 validation blocks):", "",
             "| model | layer | score spread: binary | score spread: maps | context std: binary | "
             "context std: value map | probability scale |", "|---|---|---|---|---|---|---|"]
    for path, m in models.items():
        for r in m["layers"]:
            lines.append(f"| `{m['stage']}` ({Path(path).name[:8]}) | {r['layer']} | {r['score_spread_binary']:.3f} | "
                         f"{r['score_spread_maps']:.3f} | {r['context_std_binary']:.4f} | "
                         f"{r['context_std_value_map']:.4f} | {r['alpha_probs']:.4f} |")
    write_result(out, result, "\n".join(lines) + "\n")


def _markdown(result: dict) -> str:
    lines = [f"BiPFT estimator study at `{result['commit']}` on {result['cpu']} ({result['command']}).", "",
             "Magnitudes at initialisation (micro, seed 0, 16 validation blocks; score spreads are the std over "
             "keys within each query row, times 1/sqrt(d_head)):", "",
             "| layer | score spread: binary | score spread: maps | context std: binary | context std: value map |",
             "|---|---|---|---|---|"]
    for r in result["init_magnitudes"]:
        lines.append(f"| {r['layer']} | {r['score_spread_binary']:.3f} | {r['score_spread_maps']:.3f} | "
                     f"{r['context_std_binary']:.4f} | {r['context_std_value_map']:.4f} |")
    lines += ["", f"Training ablation ({result['steps']} steps of the recipe's 1000-step schedule, seeds "
              f"{result['seeds']}; validation loss on the whole validation split):", "",
              "| variant | train loss (last 50 steps) | validation loss | validation ppl |", "|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| `{r['variant']}` seed {r['seed']} | {r['train_loss_last50']:.3f} | {r['val_loss']:.3f} | "
                     f"{np.exp(r['val_loss']):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bipft_estimator_study.json"))
    ap.add_argument("--probe", nargs="+", default=None, help="trained BiPFT/binary model artifact directories")
    args = ap.parse_args()
    t0 = time.perf_counter()
    train_blocks, val_blocks = build_blocks()
    if args.probe:
        return probe_trained(args.probe, val_blocks[:16], Path(args.out).with_name("bipft_estimator_probe.json"))
    fresh = build_model("micro", VOCAB, SEQ, seed=0).eval()
    bn.install_binary_network(fresh, estimators=True)
    init_rows = magnitudes(fresh, val_blocks[:16])
    runs = []
    for seed in args.seeds:
        for variant in args.variants:
            runs.append(run(train_blocks, val_blocks, variant, seed, args))
            print(f"[{time.perf_counter() - t0:5.0f}s] {variant} seed {seed}: train {runs[-1]['train_loss_last50']:.3f}"
                  f" validation {runs[-1]['val_loss']:.3f}", flush=True)
    commit, cpu = commit_and_cpu()
    result = {"commit": commit, "cpu": cpu, "steps": args.steps, "seeds": args.seeds, "model": "micro",
              "init_magnitudes": init_rows, "runs": runs, "torch_threads": torch.get_num_threads(),
              "wall_seconds": time.perf_counter() - t0,
              "command": "python benchmarks/bipft_estimator_study.py " + " ".join(sys.argv[1:])}
    write_result(args.out, result, _markdown(result))


if __name__ == "__main__":
    main()
