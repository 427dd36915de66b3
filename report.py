"""The report's published numbers and logs, and the statistics that compare runs.

Plain Python, no torch: results/build.py rebuilds the pages with it on any machine, and
evaluate.py and common.py import it.
"""
import csv
import math
import statistics
from pathlib import Path

REPORT = {"cnn": 44.53, "resnet9": 66.02}  # the report's test accuracies (mean of 100 runs)
REPORT_LOG = Path(__file__).with_name("report_log.csv")  # the report's epoch logs, as printed in it


class UserError(Exception):
    """A problem with the user's input: reported as one line, never a traceback."""


def read_report_log(path=REPORT_LOG):
    """The report's epoch logs: {"cnn": rows, "resnet9": rows}, each row a dict of numbers.

    val_acc is a fraction in [0, 1], like every accuracy in this project (the report printed 56.2%).
    """
    logs = {}
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                model = row.pop("model")
                logs.setdefault(model, []).append({k: int(v) if k == "epoch" else float(v)
                                                   for k, v in row.items()})
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise UserError(f"cannot read the report's log {path} ({error}): restore it with "
                               f"git checkout {Path(path).name}") from None
    return logs


def format_row(row, epochs):
    """The report's log line, then what it lacked: train accuracy and time."""
    val = "val_loss: -, val_accuracy: -"  # --val-size 0: nothing is held out
    if row["val_loss"] is not None:
        val = f"val_loss: {row['val_loss']:.4f}, val_accuracy: {100 * row['val_accuracy']:.1f}%"
    return (f"Epoch: {row['epoch']}/{epochs}, last_lr: {row['last_lr']:.5f}, "
            f"train_loss: {row['train_loss']:.4f}, {val}, "
            f"train_accuracy: {100 * row['train_accuracy']:.1f}%, {row['seconds']:.1f} s")


def spread(values):
    """mean, sample standard deviation (n - 1; None for one run) and the values; None if any is."""
    if any(value is None for value in values):
        return None
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "values": values}


def welch(a, b):
    """Welch's t, its degrees of freedom and the two-sided p-value for samples a and b.
    (t and df are None when neither sample varies: p is then 1 for equal means, else 0.)"""
    mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
    se2_a, se2_b = statistics.variance(a) / len(a), statistics.variance(b) / len(b)  # squared standard errors
    if se2_a + se2_b == 0:
        return None, None, float(mean_a == mean_b)
    t = (mean_a - mean_b) / math.sqrt(se2_a + se2_b)
    df = (se2_a + se2_b) ** 2 / (se2_a ** 2 / (len(a) - 1) + se2_b ** 2 / (len(b) - 1))
    return t, df, t_two_sided_p(t, df)


def t_two_sided_p(t, df):
    """P(|T| >= |t|) for Student's t with df degrees of freedom: I_x(df/2, 1/2), x = df / (df + t^2)."""
    return incomplete_beta(df / 2, 0.5, df / (df + t * t))


def incomplete_beta(a, b, x):
    """The regularised incomplete beta function I_x(a, b), by its continued fraction
    (Numerical Recipes, 6.4), on the side of x where the fraction converges quickly."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * beta_fraction(a, b, x) / a
    return 1 - front * beta_fraction(b, a, 1 - x) / b


def beta_fraction(a, b, x, tiny=1e-300, eps=1e-15):
    """The continued fraction of I_x(a, b), evaluated by the modified Lentz method."""
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):  # converges in about sqrt(max(a, b)) steps
        for coefficient in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + coefficient * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + coefficient / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < eps:
            break
    return h
