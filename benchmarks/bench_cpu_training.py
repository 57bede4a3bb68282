"""CPU training throughput: paperdag's trainer vs bare PyTorch, HF Trainer and DeepSpeed, one run.

Peers: a bare PyTorch loop (fp32; bf16 autocast; bf16 autocast + torch.compile), HF Trainer
(fp32; ``bf16=True``; ``bf16=True`` + ``torch_compile=True``) and DeepSpeed ZeRO-1 (fp32; its
``bf16`` mode). paperdag runs with its defaults (``auto`` precision, compile and attention, for a
1000-step run) plus one ablation row per choice.

Same micro-shaped Llama (hidden 256, 4 layers, 4 heads, intermediate 688 as issue 6 defines
it; the ``micro`` preset uses 704 so group-64 quantization divides it), vocab 4096, batch 16 x
seq 256, AdamW, same random token data. Each configuration runs ``--warmup`` + ``--steps``
optimizer steps per repeat; step time is the gap between consecutive step-end timestamps
(warmup steps excluded). Each configuration runs in its own process, and configurations
alternate inside every repeat (forward, then reversed) so load noise hits all alike; the
reported number is the median over repeats of each repeat's median step time.
Also measures fp32/bf16 GEMM throughput and reports model FLOP/s (``3 * forward_flops_per_token``
per token: 6N + attention) as a fraction of it.

    .venv/bin/python benchmarks/bench_cpu_training.py [--steps 10] [--warmup 3] [--repeats 3]

Writes benchmarks/results/cpu_training.json and cpu_training.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from components.train.dense import DenseTraining  # noqa: E402
from components.train.method import forward_flops_per_token  # noqa: E402
from components.train.trainer import _init_distributed, train  # noqa: E402

VOCAB, SEQ, BATCH = 4096, 256, 16
SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=688)
LR, WD, CLIP = 1e-3, 0.1, 1.0
RESULT_PREFIX = "RESULT "
RUN_STEPS = 1000  # the run length paperdag is configured for (its `auto` compile rule looks at it)
RESULTS = Path(__file__).parent / "results"


def make_model() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=SEQ, tie_word_embeddings=False, **SHAPE)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def step_times(stamps: list[float], warmup: int) -> list[float]:
    """Per-step seconds from step-end timestamps; stamps[0] is the start, warmup steps dropped."""
    return list(np.diff(stamps)[warmup:])


def bare_loop_stamps(blocks: np.ndarray, total: int, bf16: bool, compile_model: bool = False) -> list[float]:
    """Step-end timestamps of a plain PyTorch training loop (stamps[0] is the start)."""
    model = make_model()
    model.train()
    forward = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=WD, fused=True)
    stamps = [time.perf_counter()]
    for step in range(total):
        batch = torch.from_numpy(blocks[step * BATCH: (step + 1) * BATCH].astype(np.int64))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = forward(input_ids=batch, labels=batch).loss
        loss.item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    return stamps


def bare_loop(blocks: np.ndarray, total: int, warmup: int, bf16: bool, compile_model: bool = False) -> list[float]:
    return step_times(bare_loop_stamps(blocks, total, bf16, compile_model), warmup)


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: np.ndarray):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        ids = torch.from_numpy(self.blocks[i].astype(np.int64))
        return {"input_ids": ids, "labels": ids}


def hf_trainer(blocks: np.ndarray, total: int, warmup: int, bf16: bool, compile_model: bool = False) -> list[float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not stamps:
                stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, use_cpu=True, bf16=bf16, max_steps=total, per_device_train_batch_size=BATCH,
            learning_rate=LR, weight_decay=WD, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=CLIP,
            lr_scheduler_type="constant", optim="adamw_torch_fused", report_to=[], logging_strategy="no",
            save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
            torch_compile=compile_model,
        )
        trainer = Trainer(model=make_model(), args=args, train_dataset=_Blocks(blocks[: total * BATCH]),
                          callbacks=[Stamp()])
        trainer.train()
        wrapped = type(trainer.model_wrapped).__name__
    if wrapped not in ("LlamaForCausalLM", "OptimizedModule"):
        print(f"  note: HF Trainer wrapped the model in {wrapped}", flush=True)
    return step_times(stamps, warmup)


def deepspeed_zero1(blocks: np.ndarray, total: int, warmup: int, bf16: bool) -> list[float]:
    import deepspeed

    _init_distributed()
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=WD, fused=True)
    config = {
        "train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 1}, "gradient_clipping": CLIP, "steps_per_print": 10**9,
        # DeepSpeed's own bf16 mode: bf16 weights and gradients, fp32 master weights in the optimizer
        "bf16": {"enabled": bf16},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    stamps = [time.perf_counter()]
    for step in range(total):
        batch = torch.from_numpy(blocks[step * BATCH: (step + 1) * BATCH].astype(np.int64))
        loss = engine(input_ids=batch, labels=batch).loss
        loss.item()
        engine.backward(loss)
        engine.step()
        stamps.append(time.perf_counter())
    engine.destroy()
    return step_times(stamps, warmup)


def paperdag(blocks: np.ndarray, total: int, warmup: int, **params) -> list[float]:
    """paperdag's trainer configured for a RUN_STEPS-step run and stopped after ``total`` steps,
    so its ``auto`` choices (precision, torch.compile, attention) are those of a real pretraining
    run; ``params`` force a choice for the ablation rows."""
    cfg = DenseTraining.Params(steps=max(RUN_STEPS, total), batch_size=BATCH, lr=LR, weight_decay=WD,
                               grad_clip=CLIP, log_every=1, **params)
    stamps = [time.perf_counter()]
    result = train(make_model(), blocks, cfg, DenseTraining(cfg), progress=False, stop_after_step=total,
                   on_log=lambda s, m: stamps.append(time.perf_counter()))
    paperdag.last_choice = (
        f"{result.precision}, {'compiled' if result.compiled else 'eager mode'}, {result.attention} attention, "
        f"{'cached' if result.allocator_cache else 'system'} CPU allocator")
    return step_times(stamps, warmup)


paperdag.last_choice = None


def gemm_flops(dtype: torch.dtype, n: int = 2048, reps: int = 7) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


OURS = {  # paperdag's default first; the rest force one choice each (ablations)
    "paperdag_auto": {},
    "paperdag_no_compile": {"torch_compile": False},
    "paperdag_sdpa_attention": {"attention": "sdpa"},
    "paperdag_fp32": {"precision": "fp32"},
    "paperdag_system_allocator": {},  # with CONFIG_ENV below
}
CONFIG_ENV = {"paperdag_system_allocator": {"PAPERDAG_CPU_ALLOCATOR": "system"}}


def make_configs(blocks: np.ndarray, total: int, warmup: int) -> dict:
    peers = {
        "hf_trainer_fp32": lambda: hf_trainer(blocks, total, warmup, False),
        "hf_trainer_bf16": lambda: hf_trainer(blocks, total, warmup, True),
        "hf_trainer_bf16_compile": lambda: hf_trainer(blocks, total, warmup, True, compile_model=True),
        "bare_fp32": lambda: bare_loop(blocks, total, warmup, False),
        "bare_bf16_autocast": lambda: bare_loop(blocks, total, warmup, True),
        "bare_bf16_autocast_compile": lambda: bare_loop(blocks, total, warmup, True, compile_model=True),
        "deepspeed_zero1_fp32": lambda: deepspeed_zero1(blocks, total, warmup, False),
        "deepspeed_zero1_bf16": lambda: deepspeed_zero1(blocks, total, warmup, True),
    }
    return {**peers, **{name: (lambda p=params: paperdag(blocks, total, warmup, **p)) for name, params in OURS.items()}}


def run_one(name: str, args) -> dict:
    """Run one configuration in a fresh process: DeepSpeed's process group (RANK, WORLD_SIZE) and
    accelerate's singleton state would otherwise leak into the next one (HF Trainer then wrapped
    its model in DistributedDataParallel), and each compile starts from an empty dynamo cache."""
    cmd = [sys.executable, __file__, "--only", name, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **CONFIG_ENV.get(name, {})})
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps (torch.compile runs here)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", help="run this one configuration here and print its step times (internal)")
    ap.add_argument("--out", default=str(RESULTS / "cpu_training.json"))
    args = ap.parse_args()
    total = args.warmup + args.steps
    blocks = np.random.default_rng(0).integers(0, VOCAB, (BATCH * total, SEQ), dtype=np.int32)
    configs = make_configs(blocks, total, args.warmup)
    names = list(configs)
    if args.only:
        started = time.perf_counter()
        times = configs[args.only]()
        choice = paperdag.last_choice
        print(RESULT_PREFIX + json.dumps({"times": [float(t) for t in times], "choice": choice,
                                          "seconds": time.perf_counter() - started}), flush=True)
        return
    t0 = time.perf_counter()
    gemm = {"fp32": [], "bf16": []}
    per_repeat: dict[str, list[float]] = {k: [] for k in names}
    choices: dict[str, str] = {}
    for r in range(args.repeats):
        gemm["fp32"].append(gemm_flops(torch.float32))
        gemm["bf16"].append(gemm_flops(torch.bfloat16))
        for name in (names if r % 2 == 0 else names[::-1]):
            one = run_one(name, args)
            per_repeat[name].append(statistics.median(one["times"]))
            if one["choice"]:
                choices[name] = one["choice"]
            print(f"[{time.perf_counter() - t0:6.0f}s] repeat {r + 1}/{args.repeats} {name:27s} "
                  f"{per_repeat[name][-1]:.3f} s/step ({len(one['times'])} timed, {one['seconds']:.0f} s in all)",
                  flush=True)

    model = make_model()
    fpt = 3 * forward_flops_per_token(model, SEQ)
    n_params = sum(p.numel() for p in model.parameters())
    gemm_fp32, gemm_bf16 = statistics.median(gemm["fp32"]), statistics.median(gemm["bf16"])
    tokens = BATCH * SEQ
    bare = statistics.median(per_repeat["bare_fp32"])
    rows = {}
    for name, reps in per_repeat.items():
        s = statistics.median(reps)
        flops = fpt * tokens / s
        rows[name] = {
            "s_per_step": s, "s_per_step_repeats": reps, "tokens_per_s": tokens / s,
            "speedup_vs_bare_fp32": bare / s, "model_flops_per_s": flops,
            "fraction_of_bf16_gemm": flops / gemm_bf16, "fraction_of_fp32_gemm": flops / gemm_fp32,
        }
    auto = rows["paperdag_auto"]
    best_peer = max((k for k in rows if k not in OURS), key=lambda k: rows[k]["tokens_per_s"])
    result = {
        "model": {"shape": "micro-shaped Llama (issue 6: intermediate 688; preset 'micro' uses 704)", **SHAPE,
                  "vocab": VOCAB, "params": n_params},
        "batch": BATCH, "seq_len": SEQ, "timed_steps": args.steps, "warmup_steps": args.warmup,
        "repeats": args.repeats, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "paperdag_choices": choices,
        "train_flops_per_token": fpt,
        "gemm_2048_flops_per_s": {"fp32": gemm_fp32, "bf16": gemm_bf16, "repeats": gemm},
        "configs": rows,
        "paperdag_vs_best_peer": {"best_peer": best_peer,
                                  "ratio_tokens_per_s": auto["tokens_per_s"] / rows[best_peer]["tokens_per_s"]},
        "paperdag_auto_vs_bare_fp32": auto["speedup_vs_bare_fp32"],
        "target_2x_met": bool(auto["speedup_vs_bare_fp32"] >= 2.0),
        "paperdag_fp32_over_bare_fp32_time": rows["paperdag_fp32"]["s_per_step"] / bare,
        "wall_seconds": time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    lines = [
        f"# CPU training throughput (micro-shaped Llama, {n_params / 1e6:.2f}M params, batch {BATCH} x seq {SEQ})",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} repeats x "
        f"{args.steps} timed steps (after {args.warmup} warmup). GEMM 2048^3: fp32 {gemm_fp32 / 1e9:.0f} GFLOP/s, "
        f"bf16 {gemm_bf16 / 1e9:.0f} GFLOP/s.",
        "",
        "| config | s/step | tokens/s | vs bare fp32 | model GFLOP/s | of bf16 GEMM | of fp32 GEMM |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['s_per_step']:.3f} | {row['tokens_per_s']:.0f} | "
                     f"{row['speedup_vs_bare_fp32']:.2f}x | {row['model_flops_per_s'] / 1e9:.1f} | "
                     f"{row['fraction_of_bf16_gemm']:.1%} | {row['fraction_of_fp32_gemm']:.1%} |")
    lines += [
        "",
        "paperdag's choices: " + "; ".join(f"{k}: {v}" for k, v in result["paperdag_choices"].items()) + ".",
        "",
        f"paperdag auto vs bare fp32: {result['paperdag_auto_vs_bare_fp32']:.2f}x (target 2.0x: "
        f"{'met' if result['target_2x_met'] else 'NOT met'}); vs the best peer ({best_peer}): "
        f"{result['paperdag_vs_best_peer']['ratio_tokens_per_s']:.2f}x tokens/s. "
        f"paperdag fp32 / bare fp32 step time: {result['paperdag_fp32_over_bare_fp32_time']:.3f}.",
        "",
        "Command: `.venv/bin/python benchmarks/bench_cpu_training.py`",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
