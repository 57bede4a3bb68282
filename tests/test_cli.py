"""The command line's own surface: version, completion, and requests outside a project.
(Commands on built artifacts are in tests/e2e/test_pipeline.py.)"""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from flows.cli import build_parser, main
from tests.helpers import REPO, make_workspace


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("paperdag 0.")


def test_bash_completion_knows_every_command_and_the_recipes(tmp_path):
    script = subprocess.run([sys.executable, "-m", "flows.cli", "completion", "bash"], capture_output=True,
                            text=True, check=True).stdout
    commands = build_parser()._subparsers._group_actions[0].choices
    for command in commands:
        assert f"        {command}) opts=" in script, command
    assert "--dry-run" in script and "--json" in script
    # complete `paperdag status q<TAB>` in a real bash, in a project with two recipes
    make_workspace(tmp_path, {"quickstart": REPO / "tests" / "recipes" / "nano.yaml",
                              "queue": REPO / "tests" / "recipes" / "nano.yaml"})
    (tmp_path / "paperdag.bash").write_text(script)
    probe = ('source paperdag.bash; COMP_WORDS=(paperdag status q); COMP_CWORD=2; _paperdag; '
             'echo "${COMPREPLY[@]}"; COMP_WORDS=(paperdag st); COMP_CWORD=1; _paperdag; echo "${COMPREPLY[@]}"')
    out = subprocess.run(["bash", "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    recipes, commands_st = out.splitlines()
    assert sorted(recipes.split()) == ["queue", "quickstart"]
    assert sorted(commands_st.split()) == ["stage", "status"]


def test_a_recipe_outside_a_project_points_at_workspace(tmp_path, capsys):
    for argv in (["run", "quickstart"], ["status", "quickstart"], ["show", "quickstart:corpus"]):
        assert main(["--workspace", str(tmp_path), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert "is not a paperdag project" in err and "--workspace" in err, err
    assert not (tmp_path / "artifacts").exists()


def test_gc_without_recipes_removes_nothing(tmp_path, capsys):
    kept = tmp_path / "artifacts" / "quantize" / "0123456789abcdef"
    kept.mkdir(parents=True)
    (kept / "manifest.json").write_text('{"digest": "0123456789abcdef0000", "kind": "quantize", "files": {}}')
    assert main(["--workspace", str(tmp_path), "gc", "--yes"]) == 2
    assert "no recipes in params/" in capsys.readouterr().err and kept.exists()


def test_looking_commands_do_not_import_torch(tmp_path):
    """show, lineage and --help answer without torch, DeepSpeed or Prefect (seconds of start-up)."""
    code = ("import sys; from flows.cli import main; main(['--workspace', sys.argv[1], 'lineage', 'abcd']); "
            "print(sorted(m for m in ('torch', 'deepspeed', 'prefect', 'mlflow', 'transformers') if m in sys.modules))")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr
    assert "no artifact or MLflow run matches 'abcd'" in done.stderr
    assert time.perf_counter() - start < 10  # generous on a loaded 2-core machine; typically ~0.1 s
