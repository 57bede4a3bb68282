"""The training task's checks on its input models, at run time: the ones the recipe loader cannot
see from the graph (e.g. a model whose facts, not its stage kind, say it is quantized)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from components.train.dense import DenseTraining
from components.train.qat import QuantAwareTraining
from tasks.train import _check_not_quantized_twice


def test_a_quantizing_method_refuses_an_input_whose_facts_say_it_is_quantized():
    model = SimpleNamespace(path=Path("/ws/artifacts/quantize/abc"))
    quantized = {"quantization": {"scheme": "rtn", "bits": 4}}
    with pytest.raises(ValueError, match=r"stage ft: method 'qat' trains the weights onto a low-bit grid, but its "
                                         r"input model /ws/artifacts/quantize/abc is already quantized \(rtn, 4 bits\)"):
        _check_not_quantized_twice(QuantAwareTraining(), "qat", quantized, model, "ft")
    _check_not_quantized_twice(QuantAwareTraining(), "qat", {}, model, "ft")  # full precision: fine
    _check_not_quantized_twice(DenseTraining(), "dense", quantized, model, "ft")  # leaves the grid: fine
