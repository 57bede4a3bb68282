import pytest
import torch
from pydantic import ValidationError

from components.merge.base import MergeError, check_compatible
from components.merge.registry import MERGERS
from components.merge.task_arithmetic import TaskArithmetic
from components.merge.uniform_soup import UniformSoup
from components.model.presets import build_model


def nano_sd(seed):
    return build_model("nano", vocab_size=64, max_seq_len=32, seed=seed).state_dict()


def soup(**params):
    return UniformSoup(UniformSoup.Params(**params))


def ta(**params):
    return TaskArithmetic(TaskArithmetic.Params(**params))


def tiny(a, b, step):
    return {"w": torch.tensor(a, dtype=torch.float32), "b": torch.tensor(b, dtype=torch.float32),
            "step": torch.tensor([step], dtype=torch.int64)}


def test_registry():
    assert MERGERS.keys() == ["compeft", "dare_linear", "dare_ties", "graft", "greedy_soup", "groupwise",
                              "task_arithmetic", "ties", "uniform_soup", "vcycle_interpolate"]
    assert MERGERS.get("uniform_soup").paper.arxiv == "2203.05482"
    assert MERGERS.get("task_arithmetic").paper.arxiv == "2212.04089"
    assert TaskArithmetic.requires_base and not UniformSoup.requires_base


def test_soup_of_identical_models_is_the_model():
    sd = nano_sd(0)
    merged = soup().merge(None, [sd, {k: v.clone() for k, v in sd.items()}, sd], ["a", "b", "c"])
    assert merged.keys() == sd.keys()
    for key in sd:
        assert torch.equal(merged[key], sd[key]), key


def test_soup_of_two_is_exact_mean():
    m1, m2 = tiny([[1.0, 2.0], [3.0, -4.0]], [0.5], 7), tiny([[3.0, 0.0], [3.0, 4.0]], [1.5], 9)
    merged = soup().merge(None, [m1, m2], ["m1", "m2"])
    assert torch.equal(merged["w"], torch.tensor([[2.0, 1.0], [3.0, 0.0]]))
    assert torch.equal(merged["b"], torch.tensor([1.0]))
    assert merged["step"].tolist() == [7]  # integer buffers copied, not averaged
    weighted = soup(weights=[3.0, 1.0]).merge(None, [m1, m2], ["m1", "m2"])
    assert torch.equal(weighted["w"], torch.tensor([[1.5, 1.5], [3.0, -2.0]]))  # 0.75*m1 + 0.25*m2


def test_soup_of_nano_models_matches_mean():
    sds = [nano_sd(s) for s in (0, 1)]
    merged = soup().merge(None, sds, ["s0", "s1"])
    key = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(merged[key], (sds[0][key] + sds[1][key]) / 2, rtol=0, atol=1e-7)


def test_task_arithmetic_one_model_lambda_one_is_that_model():
    base, tuned = nano_sd(0), nano_sd(1)
    merged = ta().merge(base, [tuned], ["tuned"])
    for key in base:
        assert torch.equal(merged[key], tuned[key]), key


def test_task_arithmetic_two_models_golden():
    base = tiny([[1.0, 1.0], [1.0, 1.0]], [0.0], 1)
    a = tiny([[2.0, 1.0], [1.0, 3.0]], [1.0], 2)
    b = tiny([[1.0, 0.0], [5.0, 1.0]], [-1.0], 3)
    # tau_a = [[1,0],[0,2]], tau_b = [[0,-1],[4,0]]
    merged = ta(scaling=0.5).merge(base, [a, b], ["a", "b"])
    assert torch.equal(merged["w"], torch.tensor([[1.5, 0.5], [3.0, 2.0]]))
    assert torch.equal(merged["b"], torch.tensor([0.0]))
    assert merged["step"].tolist() == [1]  # from the base
    weighted = ta(weights=[1.0, -1.0]).merge(base, [a, b], ["a", "b"])  # task analogy: a - b
    assert torch.equal(weighted["w"], torch.tensor([[2.0, 2.0], [-3.0, 3.0]]))
    normalized = ta(weights=[3.0, 1.0], normalize=True).merge(base, [a, b], ["a", "b"])
    assert torch.equal(normalized["w"], torch.tensor([[1.75, 0.75], [2.0, 2.5]]))


def test_shape_mismatch_names_checkpoint_and_tensor():
    m1 = tiny([[1.0, 2.0]], [0.0], 0)
    m2 = tiny([[1.0, 2.0, 3.0]], [0.0], 0)
    with pytest.raises(MergeError, match=r"checkpoint 'ft_b': tensor 'w' has shape \(1, 3\).*'ft_a' has \(1, 2\)"):
        soup().merge(None, [m1, m2], ["ft_a", "ft_b"])
    with pytest.raises(MergeError, match=r"checkpoint 'ft_b'.*'base'"):
        ta().merge(m1, [m1, m2], ["ft_a", "ft_b"])


def test_key_mismatch_names_checkpoint_and_tensor():
    m1 = tiny([[1.0]], [0.0], 0)
    m2 = {k: v for k, v in m1.items() if k != "b"}
    with pytest.raises(MergeError, match=r"checkpoint 'two' does not match 'one': missing \['b'\]"):
        check_compatible(None, [m1, m2], ["one", "two"])


def test_task_arithmetic_requires_base():
    with pytest.raises(MergeError, match="needs the base"):
        ta().merge(None, [tiny([[1.0]], [0.0], 0)], ["x"])


def test_weight_errors():
    m = [tiny([[1.0]], [0.0], 0), tiny([[2.0]], [0.0], 0)]
    with pytest.raises(MergeError, match=r"3 weights .* for 2 models"):
        soup(weights=[1.0, 1.0, 1.0]).merge(None, m, ["a", "b"])
    with pytest.raises(MergeError, match="weights sum to 0"):
        soup(weights=[1.0, -1.0]).merge(None, m, ["a", "b"])
    with pytest.raises(MergeError, match="weights sum to 0"):
        ta(weights=[0.5, -0.5], normalize=True).merge(m[0], m, ["a", "b"])
    with pytest.raises(ValidationError, match="finite"):
        UniformSoup.Params(weights=[1.0, float("nan")])
    with pytest.raises(ValidationError, match="scaling"):
        TaskArithmetic.Params(scaling=float("inf"))
    with pytest.raises(ValidationError, match="extra"):
        UniformSoup.Params(scaling=1.0)
