"""Distillation over several processes (torchrun, gloo on CPU) equals one process over the same segments."""

from __future__ import annotations

import dataclasses
import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

from launch import torchrun
from test_distill import experts_dir  # noqa: F401  (the same 3 tiny SGD experts, a module fixture)
from textdistill.artifacts import load_tensors
from textdistill.distill import DistillConfig, TokenSearchSettings, distill
from textdistill.errors import ConfigError
from textdistill.instrument import InstrumentConfig
from textdistill.matching import StudentSettings

# 3 segments over 2 ranks (2 + 1) and 3 confirmation draws: the shares are uneven on purpose
CONFIGS = {
    "gcg": DistillConfig(budget="4", iterations=4, segments=3, student=StudentSettings(syn_steps=2, batch_size=2),
                         precision="fp32",   # compared with one process to rounding: never bf16, whatever the CPU
                         checkpoint_every=2, instrument=InstrumentConfig(draws=2, random_subsets=1, heldout_experts=1),
                         search=TokenSearchSettings(top_k=16, candidates=4, confirm_draws=3)),
    # with a line search of the student lr (its draws shared out over the ranks too)
    "continuous": DistillConfig(budget="4", iterations=4, segments=3, mode="continuous", lr_embeddings=1e-2,
                                precision="fp32",
                                student=StudentSettings(syn_steps=2, batch_size=2, lr_grid=(0.1, 0.5)),
                                checkpoint_every=2,
                                instrument=InstrumentConfig(draws=2, random_subsets=1, heldout_experts=1)),
}

SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[4])
    from test_distill_distributed import CONFIGS
    from textdistill import distributed
    from textdistill.distill import distill
    experts, out, mode = sys.argv[1:4]
    result = distill(experts=experts, output=out, config=CONFIGS[mode], device="cpu", progress=False)
    assert ("heldout" in result) == distributed.is_main(), result
""")


@pytest.mark.parametrize("mode", ["gcg", "continuous"])
def test_two_ranks_equal_one_process_over_the_same_segments(tmp_path, experts_dir, mode):
    config = CONFIGS[mode]
    one = tmp_path / "one"
    distill(experts=experts_dir, output=one, config=config, device="cpu", progress=False)
    # so that the 2-rank run scores the held-out instrument itself (its draws shared out) rather than reading it
    shutil.rmtree(experts_dir / "instrument_cache", ignore_errors=True)
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    two = tmp_path / "two"
    torchrun(script, experts_dir, two, mode, Path(__file__).parent, nproc=2, timeout=240)
    a, b = load_tensors(one / "state.safetensors"), load_tensors(two / "state.safetensors")
    assert torch.equal(a["token_ids"], b["token_ids"])
    torch.testing.assert_close(b["prompt_embeds"], a["prompt_embeds"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b["log_lr"], a["log_lr"], rtol=1e-5, atol=1e-7)
    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)]
    assert [len(r["segments"]) for r in rows[0]] == [3] * 4
    for x, y in zip(*rows):
        assert x["segments"] == y["segments"] and x.get("accepted") == y.get("accepted")
        assert y["matching_loss"] == pytest.approx(x["matching_loss"], rel=1e-5)
    if mode == "gcg":
        assert any(r["accepted"] for r in rows[0]), "no swap was accepted: the comparison shows nothing"
    else:
        assert float(a["embed_opt.0.step"]) == 4 and all(r["matching_loss"] is not None for r in rows[0])
    if mode == "continuous":
        searches = [json.loads((run / "init.json").read_text())["lr_search"] for run in (one, two)]
        assert searches[0]["lr"] == searches[1]["lr"]
        for lr, loss in searches[0]["mean_loss"].items():
            assert searches[1]["mean_loss"][lr] == pytest.approx(loss, rel=1e-6)
    run = json.loads((two / "run.json").read_text())
    assert run["world_size"] == 2 and run["segments"] == 3
    assert (two / "summary.json").is_file()   # rank 0 wrote the folder
    heldout = [json.loads((run / "heldout.json").read_text()) for run in (one, two)]
    assert heldout[1]["cached_sets"] == 0
    for name in ("init", "projected", "floor"):
        assert heldout[1][name]["draws"] == pytest.approx(heldout[0][name]["draws"], rel=1e-6), name
    assert heldout[1]["random"][0]["draws"] == pytest.approx(heldout[0]["random"][0]["draws"], rel=1e-6)


def test_segments_must_be_positive():
    with pytest.raises(ConfigError, match="segments must be positive"):
        DistillConfig(segments=0)


def test_a_run_resumes_only_with_its_number_of_segments(tmp_path, experts_dir):
    config = dataclasses.replace(CONFIGS["gcg"], iterations=2, segments=2)
    distill(experts=experts_dir, output=tmp_path, config=config, device="cpu", progress=False)
    with pytest.raises(ConfigError, match="other settings"):
        distill(experts=experts_dir, output=tmp_path, config=dataclasses.replace(config, iterations=3, segments=None),
                resume=True, device="cpu", progress=False)


def test_a_bf16_model_distils_without_upcasting_its_base_weights_and_with_fp32_lora(tmp_path, experts_dir, monkeypatch):
    import textdistill.distill as distill_module

    loaded = {}
    real_loader = distill_module.load_student_model

    def capture(*args, **kwargs):
        loaded["model"], tokenizer = real_loader(*args, **kwargs)
        return loaded["model"], tokenizer

    monkeypatch.setattr(distill_module, "load_student_model", capture)
    real_scorer = distill_module.Scorer

    def scorer(*args, **kwargs):
        loaded["scorer"] = real_scorer(*args, **kwargs)
        return loaded["scorer"]

    monkeypatch.setattr(distill_module, "Scorer", scorer)
    config = dataclasses.replace(CONFIGS["gcg"], iterations=2, segments=None, dtype="bf16", precision="fp32")
    summary = distill(experts=experts_dir, output=tmp_path, config=config, device="cpu", progress=False)
    base = {n: p.dtype for n, p in loaded["model"].named_parameters() if "lora_" not in n}
    assert base and set(base.values()) == {torch.bfloat16}, set(base.values())
    # the student's LoRA tensors (snapshots and every unrolled step) are fp32 master copies
    assert loaded["scorer"].dtype == torch.float32
    assert {p.dtype for p in loaded["scorer"].params(0, 0).values()} == {torch.float32}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["matching_loss"] is not None and r["matching_loss"] > 0 for r in rows)
    assert summary["heldout"]["projected"]["loss"] > 0


def test_the_command_line_on_two_ranks_reports_once(tmp_path, experts_dir):
    out = tmp_path / "cli"
    proc = torchrun("textdistill.cli", "distill", "--experts", experts_dir, "--budget", "4", "--iterations", "2",
                    "--syn-steps", "2", "--batch-size", "2", "--instrument.draws", "2",
                    "--instrument.random_subsets", "1", "--instrument.heldout_experts", "1", "--device", "cpu",
                    "--no-progress", "--output", out, module=True, timeout=240)
    assert proc.stdout.count("held-out matching loss") == 1, proc.stdout   # rank 0 reports, rank 1 stays quiet
    assert json.loads((out / "run.json").read_text())["segments"] == 2   # one segment per rank by default
