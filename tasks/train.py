"""pretrain / finetune / distill stages: one DeepSpeed trainer, methods plug in as hooks.

Checkpoints go to ``.paperdag/checkpoints/<digest>/`` (outside the artifact's temporary
directory), so a run killed mid-training resumes where it stopped; they are removed once
the artifact is complete. A ``sampler`` stage option (``components/train/samplers``) picks the
blocks of each step; its skills are the domains, in the sorted order that train.npy concatenates
``train-{domain}.npy`` in, and its validation blocks come from ``validation-{domain}.npy``.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from components.eval.stability import loss_spike
from components.model.presets import build_model, count_params
from components.quant.packing import QUANT_CONFIG_ATTR
from components.train.method import AUXILIARY_FILE, block_weight_counts
from components.train.mlm import check_objective
from components.train.monitor import ValidationMonitor
from components.train.samplers.base import Sampler
from components.train.samplers.registry import SAMPLERS
from components.train.trainer import KEPT_DIR, kept_steps, step_dir_name, train
from tasks.artifacts import DIGEST_LEN, Artifact
from tasks.model_io import (LOSS_CURVE, SIDE_MODULES, TokenizerMismatchError, check_model_tokenizer,
                            load_model_artifact, load_tokenizer_artifact, read_model_facts, save_model_artifact)


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


def domain_skills(tokens_dir: Path, n_train_blocks: int,
                  stage: str) -> tuple[dict[str, tuple[int, int]], dict[str, np.ndarray]]:
    """Row range of each domain inside train.npy and its validation blocks (memmaps).

    Domains without training blocks are left out: there is nothing to sample from them.
    """
    domains = sorted(p.name[len("train-"):-len(".npy")] for p in tokens_dir.glob("train-*.npy"))
    lengths = {d: int(np.load(tokens_dir / f"train-{d}.npy", mmap_mode="r").shape[0]) for d in domains}
    if sum(lengths.values()) != n_train_blocks:
        raise ValueError(f"stage {stage}: the train-{{domain}}.npy files of {tokens_dir} hold "
                         f"{sum(lengths.values())} blocks ({lengths}) but train.npy holds {n_train_blocks}; "
                         "the tokens artifact is inconsistent, re-run its tokenize stage")
    ranges, validation, start = {}, {}, 0
    for domain in domains:
        if lengths[domain]:
            ranges[domain] = (start, start + lengths[domain])
            path = tokens_dir / f"validation-{domain}.npy"
            validation[domain] = np.load(path, mmap_mode="r") if path.exists() else np.zeros((0, 0), np.int32)
        start += lengths[domain]
    return ranges, validation


def build_sampler(options: dict, tokens_dir: Path, blocks: np.ndarray, batch_size: int, seed: int,
                  stage: str) -> Sampler | None:
    """The stage's ``sampler`` option, bound to its training blocks; None when it has none."""
    spec = options.get("sampler")
    if not spec:
        return None
    n_train_blocks = len(blocks)
    cls = SAMPLERS.get(spec["method"])
    sampler = cls(cls.Params.model_validate(spec.get("params") or {}))
    domain = options.get("train_domain")
    if domain:
        if cls.needs_skills:
            raise ValueError(f"stage {stage}: sampler {cls.key!r} mixes domains, so it cannot be combined with "
                             f"train_domain {domain!r}")
        path = tokens_dir / f"validation-{domain}.npy"
        ranges = {domain: (0, n_train_blocks)}
        validation = {domain: np.load(path, mmap_mode="r")} if path.exists() else {}
    else:
        ranges, validation = domain_skills(tokens_dir, n_train_blocks, stage)
    try:
        sampler.bind(n_train_blocks, batch_size, seed, ranges, validation, train_blocks=blocks)
    except ValueError as e:
        raise type(e)(f"stage {stage}: {e}") from None
    return sampler


def build_monitor(tokens_dir: Path, config, stage: str) -> ValidationMonitor:
    """Held-out loss of every domain's validation blocks every ``monitor_every`` steps."""
    validation = {p.name[len("validation-"):-len(".npy")]: np.load(p, mmap_mode="r")
                  for p in sorted(tokens_dir.glob("validation-*.npy"))}
    try:
        return ValidationMonitor(validation, config.monitor_every, config.monitor_blocks)
    except ValueError as e:
        raise ValueError(f"stage {stage}: {e} ({tokens_dir})") from None


def _use_special_ids(model, tokenizer) -> None:
    """config.json and generation_config.json name the tokenizer's bos/eos/pad ids (a new
    LlamaConfig says 1 and 2 whatever the tokenizer), so generation stops where documents end."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name)
        setattr(model.config, name, value)
        if getattr(model, "generation_config", None) is not None:  # an encoder has none
            setattr(model.generation_config, name, value)


def _check_vocab(model, tokenizer, what: str, stage: str, model_dir: Path | None = None) -> None:
    """The model's embedding fits the tokens' tokenizer; a loaded model (``model_dir``) must also
    have been trained with that tokenizer, since one of the same size would train without error."""
    if model.config.vocab_size != len(tokenizer):
        raise TokenizerMismatchError(
            f"stage {stage}: {what} has vocab_size {model.config.vocab_size} but the tokens' tokenizer has "
            f"{len(tokenizer)} entries; a model must be trained on the tokenizer it was built for")
    if model_dir is not None:
        check_model_tokenizer(model_dir, tokenizer, f"stage {stage}: {what} and the stage's tokens")


@dataclass
class TrainingSetup:
    """What a training stage trains: built the same way in the task and in every rank."""

    model: Any
    tokenizer: Any
    blocks: np.ndarray
    sampler: Sampler | None
    teacher: Any
    parents: dict
    monitor: Any = None  # ValidationMonitor when the stage sets monitor_every


def _check_not_quantized_twice(method, method_key: str, facts: dict, model: Artifact, stage: str) -> None:
    quantization = facts.get("quantization")
    if method.quantizes_weights and quantization:
        raise ValueError(f"stage {stage}: method {method_key!r} trains the weights onto a low-bit grid, but its input "
                         f"model {model.path} is already quantized ({quantization.get('scheme')}, "
                         f"{quantization.get('bits')} bits); give it the full-precision model, or fine-tune this "
                         "one with a method that does not quantize (e.g. lora)")


def prepare_training(stage: str, kind: str, method_key: str, options: dict, method,
                     inputs: dict[str, Artifact], launcher: bool = False) -> TrainingSetup:
    """The stage's starting model (built from its preset and seed, or loaded), token blocks,
    sampler and teacher, checked against the tokens' tokenizer.

    ``launcher``: for the task that launches ranks, which only saves what rank 0 trained: no
    sampler and no teacher weights (only the teacher's facts); every rank builds and checks its own."""
    tokens = inputs["tokens"]
    tokenizer = load_tokenizer_artifact(tokens)
    blocks = _train_blocks(tokens.path, options.get("train_domain"), stage)
    config = method.params
    sampler = None if launcher else build_sampler(options, tokens.path, blocks, config.batch_size, config.seed, stage)
    monitor = None if launcher or not config.monitor_every else build_monitor(tokens.path, config, stage)
    teacher, parents = None, {}
    if kind == "finetune":
        model, _, parent_facts = load_model_artifact(inputs["model"], encoder_ok=method_key == "mlm",
                                                     keeps=("linear_attention",) if method_key == "hedgehog" else ())
        _check_vocab(model, tokenizer, f"input model {inputs['model'].path}", stage, inputs["model"].path)
        _check_not_quantized_twice(method, method_key, parent_facts, inputs["model"], stage)
        parents = {"model": parent_facts}
    elif kind == "distill" and inputs.get("student"):
        model, _, parent_facts = load_model_artifact(inputs["student"])  # e.g. Well-Read Students
        _check_vocab(model, tokenizer, f"student {inputs['student'].path}", stage, inputs["student"].path)
        parents = {"student": parent_facts}
    else:
        model = build_model(options["model"], vocab_size=len(tokenizer), max_seq_len=blocks.shape[1],
                            seed=config.seed)
        _check_vocab(model, tokenizer, f"model {options['model']!r}", stage)
        _use_special_ids(model, tokenizer)
    if kind == "distill" and inputs.get("teacher") and launcher:
        parents["teacher"] = read_model_facts(inputs["teacher"])
    elif kind == "distill" and inputs.get("teacher"):
        teacher, _, parent_facts = load_model_artifact(inputs["teacher"], keeps=SIDE_MODULES)
        _check_vocab(teacher, tokenizer, f"teacher {inputs['teacher'].path}", stage, inputs["teacher"].path)
        parents["teacher"] = parent_facts
    check_objective(model, method_key, f"stage {stage}")
    if kind == "distill" and method.needs_teacher and not inputs.get("teacher"):
        raise ValueError(f"stage {stage}: distill method {method_key!r} needs a `teacher` input")
    method.use_tokenizer(tokenizer)
    return TrainingSetup(model, tokenizer, blocks, sampler, teacher, parents, monitor)


def run(ctx) -> dict:
    plan, method = ctx.plan, ctx.method
    ranks = plan.options.get("ranks", 1)
    setup = prepare_training(plan.name, plan.kind, plan.method, plan.options, method,
                             {role: ctx.input(role) for role in ctx.inputs}, launcher=ranks > 1)
    model, tokenizer, sampler, parents = setup.model, setup.tokenizer, setup.sampler, setup.parents
    checkpoints = ctx.workspace.state_dir / "checkpoints" / plan.digest[:DIGEST_LEN]

    def on_log(step: int, metrics: dict) -> None:
        ctx.log_metrics(step, {f"train_{k}": v for k, v in metrics.items()})

    if ranks > 1:
        from tasks.train_ranks import train_on_ranks

        result = train_on_ranks(ctx, model, ranks, checkpoints, on_log)
    else:
        result = train(model, setup.blocks, method.params, method, teacher=setup.teacher, checkpoint_dir=checkpoints,
                       on_log=on_log, progress=ctx.progress, sampler=sampler, monitor=setup.monitor)
    model.to("cpu")
    stability = stability_facts(result.losses, result.diverged_at_step, method.params)
    facts = {
        "kind": plan.kind, "method": plan.method, "precision": result.precision,
        "torch_compile": result.compiled, "attention": result.attention, "cpu_allocator_cache": result.allocator_cache,
        "train_domain": plan.options.get("train_domain"),
        "train_flops": result.train_flops, "train_tokens": result.tokens, "steps": result.steps,
        "final_loss": result.losses[-1], "n_params": count_params(model),
        "trainable_params": result.trainable_params, "optimizer_state_bytes": result.optimizer_state_bytes,
        "block_matrix_state_bytes": result.block_matrix_state_bytes,
        "resumed_from_step": result.resumed_from_step, **result.method_facts,
        **({"ranks": ranks} if ranks > 1 else {}),
        "sampler": (plan.options.get("sampler") or {}).get("method", "uniform"), **result.sampler_facts,
        **result.monitor_facts, **stability, "parents": parents,
    }
    # trained weights have left the grid of a quantized input model (e.g. LoRA merged into an RTN
    # model, QLoRA-style), so the saved model is not marked quantized: it may be quantized again
    setattr(model.config, QUANT_CONFIG_ATTR, None)
    quantized = method.pack(model)  # e.g. QAT: the trained weights as packed low-bit codes
    if quantized is not None:
        with torch.no_grad():  # the artifact holds exactly what its packed file dequantizes to
            for name, value in quantized.state_dict.items():
                model.get_parameter(name).copy_(value)
        facts["quantization"] = quantized.meta
    facts.update(block_weight_counts(model, result.method_facts.get("mean_density")))
    kept = checkpoints / KEPT_DIR
    if method.params.keep_checkpoints:  # the sweep's checkpoints: weights only, read with the artifact's config
        facts["kept_checkpoints"] = [
            {"step": step, "fraction": f, "path": f"{KEPT_ARTIFACT_DIR}/{step_dir_name(step)}"}
            for f, step in kept_steps(method.params).items()]
        missing = [k["step"] for k in facts["kept_checkpoints"] if not (kept / step_dir_name(k["step"])).is_dir()]
        if missing:
            raise RuntimeError(f"stage {plan.name}: kept checkpoints of steps {missing} are missing from {kept}")
        shutil.move(str(kept), str(ctx.out_dir / KEPT_ARTIFACT_DIR))
    save_model_artifact(model, tokenizer, ctx.out_dir, facts)
    auxiliary = method.auxiliary_tensors()
    if auxiliary:
        save_file({k: v.contiguous() for k, v in auxiliary.items()}, str(ctx.out_dir / AUXILIARY_FILE))
    if quantized is not None:
        quantized.save_packed(ctx.out_dir / "quantized.safetensors")
    curve = loss_curve(result.losses)
    if result.monitor_history:
        curve["validation"] = result.monitor_history
    (ctx.out_dir / LOSS_CURVE).write_text(json.dumps(curve))
    ctx.facts.update({key: facts[key] for key in ("precision", "torch_compile", "attention", "train_flops", "sampler")})
    shutil.rmtree(checkpoints, ignore_errors=True)
    first = float(np.mean(result.losses[: max(1, len(result.losses) // 20)]))
    return {"final_loss": result.losses[-1], "initial_loss": first, "train_flops": result.train_flops,
            "train_tokens": result.tokens, "tokens_per_s": result.tokens_per_second,
            "trainable_params": result.trainable_params, "optimizer_state_bytes": result.optimizer_state_bytes,
            "block_matrix_state_bytes": result.block_matrix_state_bytes,
            **({"packed_bytes": quantized.meta["packed_bytes"], "bits_per_weight": quantized.meta["bits_per_weight"]}
               if quantized is not None else {}),
            "precision_bf16": float(result.precision == "bf16"),
            **{k: float(v) for k, v in result.sampler_facts.items() if isinstance(v, (int, float))},
            **result.monitor_facts, **stability}


KEPT_ARTIFACT_DIR = "checkpoints"


def stability_facts(losses: list[float], diverged_at_step: int | None, config) -> dict:
    """How stable the run was (``components/eval/stability.py``): diverged, its largest loss spike
    after warmup, its peak learning rate; the step it diverged at when it did."""
    return {"stability_diverged": float(diverged_at_step is not None),
            "stability_loss_spike": loss_spike(losses, config.warmup_steps), "stability_lr": float(config.lr),
            **({"stability_diverged_at_step": diverged_at_step} if diverged_at_step is not None else {})}


def loss_curve(losses: list[float], max_points: int = 500) -> dict[str, list]:
    """The training loss by step for the report's curves, at most ``max_points`` points: each
    the mean over a window of consecutive steps, at the window's last step (a long run's curve
    stays a few kB in the artifact's facts)."""
    window = max(1, -(-len(losses) // max_points))
    steps, values = [], []
    for start in range(0, len(losses), window):
        chunk = losses[start:start + window]
        steps.append(start + len(chunk))
        values.append(round(float(np.mean(chunk)), 6))
    return {"steps": steps, "loss": values}
