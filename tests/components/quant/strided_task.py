"""A nano model and a task it learns in ~100 steps: the trained model the PTQ tests quantize."""
import torch

from components.model.presets import build_model

VOCAB, SEQ = 64, 32


def nano(seed=0):
    return build_model("nano", vocab_size=VOCAB, max_seq_len=SEQ, seed=seed)


def strided(n, seed):
    """Sequences ``start + stride * t (mod VOCAB)``."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    return (start + stride * torch.arange(SEQ)) % VOCAB


def trained_nano(steps=120):
    """A nano model after ``steps`` Adam steps on strided sequences (seeded, so every test file gets the same)."""
    torch.manual_seed(0)
    model = nano()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        x = strided(16, 100 + step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def trained_state(steps=120):
    """``trained_nano``'s weights as a detached state dict (a module fixture's shared starting point)."""
    return {k: v.detach().clone() for k, v in trained_nano(steps).state_dict().items()}


def model_from(state):
    model = nano()
    model.load_state_dict(state)
    return model.eval()
