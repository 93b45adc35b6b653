"""Tests for textdistill.unroll: the differentiable inner loop, its meta-gradients and the matching loss."""

from __future__ import annotations

import pathlib
import sys
import types

import peft
import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from tiny import make_tiny_gemma, make_tiny_llama  # noqa: E402

from textdistill.unroll import (  # noqa: E402
    SyntheticBatch,
    _decoder_layers,
    attention_context,
    build_inputs,
    lora_parameters,
    matching_loss,
    rows_loss,
    student_loss,
    unroll,
)

VOCAB = 96
MAKERS = {"llama": make_tiny_llama, "gemma": make_tiny_gemma}


def make_peft(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0, attn: str | None = None,
              layers: list[int] | None = None):
    base = MAKERS[kind](VOCAB, seed=seed, dtype=dtype)
    if attn is not None:
        base.set_attn_implementation(attn)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0, layers_to_transform=layers))
    model.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():   # peft starts B at zero: randomise so every gradient is non-trivial
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def embed_std(model) -> float:
    with torch.no_grad():
        return float(model.get_input_embeddings()(torch.arange(VOCAB)).std())


def make_samples(model, lengths, seed: int):
    """[(prompt (P, H) leaf requiring grad, response ids (R,))] for (P, R) in lengths."""
    gen = torch.Generator().manual_seed(seed)
    hidden = model.get_input_embeddings().weight.shape[1]
    dtype = model.get_input_embeddings().weight.dtype
    std = embed_std(model)
    out = []
    for p_len, r_len in lengths:
        prompt = (std * torch.randn(p_len, hidden, generator=gen, dtype=dtype)).requires_grad_(True)
        out.append((prompt, torch.randint(0, VOCAB, (r_len,), generator=gen)))
    return out


def batch_of(samples) -> SyntheticBatch:
    return SyntheticBatch.from_samples([p for p, _ in samples], [r for _, r in samples])


def manual_inputs(model, samples):
    """inputs_embeds / attention_mask / labels built sample by sample, independently of build_inputs."""
    embed = model.get_input_embeddings()
    rows, masks, labels = [], [], []
    total = max(p.shape[0] + r.shape[0] for p, r in samples)
    for prompt, resp in samples:
        seq = torch.cat([prompt.to(embed.weight.dtype), embed(resp)])
        pad = total - seq.shape[0]
        rows.append(torch.cat([seq, seq.new_zeros(pad, seq.shape[1])]))
        masks.append(torch.tensor([1] * seq.shape[0] + [0] * pad))
        labels.append(torch.tensor([-100] * prompt.shape[0] + resp.tolist() + [-100] * pad))
    return torch.stack(rows), torch.stack(masks), torch.stack(labels)


def perturbed(params, scale: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}


@pytest.fixture
def exact_float64(monkeypatch):
    """Transformers' RMSNorm and eager softmax compute in float32 even for a float64 model, which makes the
    forward only float32-accurate (finite differences then cannot reach 1e-4). Keep float64 throughout."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def rms(x, eps):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    monkeypatch.setattr(LlamaRMSNorm, "forward", lambda self, x: self.weight * rms(x, self.variance_epsilon))
    monkeypatch.setattr(Gemma3RMSNorm, "forward", lambda self, x: rms(x, self.eps) * (1.0 + self.weight))
    softmax = torch.nn.functional.softmax

    def softmax_keep_float64(x, dim=None, _stacklevel=3, dtype=None):
        return softmax(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype)

    monkeypatch.setattr(torch.nn.functional, "softmax", softmax_keep_float64)


LENGTHS_A = [(3, 4), (5, 2), (2, 6)]
LENGTHS_B = [(4, 3), (1, 5)]


# ----------------------------------------------------------------------------------------------------------------


def test_lora_parameters_are_detached_lora_tensors():
    model = make_peft("llama")
    params = lora_parameters(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert list(params) == names and all("lora_" in n for n in names) and len(names) == 8
    for n, p in model.named_parameters():
        if n in params:
            assert torch.equal(params[n], p) and not params[n].requires_grad
            assert params[n].data_ptr() != p.data_ptr()


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_build_inputs_matches_manual_construction(kind):
    model = make_peft(kind)
    samples = make_samples(model, LENGTHS_A, seed=3)
    embeds, mask, labels = build_inputs(model, batch_of(samples))
    m_embeds, m_mask, m_labels = manual_inputs(model, samples)
    torch.testing.assert_close(embeds, m_embeds, rtol=0, atol=0)
    assert torch.equal(mask, m_mask) and torch.equal(labels, m_labels)
    # differentiable w.r.t. the prompts, and only the first P_i rows of each prompt matter
    embeds.sum().backward()
    for prompt, _ in samples:
        assert torch.equal(prompt.grad, torch.ones_like(prompt))


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_student_loss_equals_token_path(kind):
    """Prompts that are exact token embeddings give the same loss as the model's own input_ids forward with the
    same labels (checks the response embedding, Gemma's embed scale, the label shift and the masking)."""
    model = make_peft(kind)
    gen = torch.Generator().manual_seed(5)
    embed = model.get_input_embeddings()
    prompt_ids = [torch.randint(0, VOCAB, (p,), generator=gen) for p, _ in LENGTHS_A]
    resp_ids = [torch.randint(0, VOCAB, (r,), generator=gen) for _, r in LENGTHS_A]
    with torch.no_grad():
        batch = SyntheticBatch.from_samples([embed(p) for p in prompt_ids], resp_ids)
        ours = student_loss(model, lora_parameters(model), batch)
        total = max(len(p) + len(r) for p, r in zip(prompt_ids, resp_ids))
        ids, mask, labels = [], [], []
        for p, r in zip(prompt_ids, resp_ids):
            pad = total - len(p) - len(r)
            ids.append(torch.cat([p, r, torch.zeros(pad, dtype=torch.long)]))
            mask.append(torch.tensor([1] * (len(p) + len(r)) + [0] * pad))
            labels.append(torch.tensor([-100] * len(p) + r.tolist() + [-100] * pad))
        ref = model(input_ids=torch.stack(ids), attention_mask=torch.stack(mask), labels=torch.stack(labels)).loss
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_one_inner_step_equals_torch_sgd(kind):
    model = make_peft(kind)
    start = lora_parameters(model)
    samples = make_samples(model, LENGTHS_A, seed=7)
    lr = 0.5
    ours = unroll(model, start, [batch_of(samples)], torch.tensor(lr))

    # reference: ordinary forward with labels, loss.backward(), torch.optim.SGD on the model's own LoRA params
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=lr)
    embeds, mask, labels = manual_inputs(model, [(p.detach(), r) for p, r in samples])
    model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss.backward()
    opt.step()
    moved = 0.0
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[name], p.detach(), rtol=0, atol=1e-6)
            moved = max(moved, float((p.detach() - start[name]).abs().max()))
    assert moved > 1e-3   # the step really moved the parameters


def assert_meta_gradient_matches_finite_differences(meta_loss, prompts, *, directions: int, seed: int):
    """Backward of ``meta_loss(prompts, lr)`` at lr 0.3 (float64) against central differences in the lr and along
    ``directions`` random directions of the prompts; returns the prompts' gradients and the lr leaf."""
    lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    meta_loss(prompts, lr).backward()
    grads = [p.grad.clone() for p in prompts]
    assert all(g.abs().sum() > 0 for g in grads)
    eps = 1e-5
    with torch.no_grad():
        lr_fd = (meta_loss(prompts, lr + eps, False) - meta_loss(prompts, lr - eps, False)) / (2 * eps)
    assert abs(float(lr.grad) - float(lr_fd)) <= 1e-4 * abs(float(lr_fd)) and abs(float(lr_fd)) > 1e-8
    gen = torch.Generator().manual_seed(seed)
    for _ in range(directions):   # directional derivatives along random directions
        dirs = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in prompts]
        plus = [(p + eps * d).detach() for p, d in zip(prompts, dirs)]
        minus = [(p - eps * d).detach() for p, d in zip(prompts, dirs)]
        with torch.no_grad():
            fd = (meta_loss(plus, lr.detach(), False) - meta_loss(minus, lr.detach(), False)) / (2 * eps)
        analytic = sum((g * d).sum() for g, d in zip(grads, dirs)).detach()
        assert abs(float(analytic) - float(fd)) <= 1e-4 * abs(float(fd)) and abs(float(fd)) > 1e-10
    return grads, lr


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_meta_gradient_matches_finite_differences(kind, exact_float64):
    """d matching_loss(unroll(...)) / d(prompts, lr) in float64 against central differences."""
    model = make_peft(kind, dtype=torch.float64)
    start = lora_parameters(model)
    target = perturbed(start, 0.05, seed=11)
    s1, s2 = make_samples(model, LENGTHS_A, seed=12), make_samples(model, LENGTHS_B, seed=13)
    prompts = [p for p, _ in s1 + s2]
    responses = [r for _, r in s1 + s2]

    def meta_loss(prompt_list, lr, create_graph=True):
        a = SyntheticBatch.from_samples(prompt_list[:3], responses[:3])
        b = SyntheticBatch.from_samples(prompt_list[3:], responses[3:])
        theta = unroll(model, start, [a, b], lr, create_graph=create_graph)
        return matching_loss(theta, start, target)

    grads, lr = assert_meta_gradient_matches_finite_differences(meta_loss, prompts, directions=2, seed=14)
    eps = 1e-5
    for idx in [(0, 1, 2), (4, 0, 31)]:   # a few single coordinates (prompt, row, column)
        k, row, col = idx
        plus = [p.detach().clone() for p in prompts]
        minus = [p.detach().clone() for p in prompts]
        plus[k][row, col] += eps
        minus[k][row, col] -= eps
        fd = ((meta_loss(plus, lr.detach(), False) - meta_loss(minus, lr.detach(), False)) / (2 * eps)).detach()
        analytic = grads[k][row, col]
        assert abs(float(analytic) - float(fd)) <= 1e-4 * abs(float(fd)) + 1e-12


def test_first_order_mode_gives_lr_gradient_only():
    model = make_peft("llama", dtype=torch.float64)
    start = lora_parameters(model)
    samples = make_samples(model, LENGTHS_A, seed=21)
    lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    theta = unroll(model, start, [batch_of(samples)], lr, create_graph=False)
    matching_loss(theta, start, perturbed(start, 0.05, seed=22)).backward()
    assert lr.grad is not None and lr.grad != 0
    assert all(p.grad is None for p, _ in samples)


@pytest.mark.parametrize("recompute", [False, True])
def test_base_weights_untouched_and_gradient_free(recompute):
    model = make_peft("gemma")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    start = lora_parameters(model)
    samples = make_samples(model, LENGTHS_A, seed=31)
    lr = torch.tensor(0.3, requires_grad=True)
    theta = unroll(model, start, [batch_of(samples), batch_of(samples[:2])], lr, recompute=recompute)
    matching_loss(theta, start, perturbed(start, 0.05, seed=32)).backward()
    assert lr.grad is not None and all(p.grad is not None for p, _ in samples)
    for n, p in model.named_parameters():   # base and the model's own LoRA tensors: unchanged, no gradient
        assert torch.equal(p, before[n]), n
        assert p.grad is None, n
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n


@pytest.mark.parametrize("kind", ["llama", "gemma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smoke_meta_gradient_finite_nonzero(kind, dtype):
    model = make_peft(kind, dtype=dtype)
    start = lora_parameters(model)
    samples = make_samples(model, LENGTHS_A, seed=41) + make_samples(model, LENGTHS_B, seed=42)
    batches = [batch_of(samples[:3]), batch_of(samples[3:])]
    lr = torch.tensor(0.3, requires_grad=True)
    theta = unroll(model, start, batches, lr)
    # peft keeps LoRA tensors in float32 on a bfloat16 base (autocast_adapter_dtype): theta keeps the start dtype
    assert all(theta[k].dtype == start[k].dtype and theta[k].shape == start[k].shape for k in start)
    loss = matching_loss(theta, start, perturbed(start, 0.05, seed=43))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lr.grad) and lr.grad != 0
    for prompt, _ in samples:
        assert prompt.grad.dtype == model.get_input_embeddings().weight.dtype
        assert torch.isfinite(prompt.grad).all() and prompt.grad.abs().sum() > 0


def _three_step_meta_gradients(model, seed: int, lengths=LENGTHS_A + LENGTHS_B, **unroll_options):
    """Matching loss, theta_N and the gradients of the lr, the prompts and the start params, for 3 steps with prompts
    reused across steps, under ``unroll_options``."""
    start = lora_parameters(model)
    target = perturbed(start, 0.05, seed=seed)
    samples = make_samples(model, lengths, seed=seed + 1)
    prompts = [p.detach().clone().requires_grad_(True) for p, _ in samples]
    resp = [r for _, r in samples]
    batches = [SyntheticBatch.from_samples(prompts[:3], resp[:3]),
               SyntheticBatch.from_samples(prompts[3:], resp[3:]),
               SyntheticBatch.from_samples(prompts[1:4], resp[1:4])]   # prompts reused across steps
    lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    start_leaf = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    theta = unroll(model, start_leaf, batches, lr, **unroll_options)
    loss = matching_loss(theta, start, target)
    loss.backward()
    return (loss.detach(), {k: v.detach() for k, v in theta.items()}, lr.grad, [p.grad for p in prompts],
            {k: v.grad for k, v in start_leaf.items()})


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_recompute_matches_keep_graph(kind):
    model = make_peft(kind, dtype=torch.float64)
    l0, t0, lr0, p0, s0 = _three_step_meta_gradients(model, 51)
    l1, t1, lr1, p1, s1 = _three_step_meta_gradients(model, 51, recompute=True)
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=0)
    for k in t0:
        torch.testing.assert_close(t1[k], t0[k], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(s1[k], s0[k], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(lr1, lr0, rtol=1e-9, atol=0)
    assert lr0 != 0
    for g0, g1 in zip(p0, p1):
        assert g0.abs().sum() > 0
        torch.testing.assert_close(g1, g0, rtol=1e-9, atol=1e-12)


def test_recompute_partial_outputs_and_no_prompt_grad():
    """Only some outputs used, prompts not requiring grad: recompute still agrees with keep-graph on lr."""
    model = make_peft("llama", dtype=torch.float64)
    start = lora_parameters(model)
    samples = [(p.detach(), r) for p, r in make_samples(model, LENGTHS_A, seed=61)]
    key = next(iter(start))
    grads = []
    for recompute in (False, True):
        lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        theta = unroll(model, start, [batch_of(samples)] * 2, lr, recompute=recompute)
        theta[key].square().sum().backward()
        grads.append(lr.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=0)
    assert grads[0] != 0


@pytest.mark.parametrize("kind, layers", [("llama", None), ("gemma", None), ("llama", [1])])
def test_checkpointed_layers_give_the_keep_graph_meta_gradient(kind, layers, exact_float64):
    """recompute + checkpoint_layers (layer-by-layer gradients and second-order products) gives the keep-graph
    gradients for the lr, every prompt (reused across steps) and the start params; also with LoRA on the second
    layer only."""
    model = make_peft(kind, dtype=torch.float64, layers=layers)
    _, _, lr0, p0, s0 = _three_step_meta_gradients(model, 71)
    _, _, lr1, p1, s1 = _three_step_meta_gradients(model, 71, recompute=True, checkpoint_layers=True)
    assert lr0 != 0
    torch.testing.assert_close(lr1, lr0, rtol=1e-9, atol=0)
    for g0, g1 in zip(p0 + list(s0.values()), p1 + list(s1.values())):
        assert g0.abs().sum() > 0
        torch.testing.assert_close(g1, g0, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("layerwise, micro_batch", [(False, 1), (False, 2), (True, 1), (True, 2)])
def test_micro_batches_give_the_keep_graph_meta_gradient(layerwise, micro_batch, exact_float64):
    """recompute with micro_batch (each step differentiated a few samples at a time, weighted by their predicted
    tokens) gives the keep-graph gradients, with or without checkpoint_layers; one sample has no prompt (its first
    response token is predicted by nothing) and the steps' batches have 3, 2 and 3 samples."""
    model = make_peft("llama", dtype=torch.float64)
    lengths = [(3, 4), (0, 5), (2, 6), (4, 3), (1, 5)]
    _, _, lr0, p0, s0 = _three_step_meta_gradients(model, 81, lengths)
    _, _, lr1, p1, s1 = _three_step_meta_gradients(model, 81, lengths, recompute=True, checkpoint_layers=layerwise,
                                                   micro_batch=micro_batch)
    assert lr0 != 0
    torch.testing.assert_close(lr1, lr0, rtol=1e-9, atol=0)
    for g0, g1 in zip(p0 + list(s0.values()), p1 + list(s1.values())):
        assert g0.numel() == 0 or g0.abs().sum() > 0     # (the prompt of no rows)
        torch.testing.assert_close(g1, g0, rtol=1e-9, atol=1e-12)


def test_checkpointed_layers_are_run_again_in_the_backward_pass_and_restored():
    """Without checkpoint_layers each decoder layer runs once per step in the unroll (the first-order step) and once
    in the backward pass (the replayed step). With it, layer by layer: twice per step in the unroll (the forward pass
    without graph, then again for its gradient) and four times per replayed step (forward; down for the gradient; up
    through its double graph; down for the first-order product). The layers' forward is the class's own again
    afterwards."""
    model = make_peft("llama", dtype=torch.float64)
    mlps = [m for name, m in model.named_modules() if name.endswith("mlp")]
    calls = [0]
    for mlp in mlps:
        mlp.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    samples = make_samples(model, LENGTHS_A, seed=73)
    counts = {}
    for checkpointed in (False, True):
        lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        calls[0] = 0
        theta = unroll(model, lora_parameters(model), [batch_of(samples)] * 2, lr, recompute=True,
                       checkpoint_layers=checkpointed)
        forward_calls = calls[0]
        sum(v.square().sum() for v in theta.values()).backward()
        counts[checkpointed] = (forward_calls, calls[0] - forward_calls)
    steps_times_layers = 2 * len(mlps)
    assert counts[False] == (steps_times_layers, steps_times_layers)
    assert counts[True] == (2 * steps_times_layers, 4 * steps_times_layers)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_checkpoint_layers_needs_recompute_and_decoder_layers():
    model = make_peft("llama")
    samples = make_samples(model, LENGTHS_A, seed=74)
    with pytest.raises(ValueError, match="needs recompute=True"):
        unroll(model, lora_parameters(model), [batch_of(samples)], 0.1, checkpoint_layers=True)
    for micro_batch, recompute in ((2, False), (0, True)):
        with pytest.raises(ValueError, match="micro_batch must be a positive number of samples and needs recompute"):
            unroll(model, lora_parameters(model), [batch_of(samples)], 0.1, recompute=recompute,
                   micro_batch=micro_batch)
    with pytest.raises(ValueError, match="GradientCheckpointingLayer"):
        _decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    head_adapted = peft.get_peft_model(make_tiny_llama(VOCAB), peft.LoraConfig(r=2, target_modules=["q_proj",
                                                                                                   "lm_head"]))
    with pytest.raises(ValueError, match="outside every decoder layer.*lm_head"):
        unroll(head_adapted, lora_parameters(head_adapted), [batch_of(samples)], 0.1, recompute=True,
               checkpoint_layers=True)


def test_sdpa_model_runs_with_math_backend_and_matches_eager(exact_float64):
    grads = {}
    for attn in ("eager", "sdpa"):
        model = make_peft("llama", dtype=torch.float64, attn=attn)
        assert model.config._attn_implementation == attn
        start = lora_parameters(model)
        samples = make_samples(model, LENGTHS_A, seed=71)
        lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        theta = unroll(model, start, [batch_of(samples)], lr)
        matching_loss(theta, start, perturbed(start, 0.05, seed=72)).backward()
        grads[attn] = (lr.grad, samples[0][0].grad)
    torch.testing.assert_close(grads["sdpa"][0], grads["eager"][0], rtol=1e-9, atol=0)
    torch.testing.assert_close(grads["sdpa"][1], grads["eager"][1], rtol=1e-9, atol=1e-14)


def test_unsupported_attention_is_refused():
    fake = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(ValueError, match="eager"):
        attention_context(fake)
    attention_context(fake, second_order=False)   # fine without double backward
    model = make_peft("llama")
    model.base_model.model.config._attn_implementation = "flash_attention_2"
    if model.config._attn_implementation == "flash_attention_2":
        start = lora_parameters(model)
        with pytest.raises(ValueError, match="double backward"):
            unroll(model, start, [batch_of(make_samples(model, LENGTHS_A, seed=1))], 0.1)


def test_matching_loss_values_and_errors():
    gen = torch.Generator().manual_seed(0)
    start = {"a": torch.randn(3, 4, generator=gen), "b": torch.randn(5, generator=gen)}
    target = perturbed(start, 1.0, seed=1)
    zero = matching_loss(target, start, target)
    one = matching_loss(start, start, target)
    assert float(zero) == 0.0
    torch.testing.assert_close(one, torch.tensor(1.0))
    mid = {k: 0.5 * (start[k] + target[k]) for k in start}
    torch.testing.assert_close(matching_loss(mid, start, target), torch.tensor(0.25))
    other = perturbed(start, 0.3, seed=2)
    expected = sum(((other[k] - target[k]) ** 2).sum() for k in start) / sum(
        ((start[k] - target[k]) ** 2).sum() for k in start)
    torch.testing.assert_close(matching_loss(other, start, target), expected)

    with pytest.raises(ValueError, match="keys"):
        matching_loss({"a": start["a"]}, start, target)
    with pytest.raises(ValueError, match="keys"):
        matching_loss(start, start, {**target, "c": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        matching_loss({**start, "b": torch.zeros(6)}, start, target)
    with pytest.raises(ValueError, match="denominator"):
        matching_loss(target, start, start)
    # gradient flows to the student only
    student = {k: v.clone().requires_grad_(True) for k, v in other.items()}
    matching_loss(student, start, target).backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in student.values())


def test_synthetic_batch_validation():
    emb = torch.zeros(2, 3, 8)
    ids = torch.zeros(2, 4, dtype=torch.long)
    ok = torch.tensor([3, 1]), torch.tensor([4, 2])
    SyntheticBatch(emb, ok[0], ids, ok[1])
    with pytest.raises(ValueError, match="prompt_lengths"):
        SyntheticBatch(emb, torch.tensor([4, 1]), ids, ok[1])
    with pytest.raises(ValueError, match="response_lengths"):
        SyntheticBatch(emb, ok[0], ids, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="response_ids"):
        SyntheticBatch(emb, ok[0], ids.float(), ok[1])
    with pytest.raises(ValueError, match="prompt_embeds"):
        SyntheticBatch(emb[0], ok[0], ids, ok[1])


def _graph_bytes_after_unroll(recompute: bool, n_steps: int) -> int:
    """Bytes of non-parameter tensors the autograd graph still holds once unroll has returned."""
    import gc
    import weakref

    model = make_peft("llama")
    own = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    start = lora_parameters(model)
    batch = batch_of(make_samples(model, LENGTHS_A, seed=81))
    lr = torch.tensor(0.3, requires_grad=True)
    alive: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in own:
            alive[id(t)] = t.untyped_storage().nbytes()
            weakref.finalize(t, alive.pop, id(t), None)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        theta = unroll(model, start, [batch] * n_steps, lr, recompute=recompute)
    gc.collect()
    held = sum(alive.values())
    del theta
    return held


def test_recompute_keeps_no_per_step_graph():
    keep1, keep3 = _graph_bytes_after_unroll(False, 1), _graph_bytes_after_unroll(False, 3)
    rec1, rec3 = _graph_bytes_after_unroll(True, 1), _graph_bytes_after_unroll(True, 3)
    assert keep3 > 2.5 * keep1           # the keep-graph mode holds every step's activations
    assert rec3 == rec1 < keep1 / 20     # recompute holds only its inputs (snapshots live on the node)


def _token_rows(model, lengths, seed: int) -> list[SyntheticBatch]:
    """Held-out rows as the performance objective sees them: token-embedding prompts (no grad) and responses."""
    gen = torch.Generator().manual_seed(seed)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        samples = [(embed(torch.randint(0, VOCAB, (p,), generator=gen)), torch.randint(0, VOCAB, (r,), generator=gen))
                   for p, r in lengths]
    return samples


def test_rows_loss_is_the_token_mean_over_all_chunks():
    # chunks of unequal token counts: a mean of chunk means would weigh the short chunk's tokens more
    model = make_peft("llama")
    rows = _token_rows(model, [(3, 2), (5, 7), (2, 1), (4, 6)], seed=21)
    whole = student_loss(model, lora_parameters(model), batch_of(rows))
    chunks = [batch_of(rows[:1]), batch_of(rows[1:])]
    torch.testing.assert_close(rows_loss(model, lora_parameters(model), chunks), whole, rtol=1e-6, atol=1e-7)
    mean_of_means = (student_loss(model, lora_parameters(model), chunks[0])
                     + student_loss(model, lora_parameters(model), chunks[1])) / 2
    assert abs(float(mean_of_means) - float(whole)) > 1e-4


@pytest.mark.parametrize("recompute", [False, True])
def test_performance_meta_gradient_matches_finite_differences(recompute, exact_float64):
    """d rows_loss(unroll(...)) / d(prompts, lr) in float64 against central differences: the performance
    objective's meta-gradient flows through every student step."""
    model = make_peft("llama", dtype=torch.float64)
    start = lora_parameters(model)
    s1 = make_samples(model, LENGTHS_A, seed=22)
    prompts = [p for p, _ in s1]
    responses = [r for _, r in s1]
    held_out = [batch_of(_token_rows(model, [(3, 4), (5, 2), (2, 6)], seed=23))]

    def meta_loss(prompt_list, lr, create_graph=True):
        a = SyntheticBatch.from_samples(prompt_list[:2], responses[:2])
        b = SyntheticBatch.from_samples(prompt_list[1:], responses[1:])
        if recompute:
            theta = unroll(model, start, [a, b], lr, recompute=True)
        else:
            theta = unroll(model, start, [a, b], lr, create_graph=create_graph)
        return rows_loss(model, theta, held_out)

    assert_meta_gradient_matches_finite_differences(meta_loss, prompts, directions=1, seed=24)
