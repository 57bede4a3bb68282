import random

import pytest
import torch
import yaml

from components.eval import prepacking
from components.eval.lm_eval_task import arithmetic_examples, run_lm_eval, write_arithmetic_task
from components.model.presets import build_model


def test_parses_arithmetic_lines():
    texts = ["347+68=415\nnot arithmetic\n12-5=7", " 3 + 4 = 7 ", "5-12=-7", "1+1=2=3", "a+b=c"]
    assert arithmetic_examples(texts, None) == [
        {"question": "347+68=", "answer": "415"},
        {"question": "12-5=", "answer": "7"},
        {"question": "3+4=", "answer": "7"},
        {"question": "5-12=", "answer": "-7"},
    ]
    assert arithmetic_examples(texts, 2) == [{"question": "347+68=", "answer": "415"},
                                             {"question": "12-5=", "answer": "7"}]
    assert arithmetic_examples(["hello", "1+2=x"], None) == []
    with pytest.raises(ValueError, match="limit"):
        arithmetic_examples(texts, 0)


def _load_task_yaml(path):
    """The task config, its ``!function`` tag read as text (the harness resolves it on load)."""
    text = path.read_text()
    assert text.count(" !function ") == 1
    config = yaml.safe_load(text.replace(" !function ", " "))
    return {k: f"!function {v}" if k == "custom_dataset" else v for k, v in config.items()}


def test_writes_a_task_that_holds_no_absolute_path(tmp_path):
    examples = [{"question": "1+2=", "answer": "3"}, {"question": "9-4=", "answer": "5"}]
    write_arithmetic_task(tmp_path / "tasks", examples, task_name="arith")
    config = _load_task_yaml(tmp_path / "tasks" / "arith.yaml")
    assert config["task"] == "arith"
    assert config["output_type"] == "generate_until"
    assert config["custom_dataset"] == "!function arith_data.load"  # the loader module beside the YAML
    assert config["test_split"] == "test"
    assert config["doc_to_text"] == "{{question}}" and config["doc_to_target"] == "{{answer}}"
    assert config["generation_kwargs"] == {"until": ["\n", " "], "max_gen_toks": 8, "do_sample": False}
    assert config["metric_list"] == [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]
    assert (tmp_path / "tasks" / "arith.jsonl").read_text().splitlines() == [
        '{"question": "1+2=", "answer": "3"}', '{"question": "9-4=", "answer": "5"}']
    files = sorted(p.name for p in (tmp_path / "tasks").iterdir())
    assert files == ["arith.jsonl", "arith.yaml", "arith_data.py"]
    for name in files:  # the same bytes wherever it is written: nothing names the directory
        assert str(tmp_path) not in (tmp_path / "tasks" / name).read_text()
    with pytest.raises(ValueError, match="task_name"):
        write_arithmetic_task(tmp_path, examples, task_name="bad name")


def greedy_answer(model, tokenizer, question, max_new=8):
    """What the harness should extract: greedy tokens, cut at the first stop string."""
    ids = tokenizer(question, return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(max_new):
            next_id = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    generated = ids[0, -max_new:].tolist()
    if tokenizer.eos_token_id in generated:  # generation ends at EOS
        generated = generated[:generated.index(tokenizer.eos_token_id)]
    text = tokenizer.decode(generated, skip_special_tokens=True)  # as the harness decodes
    for stop in ("\n", " "):
        text = text.split(stop)[0]
    return text


def test_harness_scores_generations_against_targets(tmp_path, char_tokenizer, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # a workspace outside any git repository, as `paperdag init` makes one
    model = build_model("nano", vocab_size=64, max_seq_len=32, seed=0).eval()
    rng = random.Random(0)
    texts = [f"{a}+{b}={a + b}" for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(40))]
    examples = arithmetic_examples(texts, None)
    # Make the untrained model "right" on exactly the first 10 examples by using its own greedy
    # output as their target, and wrong on the rest with a target it cannot produce (there is
    # no 'x' in the vocabulary), so the expected score is known: 10 / 40.
    forced = [{"question": ex["question"], "answer": greedy_answer(model, char_tokenizer, ex["question"])}
              for ex in examples[:10]]
    assert sum(bool(ex["answer"]) for ex in forced) >= 3  # not only empty generations
    forced += [{"question": ex["question"], "answer": "x" + ex["answer"]} for ex in examples[10:]]
    # written in one directory, run from another (as from an artifact's final path after the
    # build directory is renamed): the task must not point back at where it was written
    write_arithmetic_task(tmp_path / "build", forced)
    (tmp_path / "build").rename(tmp_path / "final")
    task_dir = tmp_path / "final"
    result = run_lm_eval(model, char_tokenizer, task_dir, "paperdag_arithmetic", batch_size=16)
    assert result == {"exact_match": pytest.approx(10 / 40), "n": 40}
    # the harness asks git for the cwd's commit; outside a repository that printed git's
    # "fatal: not a git repository" into every evaluate stage's log
    assert "not a git repository" not in capfd.readouterr().err
    # the same answers when each batch is generated prepacked instead of left-padded
    packed_calls, packed_generate = [], prepacking.prepacked_greedy_generate

    def counted(*args, **kwargs):
        packed_calls.append(len(args[1]))
        return packed_generate(*args, **kwargs)

    monkeypatch.setattr(prepacking, "prepacked_greedy_generate", counted)
    prepacked = run_lm_eval(model, char_tokenizer, task_dir, "paperdag_arithmetic", batch_size=16, prepacked=True)
    assert prepacked == result and sum(packed_calls) == 40  # every prompt went through the packed path

    limited = run_lm_eval(model, char_tokenizer, task_dir, "paperdag_arithmetic", limit=5)
    assert limited == {"exact_match": pytest.approx(1.0), "n": 5}


def test_missing_task_config(tmp_path, char_tokenizer):
    model = build_model("nano", vocab_size=64, max_seq_len=32, seed=0)
    with pytest.raises(FileNotFoundError, match="write_arithmetic_task"):
        run_lm_eval(model, char_tokenizer, tmp_path, "paperdag_arithmetic")
