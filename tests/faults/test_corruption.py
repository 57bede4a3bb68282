"""Corrupt each artifact file type: a hit or an input must never serve it, and a directory
without a valid manifest is quarantined and rebuilt instead of blocking its stage for good."""
from __future__ import annotations

import json

import numpy as np
import pytest

from flows.cli import EXIT_FAILED, main
from tests.faults.helpers import artifact_dir, no_run_left_running, runs, stage, temp_dirs


def flip_bytes(path):
    data = bytearray(path.read_bytes())
    for i in (len(data) // 2, len(data) // 2 + 1):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def overwrite_token_ids(path):
    blocks = np.load(path)
    blocks[:4] = 7  # same shape, same size on disk, different training data
    np.save(path, blocks)


def edit_json(path):
    data = json.loads(path.read_text())
    data["edited_by_hand"] = 1
    path.write_text(json.dumps(data))


def edit_metrics(path):
    data = json.loads(path.read_text())
    data["models"]["pretrain_dense"]["ppl_all"] = 1.0  # a flattering number nobody measured
    path.write_text(json.dumps(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# (stage whose artifact is damaged, file in it, damage, stage then run, extra --set to force a miss)
CASES = {
    "model_safetensors_flipped_hit": ("pretrain_dense", "model.safetensors", flip_bytes, "pretrain_dense", ()),
    "model_safetensors_flipped_input": ("pretrain_dense", "model.safetensors", flip_bytes, "quantize",
                                        ("--set", "stages.quantize.params.bits=8")),
    "train_npy_token_ids_overwritten": ("tokenize", "train.npy", overwrite_token_ids, "pretrain_dense",
                                        ("--set", "stages.pretrain_dense.params.steps=13")),
    "metrics_json_edited": ("evaluate", "metrics.json", edit_metrics, "evaluate", ()),
    "parquet_shard_truncated": ("corpus", "docs/part-00000.parquet", truncate, "filter", ()),
    "tokenizer_json_edited": ("tokenize", "tokenizer/tokenizer.json", edit_json, "tokenize", ()),
    "paperdag_json_edited": ("quantize", "paperdag.json", edit_json, "evaluate", ()),
    "packed_quantized_flipped": ("quantize", "quantized.safetensors", flip_bytes, "quantize", ()),
    "stage_metrics_edited": ("pretrain_spdf", "stage_metrics.json", edit_json, "pretrain_spdf", ()),
}


@pytest.mark.fault("clear_error")
@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupt_file_is_never_served(nano_copy, capsys, case):
    damaged_stage, rel, damage, run, extra = CASES[case]
    art = artifact_dir(nano_copy, damaged_stage)
    damage(art / rel)
    before = sorted(p.name for p in nano_copy.glob("artifacts/*/*"))
    capsys.readouterr()
    assert stage(nano_copy, run, *extra) == EXIT_FAILED
    err = capsys.readouterr().err
    assert f"file {rel} is corrupt" in err and f"paperdag run nano --only {damaged_stage}" in err, err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    assert sorted(p.name for p in nano_copy.glob("artifacts/*/*")) == before  # nothing new was built on it
    assert temp_dirs(nano_copy) == [] and no_run_left_running(nano_copy)
    # the command the message gives rebuilds it, and then it verifies byte for byte
    assert stage(nano_copy, damaged_stage, "--force") == 0
    assert main(["--workspace", str(nano_copy), "verify", str(art.name)]) == 0


MANIFEST_DAMAGE = {
    "manifest_missing": lambda p: p.unlink(),
    "manifest_invalid_json": lambda p: p.write_text('{"digest": "abc", "files": {'),
    "manifest_wrong_digest": lambda p: p.write_text(json.dumps(dict(json.loads(p.read_text()), digest="0" * 64))),
}


@pytest.mark.fault("recovers")
@pytest.mark.parametrize("case", sorted(MANIFEST_DAMAGE))
def test_a_directory_without_a_valid_manifest_is_quarantined_and_rebuilt(nano_copy, capsys, case):
    art = artifact_dir(nano_copy, "pretrain_dense")
    weights = (art / "model.safetensors").read_bytes()
    MANIFEST_DAMAGE[case](art / "manifest.json")
    capsys.readouterr()
    assert stage(nano_copy, "pretrain_dense") == 0  # used to fail with AttributeError on every rerun
    err = capsys.readouterr().err
    assert f"{art} is not a valid artifact" in err and "manifest.json" in err and "rebuilt" in err
    [quarantined] = (nano_copy / ".paperdag" / "quarantine").iterdir()
    assert (quarantined / "model.safetensors").read_bytes() == weights  # kept for a look, not deleted
    assert main(["--workspace", str(nano_copy), "verify", art.name]) == 0
    assert (art / "model.safetensors").read_bytes() == weights  # the deterministic rebuild
    assert stage(nano_copy, "pretrain_dense") == 0  # and the next run is a plain hit
    assert "not a valid artifact" not in capsys.readouterr().err


@pytest.mark.fault("clear_error")
def test_verify_rehashes_everything_and_names_the_bad_file(nano_copy, capsys):
    assert main(["--workspace", str(nano_copy), "verify"]) == 0
    out = capsys.readouterr().out
    assert "19 artifacts verified, 0 bad" in out  # 13 stages and the 6 models' cached evaluations
    assert out.count("ok       model_eval/") == 6
    flip_bytes(artifact_dir(nano_copy, "merge") / "model.safetensors")
    assert main(["--workspace", str(nano_copy), "verify", "nano"]) == EXIT_FAILED
    out = capsys.readouterr().out
    assert "CORRUPT  merge" in out and "file model.safetensors is corrupt" in out and "12 artifacts verified, 1 bad" in out


@pytest.mark.fault("recovers")
def test_a_killed_runs_mlflow_state_is_swept(nano_copy):
    # a run a SIGKILLed process left RUNNING is marked KILLED by the next tracker on the host
    from tests.helpers import mlflow_client

    client = mlflow_client(nano_copy)
    exp = client.get_experiment_by_name("nano")
    orphan = client.create_run(exp.experiment_id, tags={"paperdag.host": __import__("socket").gethostname(),
                                                         "paperdag.pid": "999999999"})
    assert stage(nano_copy, "corpus") == 0
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"
    assert no_run_left_running(nano_copy) and len(runs(nano_copy)) > 13
