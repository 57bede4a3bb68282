"""A stage's code version covers the code it runs and not other methods' code: an edit to a
quantization grid or to BiPFT's layers reruns the stages that use them, not data selection or a
dense pretraining. Models that carry side modules (linear attention, a binary network, activation
quantization) are loaded through installers imported by name; the stage that made such a model
holds the installer in its own closure, so an edit still reaches every consumer through its input
digest."""
from __future__ import annotations

from pathlib import Path

import pytest

from tasks.code_version import PROJECT_ROOT, source_closure
from tasks.kinds import KINDS

GRIDS_AND_SIDE_MODULES = ("components/quant/fake_quant.py", "components/quant/minifloat.py",
                          "components/quant/activation.py", "components/model/binary_network.py",
                          "components/train/replacement.py")


def closure(kind: str, method_module: str) -> set[str]:
    files = source_closure((KINDS[kind].task_module, method_module))
    return {str(Path(f).relative_to(PROJECT_ROOT)) for f in files}


@pytest.mark.parametrize("kind,method_module", [
    ("select", "components.data.heuristic_filter"), ("select", "components.data.lm_scoring"),
    ("tokenize", "components.data.byte_bpe"), ("pretrain", "components.train.dense"),
    ("finetune", "components.train.lora")])
def test_stages_that_never_run_a_grid_or_a_side_module_do_not_hash_them(kind, method_module):
    files = closure(kind, method_module)
    assert method_module.replace(".", "/") + ".py" in files
    assert not files & set(GRIDS_AND_SIDE_MODULES), sorted(files & set(GRIDS_AND_SIDE_MODULES))


@pytest.mark.parametrize("kind,method_module,needed", [
    ("pretrain", "components.train.qat", "components/quant/fake_quant.py"),
    ("pretrain", "components.train.dynamic_fixed_point", "components/quant/fake_quant.py"),
    ("pretrain", "components.train.bipft", "components/model/binary_network.py"),
    ("finetune", "components.train.hedgehog", "components/model/linear_attention.py"),
    ("quantize", "components.quant.rtn", "components/quant/activation.py")])
def test_the_stage_that_makes_a_side_module_hashes_its_installer(kind, method_module, needed):
    assert needed in closure(kind, method_module)
