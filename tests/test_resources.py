"""Per-stage ``resources`` (threads, memory_gb, gpus): validated on load, kept out of the
digest, refused before anything runs when the machine cannot hold them, and packed so stages
side by side never add up to more than the machine has (flows/parallel.py)."""
from __future__ import annotations

import os

import pytest

from flows.cli import EXIT_USAGE, main
from flows.errors import RecipeError
from flows.parallel import (Capacity, ResourcesError, StagePacker, check_ray_capacity, check_stage_resources,
                            ray_stage_options, stage_threads)
from flows.recipe import load_plan
from tests.helpers import NANO_RECIPE, make_workspace


def test_resources_are_typed_and_named_on_error():
    _, plan = load_plan(NANO_RECIPE, ["stages.pretrain_dense.resources={threads: 2, memory_gb: 1.5}"])
    assert plan.stages["pretrain_dense"].resources == {"threads": 2, "memory_gb": 1.5, "gpus": 0, "ranks": 1}
    with pytest.raises(RecipeError, match=r"stages\.pretrain_dense\.resources\.threads"):
        load_plan(NANO_RECIPE, ["stages.pretrain_dense.resources={threads: 0}"])
    with pytest.raises(RecipeError, match=r"stages\.pretrain_dense\.resources\.cores"):
        load_plan(NANO_RECIPE, ["stages.pretrain_dense.resources={cores: 2}"])


def test_resources_do_not_move_digests():
    _, plain = load_plan(NANO_RECIPE)
    _, placed = load_plan(NANO_RECIPE, ["stages.pretrain_dense.resources={threads: 1}",
                                        "stages.evaluate.resources={memory_gb: 2}"])
    assert {n: s.digest for n, s in plain.stages.items()} == {n: s.digest for n, s in placed.stages.items()}


def test_ranks_move_only_their_stage_and_downstream_and_are_set_per_run():
    _, plain = load_plan(NANO_RECIPE)
    _, ranked = load_plan(NANO_RECIPE, ["stages.pretrain_dense.resources.ranks=2"])  # no resources key in the file
    moved = {n for n, s in plain.stages.items() if s.digest != ranked.stages[n].digest}
    assert moved == {"pretrain_dense", "finetune_prose", "finetune_code", "distill", "quantize", "merge", "evaluate"}
    assert ranked.stages["pretrain_dense"].options["ranks"] == 2 and "ranks" not in plain.stages["pretrain_dense"].options


@pytest.mark.parametrize(("override", "message"), [
    ("stages.quantize.resources.ranks=2", "stages.quantize.resources.ranks: 2 ranks, but a quantize stage runs in one"),
    ("stages.pretrain_dense.resources.ranks=3", "stages.pretrain_dense.resources.ranks: 3 ranks do not split "
                                                "params.batch_size=8"),
    ("stages.pretrain_dense.resources={ranks: 2, gpus: 1}", "2 ranks need one GPU each, but resources.gpus is 1"),
    ("stages.pretrain_dense.resources.ranks=0", "stages.pretrain_dense.resources.ranks"),
])
def test_impossible_rank_counts_are_named_before_anything_runs(override, message):
    with pytest.raises(RecipeError, match=message.replace(".", r"\.")):
        load_plan(NANO_RECIPE, [override])


def test_more_ranks_than_the_machine_has_cores_or_gpus_are_refused_before_anything_runs():
    _, plan = load_plan(NANO_RECIPE, ["stages.pretrain_dense.resources.ranks=4"])
    check_stage_resources(plan, ["pretrain_dense"], Capacity(cores=4, memory_gb=24.0, gpus=0))
    with pytest.raises(ValueError, match="stages.pretrain_dense.resources.ranks: asks for 4, but this machine has 2 cores"):
        check_stage_resources(plan, ["pretrain_dense"], Capacity(cores=2, memory_gb=24.0, gpus=0))
    with pytest.raises(ValueError, match="resources.ranks: asks for 4, but this machine has 2 NVIDIA GPUs"):
        check_stage_resources(plan, ["pretrain_dense"], Capacity(cores=64, memory_gb=24.0, gpus=2))


def test_a_method_with_per_block_state_is_refused_on_ranks():
    with pytest.raises(RecipeError, match="method 'ps_kd' keeps per-block state"):
        load_plan(NANO_RECIPE, ["stages.distill.method=ps_kd", "stages.distill.inputs={tokens: tokenize}",
                                "stages.distill.resources.ranks=2"])


def test_l4q_is_refused_on_ranks_before_anything_runs():
    with pytest.raises(RecipeError, match="method 'l4q' packs its merged weights from the learned grids, which only "
                                          "the training process holds; train it on one rank"):
        load_plan(NANO_RECIPE, ["stages.finetune_prose.method=l4q", "stages.finetune_prose.params.group_size=32",
                                "stages.finetune_prose.resources.ranks=2"])


@pytest.mark.parametrize(("key", "value", "unit"), [("threads", 4096, "cores"), ("memory_gb", 1e6, "GB of memory"),
                                                    ("gpus", 64, "NVIDIA GPUs")])
def test_a_stage_asking_more_than_the_machine_has_is_refused_before_anything_runs(tmp_path, capsys, key, value, unit):
    ws = make_workspace(tmp_path / "ws")
    rc = main(["--workspace", str(ws), "run", "nano", "--no-progress", "--set", f"stages.distill.resources={{{key}: {value}}}"])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE, err
    assert f"stages.distill.resources.{key}: asks for {value:g}, but this machine has" in err and unit in err, err
    assert len(err.strip().splitlines()) == 1
    assert not list(ws.glob("artifacts/*/*")) and not (ws / "mlflow.db").exists()  # refused before any stage
    rc = main(["--workspace", str(ws), "stage", "nano", "distill", "--set", f"stages.distill.resources={{{key}: {value}}}"])
    assert rc == EXIT_USAGE and f"stages.distill.resources.{key}" in capsys.readouterr().err


def test_the_check_reads_only_the_selected_stages():
    _, plan = load_plan(NANO_RECIPE, ["stages.distill.resources={gpus: 64}"])
    machine = Capacity(cores=2, memory_gb=24.0, gpus=0)
    check_stage_resources(plan, ["corpus", "tokenize"], machine)  # distill is not among them: no error
    with pytest.raises(ValueError, match="stages.distill.resources.gpus: asks for 64, but this machine has 0"):
        check_stage_resources(plan, ["corpus", "distill"], machine)


def test_the_packer_sums_threads_memory_and_gpus_within_the_machine():
    packer = StagePacker(Capacity(cores=4, memory_gb=16.0, gpus=1), default_threads=2)
    assert packer.fits({"threads": 4, "memory_gb": 16.0, "gpus": 1})  # alone, anything the check let through
    packer.take("a", {})  # 2 threads by default
    assert packer.fits({}) and not packer.fits({"threads": 3})
    packer.take("b", {"threads": 2, "memory_gb": 10.0, "gpus": 0})
    assert not packer.fits({"threads": 1})  # 4 of 4 cores held
    packer.release("a")
    assert packer.fits({"threads": 2, "memory_gb": 6.0, "gpus": 1})
    assert not packer.fits({"threads": 1, "memory_gb": 6.5})  # 10 + 6.5 GB > 16
    packer.take("c", {"threads": 1, "gpus": 1})
    packer.release("b")
    assert not packer.fits({"threads": 1, "gpus": 1}) and packer.fits({"threads": 3})


def test_a_cluster_at_an_address_is_not_packed_by_this_machine():
    packer = StagePacker(Capacity.unbounded(), default_threads=1)
    packer.take("a", {"threads": 64, "gpus": 8, "memory_gb": 512.0})
    assert packer.fits({"threads": 64, "gpus": 8, "memory_gb": 512.0})  # Ray or Dask decide; --max-parallel caps


def test_stage_resources_become_rays_remote_options():
    assert ray_stage_options({}, default_threads=2) == {"num_cpus": 2}
    assert ray_stage_options({"threads": 4, "gpus": 1, "memory_gb": 1.5, "ranks": 1}, 2) == {
        "num_cpus": 4, "num_gpus": 1, "memory": int(1.5 * 2**30)}


def test_a_stage_no_ray_node_can_hold_is_refused_naming_it():
    _, plan = load_plan(NANO_RECIPE, ["stages.distill.resources={threads: 2, gpus: 2}",
                                      "stages.pretrain_dense.resources={threads: 8, memory_gb: 4}"])
    nodes = [{"CPU": 16.0, "GPU": 1.0, "memory": 64 * 2**30}, {"CPU": 2.0, "GPU": 2.0, "memory": 8 * 2**30}]
    check_ray_capacity(plan, ["pretrain_dense", "distill"], 1, nodes)  # each fits on one node
    with pytest.raises(ResourcesError) as error:
        check_ray_capacity(plan, ["pretrain_dense", "distill"], 1, nodes[:1])
    assert str(error.value) == (f"{plan.recipe_path}: stages.distill.resources: asks Ray for CPU 2, GPU 2 on one node, "
                                "but the cluster's largest node has CPU 16, GPU 1 (1 node(s)); lower it, or add a node "
                                "that has them")
    # one node with the CPUs, another with the memory: no single node holds the stage
    with pytest.raises(ResourcesError, match=r"stages\.pretrain_dense\.resources: asks Ray for CPU 8, memory 4 GB"):
        check_ray_capacity(plan, ["pretrain_dense"], 1, [{"CPU": 16.0, "memory": 2 * 2**30}, {"CPU": 2.0, "memory": 64 * 2**30}])
    check_ray_capacity(plan, ["corpus"], 1, nodes[:1])  # stages that ask nothing take the default threads


def test_stage_threads_sets_torch_for_the_stage_and_restores_it():
    import torch

    before = torch.get_num_threads()
    with stage_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with stage_threads(None):
        assert torch.get_num_threads() == before


def test_the_local_capacity_is_this_machine(monkeypatch):
    machine = Capacity.local()
    assert machine.cores == os.cpu_count() and machine.memory_gb > 1
    # counted from the device nodes, without importing torch; torch sees the same devices
    import torch

    assert machine.gpus == torch.cuda.device_count()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no device visible, whatever the machine has
    assert Capacity.local().gpus == 0
