"""Training-step speed: logits only at response positions vs logits at every position, on the real models.

    python bench/bench_head_packing.py [--threads 1] [--repeats 3] [--out results/bench_head_packing.json]

`training.response_loss` sends only the hidden states that predict a response token to the output head
(`models.output_head_only_at`). The reference computes logits at every position and masks the loss, as a plain
causal-LM loss does. Both arms run the same LoRA forward+backward under bf16 autocast on the same batch of 8 ARC-Easy
train rows, interleaved, after one warm-up each; the losses must agree. Only ratios within one run are meant to be
compared (absolute times depend on the machine and its load).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def full_logits_loss(model, batch):
    """The reference: logits at all (B, T) positions, loss masked to the response tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits   # (B, T, V)
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                             ignore_index=-100)


def bench_model(name: str, repeats: int) -> dict:
    from textdistill.config import LoraSettings
    from textdistill.data import load_examples, tokenize_examples
    from textdistill.models import add_lora, load_model, load_tokenizer
    from textdistill.training import collate, response_loss

    tokenizer = load_tokenizer(name)
    examples = tokenize_examples(tokenizer, load_examples("arc-easy:train")[:8], max_length=256)
    batch = collate(examples, tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = add_lora(load_model(name, attn_implementation="sdpa"),
                     LoraSettings(r=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))
    arms = {"packed": lambda: response_loss(model, batch)[0], "full_logits": lambda: full_logits_loss(model, batch)}
    times: dict[str, list[float]] = {k: [] for k in arms}
    losses = {}
    for round_ in range(repeats + 1):
        for arm, loss_fn in arms.items():
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn()
            loss.backward()
            if round_ > 0:                                   # round 0 is the warm-up
                times[arm].append(time.perf_counter() - start)
            losses[arm] = float(loss)
    packed, full = statistics.median(times["packed"]), statistics.median(times["full_logits"])
    tokens = int(batch["attention_mask"].sum())
    predicted = int((batch["labels"][:, 1:] != -100).sum())
    return {"batch_tokens": tokens, "response_tokens": predicted, "vocab": model.get_output_embeddings().out_features,
            "packed_step_s": packed, "full_logits_step_s": full, "speedup": full / packed,
            "loss_packed": losses["packed"], "loss_full_logits": losses["full_logits"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--out", default="results/bench_head_packing.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {"threads": args.threads, "torch": torch.__version__, "repeats": args.repeats,
               "models": {name: bench_model(name, args.repeats) for name in args.models}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    for name, values in results["models"].items():
        print(f"{name}: packed {values['packed_step_s']:.2f} s, full logits {values['full_logits_step_s']:.2f} s, "
              f"speedup {values['speedup']:.2f}x (loss {values['loss_packed']:.4f} vs {values['loss_full_logits']:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
