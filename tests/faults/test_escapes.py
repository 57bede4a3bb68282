"""Nothing a recipe says can reach outside the workspace, a shell, or the content of other files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.cli import EXIT_USAGE, main
from flows.dvc_sync import render_dvc_yaml
from tests.helpers import NANO_RECIPE, make_workspace


@pytest.mark.fault("clear_error")
@pytest.mark.parametrize("name", ["../../../../outside", "a/b", "Upper", "x;rm -rf ~", ""])
def test_recipe_names_are_identifiers(tmp_path, capsys, name):
    """`name: ../../../../outside` used to make MLflow write files outside the workspace."""
    ws = make_workspace(tmp_path / "deep" / "er" / "ws")
    recipe = yaml.safe_load(NANO_RECIPE.read_text())
    recipe["name"] = name
    (ws / "params" / "evil.yaml").write_text(yaml.safe_dump(recipe))
    outside = lambda: sorted(p for p in tmp_path.rglob("*") if not p.is_relative_to(ws))
    before = outside()
    assert main(["--workspace", str(ws), "stage", "evil", "corpus", "--no-progress"]) == EXIT_USAGE
    assert "must be snake_case" in capsys.readouterr().err
    assert outside() == before and not list(ws.glob("artifacts/*/*")) and not (ws / "mlflow.db").exists()


@pytest.mark.fault("clear_error")
def test_a_recipe_file_name_cannot_inject_a_shell_command(tmp_path):
    """A recipe file named `x;touch INJECTED;#.yaml` went unquoted into dvc.yaml's cmd."""
    ws = make_workspace(tmp_path / "ws", {})
    recipe = yaml.safe_load(NANO_RECIPE.read_text())
    recipe["stages"] = {"corpus": recipe["stages"]["corpus"]}
    recipe["claims"] = []
    (ws / "params" / "x;touch INJECTED;#.yaml").write_text(yaml.safe_dump(recipe))
    stages = yaml.safe_load(render_dvc_yaml(ws))["stages"]
    [cmd] = [s["cmd"] for s in stages.values()]
    env = dict(os.environ, PAPERDAG_WORKSPACE=str(ws), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    done = subprocess.run(["sh", "-c", cmd], cwd=ws, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (ws / "INJECTED").exists()
    assert list(ws.glob("artifacts/corpus/*/manifest.json"))  # the stage itself ran, from that very file


SECRET = "root:$6$s3cr3t-hash:19000:0:99999:7:::"


@pytest.mark.fault("clear_error")
def test_a_file_that_is_not_a_recipe_is_never_echoed(tmp_path, capsys):
    """`paperdag run /etc/shadow` echoed the file's lines in its "unknown keys" message."""
    ws = make_workspace(tmp_path / "ws")
    shadow = tmp_path / "shadow"
    shadow.write_text(SECRET + "\n")
    as_yaml = tmp_path / "config.yaml"  # a YAML mapping that is not a recipe
    as_yaml.write_text(f"{SECRET.split(':')[0]}: '{SECRET}'\npassword: hunter2\n")
    for target in (str(shadow), str(as_yaml), "/etc/shadow"):
        assert main(["--workspace", str(ws), "validate", target]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert "s3cr3t" not in err and "hunter2" not in err and "password" not in err, err
    assert "not a paperdag recipe" in err or "neither a recipe name" in err


@pytest.mark.fault("clear_error")
def test_a_checkpoint_mapping_to_custom_code_is_refused_without_running_it(tmp_path):
    """A config with `auto_map` raised transformers' interactive [y/N] prompt; now it is refused."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    marker = tmp_path / "CODE_RAN"
    (ckpt / "config.json").write_text(json.dumps({
        "model_type": "paperdag_custom", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}}))
    (ckpt / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    code = f"from components.model.presets import load_model; load_model({str(ckpt)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode != 0 and "trust_remote_code" in done.stderr
    assert not marker.exists()


@pytest.mark.fault("clear_error")
def test_a_recipe_cannot_make_paperdag_write_outside_its_workspace(tmp_path, capsys):
    ws = make_workspace(tmp_path / "ws")
    dataset = tmp_path / "hf_local"
    dataset.mkdir()
    (dataset / "train.jsonl").write_text("".join(json.dumps({"text": f"row {i} " * 5}) + "\n" for i in range(40)))
    outside = tmp_path / "elsewhere"
    rc = main(["--workspace", str(ws), "stage", "nano", "corpus", "--no-progress", "--set",
               f"data.sources=[{{type: hf, name: {dataset}, domain: prose, cache_dir: {outside}}}, "
               "{type: arithmetic, n_docs: 40}]"])
    assert rc == 1
    assert f"data.sources[0].cache_dir: {outside} is outside the workspace" in capsys.readouterr().err
    assert not outside.exists() and not list(ws.glob("artifacts/corpus/*"))
