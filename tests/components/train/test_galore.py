"""GaLore: the projected Adam step against the paper's formulas, the projection's refresh, the
measured optimizer-state bytes, an exact resume, and params that cannot apply."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from components.train.galore import GaLoreAdamW, GaLoreError, GaLoreTraining
from components.train.lora import LoraFinetune
from components.train.trainer import train
from tests.components.train.test_trainer import assert_resume_is_exact, dense, nano, pattern_blocks


def galore(**overrides):
    params = dict(steps=12, batch_size=8, lr=1e-2, warmup_steps=2, precision="fp32", rank=8, update_proj_gap=5)
    params.update(overrides)
    config = GaLoreTraining.Params(**params)
    return config, GaLoreTraining(config)


def reference_steps(weight: np.ndarray, grads: list[np.ndarray], rank: int, gap: int, scale: float, lr: float,
                    betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0) -> np.ndarray:
    """Algorithm 1 of the paper in float64 numpy: Adam on the projected gradient, projected back."""
    b1, b2 = betas
    w = weight.astype(np.float64)
    m = v = proj = None
    for t, g in enumerate(grads):
        g = g.astype(np.float64)
        tall = g.shape[0] >= g.shape[1]
        if t % gap == 0:
            # singular vectors are unique up to sign only, and the moments carried across a refresh
            # see the sign: the reference takes the same fp32 SVD as the optimizer
            u, _, vh = (x.numpy() for x in torch.linalg.svd(torch.from_numpy(g.astype(np.float32)),
                                                            full_matrices=False))
            proj = (vh[:rank] if tall else u[:, :rank]).astype(np.float64)
        r = g @ proj.T if tall else proj.T @ g
        m = (1 - b1) * r if m is None else b1 * m + (1 - b1) * r
        v = (1 - b2) * r * r if v is None else b2 * v + (1 - b2) * r * r
        n = m / (np.sqrt(v) + eps)
        step_size = lr * np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
        w = w - step_size * scale * (n @ proj if tall else proj @ n)
        w = w - lr * weight_decay * w
    return w


@pytest.mark.parametrize("shape", [(24, 10), (10, 24)], ids=["tall (right vectors)", "wide (left vectors)"])
def test_steps_follow_the_papers_algorithm(shape):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) for _ in range(7)]
    param = torch.nn.Parameter(weight.clone())
    opt = GaLoreAdamW([{"params": [param], "rank": 4, "update_proj_gap": 3, "scale": 0.25}], lr=0.01,
                      betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    expected = reference_steps(weight.numpy(), [g.numpy() for g in grads], rank=4, gap=3, scale=0.25, lr=0.01,
                               weight_decay=0.1)
    np.testing.assert_allclose(param.detach().numpy(), expected, rtol=0, atol=1e-6)
    state = opt.state[param]
    assert state["exp_avg"].shape == ((shape[0], 4) if shape[0] >= shape[1] else (4, shape[1]))


def test_the_projection_is_refreshed_every_gap_steps_only():
    param = torch.nn.Parameter(torch.zeros(16, 8))
    opt = GaLoreAdamW([{"params": [param], "rank": 2, "update_proj_gap": 3, "scale": 1.0}], lr=0.1)
    gen = torch.Generator().manual_seed(1)
    seen = []
    for _ in range(7):
        param.grad = torch.randn(16, 8, generator=gen)
        opt.step()
        seen.append(opt.state[param]["projection"].clone())
    same = [torch.equal(seen[i], seen[i - 1]) for i in range(1, 7)]
    assert same == [True, True, False, True, True, False]  # new SVDs at steps 4 and 7 (0-based 3 and 6)


def test_galore_trains_and_keeps_the_block_matrix_state_low_rank():
    config, method = galore(steps=40, rank=8, update_proj_gap=10)
    result = train(nano(), pattern_blocks(), config, method, progress=False)
    # nano is 64 wide: the loss of the counting pattern falls (measured: first 5 steps 3.34, last 5 0.007)
    assert sum(result.losses[-5:]) < 0.2 * sum(result.losses[:5])
    base = nano()
    shapes = [m.weight.shape for m in base.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    # moments on the projected gradient (r x max side, twice) plus the projection (r x min side), fp32
    assert result.block_matrix_state_bytes == sum(4 * (2 * 8 * max(s) + 8 * min(s)) for s in shapes)
    assert result.method_facts == {"galore_rank": 8, "galore_projected_matrices": len(shapes)}
    adam = train(nano(), pattern_blocks(), *dense(steps=2), progress=False)
    # torch's AdamW: two full moments, and each parameter's step count as a 0-d fp32 tensor
    assert adam.block_matrix_state_bytes == sum(2 * 4 * s.numel() + 4 for s in shapes)
    # embeddings, lm_head and norms keep full Adam moments in both (torch's with a step tensor each)
    others = len(list(base.parameters())) - len(shapes)
    assert (result.optimizer_state_bytes - result.block_matrix_state_bytes + 4 * others
            == adam.optimizer_state_bytes - adam.block_matrix_state_bytes)


def test_a_galore_resume_is_bit_exact(tmp_path):
    # the projection is refreshed at steps 1, 4, 7, 10: one refresh after the resume at step 8
    assert_resume_is_exact(tmp_path, lambda: galore(checkpoint_every=4, update_proj_gap=3))


def test_params_that_cannot_apply_are_refused_by_name():
    with pytest.raises(GaLoreError, match=r"params\.rank=65 is larger than layer .* allows \(min\(out, in\) = 64\)"):
        train(nano(), pattern_blocks(), *galore(rank=65), progress=False)
    with pytest.raises(GaLoreError, match=r"params\.target_modules \['qkv'\] names no trainable Linear"):
        train(nano(), pattern_blocks(), *galore(target_modules=("qkv",)), progress=False)
    with pytest.raises(ValidationError, match="zero_stage=2: GaLore takes an SVD"):
        GaLoreTraining.Params(zero_stage=2)
    with pytest.raises(ValidationError, match=r"betas must each be in \[0, 1\)"):
        GaLoreTraining.Params(betas=(0.9, 1.0))
    with pytest.raises(GaLoreError, match=r"matrices only; a parameter of shape \(4,\)"):
        GaLoreAdamW([{"params": [torch.nn.Parameter(torch.zeros(4))], "rank": 2}], lr=0.1)


def test_lora_can_pretrain_with_embeddings_and_norms_trained_beside_the_adapters():
    config = LoraFinetune.Params(steps=3, batch_size=8, lr=1e-2, precision="fp32", rank=4,
                                 also_train=("embed_tokens", "norm", "lm_head"))
    model, before = nano(), nano()
    train(model, pattern_blocks(), config, LoraFinetune(config), progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, dict(before.named_parameters())[n])}
    assert "model.embed_tokens.weight" in changed and "model.norm.weight" in changed
    assert any(".q_proj." in n for n in changed)  # the merged adapters
    with pytest.raises(ValidationError, match="also_train pattern '\\[' is not a regular expression"):
        LoraFinetune.Params(also_train=("[",))


def test_a_recipe_names_galore_for_a_pretrain_stage():
    from flows.recipe import load_plan
    from tests.helpers import NANO_RECIPE

    _, plan = load_plan(NANO_RECIPE, ["stages.pretrain_dense.method=galore", "stages.pretrain_dense.params.rank=16"])
    stage = plan.stages["pretrain_dense"]
    assert stage.method == "galore" and stage.params["rank"] == 16 and stage.params["scale"] == 0.25
