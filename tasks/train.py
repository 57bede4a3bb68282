"""pretrain / finetune / distill stages: one DeepSpeed trainer, methods plug in as hooks.

Checkpoints go to ``.paperdag/checkpoints/<digest>/`` (outside the artifact's temporary
directory), so a run killed mid-training resumes where it stopped; they are removed once
the artifact is complete.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from components.model.presets import build_model, count_params
from components.train.trainer import train
from tasks.artifacts import DIGEST_LEN
from tasks.model_io import load_model_artifact, load_tokenizer_artifact, save_model_artifact


class TokenizerMismatchError(ValueError):
    pass


def _train_blocks(tokens_dir: Path, domain: str | None, stage: str) -> np.ndarray:
    name = f"train-{domain}.npy" if domain else "train.npy"
    path = tokens_dir / name
    if not path.exists():
        domains = sorted(p.stem.removeprefix("train-") for p in tokens_dir.glob("train-*.npy"))
        raise ValueError(f"stage {stage}: train_domain {domain!r} has no token blocks; domains: {', '.join(domains)}")
    blocks = np.load(path, mmap_mode="r")
    if len(blocks) == 0:
        raise ValueError(f"stage {stage}: {path.name} holds no blocks (the domain is too small for one block)")
    return blocks


def _check_vocab(model, tokenizer, what: str, stage: str) -> None:
    if model.config.vocab_size != len(tokenizer):
        raise TokenizerMismatchError(
            f"stage {stage}: {what} has vocab_size {model.config.vocab_size} but the tokens' tokenizer has "
            f"{len(tokenizer)} entries; a model must be trained on the tokenizer it was built for")


def run(ctx) -> dict:
    plan = ctx.plan
    tokens = ctx.input("tokens")
    tokenizer = load_tokenizer_artifact(tokens)
    blocks = _train_blocks(tokens.path, plan.options.get("train_domain"), plan.name)
    method = ctx.method
    config = method.params
    teacher, parents = None, {}
    if plan.kind == "finetune":
        model, _, parent_facts = load_model_artifact(ctx.input("model"))
        _check_vocab(model, tokenizer, f"input model {ctx.input('model').path}", plan.name)
        parents = {"model": parent_facts}
    elif plan.kind == "distill" and ctx.inputs.get("student"):
        model, _, parent_facts = load_model_artifact(ctx.input("student"))  # e.g. Well-Read Students
        _check_vocab(model, tokenizer, f"student {ctx.input('student').path}", plan.name)
        parents = {"student": parent_facts}
    else:
        model = build_model(plan.options["model"], vocab_size=len(tokenizer), max_seq_len=blocks.shape[1],
                            seed=config.seed)
        _check_vocab(model, tokenizer, f"model {plan.options['model']!r}", plan.name)
    if plan.kind == "distill" and ctx.inputs.get("teacher"):
        teacher, _, parent_facts = load_model_artifact(ctx.input("teacher"))
        _check_vocab(teacher, tokenizer, f"teacher {ctx.input('teacher').path}", plan.name)
        parents["teacher"] = parent_facts
    if plan.kind == "distill" and method.needs_teacher and teacher is None:
        raise ValueError(f"stage {plan.name}: distill method {plan.method!r} needs a `teacher` input")
    checkpoints = ctx.workspace.state_dir / "checkpoints" / plan.digest[:DIGEST_LEN]
    result = train(model, blocks, config, method, teacher=teacher, checkpoint_dir=checkpoints,
                   on_log=lambda step, m: ctx.log_metrics(step, {f"train_{k}": v for k, v in m.items()}),
                   progress=ctx.progress)
    model.to("cpu")
    facts = {
        "kind": plan.kind, "method": plan.method, "precision": result.precision,
        "train_flops": result.train_flops, "train_tokens": result.tokens, "steps": result.steps,
        "final_loss": result.losses[-1], "n_params": count_params(model),
        "resumed_from_step": result.resumed_from_step, **result.method_facts,
        "parents": parents,
    }
    save_model_artifact(model, tokenizer, ctx.out_dir, facts)
    ctx.facts.update(precision=result.precision, train_flops=result.train_flops)
    shutil.rmtree(checkpoints, ignore_errors=True)
    first = float(np.mean(result.losses[: max(1, len(result.losses) // 20)]))
    return {"final_loss": result.losses[-1], "initial_loss": first, "train_flops": result.train_flops,
            "train_tokens": result.tokens, "tokens_per_s": result.tokens / max(result.wall_seconds, 1e-9),
            "precision_bf16": float(result.precision == "bf16")}
