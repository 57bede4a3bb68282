"""GPU check of the shared trainer (run on a CUDA machine; writes JSON to $OUT or ./benchmarks/results).

1. precision auto-detection picks bf16 on a bf16-capable GPU;
2. tokens/s of paperdag's DeepSpeed trainer vs a bare PyTorch bf16-autocast loop on the
   `small` preset (~125M params at vocab 32000), and model FLOPs utilisation against this
   GPU's measured bf16 GEMM throughput (measured in the same run) and against its datasheet's
   dense bf16 peak where the device is in ``SPEC_BF16_TFLOPS``;
3. SPDF's masked weights stay exactly zero under bf16 on CUDA;
4. checkpoint + resume on CUDA in fp32: are the resumed losses bit-identical?
5. torch.compile on CUDA (``torch_compile: true``; ``auto`` does not compile there): the
   trainer's step time compiled vs eager on the `small` preset, its compile time, the
   attention ``auto`` picks on CUDA, and whether a compiled resume is bit-identical.

Each section writes the report as it goes, so a run cut short still returns what it measured.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from components.model.presets import build_model
from components.train.dense import DenseTraining
from components.train.method import forward_flops_per_token
from components.train.spdf import SpdfTraining
from components.train.trainer import resolve_precision, train

OUT = Path(os.environ.get("OUT", Path(__file__).parent / "results"))
VOCAB, SEQ, BATCH, STEPS = 32000, 512, 16, 30
# dense bf16 tensor-core peaks from NVIDIA's datasheets (without 2:4 sparsity), SXM parts
SPEC_BF16_TFLOPS = {"NVIDIA H200": 989.4, "NVIDIA H100 80GB HBM3": 989.4, "NVIDIA A100-SXM4-80GB": 312.0}


def gemm_tflops(n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def bare_loop(blocks) -> float:
    model = build_model("small", VOCAB, SEQ, seed=0).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    times = []
    for step in range(STEPS):
        x = torch.from_numpy(blocks[step * BATCH:(step + 1) * BATCH].astype(np.int64)).cuda()
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if step >= 5:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def trainer_step(blocks, **params) -> tuple[float, float, dict]:
    model = build_model("small", VOCAB, SEQ, seed=0)
    cfg = DenseTraining.Params(steps=STEPS, batch_size=BATCH, lr=3e-4, precision="auto", log_every=1, **params)
    stamps = [time.perf_counter()]
    result = train(model, blocks, cfg, DenseTraining(cfg), progress=False,
                   on_log=lambda s, m: stamps.append(time.perf_counter()))
    choices = {"compiled": result.compiled, "attention": result.attention, "first_5_steps_s": stamps[5] - stamps[0]}
    return statistics.median(np.diff(stamps[6:])), forward_flops_per_token(model, SEQ) * 3, choices


def resume_check(blocks, **params) -> tuple[bool, float]:
    """12 fp32 steps of the nano model straight vs stopped after 8 and resumed: (bit-identical, max diff)."""
    def run(stop, ckpt):
        m = build_model("nano", 512, 64, seed=0)
        c = DenseTraining.Params(steps=12, batch_size=8, precision="fp32", checkpoint_every=4, **params)
        return train(m, blocks, c, DenseTraining(c), checkpoint_dir=ckpt, progress=False, stop_after_step=stop)
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        straight = run(None, Path(a)).losses
        run(8, Path(b))
        resumed = run(None, Path(b)).losses
    return straight == resumed, max(abs(x - y) for x, y in zip(straight, resumed))


def save(report: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gpu_check.json").write_text(json.dumps(report, indent=2))


def main() -> None:
    assert torch.cuda.is_available()
    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                    "auto_precision": resolve_precision("auto")}
    report["bf16_gemm_tflops"] = gemm_tflops()
    blocks = np.random.default_rng(0).integers(0, VOCAB, (BATCH * STEPS, SEQ), dtype=np.int32)
    bare = bare_loop(blocks)
    ours, flops_per_token, choices = trainer_step(blocks)
    tokens = BATCH * SEQ
    report.update(bare_s_per_step=bare, paperdag_s_per_step=ours, ratio_paperdag_over_bare=ours / bare,
                  paperdag_tokens_per_s=tokens / ours, bare_tokens_per_s=tokens / bare,
                  paperdag_mfu=tokens / ours * flops_per_token / (report["bf16_gemm_tflops"] * 1e12),
                  paperdag_auto_choices=choices)
    peak = SPEC_BF16_TFLOPS.get(report["device"])
    if peak:
        report.update(spec_bf16_tflops=peak, paperdag_mfu_vs_spec=tokens / ours * flops_per_token / (peak * 1e12))
    save(report)
    # SPDF under bf16 on CUDA
    model = build_model("nano", 512, 64, seed=0)
    cfg = SpdfTraining.Params(steps=20, batch_size=8, precision="bf16", sparsity=0.75)
    small_blocks = np.random.default_rng(1).integers(0, 512, (64, 64), dtype=np.int32)
    train(model, small_blocks, cfg, SpdfTraining(cfg), progress=False)
    w = model.model.layers[0].mlp.up_proj.weight
    report["spdf_cuda_bf16_density"] = float((w != 0).float().mean())
    # resume on CUDA, fp32
    report["cuda_resume_bit_identical"], report["cuda_resume_max_abs_diff"] = resume_check(small_blocks)
    save(report)
    # torch.compile on CUDA, forced on
    compiled, _, compiled_choices = trainer_step(blocks, torch_compile=True)
    report.update(paperdag_compiled_s_per_step=compiled, compiled_speedup_over_eager=ours / compiled,
                  paperdag_compiled_choices=compiled_choices,
                  paperdag_compiled_mfu=tokens / compiled * flops_per_token / (report["bf16_gemm_tflops"] * 1e12))
    if peak:
        report["paperdag_compiled_mfu_vs_spec"] = tokens / compiled * flops_per_token / (peak * 1e12)
    save(report)
    (report["cuda_compiled_resume_bit_identical"],
     report["cuda_compiled_resume_max_abs_diff"]) = resume_check(small_blocks, torch_compile=True)
    save(report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
