"""Parity and speed of paperdag's QAT weight fake quantization against torchao's.

The low-bit issue asks: if torchao's QAT works on this CPU, measure parity of its int4-weight
fake quantization against ours (same values within 1e-6) and the speed of both.

Both sides read the same seeded inputs (the 28 block matrices of the ``micro`` preset, a batch
of 512 activation rows per matrix and an upstream gradient), each in its own process: ours in
the project venv (``components.train.qat``, the layer every paperdag QAT method trains through),
torchao's in benchmarks/_work/torchao-venv (see torchao_env.sh; it imports nothing from paperdag).

Two grids are compared, because the two libraries do not define "symmetric int4" the same way:
- ``paperdag grid``: codes -7..7, scale = absmax/7 per group of 32 inputs (paperdag's, as RTN
  and GPTQ use it). torchao computes it with its own primitives (``choose_qparams_affine`` with
  ``MappingType.SYMMETRIC`` and quant range -7..7, then ``_fake_quantize_affine``). This is the
  parity the issue asks for: values and gradients of the weight.
- ``torchao int4 QAT config``: ``IntxFakeQuantizeConfig(torch.int4, group_size=32,
  is_symmetric=True)``, what a torchao user gets: codes -8..7 and scale = absmax/7.5. It is a
  different grid by design, so its values differ from ours; reported for what it is (max
  difference and each grid's weight MSE), not as a parity failure.

Speed, one thread per side: a QAT linear's forward and backward (``x @ fq(W).T``, gradients for
x and W) over the 28 matrices, ours (``FakeQuantLinear``) against torchao's
``FakeQuantizedLinear`` with its int4 config; in our process also a plain ``nn.Linear``, the
baseline both pay fake quantization over.

    bash benchmarks/torchao_env.sh
    python benchmarks/bench_torchao_qat.py [--repeats 20]   -> benchmarks/results/torchao_qat.{json,md}
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
WORK = ROOT / "benchmarks" / "_work" / "torchao-bench"
PEER_PYTHON = ROOT / "benchmarks" / "_work" / "torchao-venv" / "bin" / "python"
RESULTS = ROOT / "benchmarks" / "results"
SHAPES = [(256, 256)] * 4 + [(704, 256), (704, 256), (256, 704)]  # q k v o, gate up, down of one micro block
LAYERS, TOKENS, GROUP = 4, 512, 32
N = LAYERS * len(SHAPES)
TOLERANCE = 1e-6


def make_inputs() -> None:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(N):
        out_f, in_f = SHAPES[i % len(SHAPES)]
        tensors[f"w{i}"] = torch.randn(out_f, in_f, generator=gen) * 0.02
        tensors[f"x{i}"] = torch.randn(TOKENS, in_f, generator=gen)
        tensors[f"g{i}"] = torch.randn(TOKENS, out_f, generator=gen)
        tensors[f"u{i}"] = torch.randn(out_f, in_f, generator=gen)  # upstream gradient of fq(W)
    WORK.mkdir(parents=True, exist_ok=True)
    save_file(tensors, WORK / "inputs.safetensors")


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def side(name: str, repeats: int) -> None:
    """Fake-quantized weights, their gradients and the step times of one side, saved for main()."""
    import torch
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)  # both sides on one core: the ratio is not a thread-count artefact
    data = load_file(WORK / "inputs.safetensors")
    out, times = {}, {}

    def weight_and_grad(label: str, fake_quant) -> None:
        """fq(W) and d(sum(fq(W) * G'))/dW for a fixed G' (the STE's mask shows in the gradient)."""
        for i in range(N):
            w = data[f"w{i}"].clone().requires_grad_(True)
            q = fake_quant(w)
            (q * data[f"u{i}"]).sum().backward()
            out[f"{label}.q{i}"], out[f"{label}.grad{i}"] = q.detach(), w.grad

    def train_step(layers) -> None:
        for i, layer in enumerate(layers):
            x = data[f"x{i}"].clone().requires_grad_(True)
            layer.zero_grad(set_to_none=True)
            (layer(x) * data[f"g{i}"]).sum().backward()

    def linears() -> list[torch.nn.Linear]:
        layers = []
        for i in range(N):
            out_f, in_f = SHAPES[i % len(SHAPES)]
            layer = torch.nn.Linear(in_f, out_f, bias=False)
            with torch.no_grad():
                layer.weight.copy_(data[f"w{i}"])
            layers.append(layer)
        return layers

    if name == "ours":
        sys.path.insert(0, str(ROOT))
        from components.quant.fake_quant import quantize_int
        from components.train.qat import FakeQuantLinear

        quantize = lambda w: quantize_int(w, 4, True, "group", GROUP)  # noqa: E731 (QuantAwareTraining's int quantizer)
        weight_and_grad("paperdag_grid", quantize)
        weight_and_grad("torchao_config", quantize)  # ours has one int4 grid: compared with torchao's config below
        ours = [FakeQuantLinear(layer, quantize) for layer in linears()]
        plain = linears()
        times["qat_linear"] = _timed(lambda: train_step(ours), repeats)
        times["plain_linear"] = _timed(lambda: train_step(plain), repeats)
        version = {"torch": torch.__version__}
    else:
        from torchao.quantization.qat import FakeQuantizedLinear, IntxFakeQuantizeConfig, IntxFakeQuantizer
        from torchao.quantization.quant_primitives import (MappingType, _fake_quantize_affine,
                                                           choose_qparams_affine)

        def paperdag_grid(w):
            scale, zero = choose_qparams_affine(w.detach(), MappingType.SYMMETRIC, (1, GROUP), torch.int8,
                                                quant_min=-7, quant_max=7)
            return _fake_quantize_affine(w, (1, GROUP), scale, zero, torch.int8, quant_min=-7, quant_max=7)

        config = IntxFakeQuantizeConfig(torch.int4, group_size=GROUP, is_symmetric=True)
        weight_and_grad("paperdag_grid", paperdag_grid)
        weight_and_grad("torchao_config", IntxFakeQuantizer(config))
        layers = []
        for layer in linears():
            fq = FakeQuantizedLinear(layer.in_features, layer.out_features, bias=False, weight_config=config)
            with torch.no_grad():
                fq.weight.copy_(layer.weight)
            layers.append(fq)
        times["qat_linear"] = _timed(lambda: train_step(layers), repeats)
        import importlib.metadata as metadata
        version = {"torch": torch.__version__, "torchao": metadata.version("torchao")}
    save_file(out, WORK / f"{name}.safetensors")
    (WORK / f"{name}.json").write_text(json.dumps({"versions": version, "times": times}))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--side", choices=("ours", "peer"))
    args = ap.parse_args()
    if args.side:
        side(args.side, args.repeats)
        return 0
    if not PEER_PYTHON.exists():
        print(f"{PEER_PYTHON} is missing: run `bash benchmarks/torchao_env.sh` first", file=sys.stderr)
        return 2
    import torch
    from safetensors.torch import load_file

    make_inputs()
    for name, python in (("ours", sys.executable), ("peer", str(PEER_PYTHON))):
        subprocess.run([python, __file__, "--side", name, "--repeats", str(args.repeats)], check=True)
    ours, peer = (load_file(WORK / f"{n}.safetensors") for n in ("ours", "peer"))
    runs = {n: json.loads((WORK / f"{n}.json").read_text()) for n in ("ours", "peer")}
    weights = load_file(WORK / "inputs.safetensors")

    def compare(label: str) -> dict:
        q_diff = max(float((ours[f"{label}.q{i}"] - peer[f"{label}.q{i}"]).abs().max()) for i in range(N))
        g_diff = max(float((ours[f"{label}.grad{i}"] - peer[f"{label}.grad{i}"]).abs().max()) for i in range(N))
        differing = sum(int((ours[f"{label}.q{i}"] != peer[f"{label}.q{i}"]).sum()) for i in range(N))
        total = sum(ours[f"{label}.q{i}"].numel() for i in range(N))

        def mse(side_tensors) -> float:
            return sum(float(((side_tensors[f"{label}.q{i}"] - weights[f"w{i}"]) ** 2).sum()) for i in range(N)) / total

        return {"max_abs_diff_values": q_diff, "max_abs_diff_grads": g_diff, "values_differing": differing,
                "values": total, "weight_mse_ours": mse(ours), "weight_mse_torchao": mse(peer)}

    grid, config = compare("paperdag_grid"), compare("torchao_config")
    t_ours, t_peer = runs["ours"]["times"], runs["peer"]["times"]
    result = {"torchao": runs["peer"]["versions"]["torchao"], "torch": torch.__version__, "matrices": N,
              "group_size": GROUP, "tokens": TOKENS, "threads": 1, "repeats": args.repeats,
              "paperdag_grid": grid, "torchao_config": config,
              "qat_linear_s": {"ours": t_ours["qat_linear"], "torchao": t_peer["qat_linear"],
                               "plain": t_ours["plain_linear"]},
              "ratio_ours_over_torchao": t_ours["qat_linear"] / t_peer["qat_linear"],
              "ratio_ours_over_plain": t_ours["qat_linear"] / t_ours["plain_linear"],
              "ratio_torchao_over_plain": t_peer["qat_linear"] / t_ours["plain_linear"],
              "parity": grid["max_abs_diff_values"] <= TOLERANCE and grid["max_abs_diff_grads"] <= TOLERANCE}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "torchao_qat.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"paperdag's QAT int4 weight fake quantization vs torchao {result['torchao']} (torch {result['torch']}) "
             f"on the {N} block matrices of `micro`, groups of {GROUP} inputs, one thread per side.", "",
             "| grid | max abs diff, values | max abs diff, weight grads | values differing | "
             "weight MSE: ours / torchao |", "|---|---|---|---|---|"]
    for label, row in (("paperdag grid (codes -7..7, absmax/7), torchao's primitives", grid),
                       ("torchao's int4 QAT config (codes -8..7, absmax/7.5) vs ours", config)):
        lines.append(f"| {label} | {row['max_abs_diff_values']:.1e} | {row['max_abs_diff_grads']:.1e} | "
                     f"{row['values_differing']:,} of {row['values']:,} | "
                     f"{row['weight_mse_ours']:.3e} / {row['weight_mse_torchao']:.3e} |")
    lines += ["", f"Parity on the same grid (values and gradients within {TOLERANCE:g}): "
                  f"**{'yes' if result['parity'] else 'NO'}**.", "",
              f"QAT linear forward + backward, {TOKENS} tokens through all {N} matrices: ours / torchao "
              f"**{result['ratio_ours_over_torchao']:.2f}x**; over a plain `nn.Linear`: ours "
              f"{result['ratio_ours_over_plain']:.2f}x, torchao {result['ratio_torchao_over_plain']:.2f}x."]
    (RESULTS / "torchao_qat.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if result["parity"] else 1


if __name__ == "__main__":
    sys.exit(main())
