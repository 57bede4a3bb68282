"""A training stage's recorded loss curve: every step when short, window means when long."""
from __future__ import annotations

import numpy as np
import pytest

from tasks.train import loss_curve


def test_a_short_run_keeps_every_step():
    assert loss_curve([4.0, 3.0, 2.5]) == {"steps": [1, 2, 3], "loss": [4.0, 3.0, 2.5]}


def test_a_long_run_is_averaged_over_windows_ending_at_their_last_step():
    losses = list(np.linspace(10.0, 1.0, 1001))
    curve = loss_curve(losses, max_points=100)
    assert len(curve["steps"]) <= 100
    window = curve["steps"][0]
    assert window == 11  # ceil(1001 / 100)
    assert curve["loss"][0] == pytest.approx(np.mean(losses[:window]), abs=1e-6)
    assert curve["steps"][-1] == 1001  # the last, shorter window ends at the last step
    assert curve["loss"][-1] == pytest.approx(np.mean(losses[(len(curve["steps"]) - 1) * window:]), abs=1e-6)
