"""LoRA through peft: only the adapters train, the merged model computes what the adapted model
computed and is a plain Llama again, resume is exact, and impossible params are refused."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from components.train.lora import LoraError, LoraFinetune
from components.train.trainer import train
from tests.components.train.test_trainer import assert_resume_is_exact, nano, pattern_blocks


def lora(**overrides):
    params = dict(steps=12, batch_size=8, lr=1e-2, warmup_steps=2, precision="fp32", rank=4, alpha=8.0)
    params.update(overrides)
    config = LoraFinetune.Params(**params)
    return config, LoraFinetune(config)


def test_only_the_adapters_train_and_the_merge_keeps_what_they_learned():
    config, method = lora(steps=30)
    model, base = nano(), nano()
    batch = torch.from_numpy(pattern_blocks()[:4].astype("int64"))
    adapted_logits = {}

    class Capture(LoraFinetune):  # the adapted model's output just before the merge
        def finalize(self, m):
            with torch.no_grad():
                adapted_logits["before"] = m.eval()(input_ids=batch).logits
            return super().finalize(m)

    result = train(model, pattern_blocks(), config, Capture(config), progress=False)
    assert sum(result.losses[-5:]) < 0.9 * sum(result.losses[:5])  # the adapters learn the pattern
    linears = [m for m in base.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert result.trainable_params == sum(4 * (m.in_features + m.out_features) for m in linears)
    assert result.optimizer_state_bytes == pytest.approx(2 * 4 * result.trainable_params, rel=0.01)
    # merged: a plain Llama again, with the same keys and shapes as the base
    assert type(model) is type(base) and model.state_dict().keys() == base.state_dict().keys()
    assert not any("lora" in name for name, _ in model.named_modules())
    changed = {n for n, p in model.state_dict().items() if not torch.equal(p, base.state_dict()[n])}
    assert changed == {f"model.layers.{i}.{n}.weight" for i in range(len(base.model.layers))
                       for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    with torch.no_grad():
        merged_logits = model.eval()(input_ids=batch).logits
    assert torch.allclose(merged_logits, adapted_logits["before"], atol=1e-4)
    assert result.method_facts["lora_adapters"] == len(linears)


def test_a_lora_resume_is_bit_exact(tmp_path):
    assert_resume_is_exact(tmp_path, lambda: lora(checkpoint_every=4))


def test_params_that_cannot_apply_are_refused_by_name():
    with pytest.raises(LoraError, match=r"params\.rank=4096 is larger than layer .* allows \(min\(in, out\) = "):
        train(nano(), pattern_blocks(), *lora(rank=4096), progress=False)
    with pytest.raises(LoraError, match=r"params\.target_modules: \['qkv'\] name no Linear .* the blocks have "):
        train(nano(), pattern_blocks(), *lora(target_modules=("q_proj", "qkv")), progress=False)
    with pytest.raises(ValidationError, match="target_modules lists a module twice"):
        LoraFinetune.Params(target_modules=("q_proj", "q_proj"))
    with pytest.raises(ValidationError, match="rank"):
        LoraFinetune.Params(rank=0)


def test_a_recipe_names_lora_for_a_finetune_stage():
    from flows.recipe import load_plan
    from tests.helpers import NANO_RECIPE

    _, plan = load_plan(NANO_RECIPE, ["stages.finetune_spdf.method=lora", "stages.finetune_spdf.params.rank=4"])
    stage = plan.stages["finetune_spdf"]
    assert stage.method == "lora" and stage.params["rank"] == 4 and stage.params["alpha"] == 16.0
