"""One GPTQ run for bench_gptq_llmcompressor.py, in a fresh process, on one side.

    <python> benchmarks/_gptq_worker.py --side ours|llmc --model DIR --calib calib.pt --out OUT \
        --bits 4 --granularity per_channel|group [--group-size 64] [--damp 0.01] [--block-size 128]

``--side ours`` runs with the project venv (paperdag's GptqQuantizer); ``--side llmc`` runs with the
llm-compressor venv (benchmarks/_work/llmc-venv, see llmcompressor_env.sh) and imports nothing from
paperdag. Both load the fp32 model and the calibration tensor (``torch.load(calib, weights_only=True)``: int64
``[n_seq, seq_len]``), time ONLY the quantization call with ``time.perf_counter`` and write:

- ``OUT.safetensors``: for every quantized Linear ``<name>.weight`` (dequantized, fp32) and
  ``<name>.weight_scale`` (fp32 ``[out, groups]``, the per-row/per-group step actually used), so the
  orchestrator can check the weights lie on a ``2**bits`` grid;
- ``OUT.json``: timings (imports, load, quantize: wall and this process's CPU time), versions, thread count, and for llmc the warnings
  it logged (an RTN fallback on a non-PD Hessian is only a log line there).
"""
from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", choices=("ours", "llmc"), required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--out", required=True, help="output path stem (.safetensors and .json are added)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--granularity", choices=("per_channel", "group"), default="per_channel")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward (both sides)")
    ap.add_argument("--ours-static-groups", action="store_true",
                    help="diagnostic: our group scales fixed up front from the original weights, as "
                         "llm-compressor does (GptqQuantizer.Params does not expose this; the worker "
                         "passes static_groups=True to the solver)")
    ap.add_argument("--ours-true-sequential", action="store_true",
                    help="diagnostic: GptqQuantizer.Params(true_sequential=True) (each input-sharing group's "
                         "Hessian through the already-quantized earlier groups of its block)")
    ap.add_argument("--ours-ct-grid", action="store_true",
                    help="diagnostic: our solver on compressed-tensors' symmetric grid (scale = absmax / "
                         "((2^b-1)/2), codes [-2^(b-1), 2^(b-1)-1]; scales still rounded up to fp16) by "
                         "wrapping gptq_solver._fit_grid/_quantize_column in this process only")
    ap.add_argument("--llmc-sequential-targets", default=None,
                    help="diagnostic: comma list for llm-compressor's sequential_targets, e.g. 'Linear' "
                         "(default: the decoder layer, llm-compressor's default)")
    return ap.parse_args()


def target_names(model) -> list[str]:
    import torch

    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]


def run_ours(args, model, calib):
    sys.path.insert(0, str(ROOT))
    import components.quant.gptq as gptq_mod
    from components.quant.gptq import GptqQuantizer

    if args.ours_static_groups:
        import functools

        gptq_mod.gptq_quantize = functools.partial(gptq_mod.gptq_quantize, static_groups=True)
    if args.ours_ct_grid:
        _patch_ct_grid()
    extra = {"true_sequential": True} if args.ours_true_sequential else {}
    params = GptqQuantizer.Params(bits=args.bits, granularity=args.granularity, group_size=args.group_size,
                                  symmetric=True, damp=args.damp, block_size=args.block_size, act_order=False,
                                  batch_size=args.batch_size, **extra)
    names = target_names(model)
    t0, c0 = time.perf_counter(), time.process_time()
    qm = GptqQuantizer(params).quantize(model, calib)
    quant_s = (time.perf_counter() - t0, time.process_time() - c0)
    qm.load_into(model)
    out = {}
    mods = dict(model.named_modules())
    for n in names:
        out[f"{n}.weight"] = mods[n].weight.detach().float().clone()
        out[f"{n}.weight_scale"] = qm.packed[f"{n}.weight.scales"].float().clone()
    info = {"params": params.model_dump(), "code": _code_fingerprint(), "metrics": {k: v for k, v in qm.meta.get("metrics", {}).items()
                                                        if not k.startswith(("output_mse", "rtn_output_mse"))}}
    return quant_s, out, info


def _code_fingerprint() -> dict:
    """Which version of our GPTQ ran: git HEAD plus a hash of the files that implement it."""
    import hashlib
    import subprocess

    files = ["components/quant/gptq.py", "components/quant/gptq_solver.py", "components/quant/calibration.py",
             "components/quant/rtn.py", "components/quant/base.py"]
    h = hashlib.sha256()
    for f in files:
        h.update((ROOT / f).read_bytes())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *files], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return {"git_head": head, "quant_files_sha256": h.hexdigest()[:16], "quant_files_uncommitted": dirty or None}


def _patch_ct_grid() -> None:
    """Diagnostic only: swap our symmetric grid for compressed-tensors' in this process."""
    import torch

    import components.quant.gptq_solver as solver

    fit, quant = solver._fit_grid, solver._quantize_column

    def fit_ct(rows, bits, symmetric, name):
        if not symmetric:
            return fit(rows, bits, symmetric, name)
        # ours: absmax / qmax; scaling the rows by qmax / ((2^b-1)/2) gives absmax / ((2^b-1)/2)
        return fit(rows * ((2 ** (bits - 1) - 1) / ((2 ** bits - 1) / 2)), bits, symmetric, name)

    def quant_ct(w, step, zero, bits, symmetric):
        if not symmetric:
            return quant(w, step, zero, bits, symmetric)
        q = torch.clamp(torch.round(w / step), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) + zero
        return q, (q - zero) * step

    solver._fit_grid, solver._quantize_column = fit_ct, quant_ct


def run_llmc(args, model, calib):
    import importlib.metadata

    import datasets
    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from loguru import logger

    logged: list[str] = []
    logger.add(lambda m: logged.append(str(m).rstrip()),
               filter=lambda r: r["level"].name in ("WARNING", "ERROR", "CRITICAL"))
    weights = {"num_bits": args.bits, "type": "int", "symmetric": True, "actorder": None,
               "observer": "memoryless_minmax", "dynamic": False}
    if args.granularity == "per_channel":
        weights.update(strategy="channel")
    else:
        weights.update(strategy="group", group_size=args.group_size)
    recipe = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights,
                                   "input_activations": None, "output_activations": None}},
        ignore=["lm_head"], block_size=args.block_size, dampening_frac=args.damp, actorder=None)
    n, seq = calib.shape
    ds = datasets.Dataset.from_dict({"input_ids": calib.tolist()})  # already tokenized: no BOS, no padding
    kwargs = dict(model=model, dataset=ds, recipe=recipe, num_calibration_samples=n, max_seq_length=seq,
                  shuffle_calibration_samples=False, batch_size=args.batch_size, pad_to_max_length=False)
    if args.llmc_sequential_targets:
        kwargs["sequential_targets"] = args.llmc_sequential_targets.split(",")
    # what the calibration dataloader yields, checked against the tensor before the timed call
    seen = _llmc_batches_match(ds, kwargs, calib)
    t0, c0 = time.perf_counter(), time.process_time()
    oneshot(**kwargs)
    quant_s = (time.perf_counter() - t0, time.process_time() - c0)
    out = {}
    mods = dict(model.named_modules())
    for name in target_names(model):
        m = mods[name]
        out[f"{name}.weight"] = m.weight.detach().float().clone()
        out[f"{name}.weight_scale"] = m.weight_scale.detach().float().reshape(m.weight.shape[0], -1).clone()
    info = {"recipe": recipe.model_dump(mode="json", exclude_none=False) if hasattr(recipe, "model_dump") else str(recipe),
            "oneshot_kwargs": {k: v for k, v in kwargs.items() if k not in ("model", "dataset", "recipe")},
            "calibration_batches_match_tensor": seen,
            "warnings_logged": logged,
            "rtn_fallback_logged": any("round-to-nearest" in s or "Hessian inversion failed" in s for s in logged),
            "llmcompressor": llmcompressor.__version__,
            "compressed_tensors": importlib.metadata.version("compressed-tensors"),
            "datasets": datasets.__version__}
    return quant_s, out, info


def _llmc_batches_match(ds, kwargs, calib) -> dict:
    """Build llm-compressor's own calibration dataloader and compare its batches to the tensor."""
    import torch
    from llmcompressor.args import DatasetArguments
    from llmcompressor.datasets.utils import get_calibration_dataloader

    fields = {k: v for k, v in kwargs.items() if k in DatasetArguments.__dataclass_fields__}
    dl = get_calibration_dataloader(DatasetArguments(**fields), processor=None)
    batches = list(dl)
    ids = torch.cat([b["input_ids"] for b in batches])
    rows = {tuple(r) for r in calib.tolist()}
    return {"batches": len(batches), "keys": sorted(batches[0].keys()), "shape": list(ids.shape),
            "same_multiset_of_rows": ids.shape == calib.shape and all(tuple(r) in rows for r in ids.tolist())
            and torch.equal(ids.sort(dim=0).values, calib.sort(dim=0).values)}


def main() -> None:
    args = parse()
    import torch
    import transformers
    from safetensors.torch import save_file

    if args.side == "llmc":
        import llmcompressor  # noqa: F401  (imports counted in import_s, not in quantize_s)
    else:
        sys.path.insert(0, str(ROOT))
        import components.quant.gptq  # noqa: F401
    t_imports = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    calib = torch.load(args.calib, weights_only=True)
    assert calib.dtype == torch.int64 and calib.dim() == 2, (calib.dtype, calib.shape)
    t_loaded = time.perf_counter()
    run = run_ours if args.side == "ours" else run_llmc
    quant_s, tensors, info = run(args, model, calib)
    save_file({k: v.contiguous() for k, v in tensors.items()}, f"{args.out}.safetensors")
    (quant_s, quant_cpu_s) = quant_s
    result = {"side": args.side, "quantize_s": quant_s, "quantize_cpu_s": quant_cpu_s, "import_s": t_imports - T_START,
              "load_s": t_loaded - t_imports, "in_process_total_s": time.perf_counter() - T_START,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "affinity": sorted(os.sched_getaffinity(0)), "n_quantized": len(tensors) // 2,
              "calibration_shape": list(calib.shape), **info}
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
