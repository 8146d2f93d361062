"""Comparing two models on the same test items: paired differences, their 95% intervals, verdicts.

Two models scored on the SAME test items are not two independent samples: an item that is hard for
one is usually hard for the other. So we compare them item by item (``d_i = a_i - b_i``) and ask how
much the mean of those differences would move if we had drawn other test items (and, over several
seeds, other training runs). Items that both models get right, or both get wrong, add no noise to the
difference; that is why a paired interval is narrower than one that treats the two accuracies as
independent.

The course's rules, in one place:

- a comparison is paired on the same test items and reported with a 95% interval
  (:func:`paired_difference`, or :func:`paired_difference_over_seeds` for several seeds; a finding
  rests on at least 3 seeds);
- a gap whose interval contains 0 is a tie (:func:`verdict`);
- a headline difference against the vanilla model is ``<model>_gap_n<N>`` (vanilla minus model, a
  fraction) with its half-width ``<model>_gap_n<N>_ci95`` (:func:`gap_metrics`);
- a test set too small for the interval a chapter promises is said so (:func:`interval_warning`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np

__all__ = ["PairedDifference", "paired_difference", "paired_difference_over_seeds", "verdict", "expected_half_width",
           "items_needed", "interval_warning", "gap_table", "gap_metrics"]

Z95 = 1.959963984540054  # the normal distribution's 97.5% quantile: mean +- Z95 * SE covers 95%


@dataclass(frozen=True)
class PairedDifference:
    """A paired comparison of model A with model B on the same ``m`` test items (over ``seeds`` seeds).

    ``gap`` is mean(A) - mean(B); the 95% interval is ``[low, high] = gap -+ half_width``. ``method``
    says how the interval was made and ``note`` anything a reader should know (one seed, two seeds).
    ``b10``/``b01`` count the items only A / only B got right (0/1 results, one seed), and ``p_value``
    is McNemar's exact mid-p test on them; over seeds it is the t test of the combined interval.
    """

    gap: float
    low: float
    high: float
    half_width: float
    mean_a: float
    mean_b: float
    m: int
    seeds: int
    method: str
    normal_half_width: float
    unpaired_half_width: float | None = None
    p_value: float | None = None
    b10: int | None = None
    b01: int | None = None
    per_seed_gaps: tuple[float, ...] = ()
    seed_sd: float | None = None
    df: float | None = None
    note: str = ""

    @property
    def interval(self) -> tuple[float, float]:
        return (self.low, self.high)

    @property
    def contains_zero(self) -> bool:
        """True when the 95% interval contains 0: the data cannot tell the two models apart."""
        return self.low <= 0.0 <= self.high


def _as_scores(x, what: str) -> np.ndarray:
    """``x`` as a 1-D float array of per-item results, or a ValueError saying what was expected."""
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be numbers, one 0/1 (or score) per test item: {e}") from None
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D, one 0/1 (or score) per test item; got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what} is empty: expected one 0/1 (or score) per test item")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"{what} has {int(bad.sum())} NaN or infinite value(s) (first at item "
                         f"{int(np.argmax(bad))}): expected a finite 0/1 (or score) for every test item")
    return arr


def _check_same_items(a: np.ndarray, b: np.ndarray, what_a: str, what_b: str) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"{what_a} has {a.shape[-1]} items and {what_b} has {b.shape[-1]}: a paired comparison "
                         "needs both models' results on the same test items, in the same order")
    if a.shape[-1] < 2:
        raise ValueError(f"{what_a} and {what_b} have 1 item: an interval needs at least 2 test items")


def _is_binary(*arrays: np.ndarray) -> bool:
    return all(np.isin(x, (0.0, 1.0)).all() for x in arrays)


def _bootstrap_means(d: np.ndarray, n_boot: int, seed: int, chunk_cells: int = 2_000_000) -> np.ndarray:
    """``n_boot`` means of ``d`` resampled with replacement (chunks keep the index arrays small)."""
    rng = np.random.default_rng(seed)
    m = d.size
    per_chunk = max(1, chunk_cells // m)
    means = [d[rng.integers(0, m, size=(min(per_chunk, n_boot - i), m))].mean(axis=1)
             for i in range(0, n_boot, per_chunk)]
    return np.concatenate(means)


def _mcnemar_mid_p(b10: int, b01: int) -> float:
    """McNemar's exact test, mid-p version: under "no difference" each discordant item is a fair coin."""
    from scipy.stats import binom

    n, k = b10 + b01, min(b10, b01)
    if n == 0:
        return 1.0
    return float(min(1.0, 2 * binom.cdf(k, n, 0.5) - binom.pmf(k, n, 0.5)))


def paired_difference(correct_a, correct_b, *, seed: int = 0, n_boot: int = 2000) -> PairedDifference:
    """Model A minus model B on the same test items, with a 95% interval (one training seed).

    ``correct_a``/``correct_b``: per-item results in the same item order, 0/1 (right or wrong) or a
    score (e.g. an item's accuracy over its tokens). The interval resamples test items with
    replacement (a paired bootstrap: an item's two results travel together, so items both models get
    right or wrong add no noise) and is ``gap -+ half_width``, half the width of the bootstrap's 2.5-97.5%
    range; ``seed`` fixes the resampling so a result reproduces. ``normal_half_width`` is the
    textbook ``1.96 * sd(d) / sqrt(m)`` of the per-item differences d (for 0/1 results, the paired
    McNemar-type interval) and ``unpaired_half_width`` what treating the two as independent would give.
    """
    a, b = _as_scores(correct_a, "correct_a"), _as_scores(correct_b, "correct_b")
    _check_same_items(a, b, "correct_a", "correct_b")
    if not (isinstance(n_boot, (int, np.integer)) and n_boot >= 100):
        raise ValueError(f"n_boot must be an int >= 100 bootstrap resamples, got {n_boot!r}")
    d, m = a - b, a.size
    gap = float(d.mean())
    boot = _bootstrap_means(d, n_boot, seed)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    half = float(hi - lo) / 2
    b10 = b01 = p = None
    if _is_binary(a, b):
        b10, b01 = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
        p = _mcnemar_mid_p(b10, b01)
    return PairedDifference(
        gap=gap, low=gap - half, high=gap + half, half_width=half, mean_a=float(a.mean()), mean_b=float(b.mean()),
        m=m, seeds=1, method=f"paired bootstrap over items (n_boot={n_boot}, seed={seed})",
        normal_half_width=Z95 * float(d.std(ddof=1)) / math.sqrt(m),
        unpaired_half_width=Z95 * math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / m),
        p_value=p, b10=b10, b01=b01, per_seed_gaps=(gap,))


def _is_one_seed(x) -> bool:
    """True for a single per-item array (1-D), False for one array per seed."""
    if hasattr(x, "detach"):
        return x.dim() == 1
    if isinstance(x, (list, tuple)):
        return len(x) > 0 and all(np.ndim(v) == 0 for v in x)
    return np.ndim(x) == 1


def _as_seed_matrix(x, what: str) -> np.ndarray:
    """A (seeds x items) float array from a list of per-item arrays (one per seed) or a 2-D array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    if _is_one_seed(x):
        raise ValueError(f"{what} must hold one per-item array per seed (a list of arrays, or seeds x items); "
                         "got a single per-item array: wrap it as [scores] or use paired_difference")
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError(f"{what} is empty: expected one per-item array per seed")
        rows = [_as_scores(v, f"{what}[{i}]") for i, v in enumerate(x)]
        sizes = {r.size for r in rows}
        if len(sizes) > 1:
            raise ValueError(f"{what} has seeds with {sorted(sizes)} items: every seed must be scored on the same "
                             "test items, in the same order")
        return np.stack(rows)
    arr = np.asarray(x, dtype=float)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be seeds x items (2-D) or a list of per-item arrays; got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{what} is empty: expected one per-item array per seed")
    return np.stack([_as_scores(r, f"{what}[{i}]") for i, r in enumerate(arr)])


def paired_difference_over_seeds(per_seed_a, per_seed_b, *, seed: int = 0, n_boot: int = 2000) -> PairedDifference:
    """Model A minus model B over several training seeds, on the same test items.

    ``per_seed_a[s]`` and ``per_seed_b[s]`` are the per-item results of the two models trained with
    seed ``s`` (same seed, same data order): models are paired by seed index, items by position.
    The gap is the mean over seeds and items. Its squared standard error adds two parts: which test
    items we drew (the variance of the seed-averaged per-item differences over m) and which seeds we
    trained (the variance of the per-seed gaps over the number of seeds). The interval is
    ``gap -+ t * SE``, the t quantile on Satterthwaite's degrees of freedom, so with 3 disagreeing seeds
    it widens honestly (t = 4.3 at 2 df). The per-seed gaps also carry some item noise, counted twice:
    the interval errs on the wide side (simulated coverage about 0.95-0.98). We chose this over a
    two-level bootstrap because resampling 3 seeds sees only 10 distinct resamples and understates
    the seed variance by a third, so such intervals cover less than 95%. With one seed this is
    :func:`paired_difference` (``seeds=1``, said in ``note``; ``seed`` and ``n_boot`` serve its bootstrap).
    """
    from scipy.stats import t as student_t

    A, B = _as_seed_matrix(per_seed_a, "per_seed_a"), _as_seed_matrix(per_seed_b, "per_seed_b")
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"per_seed_a has {A.shape[0]} seeds and per_seed_b has {B.shape[0]}: models are paired "
                         "by seed index, so both need the same seeds")
    _check_same_items(A, B, "per_seed_a", "per_seed_b")
    S, m = A.shape
    if S == 1:
        one = paired_difference(A[0], B[0], seed=seed, n_boot=n_boot)
        return replace(one, note="one seed: the interval covers test-item sampling only, not seed-to-seed "
                                  "variation; a finding needs at least 3 seeds")
    D = A - B
    seed_gaps = D.mean(axis=1)                    # one gap per seed
    item_d = D.mean(axis=0)                       # each item's difference, averaged over seeds
    gap = float(D.mean())
    var_items = float(item_d.var(ddof=1)) / m     # SE^2 from test-item sampling
    var_seeds = float(seed_gaps.var(ddof=1)) / S  # SE^2 from seed-to-seed variation
    se = math.sqrt(var_items + var_seeds)
    denom = var_items ** 2 / (m - 1) + var_seeds ** 2 / (S - 1)
    df = (var_items + var_seeds) ** 2 / denom if denom > 0 else float(m - 1)
    half = float(student_t.ppf(0.975, df)) * se
    p = float(2 * student_t.sf(abs(gap) / se, df)) if se > 0 else (1.0 if gap == 0 else 0.0)
    note = "" if S >= 3 else "two seeds: the seed variation is barely measured; a finding needs at least 3 seeds"
    return PairedDifference(
        gap=gap, low=gap - half, high=gap + half, half_width=half, mean_a=float(A.mean()), mean_b=float(B.mean()),
        m=m, seeds=S, method=f"items + seeds: t interval on {df:.1f} df (paired by seed index and item)",
        normal_half_width=Z95 * se, p_value=p, per_seed_gaps=tuple(float(g) for g in seed_gaps),
        seed_sd=float(seed_gaps.std(ddof=1)), df=float(df), note=note)


def verdict(diff: PairedDifference, name_a: str = "A", name_b: str = "B") -> str:
    """``"tie"`` when the 95% interval contains 0, else ``"<name_a> ahead"`` or ``"<name_b> ahead"``."""
    if diff.contains_zero:
        return "tie"
    return f"{name_a} ahead" if diff.gap > 0 else f"{name_b} ahead"


def _check_p_m(p: float, m: int | None = None, discordant: float | None = None) -> None:
    if not 0 <= p <= 1:
        raise ValueError(f"p is an accuracy, expected a number in [0, 1], got {p}")
    if m is not None and not (isinstance(m, (int, np.integer)) and m >= 1):
        raise ValueError(f"m is a number of test items, expected an int >= 1, got {m!r}")
    if discordant is not None and not 0 <= discordant <= 1:
        raise ValueError(f"discordant is the fraction of items the two models disagree on, expected [0, 1], "
                         f"got {discordant}")


def expected_half_width(p: float, m: int, *, discordant: float | None = None) -> float:
    """About how wide (+-) the 95% interval on a difference of two accuracies near ``p`` will be on ``m`` items.

    The variance of a per-item difference is at most the fraction of items the models disagree on;
    without ``discordant`` we assume two models at accuracy ``p`` whose errors are independent
    (disagreement ``2 p (1 - p)``), which is usually pessimistic: models tend to miss the same items.
    """
    _check_p_m(p, m, discordant)
    q = 2 * p * (1 - p) if discordant is None else discordant
    return Z95 * math.sqrt(q / m)


def items_needed(target_half_width: float, p: float, *, discordant: float | None = None) -> int:
    """How many test items give a 95% interval of about +-``target_half_width`` (see :func:`expected_half_width`)."""
    _check_p_m(p, None, discordant)
    if not target_half_width > 0:
        raise ValueError(f"target_half_width must be > 0, got {target_half_width}")
    q = 2 * p * (1 - p) if discordant is None else discordant
    return max(1, math.ceil(q * (Z95 / target_half_width) ** 2))


def interval_warning(m: int, target_half_width: float, *, p: float = 0.5, discordant: float | None = None,
                     promised_by: str = "the width this chapter promises") -> str | None:
    """A sentence when ``m`` test items are too few for the promised +-``target_half_width``, else None.

    ``p`` is the accuracy you expect (0.5, the default, is the worst case); ``promised_by`` says what
    the target is; e.g. "with 80 test items the 95% interval on a difference is about +-0.093, wider
    than +-0.03, the width this chapter promises (about 769 items would give it at accuracy 0.9)".
    """
    if not target_half_width > 0:
        raise ValueError(f"target_half_width must be > 0, got {target_half_width}")
    width = expected_half_width(p, m, discordant=discordant)
    if width <= target_half_width:
        return None
    need = items_needed(target_half_width, p, discordant=discordant)
    return (f"with {m} test items the 95% interval on a difference is about \u00b1{width:.2g}, wider than "
            f"\u00b1{target_half_width:.2g}, {promised_by} (about {need} items would give it at accuracy {p:.2g})")


def _row_difference(row, seed: int, n_boot: int) -> tuple[str, str, PairedDifference]:
    if len(row) == 3 and isinstance(row[2], PairedDifference):
        return row[0], row[1], row[2]
    if len(row) != 4:
        raise ValueError("a gap_table row is (name_a, name_b, per_item_a, per_item_b) or "
                         f"(name_a, name_b, PairedDifference); got {len(row)} fields")
    name_a, name_b, a, b = row
    diff = (paired_difference(a, b, seed=seed, n_boot=n_boot) if _is_one_seed(a)
            else paired_difference_over_seeds(a, b, seed=seed, n_boot=n_boot))
    return name_a, name_b, diff


def gap_table(rows, *, seed: int = 0, n_boot: int = 2000) -> str:
    """A markdown table, one comparison a row: ``| A | B | gap (A - B) | 95% interval | seeds | items | verdict |``.

    A row is ``(name_a, name_b, per_item_a, per_item_b)`` (1-D arrays: one seed; seeds x items or a
    list of arrays: several) or ``(name_a, name_b, diff)`` with a :class:`PairedDifference`. Put the
    vanilla model as A so the gap reads "vanilla minus model".
    """
    lines = ["| A | B | gap (A - B) | 95% interval | seeds | items | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        name_a, name_b, d = _row_difference(tuple(row), seed, n_boot)
        lines.append(f"| {name_a} {d.mean_a:.3f} | {name_b} {d.mean_b:.3f} | {d.gap:+.3f} | "
                     f"[{d.low:+.3f}, {d.high:+.3f}] (\u00b1{d.half_width:.3f}) | {d.seeds} | {d.m} | "
                     f"{verdict(d, name_a, name_b)} |")
    return "\n".join(lines)


_NAME = re.compile(r"[A-Za-z0-9]+(_[A-Za-z0-9]+)*")


def gap_metrics(name: str, n: int | PairedDifference | None = None, diff: PairedDifference | None = None) -> dict:
    """The headline keys of a gap against the vanilla model, rounded to 4 decimals:
    ``{"<name>_gap_n<n>": gap, "<name>_gap_n<n>_ci95": half_width}`` (without ``n``: ``<name>_gap``
    and ``<name>_gap_ci95``). ``diff`` must be ``paired_difference(vanilla, model)``: vanilla minus
    model, a fraction. ``gap_metrics("tmux", 2, d)`` or ``gap_metrics("tmux", d)``.
    """
    if isinstance(n, PairedDifference) and diff is None:
        n, diff = None, n
    if not isinstance(diff, PairedDifference):
        raise TypeError(f"diff must be a PairedDifference (from paired_difference), got {type(diff).__name__}")
    if not (isinstance(name, str) and _NAME.fullmatch(name)):
        raise ValueError(f"name must be letters, digits and single underscores (a flat metric key), got {name!r}")
    if n is not None and not (isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1):
        raise ValueError(f"n is the number of multiplexed instances, expected an int >= 1, got {n!r}")
    key = f"{name}_gap" if n is None else f"{name}_gap_n{int(n)}"
    return {key: round(float(diff.gap), 4), f"{key}_ci95": round(float(diff.half_width), 4)}
