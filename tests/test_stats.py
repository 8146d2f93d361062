"""mux.stats: paired comparisons of two models on the same test items, over seeds, verdicts and headline keys."""
import math

import numpy as np
import pytest

import mux
from mux.stats import (PairedDifference, expected_half_width, gap_metrics, gap_table, interval_warning, items_needed,
                       paired_difference, paired_difference_over_seeds, verdict)


def correlated_models(rng, m, seeds=1, delta=0.03, seed_sd=0.0, shared=0.5):
    """0/1 results of models A and B on the same m items: a shared item difficulty, A better by ``delta`` in
    expectation (the true difference), each seed shifting each model's accuracy by N(0, seed_sd), and
    a fraction ``shared`` of the (seed, item) draws common to both models (correlated errors)."""
    p = rng.uniform(0.3, 0.85, m)
    pa = np.clip(p[None] + delta + rng.normal(0, seed_sd, (seeds, 1)), 0, 1)
    pb = np.clip(p[None] + rng.normal(0, seed_sd, (seeds, 1)), 0, 1)
    u = rng.uniform(size=(seeds, m))
    v = np.where(rng.uniform(size=(seeds, m)) < shared, u, rng.uniform(size=(seeds, m)))
    return (u < pa).astype(float), (v < pb).astype(float)


def test_identical_models_tie_with_gap_zero():
    a = np.random.default_rng(0).integers(0, 2, 300)
    d = paired_difference(a, a.copy())
    assert d.gap == 0 and d.low <= 0 <= d.high and d.contains_zero
    assert (d.b10, d.b01, d.p_value, d.m, d.seeds) == (0, 0, 1.0, 300, 1)
    assert verdict(d, "vanilla", "T-MUX") == "tie"


def test_one_model_right_where_the_other_is_wrong():
    a = np.ones(100)
    d = paired_difference(a, 1 - a)
    assert d.gap == 1.0 and (d.b10, d.b01) == (100, 0)
    assert d.p_value < 1e-25
    assert verdict(d, "vanilla", "T-MUX") == "vanilla ahead"
    assert verdict(paired_difference(1 - a, a), "vanilla", "T-MUX") == "T-MUX ahead"


def test_mcnemar_mid_p_on_a_small_case():
    # 8 discordant items, 7 for A: exact two-sided p = 2 * 9/256, mid-p = that minus P(X=1) = 8/256
    a = np.array([1] * 7 + [0] + [1] * 20 + [0] * 5)
    b = np.array([0] * 7 + [1] + [1] * 20 + [0] * 5)
    d = paired_difference(a, b)
    assert (d.b10, d.b01) == (7, 1)
    assert d.p_value == pytest.approx(2 * 9 / 256 - 8 / 256)


def test_float_scores_have_no_mcnemar():
    rng = np.random.default_rng(3)
    a, b = rng.uniform(size=200), rng.uniform(size=200)
    d = paired_difference(a, b)
    assert d.p_value is None and d.b10 is None and d.gap == pytest.approx(a.mean() - b.mean())


def test_results_reproduce_given_the_seed():
    a, b = correlated_models(np.random.default_rng(4), 500)
    assert paired_difference(a[0], b[0], seed=7) == paired_difference(a[0], b[0], seed=7)
    assert paired_difference(a[0], b[0], seed=7).low != paired_difference(a[0], b[0], seed=8).low


def test_pairing_narrows_the_interval_when_errors_are_correlated():
    a, b = correlated_models(np.random.default_rng(1), 1000, shared=0.8)
    d = paired_difference(a[0], b[0])
    pa, pb = a.mean(), b.mean()
    unpaired = 1.96 * math.sqrt(pa * (1 - pa) / 1000 + pb * (1 - pb) / 1000)
    assert d.unpaired_half_width == pytest.approx(unpaired, rel=0.01)
    assert d.half_width < 0.8 * unpaired and d.normal_half_width < 0.8 * unpaired


def test_normal_and_bootstrap_half_widths_agree_for_2000_items():
    a, b = correlated_models(np.random.default_rng(2), 2000)
    d = paired_difference(a[0], b[0])
    assert d.half_width == pytest.approx(d.normal_half_width, rel=0.15)
    assert d.low == pytest.approx(d.gap - d.half_width) and d.high == pytest.approx(d.gap + d.half_width)


def test_one_seed_reduces_to_the_item_interval_and_says_so():
    a, b = correlated_models(np.random.default_rng(5), 400)
    one = paired_difference(a[0], b[0])
    over = paired_difference_over_seeds([a[0]], [b[0]])
    assert over.seeds == 1 and "one seed" in over.note
    assert (over.gap, over.low, over.high, over.half_width) == (one.gap, one.low, one.high, one.half_width)
    assert paired_difference_over_seeds(a, b).half_width == one.half_width  # a 1 x m array


def test_agreeing_seeds_give_the_item_interval_and_disagreeing_seeds_widen_it():
    a, b = correlated_models(np.random.default_rng(6), 600)
    one = paired_difference(a[0], b[0])
    same = paired_difference_over_seeds([a[0]] * 3, [b[0]] * 3)
    assert same.seeds == 3 and same.gap == pytest.approx(one.gap)
    assert same.half_width == pytest.approx(one.normal_half_width, rel=0.01)
    # same items and overall mean gap, but seed 0's B is better and seed 2's worse
    b_lo, b_hi = b[0].copy(), b[0].copy()
    wrong, right = np.flatnonzero(b[0] == 0)[:40], np.flatnonzero(b[0] == 1)[:40]
    b_hi[wrong], b_lo[right] = 1, 0
    apart = paired_difference_over_seeds([a[0]] * 3, [b_hi, b[0], b_lo])
    assert apart.gap == pytest.approx(one.gap)
    assert apart.half_width > 2 * same.half_width
    assert apart.seed_sd > 0.05 and len(apart.per_seed_gaps) == 3 and apart.df < 10


@pytest.mark.parametrize("seed_sd", [0.02, 0.04])
def test_seed_interval_covers_the_true_difference(seed_sd):
    rng = np.random.default_rng(11)
    hits = 0
    for _ in range(400):  # 3 seeds of 500 items each time, fresh items and seeds
        a, b = correlated_models(rng, 500, seeds=3, delta=0.03, seed_sd=seed_sd)
        d = paired_difference_over_seeds(a, b)
        hits += d.low <= 0.03 <= d.high
    assert 0.90 <= hits / 400 <= 0.99


def test_item_interval_covers_the_true_difference():
    rng = np.random.default_rng(12)
    hits = 0
    for _ in range(100):
        a, b = correlated_models(rng, 300)
        d = paired_difference(a[0], b[0], n_boot=400)
        hits += d.low <= 0.03 <= d.high
    assert 0.88 <= hits / 100 <= 1.0


@pytest.mark.parametrize("a, b, message", [
    ([1, 0, 1], [1, 0], "3 items and correct_b has 2"),
    ([], [], "correct_a is empty"),
    ([1, float("nan"), 0], [1, 1, 0], "correct_a has 1 NaN"),
    ([[1, 0], [0, 1]], [1, 0], "must be 1-D"),
    ([1], [0], "at least 2 test items"),
    (["x", "y"], [1, 0], "must be numbers"),
])
def test_refusals_say_what_was_expected(a, b, message):
    with pytest.raises(ValueError, match=message):
        paired_difference(a, b)


def test_seed_refusals_say_what_was_expected():
    with pytest.raises(ValueError, match="one per-item array per seed"):
        paired_difference_over_seeds([1, 0, 1], [1, 1, 0])
    with pytest.raises(ValueError, match="2 seeds and per_seed_b has 3"):
        paired_difference_over_seeds([[1, 0]] * 2, [[1, 0]] * 3)
    with pytest.raises(ValueError, match="same test items"):
        paired_difference_over_seeds([[1, 0, 1], [1, 0]], [[1, 0, 1], [1, 0, 1]])
    with pytest.raises(ValueError, match="per_seed_b is empty"):
        paired_difference_over_seeds([[1, 0]], [])
    with pytest.raises(ValueError, match=r"per_seed_a\[1\] has 1 NaN"):
        paired_difference_over_seeds(np.array([[1, 0], [np.nan, 1]]), np.ones((2, 2)))
    with pytest.raises(ValueError, match="n_boot"):
        paired_difference([1, 0], [0, 1], n_boot=5)


def test_two_seeds_warn_that_a_finding_needs_three():
    a, b = correlated_models(np.random.default_rng(8), 200, seeds=2, seed_sd=0.02)
    assert "at least 3 seeds" in paired_difference_over_seeds(a, b).note


def test_expected_half_width_and_warning():
    assert expected_half_width(0.9, 80) == pytest.approx(1.96 * math.sqrt(2 * 0.09 / 80), rel=1e-3)
    assert expected_half_width(0.9, 80, discordant=0.05) == pytest.approx(1.96 * math.sqrt(0.05 / 80), rel=1e-3)
    warning = interval_warning(80, 0.03, p=0.9)
    assert warning.startswith("with 80 test items the 95% interval on a difference is about \u00b10.093, wider than "
                              "\u00b10.03, the width this chapter promises (about ")
    need = items_needed(0.03, 0.9)
    assert expected_half_width(0.9, need) <= 0.03 < expected_half_width(0.9, need - 1)
    assert interval_warning(need, 0.03, p=0.9) is None
    with pytest.raises(ValueError, match="accuracy"):
        expected_half_width(1.5, 80)
    with pytest.raises(ValueError, match="number of test items"):
        expected_half_width(0.9, 0)


def test_gap_metrics_keys():
    d = paired_difference([1, 1, 1, 0, 1, 1], [1, 0, 1, 0, 1, 0])
    assert gap_metrics("tmux", 2, d) == {"tmux_gap_n2": round(d.gap, 4), "tmux_gap_n2_ci95": round(d.half_width, 4)}
    assert set(gap_metrics("tmux", d)) == {"tmux_gap", "tmux_gap_ci95"}
    assert set(gap_metrics("datamux", None, d)) == {"datamux_gap", "datamux_gap_ci95"}
    assert all(type(v) is float for v in gap_metrics("tmux", 2, d).values())
    with pytest.raises(ValueError, match="flat metric key"):
        gap_metrics("t mux", 2, d)
    with pytest.raises(ValueError, match="multiplexed instances"):
        gap_metrics("tmux", 0, d)
    with pytest.raises(TypeError, match="PairedDifference"):
        gap_metrics("tmux", 2, 0.03)


def test_gap_table():
    rng = np.random.default_rng(9)
    a, b = correlated_models(rng, 300, seeds=3, seed_sd=0.01)
    same = np.ones(50)
    table = gap_table([("vanilla", "T-MUX N=2", a[0], b[0]),
                       ("vanilla", "T-MUX N=2", a, b),
                       ("vanilla", "copy", same, same),
                       ("vanilla", "T-MUX N=4", paired_difference(same, np.zeros(50)))])
    lines = table.splitlines()
    assert lines[0] == "| A | B | gap (A - B) | 95% interval | seeds | items | verdict |"
    assert len(lines) == 6
    assert "| 1 | 300 |" in lines[2] and "| 3 | 300 |" in lines[3]
    assert lines[4].endswith("| 1 | 50 | tie |") and lines[5].endswith("| vanilla ahead |")
    assert lines[4].startswith("| vanilla 1.000 | copy 1.000 | +0.000 |")
    with pytest.raises(ValueError, match="gap_table row"):
        gap_table([("vanilla", "T-MUX", a[0])])


def test_exported_from_mux():
    assert mux.paired_difference is paired_difference and mux.PairedDifference is PairedDifference
    assert mux.gap_metrics is gap_metrics and mux.verdict is verdict
    d = paired_difference([1, 0, 1], [1, 0, 0])
    with pytest.raises(Exception):
        d.gap = 0.0  # frozen
