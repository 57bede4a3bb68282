"""GPTQ on CPU: paperdag's GptqQuantizer vs llm-compressor's GPTQModifier, same model, data and bits.

llm-compressor is never a paperdag dependency: it lives in its own venv (``bash
benchmarks/llmcompressor_env.sh`` -> benchmarks/_work/llmc-venv). This orchestrator runs with the
project venv; every quantization runs in a fresh subprocess (``benchmarks/_gptq_worker.py``: ours
with the project python, llm-compressor's with the llmc-venv python). Per config and repeat the two
sides alternate (ours first on even repeats, theirs first on odd ones) so load noise hits both.

Measured per config (W4 per-channel, W4 group-64, W3 per-channel by default):

- ``quantize_s``: the quantization call only (``GptqQuantizer.quantize`` / ``oneshot``), timed
  inside the worker with ``time.perf_counter`` (imports and model loading excluded); median of
  ``--repeats``. ``process_s``: the whole worker process (python start, imports, load, quantize,
  save), timed here. Both also as CPU time (``*_cpu_s``), which other load on a shared core
  disturbs far less than wall time. Ratios are ours / llm-compressor.
- perplexity of fp32, ours and theirs on the eval split, all with the same code
  (``components.eval.perplexity.evaluate_perplexity``) on the same fp32 model with only the
  quantized Linear weights replaced by each side's dequantized weights;
- that every quantized weight lies on a ``2**bits``-level grid per row/group (``w / scale`` is an
  integer within the side's code range), per-layer agreement ours vs theirs, and that repeats
  are bit-identical;
- RTN with each side's grid (ours: ``absmax/(2^(b-1)-1)``, codes ``±(2^(b-1)-1)``;
  compressed-tensors: ``absmax/((2^b-1)/2)``, codes ``[-2^(b-1), 2^(b-1)-1]``) as a reference
  for how much of a difference the grid alone makes;
- ``kl_*``: mean per-token KL(fp32 || quantized) on the eval split: on a small, lightly trained
  model perplexity barely moves at 4 bits, KL still separates the methods;
- with ``--diagnostics`` (1 run each, quality only): llm-compressor with
  ``sequential_targets=["Linear"]`` and ours with ``true_sequential=True`` (each Linear's Hessian
  collected after the earlier Linears of its block are quantized); ours on compressed-tensors' grid (``--ours-ct-grid``); for
  group configs ours with static groups (scales from the original weights, like llm-compressor),
  and both together. These patch the solver inside the worker process only.

Calibration: ``calibration_sample(train.npy, --n-calib, --seed)`` (the quantize stage's sampler),
saved once as an int64 tensor and loaded by both workers; llm-compressor gets it as a pre-tokenized
``datasets.Dataset`` of ``input_ids`` (no tokenizer, BOS, padding or truncation: the worker checks
the batches its dataloader yields hold exactly these rows).

Any pipeline artifact works: ``--model`` an HF model directory (e.g. from ``paperdag run quickstart
--only pretrain_dense``: the model artifact path it prints), ``--tokens`` the tokenize stage's
directory (``train.npy`` and ``test.npy``/``validation.npy`` of int token blocks).

    bash benchmarks/llmcompressor_env.sh
    taskset -c 1 env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1 \\
      .venv/bin/python benchmarks/bench_gptq_llmcompressor.py \\
        --model /work/devfix/micro_dense --tokens /work/devfix/tokens [--repeats 3] [--diagnostics]
    -> benchmarks/results/gptq_llmcompressor.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORKER = ROOT / "benchmarks" / "_gptq_worker.py"
OURS_PY = ROOT / ".venv" / "bin" / "python"
LLMC_PY = ROOT / "benchmarks" / "_work" / "llmc-venv" / "bin" / "python"
WORK = ROOT / "benchmarks" / "_work" / "gptq-bench"
RESULT = ROOT / "benchmarks" / "results" / "gptq_llmcompressor.json"
DIAGNOSTICS = ("llmc_seq_linear", "ours_true_sequential", "ours_ct_grid", "ours_static_groups", "ours_ct_grid_static_groups")

CONFIGS = {
    "w4_per_channel": dict(bits=4, granularity="per_channel"),
    "w4_group64": dict(bits=4, granularity="group", group_size=64),
    "w3_per_channel": dict(bits=3, granularity="per_channel"),
}


def worker_cmd(python: Path, side: str, cfg: dict, args, out: Path, extra: list[str]) -> list[str]:
    cmd = [str(python), str(WORKER), "--side", side, "--model", str(args.model), "--calib", str(WORK / "calib.pt"),
           "--out", str(out), "--bits", str(cfg["bits"]), "--granularity", cfg["granularity"],
           "--damp", str(args.damp), "--block-size", str(args.block_size), "--batch-size", str(args.batch_size)]
    if cfg["granularity"] == "group":
        cmd += ["--group-size", str(cfg["group_size"])]
    return cmd + extra


def run_worker(python: Path, side: str, cfg: dict, args, out: Path, extra: list[str] = ()) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
               TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH="")
    cmd = worker_cmd(python, side, cfg, args, out, list(extra))
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    process_s = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    process_cpu_s = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        print(f"  {side} FAILED (exit {proc.returncode}); see {out}.log", flush=True)
        return {"ok": False, "returncode": proc.returncode, "error_tail": tail, "command": cmd,
                "process_s": process_s, "process_cpu_s": process_cpu_s}
    info = json.loads(Path(f"{out}.json").read_text())
    info.update(ok=True, process_s=process_s, process_cpu_s=process_cpu_s, command=cmd)
    print(f"  {side}: quantize {info['quantize_s']:.2f} s (cpu {info['quantize_cpu_s']:.2f} s), "
          f"process {process_s:.2f} s (cpu {process_cpu_s:.2f} s)", flush=True)
    return info


# ---------------------------------------------------------------- analysis (project venv)

def load_tensors(stem: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(f"{stem}.safetensors")


def grid_check(tensors: dict, bits: int) -> dict:
    """Every weight on a per-row/per-group grid of at most 2**bits integer levels."""
    import torch

    worst_frac, code_min, code_max, max_levels, n = 0.0, None, None, 0, 0
    for key in sorted(k for k in tensors if k.endswith(".weight")):
        w = tensors[key].double()
        s = tensors[key + "_scale"].double()
        groups = s.shape[1]
        codes = (w.reshape(w.shape[0], groups, -1) / s.unsqueeze(-1)).reshape(w.shape)
        worst_frac = max(worst_frac, float((codes - codes.round()).abs().max()))
        c = codes.round()
        code_min = float(c.min()) if code_min is None else min(code_min, float(c.min()))
        code_max = float(c.max()) if code_max is None else max(code_max, float(c.max()))
        grouped = c.reshape(w.shape[0] * groups, -1)
        max_levels = max(max_levels, max(len(torch.unique(r)) for r in grouped))
        n += 1
    return {"layers": n, "max_abs_code_minus_round": worst_frac, "code_min": code_min, "code_max": code_max,
            "max_levels_per_row_or_group": max_levels,
            "on_grid": worst_frac < 1e-3 and max_levels <= 2 ** bits and code_max - code_min <= 2 ** bits - 1}


def agreement(a: dict, b: dict) -> dict:
    per_layer, differ = {}, 0
    for key in sorted(k for k in a if k.endswith(".weight")):
        d = (a[key] - b[key]).abs()
        frac = float((d > 1e-6).float().mean())
        rel = float((a[key] - b[key]).norm() / b[key].norm())
        per_layer[key.removesuffix(".weight")] = {"max_abs_diff": float(d.max()), "frac_elements_differ": frac,
                                                   "rel_fro_diff": rel}
        differ += float(d.max()) > 0
    return {"layers_compared": len(per_layer), "layers_differing": differ,
            "max_abs_diff": max(v["max_abs_diff"] for v in per_layer.values()),
            "mean_frac_elements_differ": statistics.fmean(v["frac_elements_differ"] for v in per_layer.values()),
            "per_layer": per_layer}


def repeats_identical(stems: list[Path]) -> float:
    first = load_tensors(stems[0])
    worst = 0.0
    for s in stems[1:]:
        other = load_tensors(s)
        worst = max(worst, max(float((first[k] - other[k]).abs().max()) for k in first))
    return worst


class Evaluator:
    def __init__(self, model_dir: Path, eval_blocks, batch_size: int):
        import torch
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.fp32 = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.blocks, self.batch_size = eval_blocks, batch_size
        self.ref = None

    def ppl(self, weights: dict | None = None) -> float:
        from components.eval.perplexity import evaluate_perplexity

        state = dict(self.fp32)
        for k, v in (weights or {}).items():
            if k.endswith(".weight"):
                if k not in state or state[k].shape != v.shape:
                    raise KeyError(f"quantized tensor {k} {tuple(v.shape)} does not match the model")
                state[k] = v.to(state[k].dtype)
        self.model.load_state_dict(state, strict=True)
        return evaluate_perplexity(self.model, self.blocks, batch_size=self.batch_size)["ppl"]

    def kl(self) -> float:
        """Mean per-token KL(fp32 || current weights) over the eval blocks (after ``ppl`` loaded them).

        More sensitive than perplexity on a small, lightly trained model: it sees every change of
        the output distribution, not only the change of the target token's probability."""
        import torch
        import torch.nn.functional as F

        starts = range(0, len(self.blocks), self.batch_size)
        if self.ref is None:  # fp32 log-probs, computed once (eval tokens x vocab floats)
            import copy

            ref = copy.deepcopy(self.model)
            ref.load_state_dict(self.fp32, strict=True)
            with torch.no_grad():
                self.ref = [F.log_softmax(ref(input_ids=torch.as_tensor(
                    self.blocks[s:s + self.batch_size], dtype=torch.long)).logits.float(), -1) for s in starts]
            del ref
        total, count = 0.0, 0
        with torch.no_grad():
            for p, start in zip(self.ref, starts):
                ids = torch.as_tensor(self.blocks[start:start + self.batch_size], dtype=torch.long)
                q = F.log_softmax(self.model(input_ids=ids).logits.float(), -1)
                total += float((p.exp() * (p - q)).sum())
                count += ids.numel()
        return total / count

    def measure(self, weights: dict | None = None) -> dict:
        ppl = self.ppl(weights)
        return {"ppl": ppl, "kl_to_fp32": self.kl()}

    def targets(self) -> list[str]:
        import torch

        return [f"{n}.weight" for n, m in self.model.named_modules()
                if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]


def rtn(weights: dict, names: list[str], cfg: dict, grid: str) -> dict:
    """Round-to-nearest with ours (``components.quant.rtn``) or compressed-tensors' symmetric grid."""
    import torch

    from components.quant.rtn import quantize_tensor

    out = {}
    bits = cfg["bits"]
    for n in names:
        w = weights[n].float()
        if grid == "ours":
            out[n] = quantize_tensor(w, bits, cfg["granularity"], cfg.get("group_size", 128), True, n)[3]
        else:  # compressed-tensors: scale = absmax / ((qmax - qmin) / 2), q in [qmin, qmax], fp32 scale
            qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            g = w.reshape(w.shape[0], -1, cfg["group_size"]) if cfg["granularity"] == "group" else w.unsqueeze(1)
            s = g.abs().amax(-1, keepdim=True) / ((qmax - qmin) / 2)
            s = torch.where(s == 0, torch.full_like(s, torch.finfo(torch.float32).eps), s)
            out[n] = (torch.clamp(torch.round(g / s), qmin, qmax) * s).reshape(w.shape)
    return out


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="HF model directory (fp32 safetensors)")
    ap.add_argument("--tokens", type=Path, required=True, help="tokenize-stage dir with train.npy and the eval split")
    ap.add_argument("--eval-split", default="test", help="test or validation (<split>.npy under --tokens)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--diagnostics", action="store_true", help="also the two matched-pipeline runs (1 repeat each)")
    ap.add_argument("--analyze-only", action="store_true",
                    help="skip the quantization runs; re-analyze the last ones (benchmarks/_work/gptq-bench/runs.json)")
    ap.add_argument("--llmc-python", type=Path, default=LLMC_PY)
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args()

    import numpy as np
    import torch
    import transformers

    from components.quant.calibration import calibration_sample

    WORK.mkdir(parents=True, exist_ok=True)
    calib = calibration_sample(np.load(args.tokens / "train.npy"), args.n_calib, args.seed)
    torch.save(calib, WORK / "calib.pt")
    eval_blocks = np.load(args.tokens / f"{args.eval_split}.npy")
    llmc_ok = args.llmc_python.exists()
    if not llmc_ok:
        print(f"llm-compressor venv missing at {args.llmc_python}: run bash benchmarks/llmcompressor_env.sh", flush=True)

    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    runs: dict[str, dict] = {}
    runs_file = WORK / "runs.json"
    if args.analyze_only:
        runs = {n: v for n, v in json.loads(runs_file.read_text()).items() if n in names}
        names = [n for n in names if n in runs]
    for name in ([] if args.analyze_only else names):
        cfg = CONFIGS[name]
        runs[name] = {"ours": [], "llmc": []}
        for r in range(args.repeats):
            order = ("ours", "llmc") if r % 2 == 0 else ("llmc", "ours")
            print(f"[{name}] repeat {r + 1}/{args.repeats}", flush=True)
            for side in order:
                if side == "llmc" and not llmc_ok:
                    runs[name]["llmc"].append({"ok": False, "error_tail": f"no interpreter at {args.llmc_python}"})
                    continue
                py = OURS_PY if side == "ours" else args.llmc_python
                info = run_worker(py, side, cfg, args, WORK / f"{name}.{side}.r{r}")
                info["stem"] = str(WORK / f"{name}.{side}.r{r}")
                runs[name][side].append(info)
        if args.diagnostics:
            print(f"[{name}] diagnostics", flush=True)
            if llmc_ok:
                d = run_worker(args.llmc_python, "llmc", cfg, args, WORK / f"{name}.llmc_seqlinear",
                               ["--llmc-sequential-targets", "Linear"])
                d["stem"] = str(WORK / f"{name}.llmc_seqlinear")
                runs[name]["llmc_seq_linear"] = [d]
            diags = [("ours_true_sequential", ["--ours-true-sequential"]), ("ours_ct_grid", ["--ours-ct-grid"])]
            if cfg["granularity"] == "group":
                diags += [("ours_static_groups", ["--ours-static-groups"]),
                          ("ours_ct_grid_static_groups", ["--ours-ct-grid", "--ours-static-groups"])]
            for diag, flags in diags:
                d = run_worker(OURS_PY, "ours", cfg, args, WORK / f"{name}.{diag}", flags)
                d["stem"] = str(WORK / f"{name}.{diag}")
                runs[name][diag] = [d]

    if not args.analyze_only:
        runs_file.write_text(json.dumps(runs, indent=2, default=str))
    print("evaluating perplexity", flush=True)
    ev = Evaluator(args.model, eval_blocks, args.batch_size)
    targets = ev.targets()
    ppl_fp32 = ev.ppl()
    results: dict[str, dict] = {}
    for name in names:
        cfg, rr = CONFIGS[name], runs[name]
        res: dict = {"config": cfg}
        for side in ("ours", "llmc"):
            ok = [i for i in rr[side] if i.get("ok")]
            res[f"{side}_quantize_s"] = [i["quantize_s"] for i in ok]
            res[f"{side}_process_s"] = [i["process_s"] for i in ok]
            res[f"{side}_quantize_cpu_s"] = [i["quantize_cpu_s"] for i in ok]
            res[f"{side}_process_cpu_s"] = [i["process_cpu_s"] for i in ok]
            res[f"{side}_quantize_cpu_s_median"] = median(res[f"{side}_quantize_cpu_s"])
            res[f"{side}_process_cpu_s_median"] = median(res[f"{side}_process_cpu_s"])
            res[f"{side}_quantize_s_median"] = median(res[f"{side}_quantize_s"])
            res[f"{side}_process_s_median"] = median(res[f"{side}_process_s"])
            res[f"{side}_import_s_median"] = median([i["import_s"] for i in ok])
            res[f"{side}_load_s_median"] = median([i["load_s"] for i in ok])
            failed = [i for i in rr[side] if not i.get("ok")]
            if failed:
                res[f"{side}_errors"] = [{"returncode": i.get("returncode"), "error_tail": i.get("error_tail")}
                                         for i in failed]
            if ok:
                t = load_tensors(Path(ok[0]["stem"]))
                if sorted(k for k in t if k.endswith(".weight")) != sorted(targets):
                    raise RuntimeError(f"{side} quantized a different set of layers than the model's decoder Linears")
                res[f"{side}_grid"] = grid_check(t, cfg["bits"])
                res[f"{side}_repeats_max_abs_diff"] = repeats_identical([Path(i["stem"]) for i in ok])
                m = ev.measure(t)
                res[f"ppl_{side}"], res[f"kl_{side}"] = m["ppl"], m["kl_to_fp32"]
        ours_ok, llmc_ok_runs = [i for i in rr["ours"] if i.get("ok")], [i for i in rr["llmc"] if i.get("ok")]
        if llmc_ok_runs:
            info = llmc_ok_runs[0]
            res["llmc_rtn_fallback_logged"] = any(i.get("rtn_fallback_logged") for i in llmc_ok_runs)
            res["llmc_warnings"] = sorted({w.split(" - ", 1)[-1] for i in llmc_ok_runs for w in i["warnings_logged"]})
            res["llmc_calibration_check"] = info["calibration_batches_match_tensor"]
            res["llmc_recipe"] = info["recipe"]
            res["llmc_oneshot_kwargs"] = info["oneshot_kwargs"]
        if ours_ok:
            codes = {json.dumps(i["code"], sort_keys=True) for i in ours_ok}
            if len(codes) > 1:  # the tree changed between repeats: the timings mix two versions
                raise RuntimeError(f"{name}: our GPTQ code changed between repeats: {codes}; rerun")
            res["ours_code"] = ours_ok[0]["code"]
            res["ours_params"] = ours_ok[0]["params"]
            res["ours_metrics"] = ours_ok[0]["metrics"]
        if ours_ok and llmc_ok_runs:
            res["ratio_quantize_ours_over_llmc"] = res["ours_quantize_s_median"] / res["llmc_quantize_s_median"]
            res["ratio_process_ours_over_llmc"] = res["ours_process_s_median"] / res["llmc_process_s_median"]
            res["ratio_quantize_cpu_ours_over_llmc"] = (res["ours_quantize_cpu_s_median"]
                                                        / res["llmc_quantize_cpu_s_median"])
            res["ratio_process_cpu_ours_over_llmc"] = res["ours_process_cpu_s_median"] / res["llmc_process_cpu_s_median"]
            res["ppl_rel_diff_ours_vs_llmc"] = res["ppl_ours"] / res["ppl_llmc"] - 1
            res["ppl_within_1pct"] = abs(res["ppl_rel_diff_ours_vs_llmc"]) <= 0.01
            res["ppl_ours_not_worse_than_llmc_plus_1pct"] = res["ppl_ours"] <= 1.01 * res["ppl_llmc"]
            res["faster"] = res["ratio_quantize_ours_over_llmc"] < 1
            agree = agreement(load_tensors(Path(ours_ok[0]["stem"])), load_tensors(Path(llmc_ok_runs[0]["stem"])))
            res["agreement_ours_vs_llmc"] = agree
        for grid in ("ours", "llmc"):
            m = ev.measure(rtn(ev.fp32, targets, cfg, grid))
            res[f"ppl_rtn_{grid}_grid"], res[f"kl_rtn_{grid}_grid"] = m["ppl"], m["kl_to_fp32"]
        for diag in DIAGNOSTICS:
            for i in rr.get(diag, []):
                if i.get("ok"):
                    t = load_tensors(Path(i["stem"]))
                    res[f"diag_{diag}"] = {**ev.measure(t), "grid": grid_check(t, cfg["bits"]), "quantize_s": i["quantize_s"],
                                           "rtn_fallback_logged": i.get("rtn_fallback_logged")}
                    if llmc_ok_runs:
                        agree = agreement(t, load_tensors(Path(llmc_ok_runs[0]["stem"])))
                        res[f"diag_{diag}"]["agreement_vs_llmc"] = {k: v for k, v in agree.items() if k != "per_layer"}
                else:
                    res[f"diag_{diag}"] = {"error_tail": i.get("error_tail")}
        res["ppl_fp32"] = ppl_fp32
        results[name] = res

    first = lambda side, key: next((i[key] for n in names for i in runs[n][side] if i.get("ok") and key in i), None)  # noqa: E731
    summary = {n: {k: results[n].get(k) for k in (
        "ratio_quantize_ours_over_llmc", "ratio_process_ours_over_llmc", "ratio_quantize_cpu_ours_over_llmc",
        "ratio_process_cpu_ours_over_llmc", "ours_quantize_s_median",
        "llmc_quantize_s_median", "ppl_fp32", "ppl_ours", "ppl_llmc", "ppl_rel_diff_ours_vs_llmc",
        "kl_ours", "kl_llmc", "ppl_rtn_ours_grid", "ppl_rtn_llmc_grid")} for n in names}
    for n in names:
        for diag in DIAGNOSTICS:
            if f"diag_{diag}" in results[n]:
                summary[n][f"diag_{diag}"] = results[n][f"diag_{diag}"]
    out = {
        "setup": {
            "model": str(args.model), "tokens": str(args.tokens), "eval_split": args.eval_split,
            "eval_tokens": int(eval_blocks.shape[0] * (eval_blocks.shape[1] - 1)),
            "calibration": f"calibration_sample(train.npy, {args.n_calib}, seed={args.seed}): int64 {list(calib.shape)}",
            "repeats": args.repeats, "damp": args.damp, "block_size": args.block_size,
            "calibration_batch_size": args.batch_size,
            "timing": "quantize_s: the quantize call only, perf_counter inside the worker (imports, model load, "
                      "save excluded); process_s: whole worker process; *_cpu_s: CPU time (process_time in the "
                      "worker / rusage of the child), less sensitive to other load on the shared core; medians "
                      "over repeats; sides alternate",
            "threads": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                        "affinity": sorted(os.sched_getaffinity(0))},
            "machine": platform.processor() or platform.machine(),
            "ours_versions": {"torch": first("ours", "torch") or torch.__version__,
                              "transformers": first("ours", "transformers") or transformers.__version__},
            "llmc_versions": {k: first("llmc", k) for k in ("torch", "transformers", "llmcompressor",
                                                              "compressed_tensors", "datasets")},
            "matched_config": {
                "ours": "GptqQuantizer.Params(bits, granularity, group_size, symmetric=True, damp, block_size, "
                        "act_order=False, batch_size, true_sequential=False (default: one Hessian pass per "
                        "block, like llm-compressor's default decoder-layer sequential pipeline)); targets: "
                        "every nn.Linear under model.layers.*",
                "llmc": "GPTQModifier(config_groups={targets:[Linear], weights:{num_bits, type:int, symmetric:true, "
                        "strategy:channel|group, group_size, actorder:null, observer:memoryless_minmax}}, "
                        "ignore=[lm_head], block_size, dampening_frac=damp, actorder=None); oneshot(dataset="
                        "Dataset(input_ids), num_calibration_samples=n, max_seq_length=seq_len, "
                        "shuffle_calibration_samples=False, batch_size)",
            },
        },
        "summary": summary,
        "configs": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str))
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
