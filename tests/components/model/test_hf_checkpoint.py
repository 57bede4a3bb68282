"""`kind: model`: a user's own checkpoint enters a DAG, is quantized and evaluated in its own
vocabulary, and bad checkpoints are refused before anything runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from flows.cli import main
from flows.recipe import RecipeError, load_plan
from tests.helpers import NANO_RECIPE

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.\n",
         "12 + 30 = 42\n", "import os\nprint(os.getcwd())\n"] * 20


def make_checkpoint(path: Path, vocab_extra: int = 0) -> Path:
    """A tiny Llama with its own byte-BPE tokenizer, saved as users save theirs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from components.data.registry import TOKENIZERS

    trainer = TOKENIZERS.get("byte_bpe")
    tokenizer = trainer(trainer.Params(vocab_size=300, seq_len=32)).train(TEXTS)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer) - vocab_extra, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path


def recipe(ws: Path, checkpoint_params: dict) -> Path:
    nano = yaml.safe_load(NANO_RECIPE.read_text())
    doc = {"name": "mine", "paper": {"title": "my model", "url": "https://example.org"},
           "reproduces": "a user's checkpoint through quantize and evaluate", "model": "nano", "precision": "fp32",
           "data": nano["data"],
           "stages": {
               "corpus": {"kind": "corpus", "method": "standard_corpus"},
               "mine": {"kind": "model", "method": "hf_checkpoint", "params": checkpoint_params},
               "tokenize": {"kind": "tokenize", "method": "byte_bpe", "inputs": {"docs": "corpus", "tokenizer": "mine"},
                            "params": {"seq_len": 32}},
               "quantize": {"kind": "quantize", "method": "rtn", "inputs": {"model": "mine"}, "params": {"bits": 4, "group_size": 16}},
               "evaluate": {"kind": "evaluate", "method": "standard",
                            "inputs": {"tokens": "tokenize", "models": ["mine", "quantize"]}}}}
    (ws / "params").mkdir(parents=True, exist_ok=True)
    path = ws / "params" / "mine.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_a_local_checkpoint_is_quantized_and_evaluated_in_its_own_vocabulary(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "my-model")
    ws = tmp_path / "ws"
    path = recipe(ws, {"path": str(ckpt)})
    for stage in ("corpus", "mine", "tokenize", "quantize", "evaluate"):
        assert main(["--workspace", str(ws), "stage", "mine", stage, "--no-progress", "--no-track"]) == 0, \
            capsys.readouterr().err
    _, plan = load_plan(path)
    evaluate = ws / "artifacts" / "evaluate" / plan.stages["evaluate"].digest[:16] / "metrics.json"
    models = json.loads(evaluate.read_text())["models"]
    assert set(models) == {"mine", "quantize"}
    assert all(0 < m["ppl_all"] < float("inf") for m in models.values())
    assert models["quantize"]["bits_per_weight"] < 8 < models["mine"]["bits_per_weight"]
    imported = ws / "artifacts" / "model" / plan.stages["mine"].digest[:16]
    facts = json.loads((imported / "paperdag.json").read_text())
    assert facts["architecture"] == "LlamaForCausalLM" and facts["n_params"] > 0
    tokens = ws / "artifacts" / "tokenize" / plan.stages["tokenize"].digest[:16] / "tokenizer" / "tokenizer.json"
    assert tokens.read_text() == (ckpt / "tokenizer.json").read_text(), "the corpus is packed in the model's vocabulary"

    # the checkpoint's content is the digest: new weights, a new stage (and what reads it)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(ckpt))
    with torch.no_grad():
        model.lm_head.weight.mul_(1.01)
    model.save_pretrained(str(ckpt), safe_serialization=True)
    _, edited = load_plan(path)
    changed = {n for n in plan.stages if plan.stages[n].digest != edited.stages[n].digest}
    assert changed == {"mine", "tokenize", "quantize", "evaluate"}


@pytest.mark.parametrize("case", ["pickle_only", "no_weights", "no_config", "remote_code", "not_causal",
                                  "hub_without_commit", "both_sources"])
def test_a_bad_checkpoint_is_refused_when_the_recipe_compiles(tmp_path, case):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    params: dict = {"path": str(ckpt)}
    expected = {"pickle_only": "holds only pickle weights (pytorch_model.bin)", "no_weights": "has no *.safetensors",
                "no_config": "has no config.json", "remote_code": "custom code (auto_map)",
                "not_causal": "model_type 'vit' is not a causal language model",
                "hub_without_commit": "revision must be a full 40-character commit hash",
                "both_sources": "exactly one of path"}[case]
    config = json.loads((ckpt / "config.json").read_text())
    if case == "pickle_only":
        (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    elif case == "no_weights":
        (ckpt / "model.safetensors").unlink()
    elif case == "no_config":
        (ckpt / "config.json").unlink()
    elif case in ("remote_code", "not_causal"):
        config.update({"auto_map": {"AutoModelForCausalLM": "evil.Model"}} if case == "remote_code" else
                      {"model_type": "vit"})
        (ckpt / "config.json").write_text(json.dumps(config))
    elif case == "hub_without_commit":
        params = {"hub": "someone/model", "revision": "main"}
    elif case == "both_sources":
        params = {"path": str(ckpt), "hub": "someone/model"}
    path = recipe(tmp_path / "ws", params)
    with pytest.raises(RecipeError) as err:
        load_plan(path)
    assert "stages.mine" in str(err.value) and expected in str(err.value), str(err.value)


def test_a_tokenizer_that_does_not_fit_the_model_fails_the_stage_and_leaves_nothing(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt", vocab_extra=10)  # 10 more tokens than embedding rows
    ws = tmp_path / "ws"
    recipe(ws, {"path": str(ckpt)})
    assert main(["--workspace", str(ws), "stage", "mine", "mine", "--no-progress", "--no-track"]) == 1
    err = capsys.readouterr().err
    assert "the tokenizer has" in err and "embedding has" in err, err
    assert not list((ws / "artifacts" / "model").iterdir())


def test_a_hub_model_offline_and_not_cached_says_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    ws = tmp_path / "ws"
    recipe(ws, {"hub": "someone/model", "revision": "0" * 40})
    assert main(["--workspace", str(ws), "stage", "mine", "mine", "--no-progress", "--no-track"]) == 1
    err = capsys.readouterr().err
    assert "someone/model@000000000000 is not in the local Hugging Face cache" in err, err
