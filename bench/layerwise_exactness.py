"""Do the layer-by-layer and one-sample-at-a-time replays give the recompute mode's meta-gradients on a real model?

    OMP_NUM_THREADS=1 python bench/layerwise_exactness.py --model gemma3-270m [--dtype fp64|fp32]

Loads the model (eager attention, LoRA r=8 on q/k/v/o), takes 3 samples of random token prompts (40, 25, 33 tokens)
and responses (6, 9, 4), a LoRA start and target 0.01 apart, and differentiates 2 student steps with ``unroll``
(recompute; recompute + checkpoint_layers; the same with micro_batch=1) to the lr and the prompts. Prints each
variant's max relative differences from the recompute mode and its CPU time. With ``--dtype fp64`` the RMSNorm and
softmax that transformers computes in float32 are kept in float64, as tests/test_unroll.py does, so the differences
are those of the algorithms alone. The last line is ``key=value`` figures.
"""

from __future__ import annotations

import argparse
import time

import torch


def keep_float64() -> None:
    """Transformers' RMSNorm and eager softmax compute in float32 even for a float64 model; keep float64 there."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def rms(x, eps):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    LlamaRMSNorm.forward = lambda self, x: self.weight * rms(x, self.variance_epsilon)
    Gemma3RMSNorm.forward = lambda self, x: rms(x, self.eps) * (1.0 + self.weight)
    softmax = torch.nn.functional.softmax
    torch.nn.functional.softmax = (lambda x, dim=None, _stacklevel=3, dtype=None:
                                   softmax(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype))


def main() -> int:
    from textdistill.config import LoraSettings
    from textdistill.models import add_lora, load_model
    from textdistill.projection import input_embedding_matrix
    from textdistill.unroll import SyntheticBatch, lora_parameters, matching_loss, unroll

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--dtype", choices=["fp32", "fp64"], default="fp64")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.dtype == "fp64":
        keep_float64()
    dtype = torch.float64 if args.dtype == "fp64" else torch.float32
    base = load_model(args.model, dtype=args.dtype, device="cpu", attn_implementation="eager")
    torch.manual_seed(0)
    model = add_lora(base, LoraSettings(r=8, alpha=16, dropout=0.0,
                                        target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))
    model.eval()
    embed = input_embedding_matrix(model)
    gen = torch.Generator().manual_seed(0)
    prompt_ids = [torch.randint(1000, 20000, (n,), generator=gen) for n in (40, 25, 33)]
    responses = [torch.randint(1000, 20000, (n,), generator=gen) for n in (6, 9, 4)]
    start = {k: v + 0.01 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
             for k, v in lora_parameters(model).items()}
    target = {k: v + 0.01 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in start.items()}
    results = {}
    variants = {"recompute": {}, "layerwise": {"checkpoint_layers": True},
                "layerwise_mb1": {"checkpoint_layers": True, "micro_batch": 1}}
    for name, options in variants.items():
        prompts = [embed[ids].clone().requires_grad_(True) for ids in prompt_ids]
        lr = torch.tensor(1e-2, dtype=dtype, requires_grad=True)
        began = time.process_time()
        batch = SyntheticBatch.from_samples(prompts, responses)
        theta = unroll(model, start, [batch] * 2, lr, recompute=True, **options)
        matching_loss(theta, start, target).backward()
        results[name] = (lr.grad, [p.grad for p in prompts], time.process_time() - began)

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    figures = {}
    for name in ("layerwise", "layerwise_mb1"):
        lr_grad, prompt_grads, seconds = results[name]
        figures[f"{name}_lr_rel"] = f"{rel(lr_grad, results['recompute'][0]):.3g}"
        figures[f"{name}_prompt_rel"] = (
            f"{max(rel(a, b) for a, b in zip(prompt_grads, results['recompute'][1])):.3g}")
        figures[f"{name}_time_ratio"] = f"{seconds / results['recompute'][2]:.3g}"
    print(" ".join(f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
