"""The standard evaluation: per-domain perplexity, an lm-eval task, and real sizes."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from components.data.retrieval import RetrievalLayout
from components.eval.evaluator import Evaluator
from components.eval.infilling import InfillSpec, infill_metrics
from components.eval.text_code_matching import MatchingSpec, matching_metrics
from components.eval.lm_eval_task import run_lm_eval, write_arithmetic_task
from components.eval.perplexity import evaluate_perplexity
from components.eval.rank_agreement import MetricCorrelationSpec, RankAgreementSpec
from components.eval.retrieval_perplexity import RetrievedTestBlocks, retrieval_metrics
from components.eval.scaling_fit import ScalingFitSpec
from components.eval.sizes import model_size_report
from components.eval.stability import StabilitySpec
from components.eval.sweep_plot import SweepPlot
from components.model.linear_attention import (
    FEATURE_MAPS, has_linear_attention, install_linear_attention, recorded_attention_kl, remove_linear_attention,
    set_distill_attention)
from components.model.presets import is_encoder
from components.registry import MethodParams, Paper


class StandardEvaluation(Evaluator):
    key = "standard"
    paper = Paper(
        title="A framework for few-shot language model evaluation (lm-evaluation-harness)",
        url="https://github.com/EleutherAI/lm-evaluation-harness",
    )

    class Params(MethodParams):
        ppl_batch_size: int = Field(8, ge=1)
        """Blocks per forward pass when measuring perplexity."""
        max_blocks_per_domain: int | None = Field(None, ge=1)
        """Cap on test blocks per domain (the first ones); None, the default, scores the whole test
        split, so claims are judged on all of it. The count used is logged as ``blocks_<domain>``."""
        lm_eval_limit: int | None = Field(64, ge=1)
        """Arithmetic examples run through lm-eval (None = all)."""
        lm_eval_batch_size: int = Field(16, ge=1)
        lm_eval_prepacked: bool = True
        """Generate the lm-eval answers with prepacking (Zhao et al. 2024): each batch's prompts
        packed into rows without left padding (``components/eval/prepacking.py``); the same answers
        as lm-eval's left-padded ``generate`` (``benchmarks/bench_prepacking.py`` times both)."""
        eft_beta: float = 1.0
        """EFT only: weight of the small models' fine-tuning difference (Mitchell et al. 2023)."""
        plot: SweepPlot | None = None
        """Optional: plot one metric across the evaluated models (a sweep), written as a PNG."""
        hessian_trace_probes: int | None = Field(None, ge=2)
        """Optional: Hutchinson's estimate of the loss Hessian's trace (flatness) with this many
        Rademacher probes, on the first ``hessian_trace_blocks`` test blocks of each domain
        (``components/eval/flatness.py``); metrics ``hessian_trace``, ``_se``, ``_per_param``."""
        hessian_trace_blocks: int = Field(2, ge=1)
        attention_kl_maps: tuple[Literal[FEATURE_MAPS], ...] = ()
        """Linear-attention feature maps (``elu``, ``hedgehog``) to put, untrained, in each softmax
        model's place: metric ``attention_kl_<map>``, the KL of its attention weights from softmax's
        (Hedgehog's baseline). A model with linear attention always reports ``attention_kl``."""
        infill: InfillSpec | None = None
        """Optional: fill a middle span of test blocks given prefix and suffix, scored left to right
        and in the span-corruption format (``components/eval/infilling.py``); metrics
        ``infill_nll_<format>``, ``infill_acc_<format>``, also per domain."""
        matching: MatchingSpec | None = None
        """Optional: text-to-code retrieval among ``candidates`` functions of the test split, ranked
        by CodeT5+'s text-code matching verdict and by the text's pointwise mutual information with
        the code (``components/eval/text_code_matching.py``); metrics ``tcm_top1_<match|pmi>``,
        ``tcm_mrr_<match|pmi>``."""
        retrieval: RetrievalLayout | None = None
        """Optional: perplexity of each test block's tokens after its query chunk, alone and behind
        the training blocks retrieved for it (InstructRetro-lite,
        ``components/eval/retrieval_perplexity.py``); metrics ``retrieval_ppl_none`` and
        ``retrieval_ppl_retrieved``, also per domain. Give it the layout the ``retro`` stages used."""
        checkpoints: bool = False
        """Also score the checkpoints each input model's training stage kept (``keep_checkpoints``),
        as models ``<stage>_at<percent>``, and plot every capability along training (The Fine Line,
        Yang et al. 2024). Checkpoints are rescored whenever the stage runs."""
        fits: list[ScalingFitSpec] = Field(default_factory=list)
        """Optional: scaling laws fitted across the evaluated models (``components/eval/scaling_fit.py``);
        each fit's parameters are claimable as ``<fit name>.<param>``."""
        rank_agreements: list[RankAgreementSpec] = Field(default_factory=list)
        """Optional, with ``checkpoints``: does a capability rank the runs at an early checkpoint as
        it does at the end? Spearman's rho with its interval and permutation null
        (``components/eval/rank_agreement.py``), claimable as ``<name>.spearman`` etc."""

        correlations: list[MetricCorrelationSpec] = Field(default_factory=list)
        """Optional: Spearman correlation of two per-model metrics across runs (e.g. flatness against
        a downstream probe), partial when others are held fixed; the rank agreements' statistics
        (``components/eval/rank_agreement.py``), claimable as ``<name>.spearman`` etc."""

        stability: list[StabilitySpec] = Field(default_factory=list)
        """Optional: groups of runs (e.g. a number format over learning rates and seeds) whose share of
        unstable runs, diverged or spiking, is reported (``components/eval/stability.py``) and drawn as
        a grid over learning rate; claimable as ``<name>.unstable_fraction`` etc."""

        @model_validator(mode="after")
        def _agreements_need_checkpoints(self):
            if self.rank_agreements and not self.checkpoints:
                raise ValueError("rank_agreements compare early checkpoints with final models; set checkpoints: true")
            names = [s.name for s in (*self.fits, *self.rank_agreements, *self.correlations, *self.stability)]
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError("fits, rank_agreements, correlations and stability groups must have distinct "
                                 "names; repeated: "
                                 f"{', '.join(repeated)}")
            return self

    @property
    def needs_train_blocks(self) -> bool:
        """The retrieval database is the training blocks (the evaluate stage passes ``train_blocks``)."""
        return self.params.retrieval is not None

    @property
    def needs_model_facts(self) -> bool:
        """With retrieval, a model's facts say the layout it trained in (``retro``), checked here."""
        return self.params.retrieval is not None

    def evaluate(self, model, tokenizer, model_dir: Path | None, blocks_by_domain: dict[str, np.ndarray],
                 task_examples: list[dict], work_dir: Path, quant_meta: dict | None = None,
                 progress: bool = False, train_blocks: dict[str, np.ndarray] | None = None,
                 facts: dict | None = None) -> dict[str, float]:
        p = self.params
        if is_encoder(model):
            raise ValueError(f"evaluate method standard scores causal decoders; the model {model_dir} is a masked-LM "
                             "encoder (score it with method masked_lm)")
        out = perplexity_metrics(model, blocks_by_domain, p.ppl_batch_size, p.max_blocks_per_domain, progress)
        if task_examples:
            task_dir = work_dir / "lm_eval_task"
            write_arithmetic_task(task_dir, task_examples)
            r = run_lm_eval(model, tokenizer, task_dir, "paperdag_arithmetic",
                            batch_size=p.lm_eval_batch_size, limit=p.lm_eval_limit, prepacked=p.lm_eval_prepacked)
            out["arith_exact_match"] = r["exact_match"]
            out["arith_n"] = r["n"]
        if p.infill is not None:
            out.update(infill_metrics(model, tokenizer, p.infill, blocks_by_domain, p.ppl_batch_size, model_dir))
        if p.matching is not None:
            out.update(matching_metrics(model, tokenizer, p.matching, blocks_by_domain, p.ppl_batch_size))
        if p.retrieval is not None:
            if not train_blocks:
                raise ValueError("evaluate: retrieval needs the training blocks as its database (train_blocks)")
            if (facts or {}).get("retrieval"):
                p.retrieval.check_matches(facts["retrieval"], str(model_dir))
            retrieved = getattr(self, "_test_retrieval", None)  # built once per stage, for every model
            if retrieved is None or not retrieved.built_from(p.retrieval, blocks_by_domain, train_blocks):
                retrieved = self._test_retrieval = RetrievedTestBlocks(p.retrieval, blocks_by_domain, train_blocks,
                                                                 p.max_blocks_per_domain)
            out.update(retrieval_metrics(model, p.retrieval, blocks_by_domain, train_blocks, p.ppl_batch_size,
                                         p.max_blocks_per_domain, progress, retrieved))
        if p.hessian_trace_probes:
            out.update(flatness_metrics(model, blocks_by_domain, p.hessian_trace_probes, p.hessian_trace_blocks))
        kl_args = (blocks_by_domain, p.ppl_batch_size, p.max_blocks_per_domain)
        if has_linear_attention(model):
            out["attention_kl"] = attention_kl_on_blocks(model, *kl_args)
        else:
            for kind in p.attention_kl_maps:  # the untrained map in softmax's place, measured, then removed
                install_linear_attention(model, kind)
                try:
                    out[f"attention_kl_{kind}"] = attention_kl_on_blocks(model, *kl_args)
                finally:
                    remove_linear_attention(model)
        out.update(size_metrics(model_dir, quant_meta))
        return out


def flatness_metrics(model, blocks_by_domain: dict[str, np.ndarray], probes: int, blocks_per_domain: int) -> dict:
    """The Hessian trace on the same fixed blocks for every model: the first of each domain."""
    from components.eval.flatness import hessian_trace

    chosen = [blocks_by_domain[d][:blocks_per_domain] for d in sorted(blocks_by_domain) if len(blocks_by_domain[d])]
    blocks = torch.from_numpy(np.concatenate(chosen).astype(np.int64))
    with torch.enable_grad():
        return hessian_trace(model, blocks, probes)


def attention_kl_on_blocks(model, blocks_by_domain: dict[str, np.ndarray], batch_size: int,
                           max_blocks_per_domain: int | None = None) -> float:
    """For a model with linear attention (Hedgehog): the mean over layers and query rows of
    ``KL(softmax || linear)`` between the attention weights its own queries and keys give under
    softmax and under its feature map, on the test blocks perplexity scores."""
    chosen = [np.asarray(blocks_by_domain[d][:max_blocks_per_domain]) for d in sorted(blocks_by_domain)]
    blocks = torch.from_numpy(np.concatenate([b for b in chosen if len(b)]).astype(np.int64))
    kls = []
    set_distill_attention(model, True)
    try:
        with torch.no_grad():
            for start in range(0, len(blocks), batch_size):
                batch = blocks[start:start + batch_size]
                model(input_ids=batch, logits_to_keep=1)
                kls.append(float(recorded_attention_kl(model)) * len(batch))
    finally:
        set_distill_attention(model, False)
    return sum(kls) / len(blocks)


def perplexity_metrics(model, blocks_by_domain: dict[str, np.ndarray], batch_size: int,
                       max_blocks_per_domain: int | None = None, progress: bool = False) -> dict[str, float]:
    """``loss_{domain}``/``ppl_{domain}`` on each domain's blocks (all of them, or the first
    ``max_blocks_per_domain``), ``blocks_{domain}`` (how many were scored), ``loss_all``/``ppl_all``
    weighted by tokens, and ``loss_domain_mean``: the unweighted mean over domains."""
    out: dict[str, float] = {}
    total_nll, total_tokens = 0.0, 0
    domain_losses = []
    for domain, blocks in sorted(blocks_by_domain.items()):
        blocks = np.asarray(blocks[:max_blocks_per_domain])
        if len(blocks) == 0:
            continue
        r = evaluate_perplexity(model, blocks, batch_size=batch_size, progress=progress)
        out[f"ppl_{domain}"] = r["ppl"]
        out[f"loss_{domain}"] = r["loss"]
        out[f"blocks_{domain}"] = float(len(blocks))
        domain_losses.append(r["loss"])
        total_nll += r["loss"] * r["tokens"]
        total_tokens += r["tokens"]
    if total_tokens:
        out["loss_all"] = total_nll / total_tokens
        out["ppl_all"] = math.exp(out["loss_all"])
        out["loss_domain_mean"] = sum(domain_losses) / len(domain_losses)
    return out


def size_metrics(model_dir: Path | None, quant_meta: dict | None = None) -> dict[str, float]:
    """Real bytes of a saved model (none for a wrapper such as EFT) and its activation bits."""
    out: dict[str, float] = {}
    if model_dir is not None:  # a wrapper such as EFT has no weights file of its own
        sizes = model_size_report(model_dir, quant_meta=quant_meta)
        out.update({k: v for k, v in sizes.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        out["size_bytes"] = sizes.get("deploy_bytes", sizes.get("safetensors_bytes"))
    if quant_meta and quant_meta.get("activations"):  # measured with activation fake-quant hooks
        out["activation_bits"] = quant_meta["activations"]["bits"]
    return out
