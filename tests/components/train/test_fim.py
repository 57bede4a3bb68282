"""Fill-in-the-middle with horizon-length prediction: PSM rows that rearrange their block, the
head's targets, a real run whose head learns and is kept beside (not inside) the model, an exact
resume, and refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from components.data.denoising import FIM_BYTES
from components.train.fim import HEAD_ATTR, FillInTheMiddle, horizon_targets
from components.train.registry import FINETUNE_METHODS, PRETRAIN_METHODS
from components.train.trainer import train
from tests.components.train.test_trainer import SEQ, assert_resume_is_exact, nano
from tests.components.train.test_ul2 import ControlBytes, blocks

FIM = {name: ControlBytes.ids[chr(b)] for name, b in FIM_BYTES.items()}


def fim(**overrides) -> tuple[FillInTheMiddle.Params, FillInTheMiddle]:
    params = dict(steps=12, batch_size=8, lr=3e-3, warmup_steps=2, precision="fp32", fim_rate=0.5)
    params.update(overrides)
    config = FillInTheMiddle.Params(**params)
    method = FillInTheMiddle(config)
    method.use_tokenizer(ControlBytes())
    return config, method


def test_registered_for_pretraining_and_finetuning():
    assert PRETRAIN_METHODS.get("fim") is FINETUNE_METHODS.get("fim") is FillInTheMiddle


def test_rows_are_psm_rearrangements_of_their_block_or_the_block_itself():
    _, method = fim()
    batch = torch.from_numpy(blocks(16)).long()
    ids, horizons = method.fim_batch(batch, step=2)
    assert torch.equal(ids, method.fim_batch(batch, step=2)[0])
    rearranged = 0
    for row in range(len(ids)):
        seq = ids[row].tolist()
        if FIM["PRE"] not in seq:
            assert seq == batch[row].tolist() and len(horizons[row][0]) == 0
            continue
        rearranged += 1
        assert seq[0] == FIM["PRE"] and len(seq) == SEQ
        suf, mid = seq.index(FIM["SUF"]), seq.index(FIM["MID"])
        prefix, suffix, middle = seq[1:suf], seq[suf + 1:mid], seq[mid + 1:]
        assert prefix + middle + suffix == batch[row, :SEQ - 3].tolist()
        positions, share = horizons[row]
        if middle:
            assert positions.tolist() == list(range(mid, mid + len(middle)))
            assert share[0] == 1.0 and share[-1] == pytest.approx(1 / len(middle))
    assert 0 < rearranged < len(ids)
    _, always = fim(fim_rate=1.0)
    assert all(FIM["PRE"] in row.tolist() for row in always.fim_batch(batch, step=2)[0])


def test_horizon_targets_count_down_the_middle():
    positions, share = horizon_targets(n_context=10, middle=4)
    assert positions.tolist() == [9, 10, 11, 12] and share.tolist() == [1.0, 0.75, 0.5, 0.25]


def test_hlp_trains_its_head_keeps_it_beside_the_model_and_resumes_exactly(tmp_path):
    config, method = fim(steps=40, fim_rate=1.0, horizon_weight=1.0)
    model = nano()
    train(model, blocks(), config, method, progress=False)
    assert HEAD_ATTR not in model._modules  # the saved model is a plain Llama
    head = method.auxiliary_tensors()
    assert sorted(head) == [f"{HEAD_ATTR}.bias", f"{HEAD_ATTR}.weight"]
    # the head learned: on fresh FIM rows it beats the constant 0.5 it starts from
    linear = torch.nn.Linear(head[f"{HEAD_ATTR}.weight"].shape[1], 1)
    linear.load_state_dict({"weight": head[f"{HEAD_ATTR}.weight"], "bias": head[f"{HEAD_ATTR}.bias"]})
    ids, horizons = method.fim_batch(torch.from_numpy(blocks(32)).long(), step=999)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        errors, start = [], []
        for row, (positions, share) in enumerate(horizons):
            if len(positions):
                predicted = torch.sigmoid(linear(hidden[row, positions]).squeeze(-1)).numpy()
                errors.append(np.abs(predicted - share).mean())
                start.append(np.abs(0.5 - share).mean())
    assert np.mean(errors) < 0.7 * np.mean(start)
    assert FillInTheMiddle(FillInTheMiddle.Params()).auxiliary_tensors() == {}  # plain FIM keeps nothing
    assert_resume_is_exact(tmp_path, lambda: fim(checkpoint_every=4, horizon_weight=1.0), blocks())


def test_refusals_and_the_one_process_rule():
    from pathlib import Path

    from flows.recipe import RecipeError, load_plan

    recipe = Path(__file__).resolve().parents[3] / "params" / "fim_hlp.yaml"
    load_plan(recipe, ["stages.fim_code.resources.ranks=2"])  # plain FIM shards across ranks
    with pytest.raises(RecipeError, match="hlp_code_s0.resources.ranks: method 'fim' keeps the horizon head"):
        load_plan(recipe, ["stages.hlp_code.resources.ranks=2"])
    with pytest.raises(ValueError, match="fim_rate"):
        FillInTheMiddle.Params(fim_rate=0.0)
    no_tokenizer = FillInTheMiddle(FillInTheMiddle.Params(steps=2, batch_size=2))
    with pytest.raises(ValueError, match="use_tokenizer"):
        train(nano(), blocks(), no_tokenizer.params, no_tokenizer, progress=False)
    _, method = fim()
    clash = torch.from_numpy(blocks(2)).long()
    clash[0, 5] = FIM["MID"]
    with pytest.raises(ValueError, match="fim \\(step 1\\): the data holds token id"):
        method.fim_batch(clash, step=1)
