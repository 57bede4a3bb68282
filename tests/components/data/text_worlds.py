"""Synthetic texts and tiny trained models shared by the model-based selector tests."""
from __future__ import annotations

import copy

import numpy as np
import torch

from components.model.presets import build_model

SUBJECTS = ["the farmer", "a child", "the teacher", "my neighbour", "the old dog", "a young cat", "the doctor"]
VERBS = ["reads", "finds", "carries", "watches", "likes", "paints", "buys", "sells"]
OBJECTS = ["a book", "the red apple", "some bread", "the long letter", "a small boat", "the garden gate"]
PLACES = ["in the morning", "at the market", "near the river", "after dinner", "before school"]


def english(rng, sentences=6):
    return " ".join(f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
                    f"{rng.choice(PLACES)}." for _ in range(sentences))


def gibberish(rng, words=30):
    letters = list("abcdefghijklmnopqrstuvwxyz#@%&")
    return " ".join("".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(words))


def train_ladder(tokenizer, texts, snapshots, seed=0) -> dict:
    """One nano model trained with AdamW on random 64-token windows of ``texts``, copied (in eval
    mode) after each step count in ``snapshots`` (0 = untrained)."""
    model = build_model("nano", len(tokenizer), 64, seed)
    ids = np.concatenate([[tokenizer.eos_token_id] + tokenizer.backend_tokenizer.encode(t).ids for t in texts])
    data = torch.as_tensor(ids)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ladder = {0: copy.deepcopy(model).eval()} if 0 in snapshots else {}
    for step in range(1, max(snapshots) + 1):
        starts = torch.randint(0, len(data) - 65, (16,), generator=generator)
        batch = torch.stack([data[s:s + 64] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in snapshots:
            ladder[step] = copy.deepcopy(model).eval()
    return ladder


def train_nano(tokenizer, texts, steps, seed=0):
    """A nano model trained for ``steps`` steps (see ``train_ladder``)."""
    return train_ladder(tokenizer, texts, [steps], seed)[steps]
