"""Instruction Mining (Cao et al. 2023): a linear rule from cheap per-document indicators to the
loss a model reaches after fine-tuning on the data.

What follows the paper (arXiv 2307.06290; no official code was found, so none is followed):

- quality is a linear function of natural-language indicators: ``log L_eval = b0 + sum_k b_k I_k``,
  where ``I_k`` is the mean of indicator ``k`` over a dataset and ``L_eval`` the loss on an
  evaluation set of a model fine-tuned on that dataset;
- the coefficients are fitted by ordinary least squares over many fine-tuned subsets; the
  documents the rule predicts to lower the loss most are selected. Because the rule is linear in
  the *mean* indicator, ranking documents by ``-(b . I(doc))`` and keeping the head is exactly
  picking the subset of that size with the lowest predicted loss.

Our stand-ins for the paper's indicators (all cheap; ``indicators`` picks a subset):

- ``log_tokens``: log(1 + token count), for the paper's output/input length (logged because raw
  lengths are heavy-tailed and would dominate the standardised regression);
- ``reference_loss``: the reference model's mean nats/token, for the paper's perplexity (its
  log) and, having no reward model, for its reward-model score;
- ``knn_target_distance``: mean Euclidean distance of the document's mean-pooled reference
  states to its ``knn_k`` nearest target documents, for the paper's KNN-6 (6th-neighbour distance in
  SentenceBERT space); the paper measures it within the candidate data, we measure it to the
  target set, which is what the loss is measured on;
- ``mtld``: MTLD lexical diversity (McCarthy & Jarvis 2010, TTR threshold 0.72, mean of the
  forward and backward passes) over lower-cased word-punct tokens, the paper's MTLD;
- ``alpha_fraction``: share of non-space characters that are letters, a crude fluency cue
  standing in for the UniEval naturalness/understandability scores.

Guessed, not from the paper (it fine-tunes LLaMA-2 on mixtures of instruction datasets and
measures loss on a held-out instruction set):

- subsets are ``subset_size`` documents drawn from a seeded sample of the pool; with
  ``subset_tilt > 0`` each subset is drawn with weights ``exp(tilt * w . z)`` for a random
  direction ``w`` in standardised indicator space (Gumbel top-k, without replacement), which
  spreads the subsets' mean indicators the way the paper's dataset mixtures do; uniform random
  subsets (``subset_tilt=0``) have nearly equal means and leave the regression little to fit;
- each subset fine-tunes a copy of the first reference model with plain AdamW on packed blocks
  (``finetune_*``); "measured loss" is the copy's mean document loss on a seeded sample of the
  target documents. Every copy starts from the same weights with the same seed, so differences
  come from the data;
- indicators are standardised with the mean and std over the indicator sample; the rule is fitted
  on the subsets not held out, and ``facts`` records its Spearman rank correlation with the
  measured loss on the held-out subsets (``rule_spearman_heldout``; ``..._shuffled`` is the same fit on
  shuffled losses, the control that must fail), its in-sample R^2 and its
  coefficients (``coef_<indicator>``).
"""
from __future__ import annotations

import copy
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, model_validator
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from components.data.hashed_ngrams import wordpunct_words
from components.data.lm_scoring import check_tokenizer_matches, document_losses, mean_pooled_states
from components.data.selector import BudgetParams, ScoringSelector, SelectionContext, SelectionError
from components.data.tokenizer import pack_documents
from components.registry import Paper

Indicator = Literal["log_tokens", "reference_loss", "knn_target_distance", "mtld", "alpha_fraction"]
INDICATORS: tuple[str, ...] = ("log_tokens", "reference_loss", "knn_target_distance", "mtld", "alpha_fraction")
MODEL_INDICATORS = frozenset({"reference_loss", "knn_target_distance"})
MTLD_THRESHOLD = 0.72


def mtld(words: list[str], threshold: float = MTLD_THRESHOLD) -> float:
    """Measure of Textual Lexical Diversity: mean length of word runs whose type-token ratio stays
    above ``threshold``, averaged over a forward and a backward pass. A text that never falls to
    the threshold scores its length; an empty text scores 0."""
    if not words:
        return 0.0

    def one_pass(sequence: list[str]) -> float:
        factors, types, count = 0.0, set(), 0
        for word in sequence:
            count += 1
            types.add(word)
            if len(types) / count <= threshold:
                factors, types, count = factors + 1.0, set(), 0
        if count:  # the unfinished run counts as the fraction of a factor it has covered
            factors += (1.0 - len(types) / count) / (1.0 - threshold)
        return len(sequence) / factors if factors > 0 else float(len(sequence))

    return 0.5 * (one_pass(words) + one_pass(words[::-1]))


def alpha_fraction(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    return sum(c.isalpha() for c in chars) / len(chars) if chars else 0.0


def fit_linear_rule(indicators: np.ndarray, log_losses: np.ndarray) -> tuple[float, np.ndarray, float]:
    """OLS of ``log_losses`` on ``indicators`` with an intercept: (intercept, coefficients, R^2)."""
    x = np.asarray(indicators, dtype=np.float64)
    y = np.asarray(log_losses, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"indicators must be (n_subsets, n_indicators) matching {y.shape[0]} losses, got {x.shape}")
    design = np.column_stack([np.ones(len(x)), x])
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ beta
    total = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(residual @ residual) / total if total > 0 else 0.0
    return float(beta[0]), beta[1:], r2


def gumbel_top_k(log_weights: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` distinct indices sampled without replacement with probabilities ∝ exp(log_weights)."""
    keys = log_weights + rng.gumbel(size=len(log_weights))
    return np.sort(np.argpartition(-keys, k - 1)[:k])


def finetune_copy(model, blocks: np.ndarray, steps: int, batch_size: int, lr: float, seed: int):
    """A copy of ``model`` trained ``steps`` AdamW steps on random batches of token ``blocks``."""
    tuned = copy.deepcopy(model)
    tuned.train()
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        batch = torch.from_numpy(blocks[rng.integers(len(blocks), size=batch_size)].astype(np.int64))
        loss = tuned(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return tuned.eval()


class InstructionMining(ScoringSelector):
    """Rank documents by a linear indicator rule fitted to the losses of fine-tuned model copies."""

    key = "instruction_mining"
    paper = Paper(title="Instruction Mining: Instruction Data Selection for Tuning Large Language Models",
                  url="https://arxiv.org/abs/2307.06290", arxiv="2307.06290")
    needs_target = True
    needs_tokenizer = True
    min_references = 1

    class Params(BudgetParams):
        indicators: tuple[Indicator, ...] = Field(INDICATORS, min_length=1, description="indicators of the rule")
        n_subsets: int = Field(24, ge=2, description="fine-tuned subsets the rule is fitted on (incl. held out)")
        subset_size: int = Field(64, ge=1, description="documents per subset")
        subset_tilt: float = Field(1.0, ge=0, description="spread of the subsets in indicator space (0: uniform)")
        indicator_sample_docs: int = Field(1024, ge=1, description="pool-sample documents the subsets are drawn from")
        holdout_fraction: float = Field(0.25, gt=0, lt=1, description="subsets held out to measure the rule")
        finetune_steps: int = Field(20, ge=1, description="AdamW steps per subset")
        finetune_batch_size: int = Field(8, ge=1, description="blocks per step")
        finetune_seq_len: int = Field(64, ge=2, description="tokens per packed block")
        finetune_lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
        eval_max_docs: int = Field(64, ge=1, description="target documents the measured loss averages over")
        max_tokens: int = Field(128, ge=1, description="tokens per document for loss and embedding indicators")
        batch_size: int = Field(16, ge=1, description="documents per reference-model forward pass")
        knn_k: int = Field(6, ge=1, description="neighbours of knn_target_distance (the paper's KNN-6)")

        @model_validator(mode="after")
        def _enough_subsets(self):
            if len(set(self.indicators)) != len(self.indicators):
                raise ValueError(f"indicators must not repeat, got {list(self.indicators)}")
            held = round(self.holdout_fraction * self.n_subsets)
            if held < 3 or self.n_subsets - held < len(self.indicators) + 1:
                raise ValueError(
                    f"n_subsets={self.n_subsets} with holdout_fraction={self.holdout_fraction} gives {held} held-out "
                    f"and {self.n_subsets - held} fitting subsets; need >= 3 held out (for a rank correlation) and "
                    f">= {len(self.indicators) + 1} fitting subsets ({len(self.indicators)} indicators + intercept)")
            return self

    def __init__(self, params=None):
        super().__init__(params)
        self.facts: dict = {}
        self._fitted: dict | None = None

    def indicator_matrix(self, texts: list[str]) -> np.ndarray:
        """(len(texts), n_indicators) raw indicator values, in ``params.indicators`` order."""
        p, f = self.params, self._fitted
        columns: dict[str, np.ndarray] = {}
        if "log_tokens" in p.indicators:
            encodings = f["tokenizer"].backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
            columns["log_tokens"] = np.log1p([len(e.ids) for e in encodings])
        if "reference_loss" in p.indicators:
            losses = document_losses(f["model"], f["tokenizer"], texts, p.max_tokens, p.batch_size)
            fill = f.get("loss_fill")  # set by fit; until then a document without tokens stays NaN
            columns["reference_loss"] = losses if fill is None else np.where(np.isfinite(losses), losses, fill)
        if "knn_target_distance" in p.indicators:
            states = mean_pooled_states(f["model"], f["tokenizer"], texts, p.max_tokens, p.batch_size)
            columns["knn_target_distance"] = self._knn_distance(states.astype(np.float64))
        if "mtld" in p.indicators:
            columns["mtld"] = np.array([mtld(wordpunct_words(t)) for t in texts])
        if "alpha_fraction" in p.indicators:
            columns["alpha_fraction"] = np.array([alpha_fraction(t) for t in texts])
        return np.column_stack([np.asarray(columns[name], dtype=np.float64) for name in p.indicators])

    def _knn_distance(self, states: np.ndarray) -> np.ndarray:
        target = self._fitted["target_states"]
        sq = (states * states).sum(1)[:, None] + (target * target).sum(1)[None, :] - 2.0 * states @ target.T
        dist = np.sqrt(np.maximum(sq, 0.0))
        k = min(self.params.knn_k, target.shape[0])
        return np.sort(np.partition(dist, k - 1, axis=1)[:, :k], axis=1).mean(1)

    def fit(self, context: SelectionContext) -> None:
        where = f"{context.stage} ({self.key})"
        p = self.params
        if context.target is None or context.target.empty:
            raise SelectionError(f"{where}: needs a non-empty target set to measure fine-tuned losses on")
        if not context.references:
            raise SelectionError(f"{where}: needs a `reference` model input to fine-tune and score with")
        pool = context.pool_sample
        n_pool = 0 if pool is None else len(pool)
        if p.subset_size > min(n_pool, p.indicator_sample_docs):
            raise SelectionError(
                f"{where}: subset_size={p.subset_size} is larger than the documents subsets are drawn from "
                f"({n_pool} pool-sample docs, fit_sample_docs={p.fit_sample_docs}, "
                f"indicator_sample_docs={p.indicator_sample_docs}); lower subset_size or raise those")
        model, tokenizer = context.references[0].model, context.tokenizer
        check_tokenizer_matches(model, tokenizer, where)
        max_positions = getattr(model.config, "max_position_embeddings", None)
        if max_positions is not None and p.finetune_seq_len > max_positions:
            raise SelectionError(f"{where}: finetune_seq_len={p.finetune_seq_len} exceeds the reference model's "
                                 f"max_position_embeddings={max_positions}")
        rng = np.random.default_rng([p.seed, 7])
        target = context.target.reset_index(drop=True)
        eval_rows = np.sort(rng.choice(len(target), size=min(p.eval_max_docs, len(target)), replace=False))
        eval_texts = target["text"].iloc[eval_rows].tolist()
        self._fitted = {"model": model, "tokenizer": tokenizer}
        if "knn_target_distance" in p.indicators:
            self._fitted["target_states"] = mean_pooled_states(
                model, tokenizer, target["text"].tolist(), p.max_tokens, p.batch_size).astype(np.float64)

        rows = np.sort(rng.choice(n_pool, size=min(p.indicator_sample_docs, n_pool), replace=False))
        texts = pool["text"].iloc[rows].tolist()
        raw = self.indicator_matrix(texts)
        if "reference_loss" in p.indicators:  # a document without tokens has no loss: use the mean
            col = p.indicators.index("reference_loss")
            self._fitted["loss_fill"] = float(np.nanmean(raw[:, col]))
            raw[~np.isfinite(raw[:, col]), col] = self._fitted["loss_fill"]
        mean, std = raw.mean(0), raw.std(0)
        std = np.where(std > 0, std, 1.0)  # a constant indicator standardises to 0 and gets no weight
        z = (raw - mean) / std

        def measured_loss(tuned) -> float:
            return float(np.nanmean(document_losses(tuned, tokenizer, eval_texts, p.max_tokens, p.batch_size)))

        subset_means, log_losses = [], []
        for s in tqdm(range(p.n_subsets), desc="instruction mining subsets", disable=not context.progress):
            subset_rng = np.random.default_rng([p.seed, 11, s])
            direction = subset_rng.normal(size=z.shape[1])
            direction /= max(np.linalg.norm(direction), 1e-12)
            chosen = gumbel_top_k(p.subset_tilt * (z @ direction), p.subset_size, subset_rng)
            try:
                blocks = pack_documents(tokenizer, [texts[i] for i in chosen], p.finetune_seq_len)
            except ValueError as err:
                raise SelectionError(f"{where}: subset {s} is too short to fine-tune on ({err}); raise subset_size "
                                     f"(now {p.subset_size}) or lower finetune_seq_len") from None
            tuned = finetune_copy(model, blocks, p.finetune_steps, p.finetune_batch_size, p.finetune_lr, p.seed)
            subset_means.append(z[chosen].mean(0))
            log_losses.append(np.log(measured_loss(tuned)))
            del tuned
        x, y = np.array(subset_means), np.array(log_losses)

        held = np.zeros(p.n_subsets, dtype=bool)
        held[np.random.default_rng([p.seed, 13]).choice(p.n_subsets, round(p.holdout_fraction * p.n_subsets),
                                                        replace=False)] = True
        intercept, coef, r2 = fit_linear_rule(x[~held], y[~held])
        rho = _heldout_spearman(intercept, coef, x[held], y[held])
        # the control: the same fit on shuffled losses, so the indicators carry no signal by construction
        shuffled = np.random.default_rng([p.seed, 17]).permutation(y[~held])
        rho_shuffled = _heldout_spearman(*fit_linear_rule(x[~held], shuffled)[:2], x[held], y[held])
        self._fitted.update(mean=mean, std=std, coef=coef)
        self.facts = {
            "rule_spearman_heldout": float(rho),
            "rule_spearman_heldout_shuffled": float(rho_shuffled),
            "rule_r2_insample": float(r2),
            "rule_intercept": intercept,
            **{f"coef_{name}": float(c) for name, c in zip(p.indicators, coef)},
            "reference_target_loss": measured_loss(model),
            "measured_loss_min": float(np.exp(y.min())),
            "measured_loss_max": float(np.exp(y.max())),
            "fit_subsets": float(p.n_subsets),
        }

    def score(self, docs: pd.DataFrame) -> np.ndarray:
        if self._fitted is None or "coef" not in self._fitted:
            raise RuntimeError("InstructionMining.score called before fit")
        f = self._fitted
        z = (self.indicator_matrix(docs["text"].tolist()) - f["mean"]) / f["std"]
        return -(z @ f["coef"])  # lowest predicted log-loss first


def _heldout_spearman(intercept: float, coef: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rho between a fitted rule's predictions and the measured held-out losses
    (0 when either side is constant)."""
    predicted = intercept + x @ coef
    return float(spearmanr(predicted, y).statistic) if np.ptp(predicted) > 0 and np.ptp(y) > 0 else 0.0
