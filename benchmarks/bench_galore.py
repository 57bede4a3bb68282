"""Parity and speed of paperdag's GaLoreAdamW against the GaLore authors' ``galore-torch`` package.

Both sides start from the same weights (the 28 block matrices of the ``micro`` preset: 256x256
attention projections, 704x256 and 256x704 MLP projections) and apply the same sequence of
seeded gradients with the same hyperparameters, each in its own process: ours in the project
venv, galore-torch's ``GaLoreAdamW`` in benchmarks/_work/galore-venv (see galore_env.sh; it
imports nothing from paperdag). Reported per setting:

- the max |ours - galore-torch| over every weight after the first step and after the last
  (the issue asks for one step within 1e-6);
- the mean wall time of one optimizer step over all 28 matrices on each side (SVD refreshes
  included), and the ratio ours / galore-torch; and, in our process, torch's fused AdamW on the same matrices and
  gradients (the obvious baseline: what GaLore costs over plain AdamW);
- the optimizer-state bytes of both sides for those matrices, measured from the state tensors.

    bash benchmarks/galore_env.sh
    python benchmarks/bench_galore.py [--steps 30]   -> benchmarks/results/galore.{json,md}
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
WORK = ROOT / "benchmarks" / "_work" / "galore-bench"
PEER_PYTHON = ROOT / "benchmarks" / "_work" / "galore-venv" / "bin" / "python"
RESULTS = ROOT / "benchmarks" / "results"
SHAPES = [(256, 256)] * 4 + [(704, 256), (704, 256), (256, 704)]  # q k v o, gate up, down of one micro block
LAYERS = 4
# (name, rank, update_proj_gap, scale, lr, weight_decay): the paper's pretraining setting, and one
# with a short gap and weight decay so that refreshes and decay are compared too
SETTINGS = [("paper (rank 64, gap 200, scale 0.25)", 64, 200, 0.25, 0.01, 0.0),
            ("gap 5, weight decay 0.1", 64, 5, 0.25, 0.01, 0.1)]
BETAS, EPS = (0.9, 0.999), 1e-6  # galore-torch's defaults, used on both sides


def make_inputs(steps: int) -> None:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(LAYERS * len(SHAPES)):
        shape = SHAPES[i % len(SHAPES)]
        tensors[f"w{i}"] = torch.randn(shape, generator=gen) * 0.02
        for t in range(steps):
            tensors[f"g{i}.{t}"] = torch.randn(shape, generator=gen) * 1e-3
    WORK.mkdir(parents=True, exist_ok=True)
    save_file(tensors, WORK / "inputs.safetensors")


def side(name: str, steps: int, out: Path) -> None:
    """One side's run of every setting (and, for ours, torch's AdamW), in this process."""
    import torch
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)  # both sides on one core: the ratio is not a thread-count artefact
    data = load_file(WORK / "inputs.safetensors")
    n = LAYERS * len(SHAPES)
    report, weights = {}, {}

    def run(label: str, make_optimizer) -> None:
        params = [torch.nn.Parameter(data[f"w{i}"].clone()) for i in range(n)]
        opt = make_optimizer(params)
        times = []
        for t in range(steps):
            for i, p in enumerate(params):
                p.grad = data[f"g{i}.{t}"]
            start = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)
            if t == 0:
                weights.update({f"{label}|first|{i}": p.detach().clone() for i, p in enumerate(params)})
        weights.update({f"{label}|last|{i}": p.detach().clone() for i, p in enumerate(params)})
        state_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                          if isinstance(v, torch.Tensor))
        if name == "peer":  # galore-torch keeps the projection in a GaLoreProjector object
            state_bytes += sum(s["projector"].ortho_matrix.numel() * 4 for s in opt.state.values() if "projector" in s)
        report[label] = {"median_step_s": statistics.median(times), "mean_step_s": statistics.fmean(times),
                         "state_bytes": state_bytes}

    for label, rank, gap, scale, lr, wd in SETTINGS:
        if name == "peer":
            from galore_torch import GaLoreAdamW as PeerAdamW

            run(label, lambda ps: PeerAdamW([{"params": ps, "rank": rank, "update_proj_gap": gap, "scale": scale,
                                              "proj_type": "std"}], lr=lr, betas=BETAS, eps=EPS, weight_decay=wd,
                                             no_deprecation_warning=True))
        else:
            sys.path.insert(0, str(ROOT))
            from components.train.galore import GaLoreAdamW

            run(label, lambda ps: GaLoreAdamW([{"params": ps, "rank": rank, "update_proj_gap": gap, "scale": scale}],
                                              lr=lr, betas=BETAS, eps=EPS, weight_decay=wd))
            run(label + "|adamw", lambda ps: torch.optim.AdamW(ps, lr=lr, betas=BETAS, eps=EPS, weight_decay=wd,
                                                               fused=True))
    save_file({k.replace("|", "__").replace(" ", "_").replace(",", "").replace("(", "").replace(")", ""): v
               for k, v in weights.items()}, out.with_suffix(".safetensors"))
    out.with_suffix(".json").write_text(json.dumps({"versions": {"torch": torch.__version__}, "report": report}))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--side", choices=("ours", "peer"))
    args = ap.parse_args()
    if args.side:
        side(args.side, args.steps, WORK / args.side)
        return 0
    if not PEER_PYTHON.exists():
        print(f"{PEER_PYTHON} is missing: run `bash benchmarks/galore_env.sh` first", file=sys.stderr)
        return 2
    import torch
    from safetensors.torch import load_file

    make_inputs(args.steps)
    for name, python in (("ours", sys.executable), ("peer", str(PEER_PYTHON))):
        subprocess.run([python, __file__, "--side", name, "--steps", str(args.steps)], check=True)
    ours, peer = (load_file(WORK / f"{n}.safetensors") for n in ("ours", "peer"))
    reports = {n: json.loads((WORK / f"{n}.json").read_text())["report"] for n in ("ours", "peer")}
    peer_version = subprocess.run([str(PEER_PYTHON), "-c", "import importlib.metadata as m; print(m.version('galore-torch'))"],
                                  capture_output=True, text=True, check=True).stdout.strip()
    rows = []
    for label, *_ in SETTINGS:
        key = label.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        diff = {when: max(float((ours[f"{key}__{when}__{i}"] - peer[f"{key}__{when}__{i}"]).abs().max())
                          for i in range(LAYERS * len(SHAPES))) for when in ("first", "last")}
        o, p, a = reports["ours"][label], reports["peer"][label], reports["ours"][label + "|adamw"]
        rows.append({"setting": label, "max_abs_diff_first_step": diff["first"], "max_abs_diff_last_step": diff["last"],
                     "ours_step_s": o["mean_step_s"], "galore_torch_step_s": p["mean_step_s"],
                     "adamw_step_s": a["mean_step_s"], "ratio_ours_over_galore_torch": o["mean_step_s"] / p["mean_step_s"],
                     "ratio_ours_over_adamw": o["mean_step_s"] / a["mean_step_s"],
                     "state_bytes_ours": o["state_bytes"], "state_bytes_galore_torch": p["state_bytes"],
                     "state_bytes_adamw": a["state_bytes"]})
    result = {"steps": args.steps, "matrices": LAYERS * len(SHAPES), "galore_torch": peer_version,
              "torch": torch.__version__, "threads": 1, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "galore.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"GaLoreAdamW vs galore-torch {peer_version} on the {LAYERS * len(SHAPES)} block matrices of `micro`, "
             f"{args.steps} steps of the same seeded gradients, one thread per side.", "",
             "| setting | max abs diff, step 1 | max abs diff, last step | step: ours / galore-torch | "
             "step: ours / torch AdamW | state bytes: ours / galore-torch / AdamW |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['max_abs_diff_first_step']:.1e} | {r['max_abs_diff_last_step']:.1e} | "
                     f"{r['ratio_ours_over_galore_torch']:.2f}x | {r['ratio_ours_over_adamw']:.2f}x | "
                     f"{r['state_bytes_ours']:,} / {r['state_bytes_galore_torch']:,} / {r['state_bytes_adamw']:,} |")
    (RESULTS / "galore.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    worst = max(r["max_abs_diff_first_step"] for r in rows)
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
