"""Perplexity with retrieved neighbours: the `none` format is the causal NLL of the tokens after
the query, both formats score the same tokens, and the standard evaluator asks for the database."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from components.data.retrieval import ChunkIndex, RetrievalLayout
from components.eval.standard import StandardEvaluation
from components.eval.retrieval_perplexity import bigram_overlap, retrieval_metrics
from components.model.presets import build_model

VOCAB, SEQ, CHUNK = 64, 16, 4


def blocks(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(n, SEQ)).astype(np.int32)


def test_both_formats_score_the_tokens_after_the_query_and_none_is_the_plain_causal_nll():
    model = build_model("nano", vocab_size=VOCAB, max_seq_len=SEQ, seed=0).eval()
    layout = RetrievalLayout(chunk_tokens=CHUNK, neighbours=2, neighbour_tokens=8, dims=128)
    test = {"a": blocks(5, 1), "b": blocks(3, 2)}
    database = {"x": blocks(20, 3), "y": blocks(10, 4)}
    out = retrieval_metrics(model, layout, test, database, batch_size=2)
    with torch.no_grad():
        ids = torch.from_numpy(test["a"]).long()
        logits = model(input_ids=ids).logits[:, CHUNK - 1:-1]
        expected = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, CHUNK:].reshape(-1)).item()
    assert out["retrieval_loss_none_a"] == pytest.approx(expected, rel=1e-5)
    assert out["retrieval_ppl_none_a"] == pytest.approx(math.exp(expected), rel=1e-5)
    # the retrieved format: the same tokens behind the two nearest database blocks' first 8 tokens
    index = ChunkIndex(np.concatenate([database["x"], database["y"]]), layout)
    neighbours = index.values(index.search(test["b"][:, :CHUNK]))
    with torch.no_grad():
        ids = torch.from_numpy(np.concatenate([neighbours, test["b"]], axis=1)).long()
        logits = model(input_ids=ids).logits[:, 16 + CHUNK - 1:-1]
        expected = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 16 + CHUNK:].reshape(-1)).item()
    assert out["retrieval_loss_retrieved_b"] == pytest.approx(expected, rel=1e-5)
    weighted = (5 * out["retrieval_loss_retrieved_a"] + 3 * out["retrieval_loss_retrieved_b"]) / 8
    assert out["retrieval_loss_retrieved"] == pytest.approx(weighted, rel=1e-6)


def test_the_standard_evaluator_reads_the_training_blocks_only_when_it_retrieves():
    standard = StandardEvaluation
    assert not standard().needs_train_blocks and not standard().needs_model_facts
    retrieving = standard(standard.Params(retrieval={"chunk_tokens": CHUNK, "neighbour_tokens": 8}))
    assert retrieving.needs_train_blocks and retrieving.needs_model_facts
    model = build_model("nano", vocab_size=VOCAB, max_seq_len=SEQ, seed=0).eval()
    with pytest.raises(ValueError, match="retrieval needs the training blocks"):
        retrieving.evaluate(model, None, None, {"a": blocks(2, 0)}, [], None)
    trained = {"retrieval": {"chunk_tokens": CHUNK, "neighbours": 2, "neighbour_tokens": 12, "dims": 4096,
                             "neighbours_from": "retrieved", "database_blocks": 30}}
    with pytest.raises(ValueError, match="model m trained with retrieval neighbour_tokens=12 but the evaluate "
                                         "stage's retrieval has neighbour_tokens=8"):
        retrieving.evaluate(model, None, "m", {"a": blocks(2, 0)}, [], None, train_blocks={"x": blocks(20, 3)},
                            facts=trained)


def test_bigram_overlap_counts_the_predicted_bigrams_the_neighbours_hold():
    block = np.array([[9, 9, 1, 2, 3, 4, 5]])  # after a 2-token query: bigrams (1,2) (2,3) (3,4) (4,5)
    assert bigram_overlap(block, block, chunk_tokens=2) == 1.0
    assert bigram_overlap(block, np.array([[7, 3, 4, 5, 8]]), chunk_tokens=2) == 0.5
    assert bigram_overlap(block, np.array([[2, 1, 4, 3]]), chunk_tokens=2) == 0.0  # tokens alone do not count


def test_the_neighbours_are_retrieved_once_per_stage_and_reused_for_every_model():
    from components.eval.retrieval_perplexity import RetrievedTestBlocks

    layout = RetrievalLayout(chunk_tokens=CHUNK, neighbours=2, neighbour_tokens=8, dims=128)
    test, database = {"a": blocks(5, 1)}, {"x": blocks(20, 3)}
    retrieved = RetrievedTestBlocks(layout, test, database)
    assert retrieved.built_from(layout, test, database)
    assert not retrieved.built_from(layout, dict(test), database)  # other inputs: built again
    assert not retrieved.built_from(layout.model_copy(update={"neighbours": 3}), test, database)
    for seed in (0, 1):  # two models scored on one retrieval give what each would alone
        model = build_model("nano", vocab_size=VOCAB, max_seq_len=SEQ, seed=seed).eval()
        assert retrieval_metrics(model, layout, test, database, retrieved=retrieved) == \
            retrieval_metrics(model, layout, test, database)


def test_the_standard_evaluation_retrieves_once_for_all_its_models(tmp_path, monkeypatch):
    import components.eval.standard as standard

    built = []
    original = standard.RetrievedTestBlocks.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(standard.RetrievedTestBlocks, "__init__", counting)
    layout = dict(chunk_tokens=CHUNK, neighbours=2, neighbour_tokens=8, dims=128)
    evaluator = standard.StandardEvaluation(standard.StandardEvaluation.Params(retrieval=layout))
    test, database = {"a": blocks(5, 1)}, {"x": blocks(20, 3)}
    scores = [evaluator.evaluate(build_model("nano", vocab_size=VOCAB, max_seq_len=SEQ, seed=seed).eval(), None,
                                 None, test, [], tmp_path, train_blocks=database)
              for seed in (0, 1)]
    assert len(built) == 1
    assert scores[0]["retrieval_loss_retrieved"] != scores[1]["retrieval_loss_retrieved"]
