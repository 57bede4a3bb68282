import random

import pytest
import torch
import yaml

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


def test_writes_task_yaml_and_jsonl(tmp_path):
    examples = [{"question": "1+2=", "answer": "3"}, {"question": "9-4=", "answer": "5"}]
    write_arithmetic_task(tmp_path / "tasks", examples, task_name="arith")
    config = yaml.safe_load((tmp_path / "tasks" / "arith.yaml").read_text())
    data_path = tmp_path / "tasks" / "arith.jsonl"
    assert config["task"] == "arith"
    assert config["output_type"] == "generate_until"
    assert config["dataset_path"] == "json"
    assert config["dataset_kwargs"] == {"data_files": {"test": str(data_path.resolve())}}
    assert config["test_split"] == "test"
    assert config["doc_to_text"] == "{{question}}" and config["doc_to_target"] == "{{answer}}"
    assert config["generation_kwargs"] == {"until": ["\n", " "], "max_gen_toks": 8, "do_sample": False}
    assert config["metric_list"] == [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]
    assert data_path.read_text().splitlines() == ['{"question": "1+2=", "answer": "3"}',
                                                  '{"question": "9-4=", "answer": "5"}']
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


def test_harness_scores_generations_against_targets(tmp_path, char_tokenizer):
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
    write_arithmetic_task(tmp_path, forced)
    result = run_lm_eval(model, char_tokenizer, tmp_path, "paperdag_arithmetic", batch_size=16)
    assert result == {"exact_match": pytest.approx(10 / 40), "n": 40}

    limited = run_lm_eval(model, char_tokenizer, tmp_path, "paperdag_arithmetic", limit=5)
    assert limited == {"exact_match": pytest.approx(1.0), "n": 5}


def test_missing_task_config(tmp_path, char_tokenizer):
    model = build_model("nano", vocab_size=64, max_seq_len=32, seed=0)
    with pytest.raises(FileNotFoundError, match="write_arithmetic_task"):
        run_lm_eval(model, char_tokenizer, tmp_path, "paperdag_arithmetic")
