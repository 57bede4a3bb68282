"""bert2BERT as a training method: the trainer trains (and hands back) the grown model, a resume
regrows the same model, and params and shapes it cannot use are refused by name."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from components.model.presets import PRESETS, build_model
from components.train.bert2bert import Bert2Bert
from components.train.registry import FINETUNE_METHODS, PRETRAIN_METHODS
from components.train.trainer import train
from tests.components.train.test_trainer import SEQ, VOCAB, pattern_blocks, states_equal


def small_model():
    return build_model("micro_student", vocab_size=VOCAB, max_seq_len=SEQ, seed=0)


def bert2bert(**overrides):
    params = dict(steps=12, batch_size=8, lr=3e-3, warmup_steps=2, precision="fp32", grow_to="micro", init="aki",
                  checkpoint_every=4)
    params.update(overrides)
    config = Bert2Bert.Params(**params)
    return config, Bert2Bert(config)


def test_the_trainer_trains_and_returns_the_grown_model():
    config, method = bert2bert()
    model = small_model()
    result = train(model, pattern_blocks(), config, method, progress=False)
    target = PRESETS["micro"]
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (target["hidden_size"],
                                                                          target["num_hidden_layers"])
    assert model.model.embed_tokens.weight.shape == (VOCAB, target["hidden_size"])
    assert result.trainable_params == sum(p.numel() for p in model.parameters())
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
    assert result.method_facts["grown_from"] == {"hidden_size": 128, "num_attention_heads": 2,
                                                 "intermediate_size": 384, "num_hidden_layers": 2}
    with torch.no_grad():  # the saved config describes the weights it is saved with
        reloaded = type(model)(model.config)
        reloaded.load_state_dict(model.state_dict())


def test_a_resume_regrows_the_same_model_and_is_bit_exact(tmp_path):
    config, method = bert2bert()
    straight_model = small_model()
    straight = train(straight_model, pattern_blocks(), config, method, checkpoint_dir=tmp_path / "a", progress=False)
    train(small_model(), pattern_blocks(), config, bert2bert()[1], checkpoint_dir=tmp_path / "b", progress=False,
          stop_after_step=8)
    resumed_model = small_model()
    resumed = train(resumed_model, pattern_blocks(), config, bert2bert()[1], checkpoint_dir=tmp_path / "b",
                    progress=False)
    assert resumed.resumed_from_step == 8 and resumed.losses == straight.losses
    assert states_equal(resumed_model, straight_model)


def test_growth_the_input_cannot_take_is_refused_by_name():
    nano = build_model("nano", vocab_size=VOCAB, max_seq_len=SEQ, seed=0)  # head_dim 32; every larger preset has 64
    config, method = bert2bert(grow_to="micro")
    with pytest.raises(ValueError, match=r"params\.grow_to='micro': growth keeps head_dim: the input's 64/2 = 32, "
                                         r"the target's 256/4 = 64"):
        train(nano, pattern_blocks(), config, method, progress=False)
    config, method = bert2bert(grow_to="micro_student")
    with pytest.raises(ValueError, match="params.grow_to='micro_student': growth: the target's hidden_size \\(128\\) "
                                         "is below the input's \\(256\\)"):
        train(build_model("micro", vocab_size=VOCAB, max_seq_len=SEQ, seed=0), pattern_blocks(), config, method,
              progress=False)


def test_bad_params_are_refused_by_name():
    with pytest.raises(ValidationError, match="grow_to 'huge' is not a model preset; known presets: nano, "):
        bert2bert(grow_to="huge")
    with pytest.raises(ValidationError, match="init"):
        bert2bert(init="random")
    with pytest.raises(ValidationError, match="grow_to"):
        Bert2Bert.Params(steps=4)


def test_bert2bert_is_a_finetune_method_only():
    assert FINETUNE_METHODS.get("bert2bert") is Bert2Bert
    assert "bert2bert" not in PRETRAIN_METHODS.keys()


def test_bert2bert_on_several_ranks_is_refused_before_anything_runs():
    from flows.errors import RecipeError
    from flows.recipe import load_plan
    from tests.helpers import NANO_RECIPE

    with pytest.raises(RecipeError, match="method 'bert2bert' grows the model inside the training process, so the "
                                          "launcher's model has the wrong shape; train it on one rank"):
        load_plan(NANO_RECIPE, ["stages.pretrain_dense.model=micro_student",  # a size that can grow into micro
                                "stages.finetune_prose.method=bert2bert", "stages.finetune_prose.params.grow_to=micro",
                                "stages.finetune_prose.resources.ranks=2"])
