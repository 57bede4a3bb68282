"""Parity and speed of paperdag's mergers against mergekit (separate venv, see mergekit_env.sh).

Builds a nano base and two "fine-tunes" (the base plus seeded Gaussian noise), saved as HF dirs with
safetensors, merges them with linear / task_arithmetic / ties in both tools with the same params, and
reports per method the max |ours - mergekit| over all tensors and the wall-time ratio
ours / mergekit, each side timed as a WHOLE PROCESS (python start, imports, load, merge, save;
median of --repeats). Our in-process merge() time is reported alongside for information.

    bash benchmarks/mergekit_env.sh
    python benchmarks/bench_mergekit.py [--repeats 3]   -> benchmarks/results/mergekit.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `components` importable without PYTHONPATH, also in the timed child
WORK = ROOT / "benchmarks" / "_work" / "mergekit-bench"
MERGEKIT_YAML = ROOT / "benchmarks" / "_work" / "mergekit-venv" / "bin" / "mergekit-yaml"
WEIGHTS = [0.6, 0.4]
LAMBDA, DENSITY = 0.8, 0.5
NOISE, VOCAB, SEQ = 0.01, 64, 32

# mergekit config params and the paperdag (key, params) with the same definition
METHODS = {
    "linear": ({}, "uniform_soup", {"weights": WEIGHTS}),  # mergekit linear normalizes by default
    "task_arithmetic": ({"lambda": LAMBDA}, "task_arithmetic", {"weights": WEIGHTS, "scaling": LAMBDA}),
    # mergekit TIES default normalize=True (disjoint mean); ours defaults to the same
    "ties": ({"lambda": LAMBDA, "normalize": True}, "ties",
             {"weights": WEIGHTS, "scaling": LAMBDA, "density": DENSITY, "normalize": True}),
}


def build_checkpoints() -> None:
    import torch

    from components.model.presets import build_model

    base = build_model("nano", vocab_size=VOCAB, max_seq_len=SEQ, seed=0)
    base.save_pretrained(WORK / "base", safe_serialization=True)
    for i, name in enumerate(("ft1", "ft2")):
        model = build_model("nano", vocab_size=VOCAB, max_seq_len=SEQ, seed=0)
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(NOISE * torch.randn(p.shape, generator=gen))
        model.save_pretrained(WORK / name, safe_serialization=True)


def mergekit_config(method: str) -> str:
    shared, _, _ = METHODS[method]
    density = {"density": DENSITY} if method == "ties" else {}
    models = "\n".join(
        f"  - model: {WORK / name}\n    parameters: {json.dumps({'weight': w, **density})}"
        for name, w in zip(("ft1", "ft2"), WEIGHTS))
    base = f"base_model: {WORK / 'base'}\n" if method != "linear" else ""
    params = f"parameters: {json.dumps(shared)}\n" if shared else ""
    return f"merge_method: {method}\n{base}models:\n{models}\n{params}dtype: float32\nout_dtype: float32\n"


def load_dir(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def ours_merge(method: str, out: Path) -> float:
    """Run our merger on the saved dirs, save the result; returns the in-process merge() seconds."""
    from safetensors.torch import save_file

    from components.merge.registry import MERGERS

    _, key, params = METHODS[method]
    cls = MERGERS.get(key)
    base = load_dir(WORK / "base")
    models = [load_dir(WORK / n) for n in ("ft1", "ft2")]
    t = time.perf_counter()
    merged = cls(cls.Params(**params)).merge(base, models, ["ft1", "ft2"])
    seconds = time.perf_counter() - t
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in merged.items()}, str(out / "model.safetensors"))
    return seconds


def timed(cmd: list[str], log: Path) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed (exit {proc.returncode}); see {log}:\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ours-only", nargs=2, metavar=("METHOD", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ours_only:  # the child process timed as "ours, whole process"
        print(json.dumps({"merge_seconds": ours_merge(args.ours_only[0], Path(args.ours_only[1]))}))
        return
    if not MERGEKIT_YAML.exists():
        sys.exit(f"{MERGEKIT_YAML} not found: run `bash benchmarks/mergekit_env.sh` first")
    import torch

    WORK.mkdir(parents=True, exist_ok=True)
    build_checkpoints()
    results = {}
    for method in METHODS:
        cfg = WORK / f"{method}.yml"
        cfg.write_text(mergekit_config(method))
        ours_out, mk_out = WORK / f"ours-{method}", WORK / f"mergekit-{method}"
        ours_s, mk_s = [], []
        for _ in range(args.repeats):  # alternate so machine noise hits both alike
            ours_s.append(timed([sys.executable, __file__, "--ours-only", method, str(ours_out)],
                                WORK / f"ours-{method}.log"))
            mk_s.append(timed([str(MERGEKIT_YAML), str(cfg), str(mk_out), "--no-cuda", "--quiet"],
                              WORK / f"mergekit-{method}.log"))
        in_process = ours_merge(method, ours_out)
        ours, theirs = load_dir(ours_out), load_dir(mk_out)
        common = sorted(set(ours) & set(theirs))
        max_diff = max((ours[k].double() - theirs[k].double()).abs().max().item() for k in common)
        results[method] = {
            "max_abs_diff": max_diff,
            "tensors_compared": len(common),
            "only_ours": sorted(set(ours) - set(theirs)),
            "only_mergekit": sorted(set(theirs) - set(ours)),
            "ours_process_s_median": statistics.median(ours_s),
            "mergekit_process_s_median": statistics.median(mk_s),
            "ratio_ours_over_mergekit_process": statistics.median(ours_s) / statistics.median(mk_s),
            "ours_in_process_merge_s": in_process,
            "parity_ok_1e-6": max_diff <= 1e-6,
        }
        print(method, json.dumps(results[method]))
    mk_version = subprocess.run([str(MERGEKIT_YAML.parent / "python"), "-c",
                                 "import importlib.metadata as m; print(m.version('mergekit'))"],
                                capture_output=True, text=True).stdout.strip()
    out = {
        "setup": {"model": "nano (LlamaForCausalLM, vocab 64, seq 32)", "fine_tunes": f"base + {NOISE}*N(0,1)",
                  "weights": WEIGHTS, "lambda": LAMBDA, "ties_density": DENSITY, "repeats": args.repeats,
                  "timing": "whole process each side (start, imports, load, merge, save), median",
                  "mergekit": mk_version, "torch": torch.__version__},
        "methods": results,
    }
    dest = ROOT / "benchmarks" / "results" / "mergekit.json"
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
