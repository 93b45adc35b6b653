"""``textdistill eval --backend lm-eval``: lm-evaluation-harness itself on the same items agrees with our scorer.

The agreement tests need the optional extra (``pip install 'textdistill[lm-eval]'``) and skip without it; the
error paths run either way.
"""

from __future__ import annotations

import json
import sys

import pytest

from conftest import mc_rows, write_jsonl
from textdistill.cli import main
from textdistill.config import EvalConfig
from textdistill.errors import TextDistillError

RTOL, ATOL = 1e-4, 1e-3     # batched kernels differ by rounding on any CPU; the log-likelihoods here are about -20


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= ATOL or abs(a - b) <= RTOL * abs(b)


def _lm_eval():
    return pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed: pip install "
                                                 "'textdistill[lm-eval]'")


@pytest.mark.parametrize("model_dir", ["tiny_llama_dir", "tiny_gemma_dir"])   # no BOS / BOS (Gemma)
def test_harness_backend_agrees_with_ours_item_by_item(model_dir, request, tmp_path):
    _lm_eval()
    from textdistill.evaluation import build_requests, score_requests
    from textdistill.harness import evaluate_with_harness
    from textdistill.models import load_model, load_tokenizer

    folder = request.getfixturevalue(model_dir)
    tokenizer = load_tokenizer(str(folder))
    model = load_model(str(folder), dtype="fp32", device="cpu", attn_implementation="sdpa")
    rows = mc_rows(10)
    rows[1]["choices"][0] = "a red ball, which is the largest of them all by far"   # a long choice
    task = str(write_jsonl(tmp_path / "mc.jsonl", rows))
    config = EvalConfig(task=task, split="test", num_fewshot=1)     # our few-shot prefix goes in as the description

    ours = score_requests(model, tokenizer, build_requests(config), progress=False)
    tokenizer.pad_token = None                      # the harness sets one; ours is put back afterwards
    doc = evaluate_with_harness(model, tokenizer, config, log_samples=True, progress=False)
    assert tokenizer.pad_token is None
    theirs = doc["samples"][task]
    assert len(theirs) == len(ours) == 10
    for s, r in zip(ours, theirs):
        assert all(_close(a, b) for a, b in zip(s.loglik, r["loglik"])), (s.loglik, r["loglik"])
        assert list(s.num_tokens) == r["num_tokens"] and list(s.num_chars) == r["num_chars"]
        assert (s.pred, s.pred_norm) == (r["pred"], r["pred_norm"])
        assert (int(s.pred == r["gold"]), int(s.pred_norm == r["gold"])) == (r["acc"], r["acc_norm"])
    result = doc["results"][task]
    assert result["acc,none"] == sum(s.pred == r["gold"] for s, r in zip(ours, theirs)) / 10
    assert result["acc_norm,none"] == sum(s.pred_norm == r["gold"] for s, r in zip(ours, theirs)) / 10
    harness_own = doc["lm_eval"][task]["results"]      # what lm_eval itself aggregated
    for key in ("acc,none", "acc_norm,none", "acc_stderr,none", "acc_norm_stderr,none"):
        assert harness_own[key] == pytest.approx(result[key], rel=1e-12), key
    assert doc["config"]["backend"] == "lm-eval" and doc["n-samples"][task] == {"original": 10, "effective": 10}


def test_cli_backends_write_the_same_samples(tiny_llama_dir, tmp_path, capsys):
    _lm_eval()
    task = str(write_jsonl(tmp_path / "mc.jsonl", mc_rows(6)))
    samples = {}
    for backend in ("textdistill", "lm-eval"):
        out = tmp_path / backend / "eval.json"
        assert main(["eval", "--model", str(tiny_llama_dir), "--task", task, "--backend", backend, "--output",
                     str(out), "--log-samples", "--no-progress", "--device", "cpu", "--threads", "1"]) == 0
        doc = json.loads(out.read_text())
        assert doc["config"]["backend"] == backend and ("lm_eval" in doc) == (backend == "lm-eval")
        samples[backend] = [json.loads(line) for line in (out.parent / "samples_mc.jsonl").read_text().splitlines()]
    for a, b in zip(samples["textdistill"], samples["lm-eval"]):
        assert all(_close(x, y) for x, y in zip(a["loglik"], b["loglik"]))
        same = ("prompt", "continuations", "gold", "pred", "pred_norm", "acc", "acc_norm", "num_tokens", "num_chars")
        assert {k: a[k] for k in same} == {k: b[k] for k in same}


def test_lm_eval_backend_with_another_template_is_one_line_error(tmp_path, capsys):
    task = str(write_jsonl(tmp_path / "mc.jsonl", mc_rows(3)))
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--task", task, "--template", "mc",
                 "--backend", "lm-eval", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("textdistill: error: --backend lm-eval evaluates the rc template only") and \
        err.count("\n") == 1


def test_missing_lm_eval_is_one_line_error_naming_the_extra(monkeypatch, tmp_path, capsys):
    from textdistill.harness import require_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)       # import lm_eval raises ImportError
    with pytest.raises(TextDistillError, match=r"pip install 'textdistill\[lm-eval\]'") as info:
        require_lm_eval()
    assert "\n" not in str(info.value)
    task = str(write_jsonl(tmp_path / "mc.jsonl", mc_rows(3)))
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--task", task, "--backend", "lm-eval"]) == 2
    err = capsys.readouterr().err       # before any model is looked for
    assert err.startswith("textdistill: error: --backend lm-eval needs lm-evaluation-harness") and \
        err.count("\n") == 1


def test_mmlu_cloze_contexts_are_the_harness_mmlu_continuation_strings():
    """The cloze form of MMLU (rc) is lm-evaluation-harness's own mmlu_<subject>_continuation layout, string for
    string (its subject line and its doc_to_text, rendered from the installed harness's task files), for two
    questions of every subject of the stored stratified set; the set holds 20 test questions of each of the 57."""
    _lm_eval()
    from textdistill.data import read_item_set
    from textdistill.evaluation import build_requests
    from textdistill.harness import mmlu_continuation_context

    stored = read_item_set("mmlu-test-stratified-20")
    assert len(stored["ids"]) == 1140 and len({i.split("-test-")[0] for i in stored["ids"]}) == 57
    requests = build_requests(EvalConfig(task="mmlu", split="test", template="rc", item_set="mmlu-test-stratified-20",
                                         per_subject_limit=2))
    assert len(requests) == 114 and [r.item_id for r in requests][:2] == stored["ids"][:2]
    for request in requests:
        question = request.context.split("Question: ", 1)[1].removesuffix("\nAnswer:")
        assert request.context == mmlu_continuation_context(request.subject, question), request.item_id
        assert all(c.startswith(" ") for c in request.continuations)   # target_delimiter " " + the choice's text
