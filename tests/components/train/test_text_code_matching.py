"""CodeT5+'s text-code matching on a decoder: pairs found in Python source, the matching format,
balanced and hard negatives drawn per (seed, step), ul2's M denoiser and its summed loss, a model
that learns the verdict through the shared trainer, the retrieval evaluator, and refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from components.data.byte_bpe import ByteBpeTokenizer
from components.data.denoising import DenoisingTokens
from components.data.text_code import MatchingPairs, find_pairs, fit_pair, matching_example, most_similar
from components.data.tokenizer import pack_documents
from components.eval.text_code_matching import MatchingSpec, _ranks, matching_metrics, retrieval_sets
from components.model.presets import build_model
from components.train.trainer import train
from components.train.ul2 import IGNORE, Denoiser, MixtureOfDenoisers

SEQ = 64
OPS = {"add": ("Add", "+"), "sub": ("Subtract", "-"), "mul": ("Multiply", "*")}


def source(n: int = 48, seed: int = 0) -> list[str]:
    """Python modules of small documented functions: the docstring names the operation and the
    constant, the body applies them (some functions undocumented, some one-liners)."""
    rng = np.random.default_rng(seed)
    modules = []
    for m in range(n // 4):
        parts = ["import math\n\n"]
        for k in range(4):
            name, (verb, sign) = list(OPS.items())[int(rng.integers(3))]
            const = 4 * m + k + int(rng.integers(1, 3)) * 1000  # every docstring differs
            parts.append(f'def {name}_{m}_{k}(x):\n    """{verb} {const} to x.\n\n    Long text.\n    """\n'
                         f"    y = x {sign} {const}\n    return y\n\n")
        parts.append("def helper(a): return a\n\ndef plain(b):\n    return b\n")
        modules.append("".join(parts))
    return modules


@pytest.fixture(scope="module")
def tokenizer():
    return ByteBpeTokenizer(ByteBpeTokenizer.Params(vocab_size=400, seq_len=SEQ)).train(source() + source(seed=1))


def blocks(tokenizer, seed: int = 0) -> np.ndarray:
    return pack_documents(tokenizer, source(seed=seed), SEQ)


def test_pairs_are_docstrings_and_their_functions_without_them():
    text = ('class A:\n    def f(self, x,\n          y=(1, 2)) -> dict[str, int]:\n        """Add things.\n\n'
            '        More text.\n        """\n        z = x + y\n\n        return z\n\n    def g(self): return 1\n\n'
            "def h():\n    '''   One line.   '''\n    pass\nx = 1\ndef nodoc():\n    return 2\n"
            'def cut():\n    """Cut off"""\n    a = 1')
    assert find_pairs(text) == [
        ("Add things.", "    def f(self, x,\n          y=(1, 2)) -> dict[str, int]:\n        z = x + y\n\n"
                        "        return z\n"),
        ("One line.", "def h():\n    pass\n"),
        ("Cut off", "def cut():\n    a = 1\n"),  # cut by the end of the text: kept as far as it goes
    ]


def test_the_matching_example_fits_its_length_and_the_text_takes_at_most_its_share():
    match = {"MATCH": 90, "SEP": 91, "YES": 92, "NO": 93}
    example = matching_example(list(range(50)), list(range(100, 200)), 32, match)
    text, code = fit_pair(list(range(50)), list(range(100, 200)), 32)
    assert len(text) == 8 and len(code) == 21  # 29 places: 30% of them for the text
    assert example.tolist() == [90, *range(8), 91, *range(100, 121)] and len(example) == 31  # the verdict is 32nd
    assert fit_pair([1, 2], [3, 4], 32) == ([1, 2], [3, 4])
    with pytest.raises(ValueError, match="seq_len 4 is too short"):
        fit_pair([1], [2], 4)


def test_hard_negatives_are_the_most_similar_other_snippet():
    assert most_similar([[1, 1, 2], [5, 6], [1, 2, 2], [6, 6, 5]], 8).tolist() == [2, 3, 0, 1]
    with pytest.raises(ValueError, match="at least 2 snippets"):
        most_similar([[1]], 8)


def test_draws_are_balanced_seeded_and_take_the_hard_negative(tokenizer):
    data = blocks(tokenizer)
    pairs = MatchingPairs.from_blocks(data, tokenizer)
    text = tokenizer.decode(data.reshape(-1).tolist())  # packing drops the last partial block
    documented = sum(f'"""{verb} {4 * m + k + t * 1000} to x.' in text for verb, _ in OPS.values()
                     for m in range(12) for k in range(4) for t in (1, 2))
    assert len(pairs) == documented >= 46  # helper and plain have no docstring
    match = DenoisingTokens.from_tokenizer(tokenizer).match
    draws = [pairs.draw(np.random.default_rng(s), 1.0, SEQ, match) for s in range(400)]
    verdicts = np.array([seq[-1] for seq, _ in draws])
    assert all(n == len(seq) - 1 for seq, n in draws)  # the verdict is the one target
    assert (verdicts == match["YES"]).mean() == pytest.approx(0.5, abs=0.07)
    for s, (seq, n) in enumerate(draws[:60]):
        rng = np.random.default_rng(s)
        i, matched = int(rng.integers(len(pairs))), rng.random() < 0.5
        j = i if matched else int(pairs.hardest[i])  # hard_negatives=1
        assert seq[:n].tolist() == matching_example(pairs.texts[i], pairs.codes[j], SEQ, match).tolist()
    again = pairs.draw(np.random.default_rng(7), 1.0, SEQ, match)[0]
    assert np.array_equal(again, draws[7][0])


def ul2_matching(tokenizer, steps: int = 12, **overrides) -> tuple[MixtureOfDenoisers.Params, MixtureOfDenoisers]:
    params = dict(steps=steps, batch_size=16, lr=3e-3, warmup_steps=5, precision="fp32",
                  denoisers=[{"mode": "M", "hard_negatives": 0.5}, {"mode": "C"}])
    params.update(overrides)
    config = MixtureOfDenoisers.Params(**params)
    method = MixtureOfDenoisers(config)
    method.use_tokenizer(tokenizer)
    return config, method


def test_the_loss_sums_the_denoising_token_mean_and_the_matching_row_mean(tokenizer):
    config, method = ul2_matching(tokenizer)
    data = blocks(tokenizer)
    method.use_blocks(data)
    model = build_model("nano", vocab_size=len(tokenizer), max_seq_len=SEQ, seed=0)
    method.bind(model, None, len(data))
    batch = torch.from_numpy(data[:16].astype(np.int64))
    for step in range(1, 6):
        method.on_batch(step, np.arange(16))
        ids, labels, modes = method.denoise_batch(batch, step)
        rows = torch.tensor([m == "M" for m in modes])
        if rows.all() or not rows.any():
            continue
        assert ((labels[rows] != IGNORE).sum(1) == 1).all()  # one target, the verdict, per M row
        with torch.no_grad():
            got = method.loss(model, batch, None)
            denoising = model(input_ids=ids[~rows], labels=labels[~rows]).loss
            matching = model(input_ids=ids[rows], labels=labels[rows]).loss
        assert float(got) == pytest.approx(float(denoising + matching), rel=1e-5)
        break
    else:
        raise AssertionError("no step mixed M and C rows")


FOUR = ('def inc(x):\n    """Add one to x."""\n    return x + 1\n\n'
        'def neg(x):\n    """Negate x."""\n    return -x\n\n'
        'def dbl(x):\n    """Double x."""\n    return 2 * x\n\n'
        'def sq(x):\n    """Square x."""\n    return x * x\n\n')


def test_a_nano_model_learns_the_verdict_through_the_trainer(tokenizer):
    """Four functions, every text against every function: the verdict is learnt both ways (an
    untrained or constant answer gets one of the two sides wrong)."""
    data = pack_documents(tokenizer, [FOUR] * 40, SEQ)
    config, method = ul2_matching(tokenizer, steps=120, denoisers=[{"mode": "M", "hard_negatives": 0.5}])
    model = build_model("nano", vocab_size=len(tokenizer), max_seq_len=SEQ, seed=0)
    result = train(model, data, config, method, progress=False)
    assert result.method_facts["text_code_pairs"] == len(method._pairs) == 4
    model.eval()
    match = DenoisingTokens.from_tokenizer(tokenizer).match
    right = {True: [], False: []}  # matched pairs, mismatched pairs
    with torch.no_grad():
        for i in range(4):
            for j in range(4):
                example = matching_example(method._pairs.texts[i], method._pairs.codes[j], SEQ, match)
                logits = model(input_ids=torch.from_numpy(example)[None]).logits[0, -1]
                right[i == j].append(bool(logits[match["YES"]] > logits[match["NO"]]) == (i == j))
    assert np.mean(right[True]) == 1 and np.mean(right[False]) >= 11 / 12, right


def test_retrieval_scores_match_a_direct_computation(tokenizer):
    model = build_model("nano", vocab_size=len(tokenizer), max_seq_len=SEQ, seed=0).eval()
    test = {"code": blocks(tokenizer, seed=2)}
    spec = MatchingSpec(candidates=3, max_queries=4)
    out = matching_metrics(model, tokenizer, spec, test, batch_size=5)
    assert out["tcm_queries"] == 4 and out["tcm_chance"] == pytest.approx(1 / 3)
    pairs = MatchingPairs.from_blocks(test["code"], tokenizer)
    sets = retrieval_sets(spec, pairs)
    assert all(row[0] == q and len(set(row)) == 3 for q, row in enumerate(sets))
    match, eos = DenoisingTokens.from_tokenizer(tokenizer).match, tokenizer.eos_token_id
    scores = {"match": [], "pmi": []}
    with torch.no_grad():
        for row in sets:
            for j in row:
                example = torch.from_numpy(matching_example(pairs.texts[row[0]], pairs.codes[j], SEQ, match))[None]
                logits = model(input_ids=example).logits[0, -1]
                scores["match"].append(float(logits[match["YES"]] - logits[match["NO"]]))
                text, code = fit_pair(pairs.texts[row[0]], pairs.codes[j], SEQ)
                comment = tokenizer("# " + tokenizer.decode(text) + "\n", add_special_tokens=False)["input_ids"]
                loglik = []
                for context in ([eos, *comment], [eos]):
                    ids = torch.tensor([context + code])
                    logp = -F.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="none")
                    loglik.append(float(logp[len(context) - 1:].sum()))
                scores["pmi"].append(loglik[0] - loglik[1])
    for name, values in scores.items():
        ranks = _ranks(np.array(values).reshape(4, 3))
        assert out[f"tcm_top1_{name}"] == pytest.approx((ranks == 0).mean(), abs=1e-9)
        assert out[f"tcm_mrr_{name}"] == pytest.approx((1 / (ranks + 1)).mean(), rel=1e-5)


def test_ranks_count_ties_against_the_own_function():
    assert _ranks(np.array([[3.0, 1.0, 2.0], [1.0, 1.0, 0.0], [0.0, 2.0, 1.0]])).tolist() == [0, 1, 2]


def test_refusals_name_what_is_wrong(tokenizer):
    with pytest.raises(ValidationError, match="hard_negatives is the M denoiser's"):
        Denoiser(mode="M")
    with pytest.raises(ValidationError, match="hard_negatives is the M denoiser's"):
        Denoiser(mode="R", corruption=0.15, hard_negatives=0.5)
    with pytest.raises(ValidationError, match=r"denoiser M \(text-code matching\) takes no corruption"):
        Denoiser(mode="M", corruption=0.15, hard_negatives=0.5)
    _, method = ul2_matching(tokenizer)
    prose = pack_documents(tokenizer, ["The cat sat on the mat. " * 20] * 4, SEQ)
    with pytest.raises(ValueError, match="found 0 functions with a docstring in the 22 training blocks"):
        method.use_blocks(prose)
    _, method = ul2_matching(tokenizer)
    with pytest.raises(ValueError, match="needs its text-code pairs: call method.use_blocks"):
        method.bind(build_model("nano", vocab_size=len(tokenizer), max_seq_len=SEQ, seed=0), None, 4)
    model = build_model("nano", vocab_size=len(tokenizer), max_seq_len=SEQ, seed=0)
    with pytest.raises(ValueError, match="matching.domain names 'code', which has no test blocks; domains: prose"):
        matching_metrics(model, tokenizer, MatchingSpec(), {"prose": prose})
    with pytest.raises(ValueError, match="hold 12 functions with a docstring, fewer than candidates \\(20\\)"):
        matching_metrics(model, tokenizer, MatchingSpec(candidates=20), {"code": pack_documents(tokenizer,
                                                                                                source(12), SEQ)})
