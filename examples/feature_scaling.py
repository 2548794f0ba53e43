"""Why normalizing inputs helps: the lecture's least-squares example.

Two features, income ~ N(3000, 400^2) dollars and height ~ N(69, 3^2) inches,
feed a linear least-squares model. The Hessian of its loss is
``H = (1/n) sum_i x_i x_i^T``; gradient descent needs about
``kappa(H) * ln(1/tol) / 2`` steps, where ``kappa`` is its condition number.
The script compares three scalings of the same data:

- dollars and inches;
- thousands of dollars and feet, N(3, 0.4^2) and N(5.75, 0.25^2);
- standardized (each feature minus its mean, over its standard deviation).

For each it prints the condition number in closed form, ``E[x x^T] =
mu mu^T + Sigma``, and sampled from ``--n`` draws. It then runs gradient
descent with step ``1 / lambda_max(H)`` from zero, prints the iterations to
reach a relative loss gap ``--tol``, and plots the loss curves.

Run:
    python examples/feature_scaling.py [--n 10000] [--max-iters 1000000]

Writes ``OUT/feature_scaling.json`` and ``OUT/feature_scaling.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

INCOME_DOLLARS = (3000.0, 400.0)  # mean, standard deviation
HEIGHT_INCHES = (69.0, 3.0)
LECTURE_CONDITION = {"dollars_inches": 9.2e4, "thousands_feet": 281.7}
# y = income / 400 + height / 3 + noise: both features matter equally.
TRUE_WEIGHTS_DOLLARS = np.array([1 / 400, 1 / 3])
NOISE = 1.0


@dataclasses.dataclass(frozen=True)
class Scaling:
    """One way of expressing the two features.

    Attributes:
        key: Short name used in the JSON.
        label: Human-readable name.
        divide_by: What dollars and inches are divided by (ignored when
            ``standardize``).
        standardize: Subtract the sample mean and divide by the sample std.
    """

    key: str
    label: str
    divide_by: tuple[float, float] = (1.0, 1.0)
    standardize: bool = False


SCALINGS = (
    Scaling("dollars_inches", "dollars, inches"),
    Scaling("thousands_feet", "thousands of $, feet", divide_by=(1000.0, 12.0)),
    Scaling("standardized", "standardized", standardize=True),
)


def analytic_hessian(scaling: Scaling) -> np.ndarray:
    """Returns ``E[x x^T] = mu mu^T + Sigma`` for the population.

    Args:
        scaling: The units of the features.

    Returns:
        The 2x2 expected Hessian (the identity when standardized).
    """
    if scaling.standardize:
        return np.eye(2)
    mean = np.array([INCOME_DOLLARS[0], HEIGHT_INCHES[0]]) / scaling.divide_by
    std = np.array([INCOME_DOLLARS[1], HEIGHT_INCHES[1]]) / scaling.divide_by
    return np.outer(mean, mean) + np.diag(std**2)


def condition_number(h: np.ndarray) -> float:
    """Returns ``lambda_max / lambda_min`` of a symmetric positive matrix."""
    eigenvalues = np.linalg.eigvalsh(h)
    return float(eigenvalues[-1] / eigenvalues[0])


def sample(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws the raw data in dollars and inches.

    Args:
        n: Number of people.
        seed: Seed of the NumPy generator.

    Returns:
        ``(x, y)``: features of shape (n, 2) and targets of shape (n,).
    """
    rng = np.random.default_rng(seed)
    income = rng.normal(*INCOME_DOLLARS, size=n)
    height = rng.normal(*HEIGHT_INCHES, size=n)
    x = np.stack([income, height], axis=1)
    y = x @ TRUE_WEIGHTS_DOLLARS + rng.normal(0.0, NOISE, size=n)
    return x, y


def rescale(x: np.ndarray, y: np.ndarray, scaling: Scaling) -> tuple[np.ndarray, ...]:
    """Expresses the data in the units of ``scaling``.

    A standardized problem has no intercept column, so its target is
    centered too; the intercept (the mean of y) separates from the slopes.

    Args:
        x: Raw features in dollars and inches, shape (n, 2).
        y: Targets, shape (n,).
        scaling: The units wanted.

    Returns:
        ``(x, y)`` in those units.
    """
    if scaling.standardize:
        return (x - x.mean(axis=0)) / x.std(axis=0), y - y.mean()
    return x / np.array(scaling.divide_by), y


def gradient_descent(
    x: np.ndarray, y: np.ndarray, tol: float, max_iters: int
) -> tuple[np.ndarray, int | None, float]:
    """Runs gradient descent on ``L(w) = ||x w - y||^2 / (2n)`` from w = 0.

    The step is ``1 / lambda_max(H)``, the largest one that is safe for any
    starting point.

    Args:
        x: Features, shape (n, d).
        y: Targets, shape (n,).
        tol: Stop when ``(L(w) - L*) / (L(0) - L*)`` falls to ``tol``.
        max_iters: Give up after this many steps.

    Returns:
        ``(gaps, iterations, step)``: the relative loss gap after each step
        (starting with 1.0 at step 0), the number of steps to reach ``tol``
        (None if not reached) and the step size.
    """
    n = len(y)
    h = x.T @ x / n
    g = x.T @ y / n
    w_star = np.linalg.solve(h, g)
    step = 1.0 / np.linalg.eigvalsh(h)[-1]

    def gap(w: np.ndarray) -> float:
        # L(w) - L* = (w - w*)^T H (w - w*) / 2 for a quadratic: no cancellation.
        d = w - w_star
        return 0.5 * float(d @ h @ d)

    w = np.zeros_like(g)
    initial = gap(w)
    gaps = [1.0]
    iterations = None
    for k in range(1, max_iters + 1):
        w = w - step * (h @ w - g)
        gaps.append(gap(w) / initial)
        if gaps[-1] <= tol:
            iterations = k
            break
    return np.array(gaps), iterations, float(step)


def predicted_iterations(kappa: float, tol: float) -> int:
    """Returns the worst-case steps of GD with step 1/L to shrink the gap by tol.

    Each step multiplies the gap along the flattest direction by
    ``(1 - 1/kappa)^2``.

    Args:
        kappa: Condition number of the Hessian.
        tol: Wanted relative loss gap.

    Returns:
        ``ceil(ln(tol) / (2 ln(1 - 1/kappa)))``, or 1 when kappa is 1.
    """
    if kappa <= 1.0 + 1e-12:
        return 1
    return math.ceil(math.log(tol) / (2.0 * math.log(1.0 - 1.0 / kappa)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line.

    Args:
        argv: Arguments, without the program name; None reads sys.argv.

    Returns:
        The parsed flags.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="sample size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-6, help="relative loss gap")
    parser.add_argument("--max-iters", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=Path("results"))
    return parser.parse_args(argv)


def plot(curves: dict[str, np.ndarray], tol: float, path: Path) -> None:
    """Plots the relative loss gap against the step for each scaling.

    Args:
        curves: Gap curves by scaling label.
        tol: The convergence threshold, drawn as a line.
        path: Where to write the PNG.
    """
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, gaps in curves.items():
        # Thin very long curves; keep step 0 and the last step.
        keep = np.unique(np.geomspace(1, len(gaps), 2000).astype(int) - 1)
        ax.plot(keep, np.maximum(gaps[keep], 1e-300), label=label)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_yscale("log")
    ax.axhline(tol, color="gray", linestyle="--", label=f"tol = {tol:g}")
    ax.set_xlabel("gradient descent step")
    ax.set_ylabel("(L(w) - L*) / (L(0) - L*)")
    ax.set_ylim(bottom=min(tol / 100, 1e-8), top=2)
    ax.set_title("Least squares, step 1/lambda_max: same data, three scalings")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Prints the table, writes the JSON and the PNG.

    Args:
        argv: Arguments, without the program name; None reads sys.argv.
    """
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    x_raw, y_raw = sample(args.n, args.seed)

    results: dict[str, dict] = {}
    curves: dict[str, np.ndarray] = {}
    for scaling in SCALINGS:
        x, y = rescale(x_raw, y_raw, scaling)
        analytic = condition_number(analytic_hessian(scaling))
        sampled = condition_number(x.T @ x / len(x))
        gaps, iterations, step = gradient_descent(x, y, args.tol, args.max_iters)
        curves[scaling.label] = gaps
        results[scaling.key] = {
            "label": scaling.label,
            "analytic_condition": analytic,
            "sampled_condition": sampled,
            "lecture_condition": LECTURE_CONDITION.get(scaling.key),
            "step_size": step,
            "gd_iterations": iterations,
            "predicted_iterations": predicted_iterations(sampled, args.tol),
        }

    print(f"n = {args.n:,} samples, seed {args.seed}; GD from w = 0, step 1/lambda_max")
    header = (
        f"{'scaling':<22}{'kappa analytic':>15}{'kappa sampled':>15}"
        f"{'lecture':>10}{'GD steps':>12}{'bound':>12}"
    )
    print(header)
    for r in results.values():
        lecture = f"{r['lecture_condition']:.4g}" if r["lecture_condition"] else "~1"
        steps = r["gd_iterations"]
        steps = f"{steps:,}" if steps else f">{args.max_iters:,}"
        print(
            f"{r['label']:<22}{r['analytic_condition']:>15.4g}"
            f"{r['sampled_condition']:>15.4g}{lecture:>10}{steps:>12}"
            f"{r['predicted_iterations']:>12,}"
        )
    print(
        f"'GD steps': steps until (L - L*) / (L(0) - L*) <= {args.tol:g}. 'bound':"
        " ln(tol) / (2 ln(1 - 1/kappa)), the worst case for that kappa."
    )

    ratios = ", ".join(
        f"{r['lecture_condition'] / r['analytic_condition']:.3f} ({r['label']})"
        for r in results.values()
        if r["lecture_condition"]
    )
    print(f"The lecture's figures over the closed form: {ratios}.")

    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    summary = {"config": config, "scalings": results}
    (args.out / "feature_scaling.json").write_text(json.dumps(summary, indent=2))
    plot(curves, args.tol, args.out / "feature_scaling.png")
    print(f"Wrote {args.out / 'feature_scaling.json'} and feature_scaling.png")


if __name__ == "__main__":
    main()
