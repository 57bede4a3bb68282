"""The stage kinds: which registry each kind draws methods from, and what inputs it takes.

This table is the one place that says how stages may connect; the recipe validator and the
stage runner both read it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from components.data.registry import CORPUS_BUILDERS, SELECTORS, TOKENIZERS
from components.distill.registry import DISTILL_METHODS
from components.eval.evaluators import EVALUATORS
from components.merge.registry import MERGERS
from components.model.registry import MODEL_IMPORTERS
from components.prune.registry import PRUNERS
from components.quant.registry import QUANTIZERS
from components.registry import Registry
from components.train.registry import FINETUNE_METHODS, PRETRAIN_METHODS

MODEL_KINDS = ("model", "pretrain", "finetune", "distill", "prune", "quantize", "merge")


@dataclass(frozen=True)
class Role:
    """One named input of a stage kind."""

    accepts: tuple[str, ...]  # stage kinds whose artifacts fit this role
    many: bool = False
    required: bool = True


@dataclass(frozen=True)
class StageKind:
    name: str
    registry: Registry
    task_module: str  # the module in tasks/ that runs this kind
    produces: str  # dataset | tokens | model | eval
    roles: dict[str, Role] = field(default_factory=dict)
    trains: bool = False  # takes `model`/`train_domain` stage options


KINDS: dict[str, StageKind] = {
    k.name: k
    for k in [
        StageKind("corpus", CORPUS_BUILDERS, "tasks.corpus", "dataset"),
        # an existing checkpoint (a local directory or a pinned hub commit) entering the DAG
        StageKind("model", MODEL_IMPORTERS, "tasks.import_model", "model"),
        StageKind(
            "select", SELECTORS, "tasks.select", "dataset",
            # tokenizer: counts token budgets and is the reference models' tokenizer; reference:
            # models that score documents (perplexity, ladders, embeddings); target: the target set
            {"docs": Role(("corpus", "select")), "tokenizer": Role(("tokenize",), required=False),
             "reference": Role(MODEL_KINDS, many=True, required=False),
             "target": Role(("corpus", "select"), required=False)},
        ),
        StageKind(
            "tokenize", TOKENIZERS, "tasks.tokenize", "tokens",
            # tokenizer: reuse that stage's tokenizer instead of training one, so models trained on
            # different selections share one vocabulary and their losses compare; or an imported
            # model's own, to pack the corpus in that model's vocabulary
            {"docs": Role(("corpus", "select")), "tokenizer": Role(("tokenize", "model"), required=False)},
        ),
        StageKind("pretrain", PRETRAIN_METHODS, "tasks.train", "model", {"tokens": Role(("tokenize",))}, trains=True),
        StageKind(
            "finetune", FINETUNE_METHODS, "tasks.train", "model",
            {"tokens": Role(("tokenize",)), "model": Role(MODEL_KINDS)}, trains=True,
        ),
        StageKind(
            "distill", DISTILL_METHODS, "tasks.train", "model",
            # teacher is optional for self-distillation methods (needs_teacher=False, e.g. ps_kd);
            # student, when given, is the model the student starts from instead of a fresh preset
            {"tokens": Role(("tokenize",)), "teacher": Role(MODEL_KINDS, required=False),
             "student": Role(MODEL_KINDS, required=False)}, trains=True,
        ),
        StageKind(
            # one-shot pruning of a trained model; tokens: calibration data for Wanda and SparseGPT
            "prune", PRUNERS, "tasks.prune", "model",
            {"model": Role(tuple(k for k in MODEL_KINDS if k != "quantize")),  # prune, then quantize
             "tokens": Role(("tokenize",), required=False)},
        ),
        StageKind(
            "quantize", QUANTIZERS, "tasks.quantize", "model",
            {"model": Role(MODEL_KINDS), "tokens": Role(("tokenize",), required=False)},
        ),
        StageKind(
            "merge", MERGERS, "tasks.merge", "model",
            {"base": Role(MODEL_KINDS, required=False), "models": Role(MODEL_KINDS, many=True),
             "tokens": Role(("tokenize",), required=False)},
        ),
        StageKind(
            "evaluate", EVALUATORS, "tasks.evaluate", "eval",
            {"tokens": Role(("tokenize",)), "models": Role(MODEL_KINDS, many=True, required=False),
             # emulated fine-tuning (EFT): evaluated as one more model, named "eft"
             "eft_large_base": Role(MODEL_KINDS, required=False), "eft_small_ft": Role(MODEL_KINDS, required=False),
             "eft_small_base": Role(MODEL_KINDS, required=False)},
        ),
    ]
}
