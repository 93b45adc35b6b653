"""LESS's projection made once per run, features bit-identical to the earlier code path, and the gradient features
sharded over 2 gloo processes under torchrun (same scores and selection as one process, resumable)."""

from __future__ import annotations

import hashlib
import json
import math
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import mc_rows, write_jsonl
from launch import torchrun
from textdistill.config import LoraSettings, TrainConfig
from textdistill.data import Example, tokenize_examples
from textdistill.less import (LessConfig, RandomProjection, WarmupCheckpoint, adam_direction, flatten_grads,
                              gradient_features, less_scores, pack_bits, per_example_grads, select_less)
from textdistill.training import collate
from textdistill.unroll import lora_parameters

SEED = 5
PROJ_DIM = 24


def _rows(n: int) -> list[dict]:
    colours = ["blue", "red", "green", "yellow", "black", "white"]
    return [{"id": f"row{i}", "prompt": f"Question: what colour is the thing number {i}" + " really" * (i % 4)
             + "?\nAnswer:", "response": f" {colours[i % 6]}" + " indeed" * (i % 3)} for i in range(n)]


def _lora_model(model_dir):
    from textdistill.models import add_lora, load_model

    torch.manual_seed(0)
    return add_lora(load_model(str(model_dir), device="cpu"), LoraSettings()).eval()


# ----------------------------------------------------------------------------------------------------------------
# The code path before the projection cache, kept here as the reference (the matrix's definition included)
# ----------------------------------------------------------------------------------------------------------------

def _old_block(in_dim: int, out_dim: int, seed: int, kind: str, index: int, block_rows: int = 1024) -> torch.Tensor:
    digest = hashlib.blake2b(f"textdistill-less-projection:{seed}:{index}".encode(), digest_size=8).digest()
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    rows = min(block_rows, in_dim - index * block_rows)
    scale = 1.0 / math.sqrt(out_dim)
    if kind == "gaussian":
        return torch.randn((rows, out_dim), generator=generator).mul_(scale)
    bits = torch.randint(0, 2, (rows, out_dim), generator=generator, dtype=torch.int8)
    return bits.to(torch.float32).mul_(2.0 * scale).sub_(scale)


def _old_project(x: torch.Tensor, out_dim: int, seed: int, kind: str, block_rows: int = 1024) -> torch.Tensor:
    """Every block generated anew at every call (what each buffer flush did)."""
    out = torch.zeros((x.shape[0], out_dim))
    for b in range(math.ceil(x.shape[1] / block_rows)):
        block = _old_block(x.shape[1], out_dim, seed, kind, b, block_rows)
        out.addmm_(x[:, b * block_rows: b * block_rows + block.shape[0]], block)
    return out


def _old_features(model, examples, params, *, out_dim, seed, kind, pad_id, checkpoint=None, batch_size, buffer_size):
    names = list(params)
    moments = checkpoint.flat_moments() if checkpoint is not None else None
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    out = torch.zeros((len(examples), out_dim))
    rows, index = [], []

    def flush():
        if rows:
            out[torch.tensor(index)] = F.normalize(_old_project(torch.cat(rows), out_dim, seed, kind), dim=1)
            rows.clear()
            index.clear()

    for chunk in [order[s: s + batch_size] for s in range(0, len(order), batch_size)]:
        grads = flatten_grads(per_example_grads(model, params, collate([examples[i] for i in chunk], pad_id)),
                              names).detach()
        if moments is not None:
            grads = adam_direction(grads, *moments, betas=checkpoint.betas, eps=checkpoint.eps,
                                   step=checkpoint.adam_step)
        rows.append(grads)
        index.extend(chunk)
        if sum(r.shape[0] for r in rows) >= buffer_size:
            flush()
    flush()
    return out


@pytest.fixture(scope="module")
def tiny_setup(tiny_llama_dir, smollm_tokenizer):
    model = _lora_model(tiny_llama_dir)
    gen = torch.Generator().manual_seed(1)
    lora = lora_parameters(model)
    params = {n: torch.randn(t.shape, generator=gen) * 0.2 for n, t in lora.items()}
    checkpoint = WarmupCheckpoint(
        epoch=1, step=3, lr=1e-3, params=params, adam_step=3,
        exp_avg={n: torch.randn(t.shape, generator=gen) * 1e-3 for n, t in params.items()},
        exp_avg_sq={n: torch.rand(t.shape, generator=gen) * 1e-6 for n, t in params.items()})
    examples = tokenize_examples(smollm_tokenizer, [Example(r["prompt"], r["response"], r["id"]) for r in _rows(9)],
                                 max_length=64)
    num_params = sum(t.numel() for t in params.values())
    assert num_params > 1024            # at least two generation blocks of 1024 rows
    return {"model": model, "params": params, "checkpoint": checkpoint, "examples": examples,
            "pad_id": smollm_tokenizer.pad_token_id, "num_params": num_params}


# ----------------------------------------------------------------------------------------------------------------
# 1. the projection is generated once per run
# ----------------------------------------------------------------------------------------------------------------

def test_pack_bits_keeps_every_byte_pattern():
    patterns = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).to(torch.int8)     # (256, 8): bit j
    assert torch.equal(pack_bits(patterns), torch.arange(256).to(torch.uint8))
    odd = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 0, 1]], dtype=torch.int8)                # 9 entries: 2 bytes
    assert pack_bits(odd).tolist() == [0b00011101, 1]


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projection_blocks_are_generated_once_and_equal_fresh_ones(kind, monkeypatch):
    calls = []
    real = RandomProjection._generate
    monkeypatch.setattr(RandomProjection, "_generate", lambda self, index: calls.append(index) or real(self, index))
    p, d = 70, 13                      # 70 * 13 bits is not a whole number of bytes: the packing pads
    proj = RandomProjection(p, d, seed=3, kind=kind, block_rows=16)
    x = torch.randn(5, p)
    first = proj.project(x)
    for _ in range(3):
        assert torch.equal(proj.project(x), first)
    assert sorted(calls) == list(range(proj.num_blocks)) == list(range(5)) and proj.blocks_generated == 5
    # the cached blocks hold exactly the values a fresh generator makes, and so does the projection
    for b in range(proj.num_blocks):
        assert torch.equal(proj.block(b), _old_block(p, d, 3, kind, b, block_rows=16))
    assert torch.equal(first, _old_project(x, d, 3, kind, block_rows=16))
    assert torch.equal(proj.rows(), torch.cat([_old_block(p, d, 3, kind, b, 16) for b in range(5)]))
    assert torch.equal(proj.rows(5, 40), torch.cat([_old_block(p, d, 3, kind, b, 16) for b in range(5)])[5:40])
    assert proj.cached_bytes == (math.ceil(16 * d / 8) * 4 + math.ceil(6 * d / 8) if kind == "rademacher"
                                 else p * d * 4)
    # without a cache every use generates the blocks again (the counter can tell)
    calls.clear()
    bare = RandomProjection(p, d, seed=3, kind=kind, block_rows=16, cache_bytes=0)
    assert torch.equal(bare.project(x), first) and torch.equal(bare.project(x), first)
    assert len(calls) == 10 and bare.cached_bytes == 0
    # a budget for part of the matrix keeps what fits and regenerates the rest
    calls.clear()
    half = RandomProjection(p, d, seed=3, kind=kind, block_rows=16, cache_bytes=proj.cached_bytes // 2)
    assert torch.equal(half.project(x), first) and torch.equal(half.project(x), first)
    assert 5 < len(calls) < 10


def test_less_scores_generate_the_projection_once_over_flushes_and_checkpoints(tiny_setup, monkeypatch):
    s = tiny_setup
    calls = []
    real = RandomProjection._generate
    monkeypatch.setattr(RandomProjection, "_generate", lambda self, index: calls.append(index) or real(self, index))
    proj = RandomProjection(s["num_params"], PROJ_DIM, seed=SEED)
    second = WarmupCheckpoint(**{**s["checkpoint"].__dict__, "epoch": 2, "lr": 5e-4})
    # 9 pool rows and 4 validation rows, batches of 2, a flush once 3 rows wait: 3 + 1 flushes per checkpoint, 8 in
    # all (the projection was generated at each of them before)
    result = less_scores(s["model"], s["examples"], s["examples"][:4], [s["checkpoint"], second], proj,
                         pad_id=s["pad_id"], batch_size=2, buffer_size=3)
    assert torch.isfinite(result.scores).all()
    assert sorted(calls) == list(range(proj.num_blocks)) and proj.num_blocks >= 2


# ----------------------------------------------------------------------------------------------------------------
# 2. features bit-identical to the earlier code path
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, pool_side", [("rademacher", True), ("rademacher", False), ("gaussian", True)])
def test_features_are_bit_identical_to_the_earlier_code_path(tiny_setup, kind, pool_side):
    s = tiny_setup
    checkpoint = s["checkpoint"] if pool_side else None
    proj = RandomProjection(s["num_params"], PROJ_DIM, seed=SEED, kind=kind)
    for buffer_size in (3, 100):                 # several flushes (blocks reused), then one
        got = gradient_features(s["model"], s["examples"], s["params"], proj, pad_id=s["pad_id"],
                                checkpoint=checkpoint, batch_size=2, buffer_size=buffer_size)
        expected = _old_features(s["model"], s["examples"], s["params"], out_dim=PROJ_DIM, seed=SEED, kind=kind,
                                 pad_id=s["pad_id"], checkpoint=checkpoint, batch_size=2, buffer_size=buffer_size)
        assert got.abs().sum() > 0
        assert torch.equal(got, expected), float((got - expected).abs().max())
    assert proj.blocks_generated == proj.num_blocks


# ----------------------------------------------------------------------------------------------------------------
# 3. 2 ranks under torchrun: the same scores and selection as one process, and resumable
# ----------------------------------------------------------------------------------------------------------------

SCRIPT = textwrap.dedent('''
    import json, sys, torch
    import textdistill.less as less
    from textdistill import distributed
    from textdistill.config import TrainConfig

    data, target, model, out, report = sys.argv[1:6]
    config = less.LessConfig(target=target, warmup_fraction=0.5, warmup_epochs=2, projection_dim=24,
                             max_val_examples=4, batch_size=2, buffer_size=3,
                             warmup=TrainConfig(lr=5e-3, batch_size=2, warmup_ratio=0.0, precision="fp32"))
    kwargs = dict(data=data, budget=4, output=out, seed=5, model=model, config=config, device="cpu",
                  progress=False)
    real_features, real_train, real_grads = less.gradient_features, less.train_model, less.per_example_grads
    counts = {"features": 0, "train": 0, "crash_at": 3, "rows": 0}

    def features(*args, **kw):
        counts["features"] += 1
        if counts["features"] == counts["crash_at"]:   # every rank: checkpoint 2's validation features
            raise KeyboardInterrupt("simulated kill")
        return real_features(*args, **kw)

    def train(*args, **kw):
        counts["train"] += 1
        return real_train(*args, **kw)

    def grads(model, params, batch):
        counts["rows"] += batch["input_ids"].shape[0]
        return real_grads(model, params, batch)

    less.gradient_features, less.train_model, less.per_example_grads = features, train, grads
    try:
        less.select_less(**kwargs)
        raise SystemExit("the first run should have been interrupted")
    except KeyboardInterrupt:
        pass
    partial = sorted(p.name for p in (__import__("pathlib").Path(out).parent / (".less.json.partial")).iterdir())
    distributed.barrier()
    counts.update(features=0, train=0, crash_at=-1, rows=0)
    result = less.select_less(**kwargs)
    resumed = dict(counts)
    # the features of every row computed by 2 ranks and by this rank alone
    tok = less.load_tokenizer(model)
    rows = [json.loads(line) for line in open(data)]
    examples = less.tokenize_examples(tok, [less.Example(r["prompt"], r["response"], r["id"]) for r in rows],
                                      max_length=256)
    net = less.add_lora(less.load_model(model, device="cpu"), TrainConfig().lora).eval()
    params = {n: p.detach() + 0.1 for n, p in net.named_parameters() if p.requires_grad}
    proj = less.RandomProjection(sum(p.numel() for p in params.values()), 24, seed=5)
    both = less.gradient_features(net, examples, params, proj, pad_id=tok.pad_token_id, batch_size=2,
                                  buffer_size=3, shard=True)
    alone = less.gradient_features(net, examples, params, proj, pad_id=tok.pad_token_id, batch_size=2,
                                   buffer_size=3)
    info = {"rank": distributed.rank(), "world": distributed.world_size(), "result": result,
            "resumed_features_calls": resumed["features"], "resumed_train_calls": resumed["train"],
            "resumed_rows": resumed["rows"],
            "partial": partial, "feature_diff": float((both - alone).abs().max()), "feature_equal":
            bool(torch.equal(both, alone)), "generated": proj.blocks_generated, "blocks": proj.num_blocks}
    gathered = distributed.all_gather_objects(info)
    if distributed.is_main():
        json.dump(gathered, open(report, "w"), default=str)
    distributed.barrier()
''')


def test_two_ranks_select_the_same_as_one_process_and_resume(tiny_llama_dir, tmp_path):
    target = write_jsonl(tmp_path / "target.jsonl", mc_rows(4))
    data = tmp_path / "pool.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(12)))
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    two = tmp_path / "two" / "less.json"
    two.parent.mkdir()
    torchrun(script, data, target, tiny_llama_dir, two, tmp_path / "report.json", nproc=2, timeout=240)
    ranks = json.loads((tmp_path / "report.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)

    one = tmp_path / "one" / "less.json"
    config = LessConfig(target=str(target), warmup_fraction=0.5, warmup_epochs=2, projection_dim=PROJ_DIM,
                        max_val_examples=4, batch_size=2, buffer_size=3,
                        warmup=TrainConfig(lr=5e-3, batch_size=2, warmup_ratio=0.0, precision="fp32"))
    expected = select_less(data=str(data), budget=4, output=one, seed=SEED, model=str(tiny_llama_dir),
                      config=config, device="cpu", progress=False)
    reference = json.loads(one.read_text())
    written = json.loads(two.read_text())
    scores = torch.tensor(reference["all_scores"])
    assert scores.std() > 0
    for r in ranks:       # every rank returns the same scores, those of one process to float rounding
        got = torch.tensor(r["result"]["all_scores"])
        torch.testing.assert_close(got, scores, rtol=1e-4, atol=1e-4 * float(scores.abs().max()))
        assert r["result"]["indices"] == expected["indices"]
    # rank 0's file: the one-process selection; the unfinished work is gone
    assert written["indices"] == reference["indices"] and written["ids"] == reference["ids"]
    torch.testing.assert_close(torch.tensor(written["all_scores"]), scores, rtol=1e-4,
                               atol=1e-4 * float(scores.abs().max()))
    assert written["checkpoint_lrs"] == pytest.approx(reference["checkpoint_lrs"])
    assert not (two.parent / ".less.json.partial").exists()
    # the interrupted run had left its warm-up and checkpoint 1's scores; the rerun continued from them: no
    # warm-up, only checkpoint 2's validation and pool features
    assert "scores-1.safetensors" in ranks[0]["partial"] and "scores-2.safetensors" not in ranks[0]["partial"]
    assert "warmup-epoch2.safetensors" in ranks[0]["partial"]
    assert all(r["resumed_train_calls"] == 0 and r["resumed_features_calls"] == 2 for r in ranks), [
        (r["resumed_train_calls"], r["resumed_features_calls"]) for r in ranks]
    # each rank computed the gradients of its half of checkpoint 2's rows: 2 of 4 validation rows, 6 of 12 pool rows
    assert [r["resumed_rows"] for r in ranks] == [8, 8]
    # features sharded over 2 ranks equal those of one rank alone to float rounding; each rank made R once
    assert all(r["feature_diff"] < 1e-5 for r in ranks), [r["feature_diff"] for r in ranks]
    assert all(r["generated"] == r["blocks"] for r in ranks)
