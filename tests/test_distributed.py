"""The torch.distributed helpers on one process and under torchrun with 2 gloo processes."""

from __future__ import annotations

import json
import textwrap

import torch

from textdistill import distributed
from launch import torchrun


def test_single_process_is_a_no_op():
    t = torch.tensor([1.0, 2.0])
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert distributed.all_reduce_sum(t).tolist() == [1.0, 2.0]
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.shard_indices(5) == [0, 1, 2, 3, 4]
    assert distributed.init("cpu") == torch.device("cpu")


def test_merge_shards_undoes_sharding():
    shards = [[f"x{i}" for i in range(r, 7, 3)] for r in range(3)]
    assert distributed.merge_shards(shards, 7) == [f"x{i}" for i in range(7)]


def test_two_gloo_processes(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import json, sys, torch
        from textdistill import distributed
        device = distributed.init("auto")
        r, w = distributed.rank(), distributed.world_size()
        total = distributed.all_reduce_sum(torch.tensor([float(r + 1), 10.0]))
        mine = distributed.shard_indices(5)
        merged = distributed.merge_shards(distributed.all_gather_objects([i * i for i in mine]), 5)
        seen = distributed.broadcast_object({"from": r})
        if distributed.is_main():
            json.dump({"world": w, "device": str(device), "total": total.tolist(), "merged": merged,
                       "seen": seen}, open(sys.argv[1], "w"))
        distributed.barrier()
    """))
    out = tmp_path / "out.json"
    torchrun(script, out, nproc=2, timeout=120)
    got = json.loads(out.read_text())
    assert got == {"world": 2, "device": "cpu", "total": [3.0, 20.0], "merged": [0, 1, 4, 9, 16], "seen": {"from": 0}}


def test_independent_joins_no_group_under_a_launcher(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.is_launched()
    with distributed.independent():
        assert distributed.init("cpu") == torch.device("cpu")   # would block waiting for rank 0 otherwise
    assert not dist.is_initialized() and distributed.world_size() == 1
