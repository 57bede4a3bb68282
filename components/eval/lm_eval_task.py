"""The project's local lm-evaluation-harness task: exact match on ``a+b=c`` arithmetic.

The task is written as a YAML + JSONL pair into a directory and loaded through a
``TaskManager`` that only indexes that directory, so nothing is fetched from the hub and the
harness's thousands of built-in task configs are not scanned.
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Sequence
from unittest import mock

import torch
import yaml

ARITHMETIC_LINE = re.compile(r"^\s*(\d+)\s*([+\-])\s*(\d+)\s*=\s*(-?\d+)\s*$")


def arithmetic_examples(texts: Sequence[str], limit: int | None = None) -> list[dict]:
    """Parse ``347+68=415`` / ``12-5=7`` lines into ``{"question": "347+68=", "answer": "415"}``.

    Each text may hold several lines; lines that are not a single arithmetic fact are skipped.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    examples = []
    for text in texts:
        for line in str(text).splitlines():
            match = ARITHMETIC_LINE.match(line)
            if match is None:
                continue
            a, op, b, answer = match.groups()
            examples.append({"question": f"{a}{op}{b}=", "answer": answer})
            if limit is not None and len(examples) >= limit:
                return examples
    return examples  # possibly empty: a corpus without arithmetic simply has no task examples


def write_arithmetic_task(task_dir: Path, examples: Sequence[dict], task_name: str = "paperdag_arithmetic") -> None:
    """Write ``<task_dir>/<task_name>.yaml`` (a generate_until task) and its ``.jsonl`` data."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", task_name):
        raise ValueError(f"task_name must be letters, digits and underscores, got {task_name!r}")
    if not examples:
        raise ValueError("no examples to write")
    for i, ex in enumerate(examples):
        if set(ex) != {"question", "answer"}:
            raise ValueError(f"example {i} must have exactly the keys question and answer, got {sorted(ex)}")
    task_dir = Path(task_dir).resolve()
    task_dir.mkdir(parents=True, exist_ok=True)
    with open(task_dir / f"{task_name}.jsonl", "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({"question": str(ex["question"]), "answer": str(ex["answer"])}) + "\n")
    # The data is found next to the YAML by a loader module the harness imports from the YAML's
    # own directory (``!function``), so the task holds no absolute path: it runs wherever the
    # directory is copied, and its bytes are the same in every clone.
    (task_dir / f"{task_name}_data.py").write_text(_LOADER_MODULE.format(data_file=f"{task_name}.jsonl"))
    config = {
        "task": task_name,
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n", " "], "max_gen_toks": 8, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    text = yaml.safe_dump(config, sort_keys=False) + f"custom_dataset: !function {task_name}_data.load\n"
    (task_dir / f"{task_name}.yaml").write_text(text, encoding="utf-8")


_LOADER_MODULE = '''"""Loads this task's examples from the JSONL file beside it (written by paperdag)."""
from pathlib import Path


def load(**_):
    import datasets

    data = Path(__file__).with_name("{data_file}")
    return {{"test": datasets.load_dataset("json", data_files=str(data), split="train")}}
'''


def run_lm_eval(model, tokenizer, task_dir: Path, task_name: str, batch_size: int = 16,
                limit: int | None = None, prepacked: bool = False) -> dict:
    """Run the harness on an in-memory HF model; returns ``{"exact_match", "n"}``.

    The model stays on its current device (HFLM ignores ``device`` for model instances).
    ``prepacked`` generates each batch's greedy answers with the left padding removed and the
    prompts packed into rows (``prepacked_hflm``) instead of through ``generate`` on the padded batch.
    """
    from lm_eval import evaluator, simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task_dir = Path(task_dir).resolve()
    if not (task_dir / f"{task_name}.yaml").is_file():
        raise FileNotFoundError(f"no task config {task_dir / f'{task_name}.yaml'}; run write_arithmetic_task first")
    max_length = getattr(model.config, "max_position_embeddings", None)
    was_training = model.training  # HFLM switches the model to eval mode
    try:
        lm_class = prepacked_hflm() if prepacked else HFLM
        lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        with mock.patch.object(evaluator, "get_git_commit_hash", _quiet_git_commit_hash):
            results = simple_evaluate(
                model=lm,
                tasks=[task_name],
                task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                limit=limit,
                log_samples=False,
                bootstrap_iters=0,  # no stderr bootstrap: it costs time and is not reported
            )
    finally:
        model.train(was_training)
    if results is None:  # non-zero rank in a distributed run
        raise RuntimeError("lm_eval returned no results (not rank 0?)")
    metrics = results["results"][task_name]
    return {
        "exact_match": float(metrics["exact_match,none"]),
        "n": int(results["n-samples"][task_name]["effective"]),
    }


def _quiet_git_commit_hash() -> str | None:
    """The harness's ``get_git_commit_hash`` without git's stderr: it runs ``git describe`` in the
    cwd and lets git print "fatal: not a git repository" into the log of every evaluate stage run
    outside a repository (a workspace from ``paperdag init``, a DVC-less directory). The hash only
    lands in the harness's results dict, which this module does not keep."""
    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=False)
    except FileNotFoundError:  # no git on the machine
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def prepacked_hflm():
    """lm-eval's ``HFLM`` whose greedy generation is prepacked (``components/eval/prepacking.py``).

    The harness hands ``_model_generate`` a left-padded batch of contexts; this one strips the
    padding with the attention mask, generates every context to the batch's budget or its first
    stop string (the harness cuts the text at the stop string, as after ``generate``), and returns
    the padded context followed by the new tokens, the shape ``generate`` returns. Sampling is
    left to ``generate``: packing only changes how greedy decoding is batched. So is a model that
    cannot be prepacked (a wrapper such as EFT's).
    """
    from lm_eval.models.huggingface import HFLM

    from components.eval.prepacking import prepacked_greedy_generate, supports_prepacking

    class PrepackedHFLM(HFLM):
        def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
            mask = generation_kwargs.get("attention_mask")
            if (generation_kwargs.get("do_sample") or mask is None or self.backend != "causal"
                    or not supports_prepacking(self.model)):
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
            prompts = [row[keep.bool()].tolist() for row, keep in zip(context, mask)]
            tok_decode = self.tok_decode

            def hit_stop(_: int, new_tokens: list[int]) -> bool:
                text = tok_decode(new_tokens)
                return any(s in text for s in stop)

            dtype = getattr(self, "mixed_precision_dtype", None)  # as HFLM's own generation applies it
            with torch.autocast(device_type=self.device.type, dtype=dtype, enabled=dtype is not None):
                new, _ = prepacked_greedy_generate(self.model, prompts, max_length - context.shape[1],
                                                   eos_token_id=self.model.generation_config.eos_token_id,
                                                   rows_per_batch=len(prompts), should_stop=hit_stop)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            out = torch.full((len(prompts), max_length), pad, dtype=context.dtype, device=context.device)
            out[:, :context.shape[1]] = context
            for row, tokens in enumerate(new):
                out[row, context.shape[1]:context.shape[1] + len(tokens)] = torch.as_tensor(tokens)
            return out

    return PrepackedHFLM
