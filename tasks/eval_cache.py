"""Per-model evaluations, cached apart from the evaluate stage that gathers them.

An evaluate stage scores many models; changing one of them (``--set
stages.quantize_int4.params.bits=3``) should re-score that one only. Each model's scores are an
artifact of kind ``model_eval`` in the same store, keyed by the model's digest, the test data's
(tokens) digest, the bytes of the model's files (a forced rerun that writes different bytes
under the same digest is re-scored), the evaluator and its scoring params, and the source closure of the evaluator
and of model loading. The evaluate stage's own code (claims, report) is not in the key, so a
change to how claims are judged re-judges them without re-scoring anything.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from tasks.artifacts import Artifact, ArtifactStore, compute_digest
from tasks.code_version import code_version, relative_paths, source_closure

EVAL_KIND = "model_eval"
SCORES = "scores.json"
WORK = "work"  # what the evaluator wrote for the model (the lm-eval task it ran)
REPORT_ONLY_PARAMS = ("plot", "fits", "eft_beta")  # shape the stage's report or the EFT model, not a model's scores


def evaluation_key(evaluator, model: Artifact, tokens: Artifact) -> tuple[str, dict]:
    """(digest, manifest) of ``evaluator``'s scores of ``model`` on ``tokens``' test data."""
    params = evaluator.params.model_dump(mode="json", exclude=set(REPORT_ONLY_PARAMS))
    files = source_closure((type(evaluator).__module__, "tasks.model_io"))
    version = code_version(files)
    inputs = {"model": model.digest, "tokens": tokens.digest}
    digest = compute_digest(EVAL_KIND, evaluator.key, params, inputs, version,
                            {"model_files": model.manifest["content_sha256"]})
    manifest = {"kind": EVAL_KIND, "method": evaluator.key, "params": params, "inputs": inputs,
                "model_stage": model.manifest.get("stage"), "model_recipe": model.manifest.get("recipe"),
                "code_version": version, "code_files": relative_paths(files)}
    return digest, manifest


def cached_evaluation(store: ArtifactStore, evaluator, model: Artifact, tokens: Artifact, out_dir: Path,
                      score: Callable[[Path], dict]) -> tuple[dict, bool]:
    """The model's scores and whether they were reused. ``score(work_dir)`` runs the evaluator,
    writing its files into ``work_dir``; those are copied to ``out_dir`` either way."""
    digest, manifest = evaluation_key(evaluator, model, tokens)
    cached = store.get(EVAL_KIND, digest)
    reused = cached is not None
    if cached is None:
        with store.lock(EVAL_KIND, digest, f"the evaluation of {manifest['model_stage']}"):
            cached = store.get(EVAL_KIND, digest)  # another process may have scored it meanwhile
            if cached is None:
                with store.writer(EVAL_KIND, digest, manifest) as tmp:
                    scores = score(tmp / WORK)
                    (tmp / SCORES).write_text(json.dumps(scores, indent=2, sort_keys=True, default=float))
                cached = store.get(EVAL_KIND, digest)
    if (cached.path / WORK).is_dir():
        shutil.copytree(cached.path / WORK, out_dir, dirs_exist_ok=True)
    return json.loads(cached.file(SCORES).read_text()), reused
