"""The differentiable inner loop of trajectory matching (MTT) for a LoRA causal LM.

A *student* starts from LoRA tensors theta*_t of an expert trajectory, takes N plain SGD steps on minibatches of
synthetic samples (a learnable pseudo prompt of continuous input embeddings followed by real response token ids,
loss on the response tokens only) with a learnable learning rate, and ends at theta_N. The matching loss compares
theta_N with the expert's theta*_{t+M}. Gradients of the matching loss flow back to the prompt embeddings and to the
learning rate through every inner step (second-order, as in MTT).

Only the LoRA tensors are ever substituted (through :func:`torch.func.functional_call`); the base weights of the
model are read, never written, and receive no gradient as long as they are frozen (peft freezes them).

Requirements on the model
-------------------------
* Attention must be twice differentiable. ``"eager"`` attention is; ``"sdpa"`` is run here inside
  ``sdpa_kernel(SDPBackend.MATH)`` (the fused CPU / CUDA kernels have no double backward); any other
  implementation (flash, flex, ...) is refused with a ValueError when second-order gradients are needed.
* The model should be in eval mode (no dropout): the recompute mode replays each step and assumes it is
  deterministic.
* LoRA on the input embedding layer is not supported (the response embeddings are looked up outside the
  functional call).

Two exact ways to differentiate through the unroll (:func:`unroll`):
* keep-graph (default): the whole N-step double-backward graph is kept until the caller's ``backward()``.
* ``recompute=True``: only the N LoRA snapshots are kept; during the backward pass step k is replayed to get its
  vector-Jacobian product, from the last step to the first. Same gradients, memory of one step instead of N.

``recompute=True, checkpoint_layers=True`` also bounds the memory of that one step: each step (first order in the
forward pass, second order in the replay) is differentiated decoder layer by decoder layer (:func:`_layerwise`), so
that only the hidden states between layers and one layer's graph are alive at a time; each layer is run several
times instead. Same gradients up to rounding. Wrapping the layers in ``torch.utils.checkpoint`` instead would not
help: a double backward's create_graph graph keeps every activation that checkpointing drops
(results/probe_activation_checkpointing.md); nor would forward-over-reverse products through ``torch.autograd.
forward_ad``, whose saved tangents bypass checkpointing (results/bench_checkpoint_layers.md). It needs decoder
layers of transformers' ``GradientCheckpointingLayer`` kind (every decoder model of transformers 5) that feed each
other directly, with every LoRA tensor inside them.

``recompute=True, micro_batch=G`` (with or without ``checkpoint_layers``) differentiates each step G samples at a
time: the student loss is a mean over the batch's predicted tokens, so the groups' gradients and second-order
products, weighted by their tokens, add up to the batch's. The memory of a step's graph then scales with G instead
of the batch. Same gradients up to rounding.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "SyntheticBatch",
    "attention_context",
    "build_inputs",
    "first_order_unroll",
    "lora_parameters",
    "matching_loss",
    "student_loss",
    "unroll",
]

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------------------------
# LoRA parameters
# ----------------------------------------------------------------------------------------------------------------

def lora_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The trainable (requires_grad) tensors of a peft model, keyed by their ``named_parameters()`` names, in
    module registration order, as detached clones (so later edits of the model do not alias them)."""
    params = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no trainable parameters; expected a peft LoRA model")
    return params


# ----------------------------------------------------------------------------------------------------------------
# Synthetic batches
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class SyntheticBatch:
    """A minibatch of synthetic samples, each a pseudo prompt (continuous embeddings) then response token ids.

    Attributes:
        prompt_embeds: (B, P_max, H) floating; sample b uses only its first ``prompt_lengths[b]`` rows. May
            require grad (it usually is, or is derived from, the learnable prompt).
        prompt_lengths: (B,) long, 0 <= P_b <= P_max.
        response_ids: (B, R_max) long; sample b uses only its first ``response_lengths[b]`` ids.
        response_lengths: (B,) long, 1 <= R_b <= R_max.
    """

    prompt_embeds: Tensor
    prompt_lengths: Tensor
    response_ids: Tensor
    response_lengths: Tensor

    def __post_init__(self) -> None:
        pe, pl, ri, rl = self.prompt_embeds, self.prompt_lengths, self.response_ids, self.response_lengths
        if pe.dim() != 3 or not pe.is_floating_point():
            raise ValueError(f"prompt_embeds must be a floating (B, P_max, H) tensor, got {tuple(pe.shape)} {pe.dtype}")
        batch = pe.shape[0]
        for name, t in (("prompt_lengths", pl), ("response_lengths", rl)):
            if t.shape != (batch,) or t.is_floating_point():
                raise ValueError(f"{name} must be an integer tensor of shape ({batch},), "
                                 f"got {tuple(t.shape)} {t.dtype}")
        if ri.dim() != 2 or ri.shape[0] != batch or ri.is_floating_point():
            raise ValueError(f"response_ids must be an integer (B={batch}, R_max) tensor, got {tuple(ri.shape)}")
        if bool((pl < 0).any()) or bool((pl > pe.shape[1]).any()):
            raise ValueError(f"prompt_lengths must lie in [0, {pe.shape[1]}], got {pl.tolist()}")
        if bool((rl < 1).any()) or bool((rl > ri.shape[1]).any()):
            raise ValueError(f"response_lengths must lie in [1, {ri.shape[1]}], got {rl.tolist()}")

    @classmethod
    def from_samples(cls, prompts: Sequence[Tensor], responses: Sequence[Tensor]) -> SyntheticBatch:
        """Right-pad a list of prompts (P_i, H) and response id vectors (R_i,) into a batch (differentiable
        w.r.t. the prompts)."""
        if len(prompts) != len(responses) or not prompts:
            raise ValueError(f"need as many prompts as responses (and at least one): "
                             f"{len(prompts)} vs {len(responses)}")
        device = prompts[0].device
        p_max = max(p.shape[0] for p in prompts)
        r_max = max(r.shape[0] for r in responses)
        # (B, P_max, H): F.pad keeps the graph to each prompt
        prompt_embeds = torch.stack([F.pad(p, (0, 0, 0, p_max - p.shape[0])) for p in prompts])
        response_ids = torch.stack([F.pad(r.long(), (0, r_max - r.shape[0])) for r in responses]).to(device)
        lengths = lambda xs: torch.tensor([x.shape[0] for x in xs], dtype=torch.long, device=device)  # noqa: E731
        return cls(prompt_embeds, lengths(prompts), response_ids, lengths(responses))

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The four tensors, in field order (for flattening)."""
        return self.prompt_embeds, self.prompt_lengths, self.response_ids, self.response_lengths


def build_inputs(model: nn.Module, batch: SyntheticBatch) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenate each sample's prompt rows with the embeddings of its response ids, right-padded.

    Returns ``inputs_embeds`` (B, T, H) in the embedding dtype, ``attention_mask`` (B, T) long and ``labels``
    (B, T) long with IGNORE_INDEX (-100) on prompt and padding positions, where T = max_b (P_b + R_b).
    Response embeddings come from ``model.get_input_embeddings()`` (so Gemma's embedding scale is included, the
    same as for ``input_ids``). Differentiable w.r.t. ``batch.prompt_embeds``.
    """
    embed = model.get_input_embeddings()
    pe, pl, ri, rl = batch.tensors()
    device = pe.device
    pl, ri, rl = pl.to(device), ri.to(device), rl.to(device)
    resp = embed(ri)                                              # (B, R_max, H)
    pe = pe.to(resp.dtype)                                        # (B, P_max, H)
    bsz, p_max, hidden = pe.shape
    r_max = ri.shape[1]
    total = pl + rl                                               # (B,)
    t_len = int(total.max())
    pos = torch.arange(t_len, device=device).unsqueeze(0)         # (1, T)
    in_prompt = pos < pl.unsqueeze(1)                             # (B, T)
    in_resp = (pos >= pl.unsqueeze(1)) & (pos < total.unsqueeze(1))
    # prompt rows, padded / cut to T: (B, T, H)
    if p_max >= t_len:
        prompt_part = pe[:, :t_len]
    else:
        prompt_part = F.pad(pe, (0, 0, 0, t_len - p_max))
    # response row index per position, clamped so the gather is valid everywhere: (B, T)
    r_idx = (pos - pl.unsqueeze(1)).clamp(0, r_max - 1)
    resp_part = torch.gather(resp, 1, r_idx.unsqueeze(-1).expand(bsz, t_len, hidden))    # (B, T, H)
    zeros = torch.zeros((), dtype=resp.dtype, device=device)
    inputs_embeds = torch.where(in_prompt.unsqueeze(-1), prompt_part,
                                torch.where(in_resp.unsqueeze(-1), resp_part, zeros))    # (B, T, H)
    attention_mask = (in_prompt | in_resp).long()                                       # (B, T)
    labels = torch.where(in_resp, torch.gather(ri, 1, r_idx), torch.full_like(r_idx, IGNORE_INDEX))  # (B, T)
    return inputs_embeds, attention_mask, labels


# ----------------------------------------------------------------------------------------------------------------
# Attention implementation
# ----------------------------------------------------------------------------------------------------------------

def _attn_implementation(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def attention_context(model: nn.Module, second_order: bool = True) -> contextlib.AbstractContextManager:
    """A context in which a forward pass of ``model`` can be differentiated twice.

    ``"eager"`` (or no config): nothing to do. ``"sdpa"``: restrict scaled-dot-product attention to the math
    backend. Anything else raises ValueError when ``second_order`` (load the model with
    ``attn_implementation="eager"``).
    """
    impl = _attn_implementation(model)
    if not second_order or impl in (None, "eager"):
        return contextlib.nullcontext()
    if impl == "sdpa":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel(SDPBackend.MATH)
    raise ValueError(
        f"attention implementation {impl!r} has no double backward; load the model with "
        f"attn_implementation='eager' (or 'sdpa', which is run with the math backend) to unroll through it")


# ----------------------------------------------------------------------------------------------------------------
# Inner loss and steps
# ----------------------------------------------------------------------------------------------------------------

def student_loss(model: nn.Module, lora_params: Mapping[str, Tensor], batch: SyntheticBatch) -> Tensor:
    """Mean next-token cross-entropy over all response tokens of the batch, with the LoRA tensors replaced by
    ``lora_params`` (names as in ``model.named_parameters()``; other weights are the model's own)."""
    inputs_embeds, attention_mask, labels = build_inputs(model, batch)
    # position t predicts labels[:, t + 1]; keep logits only where some sample has a target: (K,)
    targets = labels[:, 1:]                                                   # (B, T-1)
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)          # (K,)
    if keep.numel() == 0:
        raise ValueError("the batch has no predicted response token (every sample has an empty prompt and a "
                         "one-token response)")
    out = functional_call(model, dict(lora_params), (),
                          {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
                           "logits_to_keep": keep, "use_cache": False},
                          strict=False)
    logits = out.logits                                                       # (B, K, V)
    kept_targets = targets[:, keep]                                           # (B, K)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))     # at least float32 for the softmax
    return F.cross_entropy(logits.flatten(0, 1), kept_targets.flatten(), ignore_index=IGNORE_INDEX)


def _check_embedding_not_adapted(model: nn.Module, names: Sequence[str]) -> None:
    embed = model.get_input_embeddings()
    for mod_name, mod in model.named_modules():
        if mod is embed:
            # peft may hand back the wrapped base layer; its adapters sit next to it
            prefix = mod_name.removesuffix(".base_layer") + "."
            bad = [n for n in names if n.startswith(prefix)]
            if bad:
                raise ValueError(f"LoRA on the input embeddings is not supported by unroll: {bad[:3]}")


def _sgd_step(model: nn.Module, names: Sequence[str], params: Sequence[Tensor], batch: SyntheticBatch,
              lr: Tensor, create_graph: bool) -> list[Tensor]:
    """theta - lr * grad_theta student_loss(theta), tensor by tensor."""
    loss = student_loss(model, dict(zip(names, params)), batch)
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True, materialize_grads=True)
    return [p - lr.to(p.dtype) * g for p, g in zip(params, grads)]


def _ensure_leaf(p: Tensor) -> Tensor:
    return p if p.requires_grad else p.detach().requires_grad_(True)


def unroll(model: nn.Module, start_params: Mapping[str, Tensor], batches: Sequence[SyntheticBatch] | Iterator,
           lr: Tensor | float, *, create_graph: bool = True, recompute: bool = False,
           checkpoint_layers: bool = False, micro_batch: int | None = None) -> dict[str, Tensor]:
    """N differentiable SGD steps theta <- theta - lr * grad student_loss(theta, batch_k), one per batch.

    Args:
        model: the peft model (eval mode, eager or sdpa attention); its weights are not modified.
        start_params: theta*_t, LoRA tensors by ``named_parameters()`` name (see :func:`lora_parameters`).
        batches: the N minibatches, in order.
        lr: the learning rate, a positive scalar (a tensor requiring grad to learn it).
        create_graph: keep second-order terms (exact MTT meta-gradient). With False the inner gradients are
            treated as constants (first-order): lr still gets a gradient, the prompts get none.
        recompute: exact memory-saving mode (needs create_graph=True): keep only the N snapshots and replay each
            step in the backward pass. Gives the same values and gradients as the default; the gradients it
            returns are not themselves differentiable (no third-order use).
        checkpoint_layers: with ``recompute``, differentiate each step decoder layer by decoder layer (module
            docstring): memory of the hidden states between layers plus one layer's graph, at about twice the time.
            Same gradients up to rounding.
        micro_batch: with ``recompute``, differentiate each step this many samples at a time (the loss is a mean
            over tokens, so the groups' gradients and products add up, weighted by their tokens): the memory of a
            step's graph shrinks with the group. None: the whole minibatch. Same gradients up to rounding.

    Returns:
        theta_N, a dict with the keys of ``start_params``, carrying the graph to lr, the prompts and (if they
        require grad) the start params.
    """
    names = list(start_params)
    batches = list(batches)
    if not batches:
        raise ValueError("unroll needs at least one batch")
    first = next(iter(start_params.values()))
    if not torch.is_tensor(lr):
        lr = torch.tensor(lr, dtype=first.dtype, device=first.device)
    if lr.numel() != 1:
        raise ValueError(f"lr must be a scalar, got shape {tuple(lr.shape)}")
    lr = lr.reshape(())
    _check_embedding_not_adapted(model, names)
    if checkpoint_layers and not recompute:
        raise ValueError("checkpoint_layers=True needs recompute=True (a kept double-backward graph would hold every "
                         "activation that checkpointing drops)")
    if micro_batch is not None and (not recompute or micro_batch <= 0):
        raise ValueError(f"micro_batch must be a positive number of samples and needs recompute=True (a kept graph "
                         f"holds every group's), got {micro_batch} with recompute={recompute}")
    if recompute:
        if not create_graph:
            raise ValueError("recompute=True is only meaningful with create_graph=True")
        if checkpoint_layers:
            _check_layerwise(model, names)   # fail before the forward pass, not in the backward
        flat = [t for b in batches for t in b.tensors()]
        outs = _RecomputeUnroll.apply(_Spec(model, names, len(batches), checkpoint_layers, micro_batch), lr,
                                      *start_params.values(), *flat)
        return dict(zip(names, outs))
    params = [_ensure_leaf(start_params[n]) for n in names]
    with attention_context(model, second_order=create_graph), torch.enable_grad():
        for batch in batches:
            params = _sgd_step(model, names, params, batch, lr, create_graph)
    return dict(zip(names, params))


def first_order_unroll(model: nn.Module, start_params: Mapping[str, Tensor], batches: Sequence[SyntheticBatch],
                       lr: float, *, keep_snapshots: bool = False) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """The same N SGD steps as :func:`unroll`, without any graph (nothing is differentiable): for scoring a
    training set on the matching loss (the held-out instrument, candidate swaps of the token search).

    Returns theta_N (detached) and, with ``keep_snapshots``, the parameters *before* each step (theta_0 ..
    theta_{N-1}), so that a set that differs from this one only in samples first used at step k can be scored by
    continuing from ``snapshots[k]`` with ``batches[k:]`` (the steps before k are identical).
    """
    names = list(start_params)
    params = [p.detach() for p in start_params.values()]
    snapshots: list[dict[str, Tensor]] = []
    step_lr = float(lr)
    with attention_context(model, second_order=False), torch.enable_grad():
        for batch in batches:
            if keep_snapshots:
                snapshots.append(dict(zip(names, params)))
            frozen = SyntheticBatch(batch.prompt_embeds.detach(), batch.prompt_lengths, batch.response_ids,
                                    batch.response_lengths)
            leaves = [p.detach().requires_grad_(True) for p in params]
            loss = student_loss(model, dict(zip(names, leaves)), frozen)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
            params = [(p - step_lr * g).detach() for p, g in zip(leaves, grads)]
    return dict(zip(names, params)), snapshots


# ----------------------------------------------------------------------------------------------------------------
# Layer by layer: gradients and second-order products with one decoder layer's graph at a time (checkpoint_layers)
# ----------------------------------------------------------------------------------------------------------------

def _decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's decoder layers (transformers' GradientCheckpointingLayer modules) by qualified name; ValueError
    when it has none."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"checkpoint_layers needs decoder layers of transformers' GradientCheckpointingLayer kind; "
                         f"{type(model).__name__} has none (run without it)")
    return layers


def _check_layerwise(model: nn.Module, names: Sequence[str]) -> None:
    """ValueError unless every LoRA tensor sits inside a decoder layer (the layer-by-layer products cover those)."""
    prefixes = tuple(name + "." for name, _ in _decoder_layers(model))
    outside = [n for n in names if not n.startswith(prefixes)]
    if outside:
        raise ValueError(f"checkpoint_layers differentiates decoder layer by decoder layer; these LoRA tensors are "
                         f"outside every decoder layer: {outside[:3]} (run without it)")


class _LayerCall(nn.Module):
    """Runs a decoder layer's own forward (not the taping wrapper set on it) under ``functional_call`` with the
    student's LoRA tensors of that layer, given explicitly (so that it can be run again, from the tape, with leaves
    of our choosing)."""

    def __init__(self, layer: nn.Module, forward) -> None:
        super().__init__()
        self.layer = layer
        self._layer_forward = forward

    def forward(self, *args, **kwargs):
        return self._layer_forward(*args, **kwargs)


def _hidden(output):
    """The hidden states a decoder layer returns (a tensor, or the first element of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


@dataclass
class _LayerTape:
    """What one forward pass of the model through :func:`_taped_layers` leaves behind, for each decoder layer l in
    call order: its runner, its LoRA names, its input hidden states h_l (B, T, H) and its other arguments; and the
    last layer's output h_L as a leaf requiring grad (the loss's graph starts there). h_0 keeps its graph to the
    inputs embeddings; h_1 .. h_{L-1} and h_L are detached."""

    runners: list = field(default_factory=list)          # _LayerCall per layer
    names: list = field(default_factory=list)            # list[list[str]]: the model's LoRA names in each layer
    keys: list = field(default_factory=list)             # list[list[str]]: the same names as the runner's
    inputs: list = field(default_factory=list)           # h_0 .. h_{L-1}
    arguments: list = field(default_factory=list)        # (args after h, kwargs) per layer
    output: Tensor | None = None                         # h_L

    def run(self, index: int, params: Sequence[Tensor], hidden: Tensor) -> Tensor:
        """Layer ``index`` on ``hidden`` with LoRA tensors ``params`` (in the order of ``names[index]``), under the
        ambient grad mode."""
        args, kwargs = self.arguments[index]
        return _hidden(functional_call(self.runners[index], dict(zip(self.keys[index], params)), (hidden, *args),
                                       kwargs))


@contextlib.contextmanager
def _taped_layers(model: nn.Module, names: Sequence[str], tape: _LayerTape) -> Iterator[None]:
    """Within the context a forward pass of ``model`` runs its decoder layers without a graph and records them in
    ``tape``; each returns its output as a new leaf, so the graph of the loss starts at the last layer's output.
    The layers' ``forward`` is restored on exit."""
    patched = []
    for layer_name, layer in _decoder_layers(model):
        local = [n for n in names if n.startswith(layer_name + ".")]
        keys = ["layer." + n[len(layer_name) + 1:] for n in local]
        runner = _LayerCall(layer, layer.forward)

        def forward(*args, runner=runner, local=local, keys=keys, **kwargs):
            hidden = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
            args = args[1:] if args and args[0] is hidden else args
            if tape.inputs and hidden is not tape.output:
                raise ValueError("checkpoint_layers needs decoder layers that feed each other directly (the input of "
                                 "each is the output of the one before); this model transforms the hidden states "
                                 "between them (run without it)")
            tape.runners.append(runner)
            tape.names.append(local)
            tape.keys.append(keys)
            tape.inputs.append(hidden if not tape.inputs else hidden.detach())
            tape.arguments.append((args, kwargs))
            with torch.no_grad():
                output = runner(hidden, *args, **kwargs)
            leaf = _hidden(output).detach().requires_grad_(True)
            tape.output = leaf
            return (leaf, *output[1:]) if isinstance(output, tuple) else leaf

        patched.append((layer, layer.__dict__.get("forward")))   # e.g. accelerate's hooks set an instance forward
        layer.forward = forward
    try:
        yield
    finally:
        for layer, own in patched:
            if own is None:
                del layer.forward
            else:
                layer.forward = own


def _dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(xs, ys))


def _layerwise(model: nn.Module, names: Sequence[str], theta: Sequence[Tensor], batch: SyntheticBatch,
               vector: Sequence[Tensor] | None = None,
               need_prompt: bool = False) -> tuple[list[Tensor], list[Tensor] | None, Tensor | None]:
    """The gradient g = dL/dtheta of :func:`student_loss` at LoRA tensors ``theta`` (ordered as ``names``), and,
    given ``vector`` v (shaped like theta), the second-order products H_theta,theta v and (with ``need_prompt``)
    H_x,theta v for the batch's prompts x: the gradients of Phi = <v, g(theta, x)>. Exact (the same chain rule as a
    double backward), with at most one decoder layer's graph alive at a time.

    With h_l the input of layer l = 0..L-1 (h_L the last output), a_l = dL/dh_l and f_l the layer:
      1. a forward pass without graphs records h_0 .. h_L; the loss keeps only the head's graph (from h_L);
      2. down: each layer is run again to give g_l = (df_l/dtheta_l)^T a_{l+1} and a_l;
      3. (products) up: Phi_l = <v_l, g_l> + <adj(a_l), a_l> is differentiated through layer l's double graph,
         giving its direct parts d Phi/d theta_l, d Phi/d h_l, and adj(a_{l+1}), handed up; the head's double graph
         turns adj(a_L) into d Phi/d h_L;
      4. (products) down: the adjoint of h_{l+1} is carried through f_l (a first-order product) and added to the
         direct parts; at h_0 it is carried to the prompts.
    Memory: the L+1 hidden states, the L cotangents a_l and the direct parts (each (B, T, H)), plus one layer's
    graph (about a tenth of a whole-model double backward for SmolLM2; its time 1.8x: results/
    bench_checkpoint_layers.md). Each layer runs 2 times for g alone, 4 times with the products.

    Returns (g, H v or None, H_x v or None), g and H v ordered as ``names``.
    """
    tape = _LayerTape()
    leaves = [t.detach().requires_grad_(True) for t in theta]
    prompts = batch.prompt_embeds.detach().requires_grad_(need_prompt)
    frozen = SyntheticBatch(prompts, batch.prompt_lengths, batch.response_ids, batch.response_lengths)
    with _taped_layers(model, names, tape):
        loss = student_loss(model, dict(zip(names, leaves)), frozen)
    n_layers = len(tape.inputs)
    index = {n: i for i, n in enumerate(names)}
    layer_theta = [[leaves[index[n]] for n in layer_names] for layer_names in tape.names]
    products = vector is not None
    # a_L (B, T, H); with products its graph through the head is kept for step 3
    (head_cotangent,) = torch.autograd.grad(loss, [tape.output], create_graph=products)
    cotangent = head_cotangent.detach()
    del loss

    # 2. down: first-order gradients; the cotangents a_{l+1} entering each layer are kept for step 3
    grads: list[list[Tensor]] = [[] for _ in range(n_layers)]
    entering: list[Tensor | None] = [None] * n_layers
    for layer in reversed(range(n_layers)):
        hidden = tape.inputs[layer].detach().requires_grad_(layer > 0)
        params = [p.detach().requires_grad_(True) for p in layer_theta[layer]]
        entering[layer] = cotangent if products else None
        wrt = params + ([hidden] if layer > 0 else [])
        if not wrt:       # a first layer without LoRA: nothing below it to differentiate
            continue
        out = tape.run(layer, params, hidden)
        got = torch.autograd.grad(out, wrt, cotangent, allow_unused=True, materialize_grads=True)
        grads[layer] = list(got[:len(params)])
        if layer > 0:
            cotangent = got[len(params)]
        del out, got
    g = [None] * len(names)
    for layer_names, layer_grads in zip(tape.names, grads):
        for n, gr in zip(layer_names, layer_grads):
            g[index[n]] = gr
    if not products:
        return g, None, None

    # 3. up: direct parts of d Phi through each layer's double graph, and the adjoints of a_{l+1}
    v = list(vector)
    layer_v = [[v[index[n]].detach() for n in layer_names] for layer_names in tape.names]
    direct_theta: list[list[Tensor]] = [[] for _ in range(n_layers)]
    direct_hidden: list[Tensor | None] = [None] * n_layers
    adjoint = None                                                  # adj(a_l), (B, T, H); a_0 feeds nothing in Phi
    for layer in range(n_layers):
        hidden = tape.inputs[layer].detach().requires_grad_(True)
        params = [p.detach().requires_grad_(True) for p in layer_theta[layer]]
        incoming = entering[layer].requires_grad_(True)             # a_{l+1}
        out = tape.run(layer, params, hidden)
        first = torch.autograd.grad(out, params + [hidden], incoming, create_graph=True, allow_unused=True,
                                    materialize_grads=True)
        phi = _dot(layer_v[layer], first[:len(params)])
        if adjoint is not None:
            phi = phi + (adjoint * first[len(params)]).sum()
        if not torch.is_tensor(phi):   # no LoRA in this layer nor below it: Phi does not depend on it yet
            phi = (first[len(params)] * 0).sum()
        got = torch.autograd.grad(phi, params + [hidden, incoming], allow_unused=True, materialize_grads=True)
        direct_theta[layer] = list(got[:len(params)])
        direct_hidden[layer] = got[len(params)]
        adjoint = got[len(params) + 1]
        entering[layer] = None
        del out, first, phi, got
    # the head: adj(a_L) through d a_L / d h_L
    (adjoint,) = torch.autograd.grad(head_cotangent, [tape.output], adjoint, allow_unused=True,
                                     materialize_grads=True)
    del head_cotangent

    # 4. down: carry the adjoint of h_{l+1} through f_l and add the direct parts
    product_theta = [None] * len(names)
    for layer in reversed(range(n_layers)):
        hidden = tape.inputs[layer].detach().requires_grad_(True)
        params = [p.detach().requires_grad_(True) for p in layer_theta[layer]]
        out = tape.run(layer, params, hidden)
        got = torch.autograd.grad(out, params + [hidden], adjoint, allow_unused=True, materialize_grads=True)
        for n, direct, carried in zip(tape.names[layer], direct_theta[layer], got[:len(params)]):
            product_theta[index[n]] = direct + carried
        adjoint = direct_hidden[layer] + got[len(params)]
        direct_hidden[layer] = None
        del out, got
    product_prompt = None
    if need_prompt:
        (product_prompt,) = torch.autograd.grad(tape.inputs[0], [prompts], adjoint, allow_unused=True,
                                                materialize_grads=True)
    return g, product_theta, product_prompt


def _micro_batches(batch: SyntheticBatch, size: int | None) -> list[tuple[Tensor, SyntheticBatch, float]]:
    """The batch's samples in groups of ``size`` (None: one group of all), each with its share of the loss terms.

    The student loss is a mean over every predicted response token of the batch, so it is the sum over groups of
    (the group's tokens / the batch's tokens) x the group's own mean loss; so are its gradients and second-order
    products. A sample predicts its R_b response tokens, less the first when it has no prompt (position 0 predicts
    nothing). Groups that predict nothing are left out. Returns (rows (G,) long, the group's batch, weight)."""
    count = batch.batch_size
    device = batch.prompt_embeds.device
    if size is None or size >= count:
        return [(torch.arange(count, device=device), batch, 1.0)]
    tokens = (batch.response_lengths - (batch.prompt_lengths == 0).long()).tolist()
    total = sum(tokens)
    groups = []
    for first in range(0, count, size):
        share = sum(tokens[first:first + size])
        if share == 0:
            continue
        rows = torch.arange(first, min(first + size, count), device=device)
        part = SyntheticBatch(*(t[rows.to(t.device)] for t in batch.tensors()))
        groups.append((rows, part, share / total))
    return groups


def _double_backward(model: nn.Module, names: Sequence[str], theta: Sequence[Tensor], batch: SyntheticBatch,
                     vector: Sequence[Tensor] | None = None,
                     need_prompt: bool = False) -> tuple[list[Tensor], list[Tensor] | None, Tensor | None]:
    """What :func:`_layerwise` returns (g; with ``vector``, H_theta,theta v and H_x,theta v), by one backward pass
    with ``create_graph`` and a second one through it: the whole model's double graph at once."""
    leaves = [t.detach().requires_grad_(True) for t in theta]
    prompts = batch.prompt_embeds.detach().requires_grad_(need_prompt)
    frozen = SyntheticBatch(prompts, batch.prompt_lengths, batch.response_ids, batch.response_lengths)
    loss = student_loss(model, dict(zip(names, leaves)), frozen)
    grads = torch.autograd.grad(loss, leaves, create_graph=vector is not None, allow_unused=True,
                                materialize_grads=True)
    if vector is None:
        return list(grads), None, None
    # a materialized zero (a tensor the loss does not reach) has no graph and no second-order product
    pairs = [(g, v) for g, v in zip(grads, vector) if g.requires_grad]
    wrt = leaves + ([prompts] if need_prompt else [])
    got = torch.autograd.grad([g for g, _ in pairs], wrt, grad_outputs=[v.detach() for _, v in pairs],
                              allow_unused=True, materialize_grads=True)
    return [g.detach() for g in grads], list(got[:len(leaves)]), (got[len(leaves)] if need_prompt else None)


def _weighted_sum(total: list[Tensor] | None, weight: float, terms: Sequence[Tensor]) -> list[Tensor]:
    scaled = [weight * t for t in terms]
    return scaled if total is None else [a + b for a, b in zip(total, scaled)]


def _pack(tensors: Sequence[Tensor]) -> Tensor | list[Tensor]:
    """One flat copy of the tensors (when they share a dtype and device): a snapshot of a few hundred small LoRA
    tensors kept as one buffer does not fragment the allocator's heap over N steps (results/bench_inner_loop.md)."""
    if len({(t.dtype, t.device) for t in tensors}) != 1:
        return list(tensors)
    return torch.cat([t.reshape(-1) for t in tensors])


def _unpack(packed: Tensor | list[Tensor], shapes: Sequence[torch.Size]) -> list[Tensor]:
    """The tensors of :func:`_pack` as views of its buffer."""
    if isinstance(packed, list):
        return packed
    sizes = [math.prod(shape) for shape in shapes]
    return [chunk.view(shape) for chunk, shape in zip(packed.split(sizes), shapes)]


class _Spec:
    """Non-tensor arguments of :class:`_RecomputeUnroll` (model, parameter names, number of batches, whether each step
    goes layer by layer, samples differentiated at a time)."""

    def __init__(self, model: nn.Module, names: list[str], n_batches: int, checkpoint_layers: bool = False,
                 micro_batch: int | None = None) -> None:
        self.model, self.names, self.n_batches = model, names, n_batches
        self.checkpoint_layers, self.micro_batch = checkpoint_layers, micro_batch

    @property
    def plain(self) -> bool:
        """Whether each step is differentiated whole (the original recompute mode, kept bit for bit)."""
        return not self.checkpoint_layers and self.micro_batch is None

    def products(self, theta: Sequence[Tensor], batch: SyntheticBatch, vector: Sequence[Tensor] | None = None,
                 need_prompt: bool = False) -> tuple[list[Tensor], list[Tensor] | None, Tensor | None]:
        """g and the second-order products of one (micro-)batch, layer by layer or by a double backward."""
        differentiate = _layerwise if self.checkpoint_layers else _double_backward
        return differentiate(self.model, self.names, theta, batch, vector, need_prompt)


class _RecomputeUnroll(torch.autograd.Function):
    """unroll with O(1) graph memory: forward stores theta_0..theta_{N-1}; backward replays step k (double
    backward through that one step only) to map dL/dtheta_{k+1} to dL/dtheta_k, dL/dlr and dL/dprompt_k."""

    @staticmethod
    def forward(ctx, spec: _Spec, lr: Tensor, *flat: Tensor) -> tuple[Tensor, ...]:
        n = len(spec.names)
        params = [p.detach() for p in flat[:n]]
        batches = [SyntheticBatch(*(t.detach() for t in flat[n + 4 * k: n + 4 * k + 4]))
                   for k in range(spec.n_batches)]
        snapshots = []
        # same attention kernel as the replay in backward, so the replayed steps are the same computation
        with torch.enable_grad(), attention_context(spec.model, second_order=True):
            for batch in batches:
                snapshots.append(_pack(params))
                if not spec.plain:     # layer by layer and / or a few samples at a time
                    grads = None
                    for _, part, weight in _micro_batches(batch, spec.micro_batch):
                        grads = _weighted_sum(grads, weight, spec.products(params, part)[0])
                    params = [p - lr.detach().to(p.dtype) * g for p, g in zip(params, grads)]
                    continue
                leaves = [p.detach().requires_grad_(True) for p in params]
                stepped = _sgd_step(spec.model, spec.names, leaves, batch, lr.detach(), create_graph=False)
                params = [p.detach() for p in stepped]
        ctx.spec = spec
        ctx.snapshots = snapshots                       # N packed copies of the n tensors (see _pack)
        ctx.shapes = [p.shape for p in params]
        ctx.save_for_backward(lr, *flat[n:])
        return tuple(params)

    @staticmethod
    def backward(ctx, *grad_out: Tensor | None) -> tuple[Tensor | None, ...]:
        spec: _Spec = ctx.spec
        n, n_b = len(spec.names), spec.n_batches
        lr, *flat_batches = ctx.saved_tensors
        needs = ctx.needs_input_grad                    # (spec, lr, *params, *batch tensors)
        need_lr = needs[1]
        need_prompt = [needs[2 + n + 4 * k] for k in range(n_b)]
        # dL/dtheta_N; None where an output was unused
        last = _unpack(ctx.snapshots[-1], ctx.shapes)
        bar = [torch.zeros_like(s) if g is None else g for g, s in zip(grad_out, last)]
        lr_grad = torch.zeros_like(lr) if need_lr else None
        prompt_grads: list[Tensor | None] = [None] * n_b
        with torch.enable_grad(), attention_context(spec.model, second_order=True):
            for k in reversed(range(n_b)):
                pe, pl, ri, rl = flat_batches[4 * k: 4 * k + 4]
                if not spec.plain:
                    # theta' = theta - lr * sum_groups w * g(theta, x_group): its vector-Jacobian product for the
                    # cotangent bar is bar - lr * sum w H v (theta), -sum w <bar, g> (lr), -lr w H_x v (each group)
                    theta = _unpack(ctx.snapshots[k], ctx.shapes)
                    step_lr = lr.detach()
                    products = None
                    if need_prompt[k]:
                        prompt_grads[k] = torch.zeros_like(pe)
                    for rows, part, weight in _micro_batches(SyntheticBatch(pe, pl, ri, rl), spec.micro_batch):
                        grads, group_products, prompt_product = spec.products(theta, part, bar, need_prompt[k])
                        products = _weighted_sum(products, weight, group_products)
                        if need_lr:
                            lr_grad = lr_grad - weight * sum((b * g).sum().to(lr.dtype) for b, g in zip(bar, grads))
                        if need_prompt[k]:
                            prompt_grads[k][rows] = -(step_lr * weight).to(pe.dtype) * prompt_product
                    bar = [b - step_lr.to(b.dtype) * h for b, h in zip(bar, products)]
                    continue
                pe_leaf = pe.detach().requires_grad_(need_prompt[k])
                lr_leaf = lr.detach().requires_grad_(need_lr)
                theta = [s.detach().requires_grad_(True) for s in _unpack(ctx.snapshots[k], ctx.shapes)]
                stepped = _sgd_step(spec.model, spec.names, theta, SyntheticBatch(pe_leaf, pl, ri, rl),
                                    lr_leaf, create_graph=True)
                wrt = theta + ([lr_leaf] if need_lr else []) + ([pe_leaf] if need_prompt[k] else [])
                vjp = torch.autograd.grad(stepped, wrt, grad_outputs=bar, allow_unused=True, materialize_grads=True)
                bar = [g.detach() for g in vjp[:n]]
                rest = list(vjp[n:])
                if need_lr:
                    lr_grad = lr_grad + rest.pop(0).detach()
                if need_prompt[k]:
                    prompt_grads[k] = rest.pop(0).detach()
                del stepped, vjp
        start_grads = [b if needs[2 + i] else None for i, b in enumerate(bar)]
        batch_grads: list[Tensor | None] = []
        for k in range(n_b):
            batch_grads += [prompt_grads[k], None, None, None]
        return (None, lr_grad, *start_grads, *batch_grads)


# ----------------------------------------------------------------------------------------------------------------
# Matching loss
# ----------------------------------------------------------------------------------------------------------------

def matching_loss(student_params: Mapping[str, Tensor], start_params: Mapping[str, Tensor],
                  target_params: Mapping[str, Tensor]) -> Tensor:
    """sum ||theta_N - theta*_{t+M}||^2 / sum ||theta*_t - theta*_{t+M}||^2 over all LoRA tensors (a scalar,
    accumulated in at least float32). Raises ValueError on different key sets or shapes, or a zero denominator."""
    keys = set(student_params)
    for label, other in (("start", start_params), ("target", target_params)):
        if set(other) != keys:
            missing, extra = sorted(keys - set(other)), sorted(set(other) - keys)
            raise ValueError(f"student and {label} params have different keys: missing from {label} {missing[:3]}, "
                             f"extra in {label} {extra[:3]}")
    num = den = None
    for key in student_params:
        s, a, b = student_params[key], start_params[key], target_params[key]
        if not (s.shape == a.shape == b.shape):
            raise ValueError(f"shape mismatch for {key!r}: student {tuple(s.shape)}, start {tuple(a.shape)}, "
                             f"target {tuple(b.shape)}")
        dtype = torch.promote_types(s.dtype, torch.float32)
        b = b.detach().to(device=s.device, dtype=dtype)
        term_num = (s.to(dtype) - b).square().sum()
        term_den = (a.detach().to(device=s.device, dtype=dtype) - b).square().sum()
        num = term_num if num is None else num + term_num
        den = term_den if den is None else den + term_den
    if num is None:
        raise ValueError("matching_loss needs at least one parameter tensor")
    if not bool(den > 0):
        raise ValueError("matching_loss denominator is 0: the start and target params are identical "
                         "(pick target snapshots further along the expert trajectory)")
    return num / den


# ----------------------------------------------------------------------------------------------------------------
# Performance loss (the original dataset-distillation objective)
# ----------------------------------------------------------------------------------------------------------------

def predicted_tokens(batch: SyntheticBatch) -> int:
    """Response tokens the batch's loss averages over: every response token but the first of a sample with an
    empty prompt (nothing precedes it to predict it from)."""
    return int((batch.response_lengths - (batch.prompt_lengths == 0).long()).sum())


def rows_loss(model: nn.Module, params: Mapping[str, Tensor], batches: Sequence[SyntheticBatch]) -> Tensor:
    """Token-mean response loss of held-out rows (given as ``batches``, chunks of them) with the LoRA tensors
    replaced by ``params``: the performance objective after the student's steps. Differentiable w.r.t. ``params``
    (and so, through :func:`unroll`, w.r.t. the synthetic prompts and the lr) unless called under ``no_grad``."""
    if not batches:
        raise ValueError("rows_loss needs at least one batch of rows")
    counts = [predicted_tokens(b) for b in batches]
    total = sum(counts)
    loss = None
    for batch, count in zip(batches, counts):
        term = student_loss(model, params, batch) * (count / total)
        loss = term if loss is None else loss + term
    return loss
