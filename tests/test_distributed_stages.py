"""Training (on text and on learned vectors), evaluation and expert runs under torchrun with 2 gloo CPU processes give
what one process gives.

One launched job (``_JOB``) runs all the stages on 2 ranks; the module fixture runs the same entries on one process
(this one) as the reference. The training run is interrupted after step 3 (its checkpoint of step 2, written
by rank 0) and resumed on both ranks, so it also checks that every rank restores the checkpoint. Rank 1 records every
file it writes: nothing in training and evaluation, only its own expert's folder in the expert runs.
"""

from __future__ import annotations

import json
import pathlib
import textwrap

import pytest
import torch

from conftest import mc_rows, write_jsonl
from launch import torchrun
from textdistill.artifacts import load_tensors, save_tensors
from textdistill.config import DataSettings, EvalConfig, LoraSettings, TrainConfig
from textdistill.data import Example, tokenize_examples
from textdistill.evaluation import evaluate
from textdistill.experts import ExpertsConfig, make_experts
from textdistill.models import load_model, load_tokenizer
from textdistill.projection import input_embedding_matrix
from textdistill.training import train, train_on_embeddings

# SGD over LoRA (AdamW would turn a rounding difference in a near-zero gradient of a zero-initialised LoRA B into a
# step of +-lr, so adapters of differently threaded runs can differ by 2 lr there); 3 examples per micro-batch (2 on
# rank 0, 1 on rank 1) and 2 micro-batches per step: responses of different lengths make an unweighted mean of the
# ranks' losses wrong; with 16 examples, step 3 ends the epoch with a micro-batch of 1 example, which leaves rank 1
# without any.
TRAIN = TrainConfig(optimizer="sgd", lr=0.5, max_steps=5, batch_size=3, grad_accum=2, warmup_ratio=0.2,
                    schedule="linear", max_grad_norm=1.0, lora=LoraSettings(r=2, alpha=4),
                    data=DataSettings(max_length=64), precision="fp32")   # compared to rounding: pinned
EXPERTS = ExpertsConfig(num_experts=3, snapshot_every=2, train=TrainConfig(
    optimizer="sgd", lr=0.5, schedule="constant", warmup_ratio=0.0, max_steps=4, batch_size=4, max_grad_norm=None,
    lora=LoraSettings(r=2, alpha=4), data=DataSettings(max_length=64), precision="fp32"))
# the continuous arm (learned prompt vectors, here the prompts' own token embeddings): 5 samples per micro-batch
VECTORS = TrainConfig(lr=1e-2, max_steps=3, batch_size=5, warmup_ratio=0.0, lora=LoraSettings(r=2, alpha=4),
                      data=DataSettings(max_length=64), precision="fp32")
RESPONSES = [" blue", " a dark shade of green", " red, like a brick", " it is yellow"]

_JOB = textwrap.dedent("""
    import builtins, json, os, pathlib, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from test_distributed_stages import EXPERTS, TRAIN, VECTORS, eval_configs, trainable
    from textdistill import distributed, evaluation, training
    from textdistill.artifacts import save_tensors
    from textdistill.evaluation import build_requests, score_requests
    from textdistill.experts import make_experts
    from textdistill.models import load_model, load_tokenizer

    model_dir, data, questions, root = sys.argv[2], sys.argv[3], sys.argv[4], pathlib.Path(sys.argv[5])
    distributed.init("cpu")
    rank = distributed.rank()
    writes = []
    if rank:   # record every file rank 1 writes under root
        real_open, real_replace = builtins.open, os.replace

        def recording_open(file, mode="r", *args, **kwargs):
            if any(m in mode for m in "wax") and str(file).startswith(str(root)):
                writes.append(str(file))
            return real_open(file, mode, *args, **kwargs)

        def recording_replace(src, dst, *args, **kwargs):
            writes.append(str(dst))
            return real_replace(src, dst, *args, **kwargs)

        builtins.open, os.replace = recording_open, recording_replace

    class Crash(Exception):
        pass

    # 1) training, killed (on both ranks) when step 3 ends, then resumed from rank 0's checkpoint of step 2
    real_multiplier = training.lr_multiplier

    def crash_after_step_3(step, *args):
        if step == 3:
            raise Crash
        return real_multiplier(step, *args)

    training.lr_multiplier = crash_after_step_3
    try:
        training.train(model_name=model_dir, data=data, output=root / "train", config=TRAIN, device="cpu",
                       progress=False, checkpoint_every=2, checkpoint_seconds=None)
        raise AssertionError("training did not stop")
    except Crash:
        pass
    training.lr_multiplier = real_multiplier
    checkpoint = json.loads((root / "train" / "checkpoint" / "state.json").read_text())["position"]["step"]
    training.train(model_name=model_dir, data=data, output=root / "train", config=TRAIN, device="cpu",
                   progress=False, resume=True, checkpoint_every=2, checkpoint_seconds=None)
    vectors, _, result = training.train_on_embeddings(model_name=model_dir, embeddings=root.parent / "vectors.safetensors",
                                                      config=VECTORS, device="cpu", progress=False)
    if rank == 0:
        save_tensors(root / "vectors_lora.safetensors", trainable(vectors))
    vector_losses = result.losses
    train_writes = list(writes)

    # 2) evaluation: the entry, then score_requests in batches of 3 against this process scoring everything
    evaluation.evaluate(model_name=model_dir, configs=eval_configs(questions), output=str(root / "eval" / "results.json"),
                        log_samples=True, device="cpu", progress=False)
    eval_writes = writes[len(train_writes):]
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir, device="cpu")
    requests = build_requests(eval_configs(questions)[0])
    scored = []
    real_batch, real_one = evaluation._score_batch, evaluation.score_encoded
    evaluation._score_batch = lambda m, batch, *a: (scored.extend([1] * len(batch)), real_batch(m, batch, *a))[1]
    evaluation.score_encoded = lambda m, e, **k: (scored.append(1), real_one(m, e, **k))[1]
    shared = score_requests(model, tokenizer, requests, batch_size=3, sharded=True, progress=False)
    evaluation._score_batch, evaluation.score_encoded = real_batch, real_one
    alone = score_requests(model, tokenizer, requests, batch_size=3, progress=False)

    # 3) expert runs: experts 0 and 2 on rank 0, expert 1 on rank 1
    make_experts(model_name=model_dir, data=data, output=root / "experts", config=EXPERTS, device="cpu",
                 progress=False)
    expert_writes = writes[len(train_writes) + len(eval_writes):]

    if rank:
        builtins.open, os.replace = real_open, real_replace
    report = {"world": distributed.world_size(), "checkpoint_step": checkpoint, "vector_losses": vector_losses,
              "train_writes": train_writes,
              "eval_writes": eval_writes, "expert_writes": expert_writes, "scored": len(scored),
              "shared": [[list(s.loglik), list(s.is_greedy)] for s in shared],
              "alone": [[list(s.loglik), list(s.is_greedy)] for s in alone]}
    (root / f"rank{rank}.json").write_text(json.dumps(report))
    # leaving with the gloo group still up aborts a rank now and then ("terminate called without an active exception")
    distributed.barrier()
    torch.distributed.destroy_process_group()
""")


def eval_configs(questions: str) -> list[EvalConfig]:
    """One file task, 1-shot, so that contexts differ in length and the batches in size."""
    return [EvalConfig(task=questions, split="test", num_fewshot=1)]


def trainable(model) -> dict[str, torch.Tensor]:
    """The trained tensors of a model, by name."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def _save_token_vectors(path: pathlib.Path, model_dir: pathlib.Path, examples: list[Example]) -> None:
    """An embeddings file of a distill run whose prompt vectors are the prompts' own token embeddings."""
    tokenizer = load_tokenizer(str(model_dir))
    tokenized = tokenize_examples(tokenizer, examples, max_length=64)
    embed = input_embedding_matrix(load_model(str(model_dir), device="cpu"))      # (V, H)
    prompts = torch.zeros(len(tokenized), max(len(t.prompt_ids) for t in tokenized), embed.shape[1])
    responses = torch.zeros(len(tokenized), max(len(t.response_ids) for t in tokenized), dtype=torch.long)
    for i, t in enumerate(tokenized):
        prompts[i, : len(t.prompt_ids)] = embed[list(t.prompt_ids)]
        responses[i, : len(t.response_ids)] = torch.tensor(t.response_ids)
    save_tensors(path, {"prompt_embeds": prompts, "prompt_lengths": torch.tensor([len(t.prompt_ids) for t in tokenized]),
                        "response_ids": responses,
                        "response_lengths": torch.tensor([len(t.response_ids) for t in tokenized])})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir):
    """(one process's folder, the 2-rank job's folder), each with train/, eval/, experts/ and the continuous arm's
    LoRA tensors (vectors_lora.safetensors)."""
    root = tmp_path_factory.mktemp("stages")
    examples = [Example(prompt=f"Question: what colour is thing {i}?\nAnswer:", response=RESPONSES[i % len(RESPONSES)],
                        id=str(i)) for i in range(16)]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in examples))
    _save_token_vectors(root / "vectors.safetensors", tiny_llama_dir, examples)
    rows = mc_rows(14)
    rows[3]["choices"][1] = "a green hat that is much longer than the others"
    questions = str(write_jsonl(root / "questions.jsonl", rows))
    one, two = root / "one", root / "two"
    train(model_name=str(tiny_llama_dir), data=str(data), output=one / "train", config=TRAIN, device="cpu",
          progress=False)
    vectors, _, result = train_on_embeddings(model_name=str(tiny_llama_dir), embeddings=root / "vectors.safetensors",
                                             config=VECTORS, device="cpu", progress=False)
    save_tensors(one / "vectors_lora.safetensors", trainable(vectors))
    (one / "vector_losses.json").write_text(json.dumps(result.losses))
    evaluate(model_name=str(tiny_llama_dir), configs=eval_configs(questions), output=str(one / "eval" / "results.json"),
             log_samples=True, device="cpu", progress=False)
    make_experts(model_name=str(tiny_llama_dir), data=str(data), output=one / "experts", config=EXPERTS,
                 device="cpu", progress=False)
    two.mkdir()
    script = root / "job.py"
    script.write_text(_JOB)
    torchrun(script, pathlib.Path(__file__).parent, tiny_llama_dir, data, questions, two, nproc=2, timeout=150)
    return one, two


def _jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _report(two: pathlib.Path, rank: int) -> dict:
    return json.loads((two / f"rank{rank}.json").read_text())


def test_two_ranks_train_the_one_process_adapter(runs):
    one, two = runs
    assert _report(two, 0)["world"] == 2 and _report(two, 0)["checkpoint_step"] == 2
    mine, theirs = (load_tensors(run / "train" / "adapter_model.safetensors") for run in (one, two))
    assert set(mine) == set(theirs) and any("lora_B" in k for k in mine)
    for name, tensor in mine.items():
        assert tensor.abs().max() > 0, name                      # trained (LoRA B starts at zero)
        torch.testing.assert_close(theirs[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    records = [_jsonl(run / "train" / "metrics.jsonl") for run in (one, two)]
    assert [r["step"] for r in records[1]] == [1, 2, 3, 4, 5]
    for a, b in zip(*records):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert (b["tokens"], b["lr"], b["epoch"]) == (a["tokens"], a["lr"], a["epoch"])
    summaries = [json.loads((run / "train" / "summary.json").read_text()) for run in (one, two)]
    assert summaries[1]["last_loss"] == pytest.approx(summaries[0]["last_loss"], rel=1e-5)
    assert summaries[1]["tokens"] == summaries[0]["tokens"] and not (two / "train" / "checkpoint").exists()
    assert _report(two, 1)["train_writes"] == []


def test_two_ranks_train_on_vectors_as_one_process(runs):
    one, two = runs
    mine, theirs = (load_tensors(run / "vectors_lora.safetensors") for run in (one, two))
    assert set(mine) == set(theirs) and mine
    for name, tensor in mine.items():
        torch.testing.assert_close(theirs[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert _report(two, 0)["vector_losses"] == pytest.approx(json.loads((one / "vector_losses.json").read_text()),
                                                             rel=1e-5)


def test_two_ranks_score_what_one_process_scores(runs):
    one, two = runs
    docs = [json.loads((run / "eval" / "results.json").read_text()) for run in (one, two)]
    assert docs[1]["results"] == docs[0]["results"] and docs[1]["n-samples"] == docs[0]["n-samples"]
    samples = [_jsonl(next((run / "eval").glob("samples_*.jsonl"))) for run in (one, two)]
    assert len(samples[1]) == len(samples[0]) == 14
    for a, b in zip(*samples):
        assert b["loglik"] == pytest.approx(a["loglik"], rel=1e-6)
        assert {k: v for k, v in b.items() if k != "loglik"} == {k: v for k, v in a.items() if k != "loglik"}
    assert _report(two, 1)["eval_writes"] == []
    reports = [_report(two, rank) for rank in (0, 1)]
    # each rank scored a part of the questions, and both returned every score: the ones this process gets alone
    assert sorted(r["scored"] for r in reports)[0] > 0 and sum(r["scored"] for r in reports) == 14
    for report in reports:
        assert report["shared"] == report["alone"]


def test_two_ranks_make_the_one_process_experts(runs):
    one, two = runs
    for expert in range(EXPERTS.num_experts):
        folder = f"experts/expert_{expert:02d}"
        snapshots = sorted(p.name for p in (one / folder).glob("step_*.safetensors"))
        assert snapshots == sorted(p.name for p in (two / folder).glob("step_*.safetensors")) and len(snapshots) == 3
        for name in snapshots:
            mine, theirs = load_tensors(one / folder / name), load_tensors(two / folder / name)
            assert set(mine) == set(theirs)
            for key in mine:
                torch.testing.assert_close(theirs[key], mine[key], rtol=1e-5, atol=1e-7, msg=f"{folder}/{name} {key}")
        assert (one / folder / "data_order.json").read_text() == (two / folder / "data_order.json").read_text()
    manifests = [json.loads((run / "experts" / "manifest.json").read_text()) for run in (one, two)]
    for manifest in manifests:
        for entry in manifest["experts"]:
            entry.pop("seconds")
    assert manifests[1] == manifests[0] and [e["index"] for e in manifests[1]["experts"]] == [0, 1, 2]
    written = {pathlib.Path(p).relative_to(two / "experts").parts[0] for p in _report(two, 1)["expert_writes"]}
    assert written == {"expert_01"}
