"""LESS: per-example gradients, the Adam direction, the projection, scores against a naive computation, checks."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import mc_rows, write_jsonl
from textdistill.config import LoraSettings, TaskFields, TrainConfig
from textdistill.data import Example, item_to_example, load_task, tokenize_examples
from textdistill.errors import ConfigError, DataError, ModelError
from textdistill.less import (LessConfig, RandomProjection, WarmupCheckpoint, adam_direction, flatten_grads,
                              per_example_grads, select_less, target_examples)
from textdistill.selection import apply_selection, read_selection, reselect, select_random
from textdistill.training import collate, lr_multiplier, response_loss
from textdistill.unroll import lora_parameters

SEED = 3
PROJ_DIM = 32


def _rows(n: int = 12) -> list[dict]:
    colours = ["blue", "red", "green", "yellow", "black", "white"]
    return [{"id": f"row{i}", "prompt": f"Question: what colour is the thing number {i}" + " really" * (i % 4)
             + "?\nAnswer:", "response": f" {colours[i % 6]}" + " indeed" * (i % 3)} for i in range(n)]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _eval_rows() -> list[dict]:
    """Two ARC-Easy validation items, as pool rows (what a contaminated pool would hold)."""
    items = load_task("arc-easy", "validation", limit=2)
    return [{"id": f"leak{i}", "prompt": item_to_example(it).prompt, "response": item_to_example(it).response}
            for i, it in enumerate(items)]


@pytest.fixture()
def no_model_loading(monkeypatch):
    """Make any model or tokenizer load fail loudly: the test proves validation happens first."""
    import textdistill.less as less

    def refuse(*args, **kwargs):
        raise AssertionError("a model/tokenizer was loaded before the configuration was validated")

    monkeypatch.setattr(less, "load_model", refuse)
    monkeypatch.setattr(less, "load_tokenizer", refuse)


def _lora_model(model_dir, seed: int = 0):
    from textdistill.models import add_lora, load_model

    torch.manual_seed(seed)
    model = add_lora(load_model(str(model_dir), device="cpu"), LoraSettings())
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# 1. vmap per-example gradients == one backward per example
# ----------------------------------------------------------------------------------------------------------------

def test_vmap_per_example_grads_match_naive_loop(tiny_llama_dir, smollm_tokenizer):
    tok = smollm_tokenizer
    model = _lora_model(tiny_llama_dir)
    gen = torch.Generator().manual_seed(1)
    # random (non-zero) LoRA tensors so that both A and B get gradients
    params = {n: torch.randn(t.shape, generator=gen) * 0.2 for n, t in lora_parameters(model).items()}
    rows = _rows(6)
    rows[0]["prompt"] = "Hi:"  # a short prompt, so padding and the logits window are exercised
    examples = tokenize_examples(tok, [Example(r["prompt"], r["response"], r["id"]) for r in rows], max_length=64)
    assert len({len(e.input_ids) for e in examples}) > 2
    batched = per_example_grads(model, params, collate(examples, tok.pad_token_id))

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in params:
                p.copy_(params[name])
    trainable = [p for n, p in model.named_parameters() if n in params]
    for row, example in enumerate(examples):
        loss, _ = response_loss(model, collate([example], tok.pad_token_id))   # unpadded, one example
        naive = torch.autograd.grad(loss, trainable)
        for (name, expected) in zip(params, naive):
            got = batched[name][row]
            assert got.shape == expected.shape
            scale = expected.abs().max()
            assert scale > 0
            assert (got - expected).abs().max() <= 5e-5 * scale, (name, row)   # float32 summation order
    # the per-example gradients really differ between examples (no batch averaging)
    flat = flatten_grads(batched, list(params))
    assert not torch.allclose(flat[0], flat[1])


def test_adam_direction_is_adamw_update():
    """With bias correction, the direction is exactly what torch's AdamW step does (lr = 1, no weight decay)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.AdamW([p], lr=1.0, weight_decay=0.0, betas=(0.8, 0.95), eps=0.05)   # eps large enough to matter
    for _ in range(3):
        opt.zero_grad()
        (p.square() * torch.arange(5.0)).sum().backward()
        opt.step()
    state = opt.state[p]
    m, v, step = state["exp_avg"].clone(), state["exp_avg_sq"].clone(), int(state["step"])
    g = torch.randn(5)
    before = p.detach().clone()
    p.grad = g.clone()
    opt.step()
    expected = before - p.detach()
    got = adam_direction(g.unsqueeze(0), m, v, betas=(0.8, 0.95), eps=0.05, step=step, bias_correction=True)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    plain = adam_direction(g.unsqueeze(0), m, v, betas=(0.8, 0.95), eps=0.05)[0]
    manual = (0.8 * m + 0.2 * g) / ((0.95 * v + 0.05 * g * g).sqrt() + 0.05)
    torch.testing.assert_close(plain, manual)


# ----------------------------------------------------------------------------------------------------------------
# 2 + 4. LESS end to end against a naive computation; budget and decontamination of the selection
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def less_run(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("less")
    rows = _rows(6) + _eval_rows()            # 8 rows, the last two repeat ARC-Easy validation prompts
    data = _write_jsonl(folder / "pool.jsonl", rows)
    output = folder / "less.json"
    with pytest.warns(UserWarning, match="repeat a arc-easy evaluation prompt"):
        config = LessConfig(target="arc-easy:validation", warmup_fraction=0.25, warmup_epochs=2,
                            projection_dim=PROJ_DIM, max_val_examples=2, batch_size=4, buffer_size=5,
                            warmup=TrainConfig(lr=5e-3, batch_size=2, warmup_ratio=0.0, schedule="linear"),
                            keep_checkpoints=True)
        result = select_less(data=data, budget="50%", output=output, seed=SEED, model=str(tiny_llama_dir),
                        config=config, device="cpu", progress=False)
    return {"rows": rows, "data": data, "output": output, "result": result, "record": read_selection(output)}


def test_less_scores_match_naive_computation(less_run, tiny_llama_dir, smollm_tokenizer):
    tok = smollm_tokenizer
    record, result = less_run["record"], less_run["result"]
    folder = result["checkpoint_dir"]
    checkpoints = [WarmupCheckpoint.load(folder / f"warmup-epoch{e}.safetensors") for e in (1, 2)]
    # 4 warm-up rows, batch 2 -> 2 steps per epoch; linear decay over 4 steps, lr of step s = 5e-3 * (1 - (s-1)/4)
    assert [c.step for c in checkpoints] == [2, 4]
    for c, steps in zip(checkpoints, ((0, 1), (2, 3))):
        assert c.lr == pytest.approx(sum(5e-3 * lr_multiplier(s, 4, 0, "linear") for s in steps) / 2)
        assert c.adam_step == c.step
    assert record["checkpoint_lrs"] == pytest.approx([c.lr for c in checkpoints])
    assert record["num_checkpoints"] == 2 and record["projection_dim"] == PROJ_DIM
    assert record["target"] == "arc-easy:validation" and record["projection_seed"] == SEED

    pool = tokenize_examples(tok, [Example(r["prompt"], r["response"], r["id"]) for r in less_run["rows"]],
                             max_length=256)
    val = tokenize_examples(tok, target_examples("arc-easy", "validation", max_examples=2, seed=SEED), max_length=256)
    assert record["val_examples"] == 2
    model = _lora_model(tiny_llama_dir)
    names = checkpoints[0].names
    trainable = dict(model.named_parameters())
    num_params = sum(t.numel() for t in checkpoints[0].params.values())
    matrix = RandomProjection(num_params, PROJ_DIM, seed=SEED).rows()        # (P, d), generated in one go

    def naive_grad(example):
        loss, _ = response_loss(model, collate([example], tok.pad_token_id))
        grads = torch.autograd.grad(loss, [trainable[n] for n in names])
        return torch.cat([g.reshape(-1) for g in grads])

    expected = torch.zeros(len(pool))
    for c in checkpoints:
        with torch.no_grad():
            for n in names:
                trainable[n].copy_(c.params[n])
        m = torch.cat([c.exp_avg[n].reshape(-1) for n in names])
        v = torch.cat([c.exp_avg_sq[n].reshape(-1) for n in names])
        b1, b2 = c.betas
        val_feats = [F.normalize(naive_grad(e) @ matrix, dim=0) for e in val]
        for i, example in enumerate(pool):
            g = naive_grad(example)
            update = (b1 * m + (1 - b1) * g) / ((b2 * v + (1 - b2) * g * g).sqrt() + c.eps)
            feat = update @ matrix
            cos = torch.stack([F.cosine_similarity(feat, u, dim=0) for u in val_feats]).mean()
            expected[i] += c.lr * cos
    got = torch.tensor(record["all_scores"])
    assert expected.abs().max() > 0 and expected.std() > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    # the selection is the top half of the rows that are not evaluation items, best first
    eligible = sorted(range(6), key=lambda i: -float(expected[i]))
    assert set(record["indices"]) == set(eligible[:4])
    assert record["scores"] == sorted(record["scores"], reverse=True)


def test_less_selection_respects_budget_and_excludes_eval_items(less_run):
    record, rows = less_run["record"], less_run["rows"]
    indices = record["indices"]
    assert record["method"] == "less" and record["count"] == 4 == len(indices) == len(set(indices))
    assert record["ids"] == [rows[i]["id"] for i in indices]
    assert record["excluded_eval_overlap"] == ["leak0", "leak1"]
    eval_prompts = {item_to_example(it).prompt for split in ("validation", "test")
                    for it in load_task("arc-easy", split)}
    assert not any(rows[i]["prompt"] in eval_prompts for i in indices)
    # the leaked rows were scored but can never be chosen, even when they score highest
    assert all(i < 6 for i in indices)
    # the file is usable for training
    from textdistill.data import load_examples

    chosen = apply_selection(load_examples(less_run["data"]), less_run["output"])
    assert [e.id for e in chosen] == record["ids"]


def test_less_budget_larger_than_clean_pool_fails_before_model(less_run, tiny_llama_dir, tmp_path, monkeypatch):
    import textdistill.less as less

    monkeypatch.setattr(less, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    with pytest.raises(ConfigError, match=r"larger than the 6 pool rows left after removing 2"):
        select_less(data=less_run["data"], budget=7, output=tmp_path / "x.json",
               model=str(tiny_llama_dir), config=LessConfig(target="arc-easy:validation"), device="cpu",
               progress=False)
    assert not (tmp_path / "x.json").exists()


def test_less_scores_cut_to_another_budget_without_model_work(less_run, tmp_path, monkeypatch):
    """One LESS scoring run serves every budget: the smaller selection is the top of the same ranking, the
    evaluation-overlap rows stay excluded even if they score highest, and no model is loaded."""
    import textdistill.less as less
    from textdistill.data import load_examples

    monkeypatch.setattr(less, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    record = less_run["record"]
    pool = load_examples(less_run["data"])
    scores = list(record["all_scores"])
    scores[6] = scores[7] = max(scores) + 1.0                  # make the two leaked rows the best scored
    boosted = dict(record, all_scores=scores)
    source = tmp_path / "boosted.json"
    source.write_text(json.dumps(boosted))
    out = tmp_path / "less-2.json"
    result = select_less(data=less_run["data"], budget=2, output=out, scores_from=source)
    cut = read_selection(out)
    assert result["count"] == 2 and cut["indices"] == record["indices"][:2]
    assert cut["reselected_from"] == str(source) and cut["budget"] == "2"
    assert cut["excluded_eval_overlap"] == ["leak0", "leak1"] and cut["all_scores"] == scores
    with pytest.raises(ConfigError, match=r"larger than the 6 pool rows left after removing 2"):
        select_less(data=less_run["data"], budget=7, output=tmp_path / "x.json", scores_from=source)
    random_file = tmp_path / "random.json"
    select_random(data=less_run["data"], budget=2, output=random_file)
    with pytest.raises(DataError, match="not a LESS selection with 'all_scores'"):
        select_less(data=less_run["data"], budget=2, output=tmp_path / "y.json", scores_from=random_file)
    with pytest.raises(DataError, match="scored 8 rows, the pool has 5"):
        reselect(source, 2, tmp_path / "z.json", pool[:5])
    renamed = [type(e)(e.prompt, e.response, f"other{i}") for i, e in enumerate(pool)]
    with pytest.raises(DataError, match="scored on another pool of 8 rows"):
        reselect(source, 2, tmp_path / "z.json", renamed)
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "y.json").exists()


def test_less_target_can_be_a_multiple_choice_file(tiny_llama_dir, tmp_path):
    """A 10-row file (other field names) as the LESS target: its rows are the validation examples and pool rows that
    repeat one of its prompts are never selected."""
    rows = [{"q": r["question"], "options": r["choices"], "label": r["answer"]} for r in mc_rows(10, "letter")]
    target = write_jsonl(tmp_path / "target.jsonl", rows)
    leak = {"id": "leak", "prompt": f"Question: {rows[0]['q']}\nAnswer:", "response": " red ball"}
    data = _write_jsonl(tmp_path / "pool.jsonl", _rows(5) + [leak])
    config = LessConfig(target=str(target), target_fields=TaskFields(question="q", choices="options", answer="label"),
                        warmup_fraction=0.5, warmup_epochs=1, projection_dim=PROJ_DIM, max_val_examples=4,
                        warmup=TrainConfig(batch_size=2))
    with pytest.warns(UserWarning, match="1 pool rows repeat a .*target.jsonl evaluation prompt"):
        result = select_less(data=data, budget=5, output=tmp_path / "less.json", model=str(tiny_llama_dir),
                        config=config, device="cpu", progress=False)
    record = read_selection(tmp_path / "less.json")
    assert record["target"] == f"{target}:test" and record["val_examples"] == 4
    assert record["excluded_eval_overlap"] == ["leak"] and sorted(result["indices"]) == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match=r"row 0: missing field 'question'"):
        select_less(data=data, budget=2, output=tmp_path / "x.json", model=str(tiny_llama_dir),
               config=dataclasses.replace(config, target_fields=None), device="cpu", progress=False)


# ----------------------------------------------------------------------------------------------------------------
# 3. the random projection
# ----------------------------------------------------------------------------------------------------------------

def test_projection_is_seeded_and_chunk_independent():
    p, d = 50, 16
    a = RandomProjection(p, d, seed=7, block_rows=8)
    full = a.rows()
    assert full.shape == (p, d)
    torch.testing.assert_close(RandomProjection(p, d, seed=7, block_rows=8).rows(), full, rtol=0, atol=0)
    assert not torch.equal(RandomProjection(p, d, seed=8, block_rows=8).rows(), full)
    # Rademacher entries are +-1/sqrt(d), both signs present
    assert set(full.mul(math.sqrt(d)).round().unique().tolist()) == {-1.0, 1.0}
    # any split of the rows (not aligned with the generation blocks) gives the same matrix
    cuts = [0, 3, 11, 12, 29, 50]
    pieces = torch.cat([a.rows(lo, hi) for lo, hi in zip(cuts, cuts[1:])])
    torch.testing.assert_close(pieces, full, rtol=0, atol=0)
    x = torch.randn(4, p)
    torch.testing.assert_close(a.project(x), x @ full, rtol=1e-5, atol=1e-6)
    gauss = RandomProjection(p, d, seed=7, kind="gaussian", block_rows=8)
    torch.testing.assert_close(gauss.project(x), x @ gauss.rows(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(gauss.rows(), full)
    with pytest.raises(ConfigError, match="unknown projection"):
        RandomProjection(p, d, kind="sparse")


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projection_roughly_preserves_inner_products(kind):
    gen = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(8, 3000, generator=gen), dim=1)
    x[1] = F.normalize(x[0] + 0.5 * x[1], dim=0)                  # one strongly correlated pair
    proj = RandomProjection(3000, 4096, seed=1, kind=kind)
    y = proj.project(x)
    torch.testing.assert_close(y @ y.T, x @ x.T, rtol=0, atol=0.1)
    cos = F.normalize(y, dim=1) @ F.normalize(y, dim=1).T
    torch.testing.assert_close(cos, x @ x.T, rtol=0, atol=0.1)


# ----------------------------------------------------------------------------------------------------------------
# 5. bad configurations fail before any work
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, error, message", [
    ({"budget": 13}, ConfigError, r"larger than the pool \(12 samples\)"),
    ({"budget": "0%"}, ConfigError, r"must be in \(0%, 100%\]"),
    ({"budget": "2.5"}, ConfigError, "whole count"),
    ({"target": "mmlu:train"}, DataError, "task 'mmlu' has no split 'train'"),
    ({"target": "arc-easy:dev"}, DataError, "task 'arc-easy' has no split 'dev'"),
    ({"target": "arc-easy"}, ConfigError, "names no split"),
    ({"target": "gsm8k:test"}, DataError, "unknown task 'gsm8k'; named tasks: arc-easy"),
    ({"target": "missing.jsonl"}, DataError, "task file not found: missing.jsonl"),
    ({"target": None}, ConfigError, "LESS needs a target"),
    ({"model": None}, ConfigError, "LESS needs a model"),
    ({"model": "/nonexistent/model-folder"}, ModelError, "model folder not found"),
    ({"warmup_epochs": 0}, ConfigError, "warmup_epochs must be a positive whole number"),
    ({"warmup_fraction": 1.5}, ConfigError, r"warmup_fraction must be in \(0, 1\]"),
    ({"projection_dim": 0}, ConfigError, "projection_dim must be a positive integer"),
    ({"max_val_examples": 0}, ConfigError, "max_val_examples must be a positive integer"),
    ({"warmup": TrainConfig(optimizer="sgd")}, ConfigError, "needs AdamW"),
    ({"data": "missing-file.jsonl"}, DataError, "dataset not found"),
])
def test_bad_less_configs_fail_before_any_model_work(tmp_path, tiny_llama_dir, no_model_loading, overrides, error,
                                                    message):
    kwargs = {"data": _write_jsonl(tmp_path / "pool.jsonl", _rows(12)), "budget": 4,
              "output": tmp_path / "sel.json", "model": str(tiny_llama_dir), "target": "arc-easy:validation",
              "device": "cpu", "progress": False}
    kwargs.update(overrides)
    if kwargs["data"] == "missing-file.jsonl":
        kwargs["data"] = str(tmp_path / "missing-file.jsonl")
    options = {f.name: kwargs.pop(f.name) for f in dataclasses.fields(LessConfig) if f.name in kwargs}
    with pytest.raises(error, match=message):
        select_less(config=LessConfig(**options), **kwargs)
    assert not (tmp_path / "sel.json").exists()


@pytest.mark.parametrize("options, message", [
    ({"warmup_fraction": 0.0}, r"warmup_fraction must be in \(0, 1\]"),
    ({"warmup_epochs": 1.5}, "warmup_epochs must be a positive whole number"),
    ({"projection_dim": True}, "projection_dim must be a positive integer"),
    ({"projection": "sparse"}, "unknown projection 'sparse'; use rademacher or gaussian"),
    ({"max_val_examples": 0}, r"max_val_examples must be a positive integer or None \(all\)"),
    ({"batch_size": 0}, "batch_size and buffer_size must be positive, got 0 and 512"),
    ({"buffer_size": 0}, "batch_size and buffer_size must be positive, got 8 and 0"),
])
def test_less_config_checks_itself_with_one_line_errors(options, message):
    with pytest.raises(ConfigError, match=message) as caught:
        LessConfig(**options)
    assert "\n" not in str(caught.value)


def test_a_pool_row_with_nan_gradients_is_never_selected_and_the_file_stays_json(tiny_llama_dir, tmp_path,
                                                                                   monkeypatch):
    """A NaN in one pool row's gradient features (injected at the pool side of every checkpoint): the row gets no
    score (null in all_scores, listed in gradient_faults), is not selected even with the budget of the whole clean
    pool but one, and a cut to another budget keeps it out."""
    import textdistill.less as less_module

    target = write_jsonl(tmp_path / "target.jsonl", mc_rows(4))
    data = _write_jsonl(tmp_path / "pool.jsonl", _rows(6))
    real = less_module.per_example_grads

    def poisoned(model, params, batch):
        grads = real(model, params, batch)
        if batch["input_ids"].shape[0] == 6:   # the pool's one batch (the target has 4 rows)
            first = next(iter(grads))
            grads[first][2] = float("nan")     # the row of the third example in the batch
        return grads

    monkeypatch.setattr(less_module, "per_example_grads", poisoned)
    config = LessConfig(target=str(target), warmup_fraction=0.5, warmup_epochs=1, projection_dim=PROJ_DIM,
                        max_val_examples=4, batch_size=8, warmup=TrainConfig(batch_size=2))
    with pytest.warns(UserWarning, match="1 pool row.*NaN/inf LESS gradients"):
        result = select_less(data=data, budget=5, output=tmp_path / "less.json", model=str(tiny_llama_dir),
                        config=config, device="cpu", progress=False)
    record = json.loads((tmp_path / "less.json").read_text())    # strict JSON: no NaN
    assert len(record["gradient_faults"]) == 1
    bad = [i for i, s in enumerate(record["all_scores"]) if s is None]
    assert len(bad) == 1 and bad[0] not in result["indices"] and len(result["indices"]) == 5
    from textdistill.data import load_examples

    cut = reselect(tmp_path / "less.json", 5, tmp_path / "cut.json", load_examples(str(data)))
    assert bad[0] not in cut["indices"]
    with pytest.raises(ConfigError, match="5 pool rows left"):   # the unscored row is never a filler
        reselect(tmp_path / "less.json", 6, tmp_path / "all.json", load_examples(str(data)))
