"""Skill-it online data selection: a mixture over skills that follows the validation loss.

Skills are the corpus domains (the row ranges of ``train-{domain}.npy`` inside train.npy).
Follows the reference code (HazyResearch/skill-it, ``trainer/mw_trainer.py``, ``main.py``):

- the skills graph ``A`` is the paper's core: ``estimate_graph`` estimates it before training
  by the paper's brute-force procedure (train a copy of the model on skill ``i`` alone for
  ``graph_steps`` steps; ``A[i, j]`` is the drop of skill ``j``'s validation loss, clipped at 0,
  then scaled so the largest entry is 1: the scaling is ours); ``graph`` gives it explicitly;
  without either it is the identity, and ``off_diagonal`` fills every off-diagonal entry (the
  reference sets the off-diagonal edges of a binary graph to 0.5). The reference repository
  ships its estimated graphs as ``.npy`` files (``ni_graphs/``);
- every ``update_steps`` steps the validation loss ``L`` of each skill is measured, and the new
  mixture is ``w = w_init * exp(eta * A @ sum(L over the last `window` evaluations))``,
  normalised; ``normalize_loss`` divides the summed losses by ``L_0`` first (reference
  ``--normalize_loss``); ``window`` defaults to the reference's ``--mw_window 3``;
- ``w_init`` is uniform unless ``prior`` sets it (reference ``--mw_prior``).

Deviations and guesses (unverified against the paper's numbers):

- the reference evaluates after the first optimizer step of each round; here the evaluations
  are at step 0 (before training) and after every ``update_steps``-th step, which is also where
  the mixture changes. ``L_0`` is the step-0 loss (the reference replaces it with the second
  evaluation's loss after its first update);
- the first mixture is ``w_init`` itself (the reference multiplies it by ``exp(eta * A @ w_init)``,
  a constant for the default uniform prior);
- the reference draws ``update_steps * batch_size`` examples in the mixture's proportions per
  round; here each row of a batch draws its skill from ``w`` with an RNG seeded by
  ``(seed, step)``, and each skill yields its blocks in reshuffled epochs of its own (a block is
  not repeated before its skill's other blocks have been used);
- validation uses ``val_blocks`` evenly spaced blocks of each skill's validation split, in eval
  mode under the trainer's autocast; defaults ``eta=0.2`` and ``update_steps=100`` are guesses
  for short runs (the reference scripts use ``eta`` 0.2-0.8, ``update_steps`` 100-1000);
- the facts name the hardest skill as the one with the highest validation loss at the first
  mixture update (at step 0 a fresh model is equally bad at everything); ``sampler_hardest_weight_gain``
  is its final minus initial mixture weight;
- the reference's ``eta_schedule``, ``dynamic_lambda``, ``target_mask`` and ``ignore_lone_nodes``
  options are not implemented.
"""
from __future__ import annotations

import math
import re
from copy import deepcopy

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from components.registry import MethodParams, Paper
from components.train.samplers.base import Sampler, SamplerError

_TAG = 3  # separates this sampler's random streams from the trainer's (seed, epoch) ones


def _metric_name(skill: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", skill)


class SkillItSampler(Sampler):
    """Online multiplicative-weights mixture over domains, driven by per-domain validation loss."""

    key = "skill_it"
    needs_skills = True
    paper = Paper(
        title="Skill-it! A Data-Driven Skills Framework for Understanding and Training Language Models",
        url="https://arxiv.org/abs/2307.14430",
        arxiv="2307.14430",
    )

    class Params(MethodParams):
        eta: float = Field(0.2, gt=0, description="Learning rate of the multiplicative-weights update.")
        update_steps: int = Field(100, ge=1, description="Re-evaluate the skills and update the mixture every "
                                                         "this many optimizer steps.")
        window: int = Field(3, ge=1, description="Sum the losses of this many latest evaluations "
                                                 "(reference --mw_window, default 3).")
        normalize_loss: bool = Field(False, description="Divide the summed losses by each skill's step-0 loss.")
        off_diagonal: float = Field(0.0, ge=0, description="Every off-diagonal entry of the skills graph A "
                                                           "(identity when 0, the reference default).")
        graph: list[list[float]] | None = Field(
            None, description="Explicit skills graph A (k x k, non-negative; rows/columns in sorted domain "
                              "order); A[i, j] > 0 means training on skill i helps skill j.")
        prior: dict[str, float] | None = Field(None, description="Positive prior weight per skill (w_init); "
                                                                 "uniform when unset.")
        val_blocks: int = Field(8, ge=1, description="Validation blocks per skill used for each evaluation.")
        estimate_graph: bool = Field(False, description="Estimate the skills graph before training: train a copy on "
                                                        "each skill alone and measure every skill's loss drop.")
        graph_steps: int = Field(20, ge=1, description="estimate_graph: AdamW steps on each skill alone.")
        graph_lr: float = Field(1e-3, gt=0, description="estimate_graph: learning rate of those steps.")

        @field_validator("graph")
        @classmethod
        def _graph(cls, graph):
            if graph is None:
                return graph
            k = len(graph)
            if k == 0 or any(len(row) != k for row in graph):
                raise ValueError(f"graph must be a square k x k matrix, got row lengths {[len(r) for r in graph]}")
            if any(not math.isfinite(x) or x < 0 for row in graph for x in row):
                raise ValueError("graph entries must be finite and >= 0")
            if any(graph[i][i] <= 0 for i in range(k)):
                raise ValueError("graph diagonal entries must be > 0 (a skill helps itself)")
            return graph

        @field_validator("prior")
        @classmethod
        def _prior(cls, prior):
            if prior is not None and any(not math.isfinite(v) or v <= 0 for v in prior.values()):
                raise ValueError(f"prior weights must be finite and > 0, got {prior}")
            return prior

        @model_validator(mode="after")
        def _one_graph(self):
            if sum([self.graph is not None, bool(self.off_diagonal), self.estimate_graph]) > 1:
                raise ValueError("give one of `graph`, `off_diagonal` or `estimate_graph`, not several")
            return self

    # -- setup -------------------------------------------------------------------------------

    def bind(self, n_blocks, batch_size, seed, skill_ranges=None, validation=None, train_blocks=None) -> None:
        super().bind(n_blocks, batch_size, seed, skill_ranges, validation, train_blocks)
        self.skills = list(self.skill_ranges)
        k = len(self.skills)
        if k < 2:
            raise SamplerError(f"sampler 'skill_it' needs at least 2 skills (domains) to mix, got {self.skills}; "
                               "it cannot be used with `train_domain`")
        for name, (start, stop) in self.skill_ranges.items():
            if stop == start:
                raise SamplerError(f"sampler 'skill_it': skill {name!r} has no training blocks")
        unknown = sorted(set(self.validation) - set(self.skills))
        if unknown:
            raise SamplerError(f"sampler 'skill_it': validation blocks for unknown skill(s) {unknown}; "
                               f"skills: {self.skills}")
        self._val: list[torch.Tensor] = []
        for name in self.skills:
            blocks = self.validation.get(name)
            if blocks is None or len(blocks) == 0:
                raise SamplerError(f"sampler 'skill_it': skill {name!r} has no validation blocks to measure its loss")
            blocks = np.asarray(blocks)
            count = min(self.params.val_blocks, len(blocks))
            rows = np.unique(np.linspace(0, len(blocks) - 1, count).round().astype(int))  # evenly spaced
            self._val.append(torch.from_numpy(blocks[rows].astype(np.int64)))
        if self.params.graph is not None:
            self.graph = np.array(self.params.graph, dtype=np.float64)
            if self.graph.shape != (k, k):
                raise SamplerError(f"sampler 'skill_it': graph is {self.graph.shape[0]}x{self.graph.shape[1]} but "
                                   f"there are {k} skills {self.skills}")
        else:
            self.graph = np.eye(k) + self.params.off_diagonal * (1.0 - np.eye(k))
        self.graph_estimated = False
        self.graph_loss_drops: np.ndarray | None = None
        if self.params.estimate_graph and self.train_blocks is None:
            raise SamplerError("sampler 'skill_it': estimate_graph trains on each skill, so bind() needs the training "
                               "blocks (train_blocks=)")
        if self.params.prior is not None:
            if set(self.params.prior) != set(self.skills):
                raise SamplerError(f"sampler 'skill_it': prior names {sorted(self.params.prior)} but the skills "
                                   f"are {self.skills}")
            self.w_init = np.array([self.params.prior[s] for s in self.skills], dtype=np.float64)
        else:
            self.w_init = np.ones(k)
        self.starts = np.array([self.skill_ranges[s][0] for s in self.skills])
        self.sizes = np.array([self.skill_ranges[s][1] - self.skill_ranges[s][0] for s in self.skills])
        self.weights = self.w_init / self.w_init.sum()
        self.weights_initial = self.weights.copy()
        self.counts = np.zeros(k, dtype=np.int64)  # blocks drawn per skill so far
        self.history: list[np.ndarray] = []  # the last `window` evaluations
        self.loss_0: np.ndarray | None = None
        self.loss_last: np.ndarray | None = None
        self.loss_first_update: np.ndarray | None = None
        self.updates = 0
        self._pending: tuple[int, np.ndarray] | None = None
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    # -- sampling ----------------------------------------------------------------------------

    def _skill_perm(self, skill: int, epoch: int) -> np.ndarray:
        cached = self._perms.get(skill)
        if cached is None or cached[0] != epoch:
            perm = np.random.default_rng([self.seed, _TAG, skill, epoch, 1]).permutation(int(self.sizes[skill]))
            self._perms[skill] = cached = (epoch, perm)
        return cached[1]

    def indices(self, step_index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, _TAG, step_index])
        skills = rng.choice(len(self.skills), size=self.batch_size, p=self.weights)
        counts = self.counts.copy()
        rows = np.empty(self.batch_size, dtype=np.int64)
        for i, s in enumerate(skills):
            c, n = int(counts[s]), int(self.sizes[s])
            rows[i] = self.starts[s] + self._skill_perm(int(s), c // n)[c % n]
            counts[s] += 1
        self._pending = (step_index, counts)  # committed by observe() once the step is done
        return rows

    # -- the mixture update ------------------------------------------------------------------

    def _evaluate(self, model: torch.nn.Module, autocast) -> np.ndarray:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        losses = []
        try:
            with torch.no_grad(), autocast:
                for blocks in self._val:
                    x = blocks.to(device)
                    losses.append(float(model(input_ids=x, labels=x).loss.float()))
        finally:
            model.train(was_training)
        return np.array(losses, dtype=np.float64)

    def _metrics(self, losses: np.ndarray) -> dict[str, float]:
        out = {}
        for i, name in enumerate(self.skills):
            out[f"sampler_weight_{_metric_name(name)}"] = float(self.weights[i])
            out[f"sampler_val_loss_{_metric_name(name)}"] = float(losses[i])
        return out

    def _estimate_graph(self, model: torch.nn.Module, autocast, losses_0: np.ndarray) -> None:
        """The paper's brute-force estimate: per skill, a copy trained on that skill alone."""
        p = self.params
        device = next(model.parameters()).device
        drops = np.zeros((len(self.skills), len(self.skills)))
        for i, name in enumerate(self.skills):
            start, stop = self.skill_ranges[name]
            rng = np.random.default_rng([self.seed, _TAG, 7, i])
            copy = deepcopy(model).to(device)
            copy.train()
            optimizer = torch.optim.AdamW(copy.parameters(), lr=p.graph_lr)
            for _ in range(p.graph_steps):
                rows = start + rng.choice(stop - start, size=self.batch_size)
                x = torch.from_numpy(np.asarray(self.train_blocks[np.sort(rows)]).astype(np.int64)).to(device)
                with autocast:
                    loss = copy(input_ids=x, labels=x).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            drops[i] = losses_0 - self._evaluate(copy, autocast)
            del copy, optimizer
        self.graph_loss_drops = drops
        graph = np.clip(drops, 0.0, None)
        if graph.max() <= 0:
            raise SamplerError("sampler 'skill_it': training on no skill lowered any skill's validation loss during "
                               f"graph estimation ({p.graph_steps} steps at lr {p.graph_lr}); raise graph_steps or "
                               "graph_lr")
        self.graph = graph / graph.max()
        self.graph_estimated = True

    def observe(self, step: int, model: torch.nn.Module, autocast) -> dict[str, float]:
        if self._pending is not None and self._pending[0] == step - 1:
            self.counts = self._pending[1]
            self._pending = None
        if step != 0 and step % self.params.update_steps:
            return {}
        losses = self._evaluate(model, autocast)
        if step == 0 and self.params.estimate_graph and not self.graph_estimated:
            self._estimate_graph(model, autocast, losses)
        if not np.all(np.isfinite(losses)):
            raise SamplerError(f"sampler 'skill_it': non-finite validation loss {losses.tolist()} at step {step}")
        self.loss_last = losses
        self.history = (self.history + [losses])[-self.params.window:]
        if self.loss_0 is None:
            self.loss_0 = losses
        if step > 0:
            total = np.sum(self.history, axis=0)
            if self.params.normalize_loss:
                total = total / self.loss_0
            logits = self.params.eta * (self.graph @ total)
            weights = self.w_init * np.exp(logits - logits.max())  # shift: same ratios, no overflow
            self.weights = weights / weights.sum()
            self.updates += 1
            if self.loss_first_update is None:
                self.loss_first_update = losses
        return self._metrics(losses)

    # -- checkpoints and facts -----------------------------------------------------------------

    def state(self) -> dict:
        as_list = lambda a: None if a is None else [float(x) for x in a]  # noqa: E731
        return {
            "skills": list(self.skills),
            "weights": as_list(self.weights),
            "counts": [int(c) for c in self.counts],
            "history": [as_list(h) for h in self.history],
            "loss_0": as_list(self.loss_0),
            "loss_last": as_list(self.loss_last),
            "loss_first_update": as_list(self.loss_first_update),
            "updates": int(self.updates),
            "graph": [[float(x) for x in row] for row in self.graph],
            "graph_estimated": bool(self.graph_estimated),
        }

    def load_state(self, state: dict) -> None:
        if state.get("skills") != self.skills:
            raise SamplerError(f"sampler 'skill_it': the checkpoint's skills {state.get('skills')} differ from "
                               f"this run's {self.skills}")
        as_array = lambda a: None if a is None else np.array(a, dtype=np.float64)  # noqa: E731
        self.weights = as_array(state["weights"])
        self.counts = np.array(state["counts"], dtype=np.int64)
        self.history = [as_array(h) for h in state["history"]]
        self.loss_0, self.loss_last = as_array(state["loss_0"]), as_array(state["loss_last"])
        self.loss_first_update = as_array(state["loss_first_update"])
        self.updates = int(state["updates"])
        if "graph" in state:  # written since graphs can be estimated
            self.graph = np.array(state["graph"], dtype=np.float64)
            self.graph_estimated = bool(state.get("graph_estimated"))
        self._pending = None

    def facts(self, steps: int) -> dict:
        facts: dict = {"sampler_skills": len(self.skills), "sampler_updates": self.updates,
                       "sampler_graph": [[round(float(x), 4) for x in row] for row in self.graph],
                       "sampler_graph_estimated": self.graph_estimated}
        drawn = max(int(self.counts.sum()), 1)
        for i, name in enumerate(self.skills):
            tag = _metric_name(name)
            facts[f"sampler_weight_initial_{tag}"] = float(self.weights_initial[i])
            facts[f"sampler_weight_final_{tag}"] = float(self.weights[i])
            facts[f"sampler_share_{tag}"] = float(self.counts[i] / drawn)
            if self.loss_0 is not None:
                facts[f"sampler_val_loss_initial_{tag}"] = float(self.loss_0[i])
                facts[f"sampler_val_loss_final_{tag}"] = float(self.loss_last[i])
        # A freshly built model starts every skill near ln(vocab), so the step-0 ranking is noise:
        # the hardest skill is the one with the highest loss when the mixture first reacts.
        ranking = self.loss_first_update if self.loss_first_update is not None else self.loss_0
        if ranking is not None:
            hardest = int(np.argmax(ranking))
            facts["sampler_hardest_skill"] = self.skills[hardest]
            facts["sampler_hardest_weight_gain"] = float(self.weights[hardest] - self.weights_initial[hardest])
        return facts
