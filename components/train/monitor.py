"""Held-out loss per domain every few steps while a model trains.

A training stage with ``monitor_every: N`` scores the first ``monitor_blocks`` validation blocks
of every domain before its first step and after every N-th step, and logs them as
``val_loss_<domain>`` (MLflow charts them against the step). The history goes into the artifact's
``loss_curve.json`` and the evaluate stage's training-curves plot, and its shape into the facts:
for each domain the loss at the start, its peak, the step of the peak and the end. That is the
"stability gap" of continual pretraining (De Lange et al., ICLR 2023; Guo et al., 2024): when a
model moves to a new domain, the loss on the old one first rises, then partly recovers.

The scoring runs in eval mode without gradients and draws no random numbers, so a monitored run
trains exactly as an unmonitored one; the history is part of every checkpoint, so a resumed run
reports the same history as an uninterrupted one.
"""
from __future__ import annotations

import numpy as np
import torch


class ValidationMonitor:
    """``observe(step, model, autocast)`` returns ``{val_loss_<domain>: loss}`` when it scores."""

    def __init__(self, validation: dict[str, np.ndarray], every: int, max_blocks: int, batch_size: int = 16):
        self.blocks = {d: torch.from_numpy(np.asarray(b[:max_blocks], dtype=np.int64))
                       for d, b in sorted(validation.items()) if len(b)}
        if not self.blocks:
            raise ValueError("monitor_every is set but the tokens artifact has no validation blocks to score")
        self.every, self.batch_size = every, batch_size
        self.history: dict[str, list[list[float]]] = {d: [] for d in self.blocks}  # domain -> [[step, loss]]

    @torch.no_grad()
    def observe(self, step: int, model: torch.nn.Module, autocast) -> dict[str, float]:
        if step % self.every:
            return {}
        was_training = model.training
        model.eval()
        out = {}
        try:
            for domain, blocks in self.blocks.items():
                total, tokens = 0.0, 0
                for start in range(0, len(blocks), self.batch_size):
                    batch = blocks[start:start + self.batch_size].to(next(model.parameters()).device)
                    with autocast:
                        loss = model(input_ids=batch, labels=batch).loss
                    n = batch.shape[0] * (batch.shape[1] - 1)  # HF shifts the labels by one
                    total, tokens = total + float(loss) * n, tokens + n
                value = total / tokens
                self.history[domain].append([step, value])
                out[f"val_loss_{domain}"] = value
        finally:
            model.train(was_training)
        return out

    def state(self) -> dict:
        return {"history": {d: [list(p) for p in h] for d, h in self.history.items()}}

    def load_state(self, state: dict) -> None:
        saved = state.get("history", {})
        if set(saved) != set(self.history):
            raise ValueError(f"checkpoint monitor domains {sorted(saved)} differ from this run's {sorted(self.history)}")
        self.history = {d: [[int(s), float(v)] for s, v in h] for d, h in saved.items()}

    def facts(self) -> dict[str, float]:
        """Per domain: the loss at the first and last scoring, the peak, and the step of the peak."""
        out = {}
        for domain, points in self.history.items():
            if not points:
                continue
            peak_step, peak = max(points, key=lambda p: p[1])
            out.update({f"val_loss_{domain}_start": points[0][1], f"val_loss_{domain}_end": points[-1][1],
                        f"val_loss_{domain}_peak": peak, f"val_loss_{domain}_peak_step": float(peak_step)})
        return out
