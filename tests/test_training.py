"""The explicit training loop: response-only loss, loss goes down, schedules, NaN guard, run folder."""

from __future__ import annotations

import json
import math

import pytest
import torch

from textdistill.config import DataSettings, LoraSettings, TrainConfig
from textdistill.data import Example, tokenize_examples
from textdistill.errors import TrainingError
from textdistill.models import add_lora, load_model, load_tokenizer
from textdistill.training import collate, lr_multiplier, response_loss, train, train_model


def _examples():
    return [Example(prompt=f"Question: what colour is thing {i}?\nAnswer:", response=" blue", id=str(i))
            for i in range(16)]


def test_loss_covers_response_tokens_only(tiny_llama_dir):
    tok = load_tokenizer(str(tiny_llama_dir))
    model = load_model(str(tiny_llama_dir), device="cpu")
    tokenized = tokenize_examples(tok, _examples()[:3], max_length=64)
    batch = collate(tokenized, tok.pad_token_id)
    loss, count = response_loss(model, batch)
    # naive: sum of -log p(response token | everything before it), over response tokens only
    logprobs = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    total, n = 0.0, 0
    for row, ex in enumerate(tokenized):
        start = len(ex.prompt_ids)
        for pos, token in enumerate(ex.response_ids):
            total -= logprobs[row, start + pos - 1, token].item()
            n += 1
    assert count == n
    assert loss.item() == pytest.approx(total / n, rel=1e-5)
    # prompt tokens are masked: changing them in the labels tensor changes nothing
    assert (batch["labels"][0, : len(tokenized[0].prompt_ids)] == -100).all()


def test_training_lowers_the_loss(tiny_llama_dir):
    tok = load_tokenizer(str(tiny_llama_dir))
    tokenized = tokenize_examples(tok, _examples(), max_length=64)
    # full fine-tuning: a random 32-wide model with tied embeddings can fit the constant response
    model = load_model(str(tiny_llama_dir), device="cpu")
    for p in model.parameters():
        p.requires_grad_(True)
    result = train_model(model, tokenized, TrainConfig(method="full", lr=1e-2, max_steps=12, batch_size=8,
                                                       warmup_ratio=0.0, schedule="constant"),
                         pad_id=tok.pad_token_id, progress=False)
    assert result.losses[-1] < 0.7 * result.losses[0]


def test_lora_training_changes_only_lora_tensors_and_lowers_the_loss(tiny_llama_dir):
    tok = load_tokenizer(str(tiny_llama_dir))
    model = add_lora(load_model(str(tiny_llama_dir), device="cpu"),
                     LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj", "o_proj", "down_proj")))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_model(model, tokenize_examples(tok, _examples(), max_length=64),
                         TrainConfig(lr=1e-2, max_steps=8, batch_size=8, warmup_ratio=0.0, schedule="constant"),
                         pad_id=tok.pad_token_id, progress=False)
    assert result.losses[-1] < result.losses[0] - 0.1
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == ("lora_B" in name or "lora_A" in name), name


def test_nan_loss_every_step_stops_with_a_clear_error(tiny_llama_dir):
    tok = load_tokenizer(str(tiny_llama_dir))
    model = add_lora(load_model(str(tiny_llama_dir), device="cpu"), LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        model.get_base_model().model.norm.weight.fill_(float("nan"))
    rows = tokenize_examples(tok, _examples(), max_length=64)
    with pytest.warns(UserWarning), pytest.raises(TrainingError, match=r"loss became nan at step 3 \(3 faulty"):
        train_model(model, rows, TrainConfig(max_steps=5), pad_id=tok.pad_token_id, progress=False)
    with pytest.warns(UserWarning), pytest.raises(TrainingError, match="every one of the 2 training steps"):
        train_model(model, rows, TrainConfig(max_steps=2), pad_id=tok.pad_token_id, progress=False)
    assert all(torch.isfinite(p).all() for n, p in model.named_parameters() if "lora_" in n)


def test_a_nan_step_is_skipped_and_training_goes_on(tiny_llama_dir, monkeypatch):
    import textdistill.training as module

    tok = load_tokenizer(str(tiny_llama_dir))
    model = add_lora(load_model(str(tiny_llama_dir), device="cpu"), LoraSettings(r=4, alpha=8))
    real, calls, seen = module.response_loss, [], {}

    def nan_at_second_step(model, batch):
        calls.append(1)
        loss, extra = real(model, batch)
        return (loss * float("nan") if len(calls) == 2 else loss), extra

    def snapshot(step, model, optimizer):
        seen[step] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    monkeypatch.setattr(module, "response_loss", nan_at_second_step)
    log: list[dict] = []
    with pytest.warns(UserWarning, match="training step 2 skipped: loss became nan"):
        result = train_model(model, tokenize_examples(tok, _examples(), max_length=64),
                             TrainConfig(lr=1e-2, max_steps=4, batch_size=4, warmup_ratio=0.0, schedule="constant"),
                             pad_id=tok.pad_token_id, progress=False, on_step=snapshot, metrics_log=log)
    assert [("skipped" in r) for r in log] == [False, True, False, False] and log[1]["loss"] is None
    assert math.isnan(result.losses[1]) and all(math.isfinite(x) for i, x in enumerate(result.losses) if i != 1)
    assert all(torch.equal(seen[1][n], seen[2][n]) for n in seen[1])          # the faulty step changed nothing
    assert not all(torch.equal(seen[2][n], seen[3][n]) for n in seen[2])      # the next one trained


def test_schedules():
    assert lr_multiplier(0, 100, 10, "linear") == pytest.approx(0.1)
    assert lr_multiplier(10, 100, 10, "linear") == pytest.approx(1.0)
    assert lr_multiplier(99, 100, 10, "linear") == pytest.approx(1 - 89 / 90)
    assert lr_multiplier(55, 100, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(70, 100, 0, "constant") == 1.0


def test_train_entry_writes_run_folder(tiny_llama_dir, tmp_path):
    data_file = tmp_path / "d.jsonl"
    data_file.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in _examples()))
    out = tmp_path / "run"
    summary = train(model_name=str(tiny_llama_dir), data=str(data_file), output=out,
                    config=TrainConfig(max_steps=3, batch_size=4, lora=LoraSettings(r=2, alpha=4),
                                       data=DataSettings(max_length=64)), device="cpu", progress=False)
    assert summary["steps"] == 3
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["lora"]["r"] == 2 and "torch" in run["versions"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_response_loss_packs_only_response_positions_in_padded_batches(tiny_gemma_dir):
    """Rows of different lengths, responses of different lengths and content, right padding, a LoRA model: the
    output head sees only the (1, response tokens, hidden) positions and the loss equals a naive per-token sum."""
    tok = load_tokenizer(str(tiny_gemma_dir))
    rows = [Example("Q: sky?\nA:", " blue", "a"), Example("Question: what do plants need to grow well?\nAnswer:",
                                                           " sunlight and water every day", "b"),
            Example("Hi:", " ok then", "c")]
    tokenized = tokenize_examples(tok, rows, max_length=64)
    assert len({len(t.input_ids) for t in tokenized}) == 3 and len({len(t.response_ids) for t in tokenized}) == 3
    torch.manual_seed(0)
    model = add_lora(load_model(str(tiny_gemma_dir), device="cpu"), LoraSettings(r=2, alpha=4))
    batch = collate(tokenized, tok.pad_token_id)
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(tuple(a[0].shape)))
    loss, count = response_loss(model, batch)
    handle.remove()
    assert count == sum(len(t.response_ids) for t in tokenized)
    assert seen == [(1, count, model.config.hidden_size)]
    loss.backward()                              # gradients reach the LoRA weights through the packing
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)
    total = 0.0
    with torch.no_grad():
        for t in tokenized:                      # each row alone, unpadded, all logits
            logp = torch.log_softmax(model(input_ids=torch.tensor([t.input_ids])).logits[0].float(), -1)
            start = len(t.input_ids) - len(t.response_ids)
            total -= sum(logp[start + j - 1, tok_id].item() for j, tok_id in enumerate(t.response_ids))
    assert loss.item() == pytest.approx(total / count, rel=1e-4)


def test_training_on_exact_token_vectors_equals_training_on_the_text(tiny_llama_dir, tmp_path):
    # the continuous arm fed with the token embeddings themselves must be the text arm, step for step
    from textdistill.artifacts import save_tensors
    from textdistill.projection import input_embedding_matrix
    from textdistill.training import train_on_embeddings, train_on_examples

    examples = [Example(prompt=f"Question: what colour is thing {i}{'?' * (i % 3)}\nAnswer:", response=f" blue {i}",
                        id=str(i)) for i in range(6)]
    recipe = TrainConfig(max_steps=4, batch_size=3, lr=1e-2, warmup_ratio=0.0, precision="fp32", seed=3,
                         lora=LoraSettings(r=2, alpha=4), data=DataSettings(max_length=64))
    tok = load_tokenizer(str(tiny_llama_dir))
    tokenized = tokenize_examples(tok, examples, max_length=64)
    embed = input_embedding_matrix(load_model(str(tiny_llama_dir), device="cpu"))
    p_max, r_max = max(len(t.prompt_ids) for t in tokenized), max(len(t.response_ids) for t in tokenized)
    prompts = torch.zeros(len(tokenized), p_max, embed.shape[1])
    responses = torch.zeros(len(tokenized), r_max, dtype=torch.long)
    for i, t in enumerate(tokenized):
        prompts[i, : len(t.prompt_ids)] = embed[list(t.prompt_ids)]
        responses[i, : len(t.response_ids)] = torch.tensor(t.response_ids)
    save_tensors(tmp_path / "embeddings.safetensors", {
        "prompt_embeds": prompts, "prompt_lengths": torch.tensor([len(t.prompt_ids) for t in tokenized]),
        "response_ids": responses, "response_lengths": torch.tensor([len(t.response_ids) for t in tokenized])})
    text_model, _, text = train_on_examples(model_name=str(tiny_llama_dir), examples=examples, config=recipe,
                                            device="cpu", progress=False)
    vec_model, _, vectors = train_on_embeddings(model_name=str(tiny_llama_dir), embeddings=tmp_path /
                                                "embeddings.safetensors", config=recipe, device="cpu", progress=False)
    assert vectors.losses == pytest.approx(text.losses, rel=1e-4) and vectors.examples == 6
    text_lora = {n: p for n, p in text_model.named_parameters() if p.requires_grad}
    for name, p in vec_model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, text_lora[name], rtol=1e-4, atol=1e-6)


def test_training_on_vectors_of_another_width_is_refused(tiny_llama_dir, tmp_path):
    from textdistill.artifacts import save_tensors
    from textdistill.errors import ConfigError
    from textdistill.training import train_on_embeddings

    save_tensors(tmp_path / "e.safetensors", {"prompt_embeds": torch.zeros(2, 3, 7),
                                             "prompt_lengths": torch.tensor([3, 3]),
                                             "response_ids": torch.ones(2, 2, dtype=torch.long),
                                             "response_lengths": torch.tensor([2, 2])})
    with pytest.raises(ConfigError, match="only fit the model they were learned with"):
        train_on_embeddings(model_name=str(tiny_llama_dir), embeddings=tmp_path / "e.safetensors",
                            config=TrainConfig(max_steps=1), device="cpu", progress=False)


class _Crash(Exception):
    pass


def _resumable_run(tiny_llama_dir, checkpointer=None, crash_at=None, optimizer="adamw"):
    """A LoRA run whose every source of randomness matters: dropout (torch RNG), AdamW moments, warm-up + linear
    schedule, several epochs (data order). ``crash_at``: raise after that optimizer step."""
    tok = load_tokenizer(str(tiny_llama_dir))
    tokenized = tokenize_examples(tok, _examples()[:10], max_length=64)
    torch.manual_seed(0)
    model = add_lora(load_model(str(tiny_llama_dir), device="cpu"),
                     LoraSettings(r=4, alpha=8, dropout=0.1, target_modules=("q_proj", "v_proj")))
    config = TrainConfig(lr=5e-3, optimizer=optimizer, momentum=0.9 if optimizer == "sgd" else 0.0, batch_size=4,
                         epochs=3, warmup_ratio=0.2, schedule="linear", seed=3)

    def on_step(step, net, opt):
        if step == crash_at:
            raise _Crash

    log = []
    result = train_model(model, tokenized, config, pad_id=tok.pad_token_id, progress=False, metrics_log=log,
                         on_step=on_step, checkpointer=checkpointer)
    return model, result, log


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(tiny_llama_dir, tmp_path, optimizer):
    from textdistill.checkpoint import TrainCheckpointer

    reference, expected, expected_log = _resumable_run(tiny_llama_dir, optimizer=optimizer)
    assert expected.steps == 9
    make = lambda: TrainCheckpointer(tmp_path / "ckpt", fingerprint={"run": 1}, every_steps=2, every_seconds=None)
    with pytest.raises(_Crash):   # crashes after step 5: the checkpoint of step 4 is on disk, step 5 is lost
        _resumable_run(tiny_llama_dir, make(), crash_at=5, optimizer=optimizer)
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["position"]["step"] == 4
    assert [p.name for p in (tmp_path / "ckpt").glob("step_*.safetensors")] == ["step_000004.safetensors"]
    resumed, result, log = _resumable_run(tiny_llama_dir, make(), optimizer=optimizer)
    params = dict(resumed.named_parameters())
    for name, p in reference.named_parameters():
        assert torch.equal(p, params[name]), name
    assert result.losses == expected.losses and result.batch_indices == expected.batch_indices
    assert [r["step"] for r in log] == list(range(1, 10))
    assert [r["loss"] for r in log] == [r["loss"] for r in expected_log]
    # the lr schedule went on from where it was
    assert [r["lr"] for r in log] == [r["lr"] for r in expected_log]


def test_a_checkpoint_of_other_settings_is_refused(tiny_llama_dir, tmp_path):
    from textdistill.checkpoint import TrainCheckpointer
    from textdistill.errors import ConfigError

    with pytest.raises(_Crash):
        _resumable_run(tiny_llama_dir, TrainCheckpointer(tmp_path, fingerprint={"lr": 1}, every_steps=1,
                                                         every_seconds=None), crash_at=2)
    with pytest.raises(ConfigError, match="other settings"):
        _resumable_run(tiny_llama_dir, TrainCheckpointer(tmp_path, fingerprint={"lr": 2}, every_steps=1,
                                                         every_seconds=None))
    # an owner of the folder (an experiment cell) discards a stale checkpoint instead, and keeps a current one
    assert not TrainCheckpointer(tmp_path, fingerprint={"lr": 1}).discard_if_stale()
    assert TrainCheckpointer(tmp_path, fingerprint={"lr": 2}).discard_if_stale()
    assert not (tmp_path / "state.json").exists()


def test_train_resume_refusals_and_a_finished_run(tiny_llama_dir, tmp_path):
    from textdistill.errors import ConfigError

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in _examples()))
    config = TrainConfig(lr=1e-3, max_steps=3, batch_size=4, warmup_ratio=0.0)
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "state.json").write_text("{}")
    with pytest.raises(ConfigError, match="interrupted.*--resume"):
        train(model_name=str(tiny_llama_dir), data=str(data), output=out, config=config, progress=False)
    (out / "checkpoint" / "state.json").unlink()
    summary = train(model_name=str(tiny_llama_dir), data=str(data), output=out, config=config, progress=False,
                    resume=True, checkpoint_every=1)   # nothing to resume: starts from the beginning
    assert summary["steps"] == 3 and not (out / "checkpoint").exists()   # removed once summary.json is written
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.warns(UserWarning, match="finished"):
        again = train(model_name=str(tiny_llama_dir), data=str(data), output=out, config=config, progress=False,
                      resume=True)
    assert again == summary and (out / "adapter_model.safetensors").read_bytes() == before


def test_a_second_process_on_the_same_run_folder_is_refused(tiny_llama_dir, tmp_path):
    """While one run holds a folder's lock (an OS lock, as another process would), a second run into it stops with
    a one-line error before writing anything."""
    from filelock import FileLock

    from textdistill.errors import ConfigError

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in _examples()))
    out = tmp_path / "run"
    out.mkdir()
    holder = FileLock(str(out / ".lock"), thread_local=False)
    holder.acquire()
    try:
        with pytest.raises(ConfigError, match="being written by another textdistill process"):
            train(model_name=str(tiny_llama_dir), data=str(data), output=out, progress=False,
                  config=TrainConfig(max_steps=1, batch_size=4))
        assert [p.name for p in out.iterdir()] == [".lock"]
    finally:
        holder.release()
    train(model_name=str(tiny_llama_dir), data=str(data), output=out, progress=False,
          config=TrainConfig(max_steps=1, batch_size=4))   # free again
    assert (out / "summary.json").is_file()


def test_a_bf16_base_trains_fp32_lora_and_bad_dtypes_are_refused(tiny_llama_dir):
    from textdistill.errors import ConfigError
    from textdistill.training import train_on_examples

    config = TrainConfig(lr=5e-3, max_steps=6, batch_size=4, warmup_ratio=0.0, schedule="constant", dtype="bf16",
                         lora=LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj")))
    model, _, result = train_on_examples(model_name=str(tiny_llama_dir), examples=_examples(), config=config,
                                         device="cpu", progress=False)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora.values())   # fp32 master copies of what trains
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)       # half the memory for the base
    assert all(math.isfinite(x) for x in result.losses) and result.losses[-1] < result.losses[0]
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        train_on_examples(model_name=str(tiny_llama_dir), examples=_examples(), device="cpu", progress=False,
                          config=TrainConfig(max_steps=1, dtype="fp16"))
    with pytest.raises(ConfigError, match="full fine-tuning keeps fp32"):
        TrainConfig(method="full", dtype="bf16")


def test_cuda_generators_are_restored_in_device_order(monkeypatch):
    """Device 10's generator state goes to device 10, not to device 2 (string order would put it there)."""
    import random

    import numpy as np

    from textdistill import checkpoint

    got = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: got.extend(int(s[0]) for s in states))
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python_rng": [version, list(internal), gauss],
             "numpy_rng": [kind, keys.tolist(), pos, has_gauss, cached]}
    tensors = {"rng/torch": torch.get_rng_state(),
               **{f"rng/cuda/{i}": torch.tensor([i], dtype=torch.uint8) for i in range(12)}}
    checkpoint._restore_rngs(state, tensors)
    assert got == list(range(12))


def test_report_to_tensorboard_writes_live_curves_beside_metrics(tiny_llama_dir, tmp_path):
    """--report_to tensorboard mirrors the loss and lr of every step into TensorBoard event files under
    <output>/runs/ (metrics.jsonl stays); an unknown reporter is refused by name."""
    import pytest
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from textdistill.errors import ConfigError
    from textdistill.training import train

    config = TrainConfig(max_steps=3, batch_size=2, lr=1e-3, warmup_ratio=0.0, precision="fp32",
                         lora=LoraSettings(r=2, alpha=4), data=DataSettings(max_length=48, limit=6),
                         report_to=("tensorboard",))
    out = tmp_path / "run"
    train(model_name=str(tiny_llama_dir), data="arc-easy:train", output=out, config=config, device="cpu",
          progress=False)
    events = EventAccumulator(str(out / "runs")).Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    logged = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in events.Scalars("train/lr")] == [1, 2, 3] and losses == pytest.approx(logged)
    with pytest.raises(ConfigError, match="unknown reporter.*wandb; known: tensorboard"):
        TrainConfig(report_to=("wandb",))
