"""The statistics medadapt reports: a mean with its spread and confidence interval over folds,
a paired comparison of two methods over the same folds, and the interval of a proportion
(a few test images: 6 of 6 correct is 95 % CI 54-100 %, not "100 %")."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for fewer than two values."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def confidence_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """The ``level`` confidence interval of the mean of ``values`` (Student's t, n - 1 degrees of
    freedom); None for fewer than two values."""
    from scipy import stats

    values = [float(v) for v in values if v is not None]
    if len(values) < 2:
        return None
    mean, sem = statistics.fmean(values), statistics.stdev(values) / len(values) ** 0.5
    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * sem
    return mean - half, mean + half


def paired_comparison(reference: Sequence[float], other: Sequence[float]) -> dict | None:
    """Reference minus other, fold by fold (the same training subset and seed): the mean
    difference, its 95 % confidence interval and the paired t-test's two-sided p-value."""
    from scipy import stats

    pairs = [(float(a), float(b)) for a, b in zip(reference, other) if a is not None and b is not None]
    if len(pairs) < 2:
        return None
    differences = [a - b for a, b in pairs]
    if max(differences) == min(differences):  # no spread: the t-test is undefined
        p_value = 0.0 if differences[0] != 0 else 1.0
    else:
        p_value = float(stats.ttest_rel([a for a, _ in pairs], [b for _, b in pairs]).pvalue)
    return {"difference": statistics.fmean(differences), "ci": confidence_interval(differences),
            "p_value": p_value, "pairs": len(pairs)}


def proportion_interval(successes: int, total: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) ``level`` confidence interval of a proportion seen as
    ``successes`` of ``total``: never narrower than it should be, which matters most on the few
    test images of a low-data study."""
    from scipy import stats

    successes, total = int(successes), int(total)
    if total < 1 or not 0 <= successes <= total:
        raise ValueError(f"a proportion needs 0 <= successes <= total and total >= 1, got {successes} of {total}")
    alpha = 1 - level
    low = 0.0 if successes == 0 else float(stats.beta.ppf(alpha / 2, successes, total - successes + 1))
    high = 1.0 if successes == total else float(stats.beta.ppf(1 - alpha / 2, successes + 1, total - successes))
    return low, high


def proportion_text(successes: int, total: int, level: float = 0.95) -> str:
    """"6 of 6 (100 %; 95 % CI 54-100 %)": a proportion as a reader should see it."""
    low, high = proportion_interval(successes, total, level)
    return (f"{successes} of {total} ({100 * successes / total:.0f} %; {100 * level:.0f} % CI "
            f"{100 * low:.0f}-{100 * high:.0f} %)")
