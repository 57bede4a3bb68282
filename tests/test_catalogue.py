"""The numbers the README and RESULTS.md show come from one catalogue run at one commit."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO

CATALOGUE = REPO / "benchmarks" / "results" / "catalogue.json"
PREVIOUS = REPO / "benchmarks" / "results" / "catalogue_previous.json"


def _report():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import report  # benchmarks/report.py
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return report


def test_the_catalogue_is_one_run_at_one_commit_of_every_recipe():
    catalogue = json.loads(CATALOGUE.read_text())
    commits = {row.get("commit") for row in catalogue.values()}
    assert len(commits) == 1 and None not in commits, f"catalogue.json mixes commits: {commits}"
    assert set(catalogue) <= {p.stem for p in (REPO / "params").glob("*.yaml")}, \
        "no catalogue row names a recipe that is gone"
    [commit] = commits
    known = subprocess.run(["git", "cat-file", "-t", commit], cwd=REPO, capture_output=True, text=True)
    assert known.stdout.strip() == "commit", f"catalogue.json's commit {commit} is not in this repository"
    for name, row in catalogue.items():
        assert row["returncode"] == 0, f"{name}: the catalogue run failed (see benchmarks/results/{name}.log)"
        assert row["digests"] and all(c["verdict"] in ("PASS", "FAIL", "NOT DISCRIMINATING") for c in row["claims"])
    # an earlier pass's rows name their own commits, none of them this pass's
    for name, row in json.loads(PREVIOUS.read_text()).items():
        assert row["commit"] != commit and row["digests"], name
        known = subprocess.run(["git", "cat-file", "-t", row["commit"]], cwd=REPO, capture_output=True, text=True)
        assert known.stdout.strip() == "commit", f"{name}: commit {row['commit']} is not in this repository"


def test_readme_and_results_are_generated_from_the_catalogue():
    report = _report()
    catalogue = json.loads(CATALOGUE.read_text())
    readme = (REPO / "README.md").read_text()
    assert readme == report.readme_with_catalogue(readme, catalogue, json.loads(PREVIOUS.read_text())), \
        "README section 5 was not generated from catalogue.json: run python benchmarks/report.py"
    assert (REPO / "benchmarks" / "RESULTS.md").read_text() == report.results_markdown(), \
        "benchmarks/RESULTS.md was not generated from benchmarks/results/: run python benchmarks/report.py"


def test_a_recipe_added_after_the_catalogue_run_is_listed_as_not_measured_and_never_scored():
    report = _report()
    catalogue = json.loads(CATALOGUE.read_text())
    name = next(iter(catalogue))
    without = {k: v for k, v in catalogue.items() if k != name}
    assert report.unmeasured_recipes(without) == sorted([name, *report.unmeasured_recipes(catalogue)])
    row = next(line for line in report.readme_with_catalogue((REPO / "README.md").read_text(), without).splitlines()
               if line.startswith(f"| `{name}`"))
    assert "**not measured yet**" in row and "PASS" not in row and "FAIL" not in row


def test_a_recipe_this_pass_has_not_reached_shows_the_earlier_pass_with_its_commit():
    report = _report()
    catalogue = json.loads(CATALOGUE.read_text())
    name, row = next(iter(catalogue.items()))
    without = {k: v for k, v in catalogue.items() if k != name}
    earlier = {name: dict(row, commit="0123456789abcdef")}
    readme = report.readme_with_catalogue((REPO / "README.md").read_text(), without, earlier)
    [line] = [line for line in readme.splitlines() if line.startswith(f"| `{name}`")]
    assert f"earlier pass at `0123456789ab`: {report.verdict_counts(row['claims'])}" in line
    assert "1 more recipe is listed as an earlier pass measured it, at commit `0123456789ab`" in readme
    second, second_row = list(catalogue.items())[1]
    two_earlier = {**earlier, second: dict(second_row, commit="0123456789abcdef")}
    without_two = {k: v for k, v in without.items() if k != second}
    assert "2 more recipes are listed as an earlier pass measured them, at commit `0123456789ab`" in \
        report.readme_with_catalogue((REPO / "README.md").read_text(), without_two, two_earlier)
    assert name not in report.unmeasured_recipes(without, earlier)
    assert report.earlier_rows(catalogue, earlier) == {}, "a recipe this pass measured shows this pass's row only"


def test_a_pass_at_a_new_commit_moves_the_earlier_rows_aside(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import run_catalogue
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    monkeypatch.setattr(run_catalogue, "CATALOGUE", tmp_path / "catalogue.json")
    monkeypatch.setattr(run_catalogue, "PREVIOUS", tmp_path / "catalogue_previous.json")
    run_catalogue.record("a", {"commit": "c0", "n": 1})
    run_catalogue.record("b", {"commit": "c0", "n": 2})
    assert not (tmp_path / "catalogue_previous.json").exists(), "one commit so far: nothing to move"
    run_catalogue.record("a", {"commit": "c1", "n": 3})
    assert json.loads((tmp_path / "catalogue.json").read_text()) == {"a": {"commit": "c1", "n": 3}}
    assert json.loads((tmp_path / "catalogue_previous.json").read_text()) == {
        "a": {"commit": "c0", "n": 1}, "b": {"commit": "c0", "n": 2}}
    run_catalogue.record("b", {"commit": "c2", "n": 4})  # a third commit: c1's row of a replaces c0's
    assert json.loads((tmp_path / "catalogue_previous.json").read_text()) == {
        "a": {"commit": "c1", "n": 3}, "b": {"commit": "c0", "n": 2}}
    assert json.loads((tmp_path / "catalogue.json").read_text()) == {"b": {"commit": "c2", "n": 4}}


def test_every_row_records_the_digests_its_claims_were_measured_on():
    """A recipe edited after the run compiles to other digests: `paperdag list` then says STALE."""
    from flows.report import measured_status

    catalogue = json.loads(CATALOGUE.read_text())
    name, row = next(iter(catalogue.items()))
    assert measured_status(name, row["digests"], catalogue).startswith("measured at commit")
    changed = dict(row["digests"], **{next(iter(row["digests"])): "0" * 64})
    assert measured_status(name, changed, catalogue).startswith("STALE: 1 of")
    removed = {stage: digest for stage, digest in list(row["digests"].items())[1:]}
    assert measured_status(name, removed, catalogue).startswith("STALE: 1 of"), "a stage removed since is a change"
    failed = {name: dict(row, returncode=1)}
    assert measured_status(name, row["digests"], failed).startswith("FAILED to run")
    assert measured_status("no_such_recipe", {}, catalogue) == "not measured in the catalogue"


def test_the_catalogue_runner_refuses_a_dirty_tree(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    (clone / "params" / "quickstart.yaml").write_text((clone / "params" / "quickstart.yaml").read_text() + "\n# edit\n")
    done = subprocess.run([sys.executable, "benchmarks/run_catalogue.py", "--workspace", str(tmp_path / "ws"),
                           "quickstart"], cwd=clone, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "uncommitted changes" in done.stderr and "params/quickstart.yaml" in done.stderr
    assert not (tmp_path / "ws" / "artifacts").exists()


def test_resume_skips_only_recipes_this_commit_recorded_completely(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import run_catalogue
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    rows = {"done": {"commit": "c1", "returncode": 0},
            "failed": {"commit": "c1", "returncode": 1},
            "cut_short": {"commit": "c1", "returncode": 0, "missing_metrics": ["evaluate"]},
            "other_commit": {"commit": "c0", "returncode": 0}}
    monkeypatch.setattr(run_catalogue, "CATALOGUE", tmp_path / "catalogue.json")
    assert run_catalogue.recorded_complete("c1") == set(), "no catalogue file: nothing to skip"
    (tmp_path / "catalogue.json").write_text(json.dumps(rows))
    assert run_catalogue.recorded_complete("c1") == {"done"}
