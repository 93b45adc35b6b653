"""Selection by the matching objective: the greedy bookkeeping is exact, the sketch keeps inner products, cuts are
prefixes, and a real run on a tiny model picks rows."""

from __future__ import annotations

import pytest
import torch

from textdistill.errors import ConfigError
from textdistill.match_selection import CountSketch, greedy_match


def _mean_cos(features, targets, rows):
    total = features.double()[:, rows].sum(1)                          # (C, k)
    return float(torch.nn.functional.cosine_similarity(total.double(), targets.double(), dim=-1).mean())


def test_greedy_objective_is_the_cosine_of_the_chosen_sum():
    gen = torch.Generator().manual_seed(0)
    features, targets = torch.randn(3, 40, 16, generator=gen), torch.randn(3, 16, generator=gen)
    chosen, objective = greedy_match(features, targets, 6)
    assert len(set(chosen)) == 6
    for k in range(1, 7):   # the incremental formula equals the cosine computed from scratch
        assert objective[k - 1] == pytest.approx(_mean_cos(features, targets, chosen[:k]), abs=1e-9)
    # each greedy step is the best single addition
    best_first = max(range(40), key=lambda i: _mean_cos(features, targets, [i]))
    assert chosen[0] == best_first
    best_second = max((i for i in range(40) if i != chosen[0]),
                      key=lambda i: _mean_cos(features, targets, [chosen[0], i]))
    assert chosen[1] == best_second


def test_greedy_prefers_covering_the_target_over_repeating_one_direction():
    # target = e0 + e1; rows: three copies of e0 (slightly the best alone) and one e1
    features = torch.tensor([[[1.05, 0.0], [1.05, 0.0], [1.05, 0.0], [0.0, 1.0]]])
    targets = torch.tensor([[1.0, 1.0]])
    greedy, _ = greedy_match(features, targets, 2)
    alone, _ = greedy_match(features, targets, 2, greedy=False)
    assert sorted(greedy) == [0, 3] and 3 not in alone


def test_greedy_refuses_more_rows_than_there_are():
    with pytest.raises(ConfigError, match="cannot choose 5 rows out of 4"):
        greedy_match(torch.randn(1, 4, 3), torch.randn(1, 3), 5)


def test_count_sketch_keeps_inner_products():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 20000, generator=gen)
    x[1] += 3 * x[0]   # a correlated pair
    sketch = CountSketch(20000, 4096, seed=3)
    sx = sketch(x)
    exact, approx = x @ x.T, sx @ sx.T
    assert torch.allclose(approx.diagonal(), exact.diagonal(), rtol=0.1)
    cos = lambda m: m / m.diagonal().sqrt().outer(m.diagonal().sqrt())  # noqa: E731
    assert (cos(approx) - cos(exact)).abs().max() < 0.06
    assert torch.equal(CountSketch(20000, 4096, seed=3)(x), sx)   # seeded: the same map every time


def test_cut_selection_is_the_prefix_of_a_greedy_selection(tmp_path):
    from textdistill.data import Example
    from textdistill.match_selection import cut_selection
    from textdistill.selection import read_selection, write_selection

    pool = [Example(prompt=f"q{i}", response=" a", id=str(i)) for i in range(20)]
    write_selection(tmp_path / "big.json", method="match", data="x", budget=6, seed=0, examples=pool,
                    indices=[5, 2, 9, 1, 0, 7], scores=[0.1, 0.2, 0.3, 0.35, 0.4, 0.41],
                    extra={"config": {"greedy": True}})
    cut_selection(tmp_path / "big.json", 3, tmp_path / "small.json", pool)
    small = read_selection(tmp_path / "small.json")
    assert small["indices"] == [5, 2, 9] and small["ids"] == ["5", "2", "9"]
    with pytest.raises(ConfigError, match="fewer than the 8"):
        cut_selection(tmp_path / "big.json", 8, tmp_path / "x.json", pool)
