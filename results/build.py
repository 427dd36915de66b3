"""Rebuild every table of numbers in README.md and docs/*.md, and the figures, from the records.

    python results/build.py           # rewrite the tables between their markers, draw docs/*.png
    python results/build.py --check   # change nothing; exit 1 if a table or a quoted % is stale

The records are the JSON files the scripts wrote, committed here:
  results/runs/<aug>-s<seed>/<model>.json   a training run (train_cnn.py / train_resnet.py)
  results/eval/<aug>-s<seed>-<model>.json   its evaluation: report.py --tta --repeats 20 --against-report
  results/eval/ablation/<aug>-s<seed>-<model>.json          report.py --ablation --repeats 3
  results/eval/train-mode/<aug>-s<seed>-<model>-<pipeline>.json
                                            report.py --train-mode --repeat-aug PIPELINE --repeats 5
  results/classroom/<aug>/cnn.json, <aug>-cnn-eval.json    docs/lesson.md's short runs
and report_log.csv, the report's own logs. results/README.md says which command made each.

A table lives in a page between two markers, and only there:
  <!-- build: answer -->
  ...rewritten by this script...
  <!-- end build -->
The prose around the tables is written by hand; --check also fails when it quotes a
percentage that is not among the numbers this script produces (a number typed by hand, or
one that went stale when a record was re-measured).
"""
import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the report's numbers and the statistics, written once, in report.py
import report  # noqa: E402  (plain Python: the pages rebuild without torch)

MODELS = {"cnn": "CNN", "resnet9": "ResNet9"}
RECIPES = {"report": "the report's augmentation (`--aug report`)",
           "standard": "the usual crop and flip (`--aug standard`)",
           "none": "no augmentation (`--aug none`)"}
MARKER = re.compile(r"(<!-- build: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end build -->)", re.S)
PERCENT = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s?%")


class Numbers:
    """Formats numbers for the pages and remembers each one, for the prose check."""

    def __init__(self):
        self.seen = set()

    def pct(self, fraction, digits=2):
        text = f"{100 * fraction:.{digits}f}"
        self.seen.add(text)
        return text

    def points(self, value, digits=2):
        text = f"{value:.{digits}f}"
        self.seen.add(text)
        return text


# ----------------------------------------------------------------------------- the records

def load_records(results):
    """{(model, aug, seed): {"run": training record, "eval": evaluation or None}}, finished runs only."""
    records = {}
    for path in sorted((results / "runs").glob("*/*.json")):
        run = json.loads(path.read_text())
        if "history" not in run or run.get("test_accuracy") is None:
            continue  # not a training record, or a run still going: not a result
        key = (run["model"], run["config"]["aug"], run["seed"])
        evaluation = results / "eval" / f"{path.parent.name}-{run['model']}.json"
        records[key] = {"run": run, "folder": path.parent.name,
                        "eval": json.loads(evaluation.read_text()) if evaluation.exists() else None}
    return records


def load_extra_evaluations(results, kind):
    """The ablation or train-mode evaluations: {(model, aug, seed, test pipeline): record}."""
    found = {}
    for path in sorted((results / "eval" / kind).glob("*.json")):
        r = json.loads(path.read_text())
        found[(r["model"], r["aug"], r["seed"], r["repeated"]["aug"])] = r
    return found


def test_pipelines(records, results, seed_wanted=0):
    """Every test pipeline measured on one seed (0 unless told) of a model, by training recipe:
    the candidates for the report's test numbers. {(aug, pipeline name): {model: accuracy}}."""
    candidates = {}

    def add(model, aug, name, accuracy):
        candidates.setdefault((aug, name), {})[model] = accuracy

    for (model, aug, seed), r in records.items():
        if seed == seed_wanted and r["eval"] is not None:
            add(model, aug, "the report's pipeline", r["eval"]["repeated"]["mean"])
    for (model, aug, seed, _), r in load_extra_evaluations(results, "ablation").items():
        if seed == seed_wanted:
            for step, m in r["ablation"]["only"].items():
                add(model, aug, f"{step} alone", m["mean"])
            for step, m in r["ablation"]["without"].items():
                add(model, aug, f"all but {step}", m["mean"])
    for (model, aug, seed, pipeline), r in load_extra_evaluations(results, "train-mode").items():
        if seed == seed_wanted:
            add(model, aug, f"train mode, --repeat-aug {pipeline}", r["repeated"]["mean"])
    return candidates


def runs_of(records, model, aug):
    return [r for (m, a, _), r in sorted(records.items()) if m == model and a == aug]


def measure(runs, key):
    """One measure of each run, as a list: the clean test accuracy and the held-out accuracy
    after the last epoch from the training record (report.py measures the same), the
    report's protocol from the evaluation (runs not evaluated yet are left out)."""
    if key == "test_accuracy":
        return [r["run"]["test_accuracy"] for r in runs]
    if key == "val_accuracy":
        return [r["run"]["history"][-1]["val_accuracy"] for r in runs]
    return [r["eval"]["repeated"]["mean"] for r in runs if r["eval"] is not None]


def mean_std(values):
    spread = report.spread(values) if values else None
    return (spread["mean"], spread["std"]) if spread else (None, None)


def cell(numbers, values):
    """mean ± std (n = k) in percent, or one value, or "not yet"."""
    mean, std = mean_std(values)
    if mean is None:
        return "not measured yet"
    if std is None:
        return f"{numbers.pct(mean)}% (n = 1)"
    return f"{numbers.pct(mean)}% ± {numbers.points(100 * std)} (n = {len(values)})"


def mixed_precisions(runs):
    """A note such as ' (seeds in bf16 and fp32)' where a recipe's seeds trained in different
    precisions (a CPU without bfloat16 trains in fp32), so a mean over them says so; else ''."""
    precisions = sorted({r["run"]["precision"] for r in runs})
    return f" (seeds in {' and '.join(precisions)})" if len(precisions) > 1 else ""


# ----------------------------------------------------------------------------- the tables

def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def answer_table(records, numbers):
    """Per model: the report's numbers, then ours for each training recipe."""
    rows = []
    report_log = report.read_report_log()
    for model, label in MODELS.items():
        reported_val = report_log[model][-1]["val_acc"]
        rows.append([f"**{label}**", "the report", f'"val_accuracy" {numbers.pct(reported_val, 1)}%',
                     f"{numbers.points(report.REPORT[model])}% (100 passes)", "-"])
        for aug in RECIPES:
            runs = runs_of(records, model, aug)
            trained_by = f"ours, `--aug {aug}`" + mixed_precisions(runs)
            rows.append(["", trained_by, cell(numbers, measure(runs, "val_accuracy")),
                         cell(numbers, measure(runs, "repeated")), cell(numbers, measure(runs, "test_accuracy"))])
    header = ["model", "trained by", "validation accuracy", "the report's test protocol",
              "clean test accuracy"]
    return table(header, rows)


BEYOND_NOISE_P = 0.05  # a gap with Welch's p below this is called beyond the seed-to-seed noise


def mean_gap(a, b):
    """Mean of the seeds a minus mean of the seeds b, in points."""
    return 100 * (mean_std(a)[0] - mean_std(b)[0])


def can_weigh(a, b):
    """Welch's test needs a spread on both sides: two seeds of each at least."""
    return len(a) >= 2 and len(b) >= 2


def welch_row(numbers, a, b):
    """Mean of a minus mean of b in points, ± the standard error of that difference, Welch's p,
    and whether the gap is beyond the seed-to-seed noise, over the seeds of each."""
    if not can_weigh(a, b):
        gap = numbers.points(mean_gap(a, b)) if a and b else "-"
        return [gap, "needs 2 seeds of each", "not tested yet"]
    t, df, p = report.welch(a, b)
    (mean_a, std_a), (mean_b, std_b) = mean_std(a), mean_std(b)
    standard_error = (std_a ** 2 / len(a) + std_b ** 2 / len(b)) ** 0.5
    beyond = "yes" if p < BEYOND_NOISE_P else "no: within the noise of this many seeds"
    df_text = f" (df = {df:.1f})" if df is not None else ""
    return [f"{numbers.points(100 * (mean_a - mean_b))} ± {numbers.points(100 * standard_error)}",
            f"{p:.2g}{df_text}", beyond]


def verdict_table(records, numbers):
    """For each recipe: the ResNet9's clean test accuracy minus the CNN's, with Welch's p."""
    rows = []
    for aug in RECIPES:
        a = measure(runs_of(records, "resnet9", aug), "test_accuracy")
        b = measure(runs_of(records, "cnn", aug), "test_accuracy")
        rows.append([f"`--aug {aug}`", f"{len(a)} and {len(b)}", *welch_row(numbers, a, b)])
    return table(["trained by", "how many seeds (ResNet9, CNN)", "ResNet9 minus CNN (points ± standard error)",
                  "Welch's p (two-sided)", "beyond the seed-to-seed noise?"], rows)


def cost_table(records, numbers):
    """What the report's pipeline cost each model: its clean test accuracy minus another recipe's."""
    rows = []
    for model, label in MODELS.items():
        ours = measure(runs_of(records, model, "report"), "test_accuracy")
        for other in ("none", "standard"):
            theirs = measure(runs_of(records, model, other), "test_accuracy")
            rows.append([label, f"`--aug {other}`", f"{len(ours)} and {len(theirs)}", *welch_row(numbers, ours, theirs)])
    return table(["model", "against", "how many seeds (report, other)",
                  "report minus other (points ± standard error)", "Welch's p (two-sided)",
                  "beyond the seed-to-seed noise?"], rows)


def findings(records, numbers):
    """One plain sentence per finding, from the same numbers as the tables: which model is
    better under each recipe, what the report's pipeline cost each model, what the usual
    recipe gives. A finding whose runs are missing says so."""
    clean = {(model, aug): measure(runs_of(records, model, aug), "test_accuracy")
             for model in MODELS for aug in RECIPES}
    lines = []
    for aug in RECIPES:
        a, b = clean["resnet9", aug], clean["cnn", aug]
        if a and b:
            gap = mean_gap(a, b)
            lines.append(f"Trained with {RECIPES[aug]}, the ResNet9 scores {numbers.points(abs(gap))} points "
                         f"{'above' if gap >= 0 else 'below'} the CNN {evidence(a, b, ('the ResNet9', 'the CNN'))}.")
        else:
            lines.append(f"Trained with {RECIPES[aug]}, the ResNet9 against the CNN: not measured yet.")
    for model, label in MODELS.items():
        parts = []
        for other, name in (("none", "no augmentation"), ("standard", "the usual recipe")):
            a, b = clean[model, other], clean[model, "report"]
            if a and b:
                cost = mean_gap(a, b)
                parts.append(f"{'cost' if cost >= 0 else 'gained'} it {numbers.points(abs(cost))} points "
                             f"against {name} {evidence(a, b, (f'`--aug {other}`', '`--aug report`'))}")
            else:
                parts.append(f"against {name}: not measured yet")
        lines.append(f"The report's augmentation, for the {label}: {parts[0]}; {parts[1]}.")
    usual = [f"the {label} {cell(numbers, clean[model, 'standard'])}" for model, label in MODELS.items()]
    lines.append(f"The usual recipe's clean test accuracy: {usual[0]}, {usual[1]}.")
    return "".join(f"- {line}\n" for line in lines)


def evidence(a, b, names):
    """How far a gap between the seeds a and b (named names[0], names[1]) can be trusted, in
    brackets: "(3 seeds of the ResNet9, 1 of the CNN: with one seed, not yet a verdict)"."""
    seeds = f"{len(a)} seed{'s' if len(a) > 1 else ''} of {names[0]}, {len(b)} of {names[1]}"
    if not can_weigh(a, b):
        return f"({seeds}: with one seed, not yet a verdict)"
    p = report.welch(a, b)[2]
    noise = "beyond the seed-to-seed noise" if p < BEYOND_NOISE_P else "within the seed-to-seed noise"
    return f"({seeds}; Welch's p = {p:.2g}: {noise})"


def runs_table(records, numbers):
    """Every finished run: what it scored, where and how long it trained."""
    rows = []
    for (model, aug, seed), r in sorted(records.items()):
        run, e = r["run"], r["eval"]
        script = "train_cnn.py" if model == "cnn" else "train_resnet.py"
        command = f"`python {script} --aug {aug} --seed {seed}`"
        rows.append([MODELS[model], command, numbers.pct(run["test_accuracy"]),
                     numbers.pct(e["repeated"]["mean"]) if e else "not measured yet",
                     numbers.pct(run["history"][-1]["val_accuracy"]),
                     f"{run['train_seconds'] / 60:.0f} min", run["device"], run["precision"],
                     run["git_commit"][:7]])
    return table(["model", "command (20 epochs)", "clean test %", "report protocol % (20 passes)",
                  "held-out val % (epoch 20)", "train time", "device", "precision", "commit"], rows)


def first_epoch(records, numbers):
    """The CNN's first epoch line as train_cnn.py printed it, beside the report's first line."""
    r = records.get(("cnn", "report", 0))
    if r is None:
        return "(the CNN's first epoch: not measured yet)\n"
    row = r["run"]["history"][0]
    numbers.pct(row["val_accuracy"], 1), numbers.pct(row["train_accuracy"], 1)
    first = report.read_report_log()["cnn"][0]
    return ("```\n" + report.format_row(row, r["run"]["config"]["epochs"]) + "\n```\n"
            f"(the CNN's first epoch, seed 0, on a shared 2-core CPU; the report's first line: "
            f"train_loss {first['train_loss']:.4f}, val_loss {first['val_loss']:.4f}, "
            f"val_acc {numbers.pct(first['val_acc'], 1)}%)\n")


def tracks_table(records, numbers):
    """For each evaluated run: which of its columns each column of the report's log follows
    (evaluate.py --against-report: the smallest mean absolute difference over the epochs)."""
    rows = []
    for (model, aug, seed), r in sorted(records.items()):
        against = (r["eval"] or {}).get("against_report")
        if not against:
            continue
        for column, found in against["columns"].items():
            scale, unit = (100, " points") if column == "val_acc" else (1, "")
            distances = ", ".join(f"{ours} {numbers.points(scale * d)}{unit}"
                                  for ours, d in sorted(found["mean_abs_difference"].items(), key=lambda kv: kv[1]))
            rows.append([MODELS[model], f"`--aug {aug}`, seed {seed}", f"`{column}`", f"our `{found['tracks']}`",
                         distances])
    if not rows:
        return "(the logs side by side: not measured yet)\n"
    return table(["model", "trained by", "the report's column", "follows", "mean distance over the 20 epochs"], rows)


def ablation_table(records, numbers, results):
    """Points each step of the report's pipeline costs, against the clean test accuracy."""
    rows = []
    for (model, aug, seed, _), r in sorted(load_extra_evaluations(results, "ablation").items()):
        clean = r["test_accuracy"]
        for step in r["ablation"]["only"]:
            rows.append([MODELS[model], f"`--aug {aug}`, seed {seed}", step,
                         numbers.points(100 * (clean - r["ablation"]["only"][step]["mean"])),
                         numbers.points(100 * (clean - r["ablation"]["without"][step]["mean"]))])
    if not rows:
        return "(the ablation: not measured yet)\n"
    return table(["model", "trained by", "step", "points lost, this step alone",
                  "points lost, all steps but this one"], rows)


def train_mode_table(records, numbers, results):
    """The passes of a test loop that forgot model.eval(), beside the clean accuracy."""
    rows = []
    for (model, aug, seed, pipeline), r in sorted(load_extra_evaluations(results, "train-mode").items()):
        rep = r["repeated"]
        rows.append([MODELS[model], f"`--aug {aug}`, seed {seed}", f"`--repeat-aug {pipeline}`",
                     f"{numbers.pct(rep['mean'])}% ± {numbers.points(100 * rep['std'])} ({rep['n']} passes)",
                     f"{numbers.pct(r['test_accuracy'])}%"])
    if not rows:
        return "(the train-mode passes: not measured yet)\n"
    return table(["model", "trained by", "test images through", "train-mode passes", "clean test"], rows)


def both_measured(records, results):
    """The seed-0 test pipelines measured on both models: [(aug, name, CNN %, ResNet9 %)]."""
    return [(aug, name, 100 * m["cnn"], 100 * m["resnet9"])
            for (aug, name), m in sorted(test_pipelines(records, results).items()) if len(m) == 2]


def distance_to_report(cnn, resnet):
    """How far a pipeline lands from the report's two numbers: the farther of the two, in points."""
    return max(abs(cnn - report.REPORT["cnn"]), abs(resnet - report.REPORT["resnet9"]))


def nearest_to_report(points):
    """The pipeline whose farther number lands nearest the report's: the best candidate reading."""
    return min(points, key=lambda p: distance_to_report(p[2], p[3]))


def fit_both_table(records, numbers, results):
    """Every test pipeline with both models measured: how far it lands from both report numbers."""
    points = both_measured(records, results)
    rows = [[f"`--aug {aug}`", name, numbers.points(cnn), numbers.points(resnet),
             numbers.points(resnet - cnn), numbers.points(distance_to_report(cnn, resnet))]
            for aug, name, cnn, resnet in points]
    gap = numbers.points(report.REPORT["resnet9"] - report.REPORT["cnn"])
    if not rows:
        return (f"(every test pipeline against both report numbers, a {gap}-point gap: not measured "
                f"yet, it needs the seed-0 ResNet9 evaluations)\n")
    aug, name, cnn, resnet = nearest_to_report(points)
    gaps = sorted(resnet_ - cnn_ for _, _, cnn_, resnet_ in points)
    summary = (f"\n{len(rows)} pipeline{'' if len(rows) == 1 else 's'} with both models measured. The nearest to both report numbers: "
               f"{name} (models trained `--aug {aug}`), {numbers.points(distance_to_report(cnn, resnet))} points from the farther one. "
               f"{other_seeds(records, results, numbers, aug, name)}"
               f"Our gaps between the two models: {gaps[0]:.2f} to {gaps[-1]:.2f} points; the report's: {gap}.\n")
    return table(["trained by", "test pipeline", "CNN %", "ResNet9 %", f"gap (the report's: {gap})",
                  "farther of the two from the report (points)"], rows) + summary


def other_seeds(records, results, numbers, aug, name):
    """The same test pipeline on the seeds after 0, where measured: does a seed-0 fit hold?"""
    seeds = sorted({seed for (_, a, seed) in records if a == aug and seed != 0})
    measured = {seed: test_pipelines(records, results, seed).get((aug, name), {}) for seed in seeds}
    found = [f"{label} seed {seed} {numbers.pct(measured[seed][model])}%"
             for model, label in MODELS.items() for seed in seeds if model in measured[seed]]
    if not found:
        return "On other seeds: not measured yet. "
    return f"The same pipeline on other seeds: {', '.join(found)}. "


def classroom_table(records, numbers, results):
    """docs/lesson.md's short CNN runs, that fit inside a class: what they measure, how long."""
    rows = []
    for path in sorted((results / "classroom").glob("*/cnn.json")):
        run = json.loads(path.read_text())
        e, train_mode = (json.loads(f.read_text()) if f.exists() else None for f in
                         (path.parent.with_name(f"{path.parent.name}-cnn-{kind}.json") for kind in ("eval", "train-mode")))
        last, config = run["history"][-1], run["config"]
        rows.append([f"`python train_cnn.py --aug {config['aug']} --epochs {config['epochs']} "
                     f"--subset {config['subset']}`", f"{run['train_seconds'] / 60:.0f} min",
                     f"{numbers.pct(last['train_accuracy'], 1)}%", f"{numbers.pct(last['val_accuracy'], 1)}%",
                     f"{numbers.pct(run['test_accuracy'])}%",
                     f"{numbers.pct(e['repeated']['mean'])}% ({e['repeated']['n']} passes)" if e else "not measured yet",
                     f"{numbers.pct(train_mode['repeated']['mean'])}% ± {numbers.points(100 * train_mode['repeated']['std'])} "
                     f"({train_mode['repeated']['n']} passes)" if train_mode else "-",
                     run["device"]])
    if not rows:
        return "(the classroom runs: not measured yet)\n"
    return table(["command", "train time", "training accuracy (last epoch)", "held-out val",
                  "clean test", "the report's protocol", "train-mode passes, no augmentation", "device"], rows)


def test_error_table(records, numbers):
    """The test set's own error: the standard error of an accuracy p on the 10,000 test images,
    each one right or wrong (a binomial), and the 95% range a rerun on new images would give."""
    n = 10_000
    rows = []
    for p in (0.5, 0.6, 0.7, 0.8, 0.9):
        standard_error = (p * (1 - p) / n) ** 0.5
        rows.append([f"{numbers.pct(p, 0)}%", numbers.points(100 * standard_error),
                     f"± {numbers.points(100 * 1.96 * standard_error)}"])
    return table(["accuracy", "standard error (points)", "95% range (points)"], rows)


TABLES = {"answer": answer_table, "findings": findings, "verdicts": verdict_table, "cost": cost_table, "runs": runs_table,
          "first-epoch": first_epoch, "tracks": tracks_table, "ablation": ablation_table, "train-mode": train_mode_table,
          "fit-both": fit_both_table, "classroom": classroom_table, "test-error": test_error_table}
NEEDS_RESULTS = {"ablation", "train-mode", "fit-both", "classroom"}  # they read results/eval/ beyond the runs


# ----------------------------------------------------------------------------- the figures

def draw_answer(records, path, results=None):
    """Figure (a): per model, one accuracy axis: the report's numbers beside ours, by recipe."""
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(16, 6), sharey=True)
    report_log = report.read_report_log()
    for ax, (model, label) in zip(axes, MODELS.items()):
        ax.scatter([0, 0], [100 * report_log[model][-1]["val_acc"], report.REPORT[model]],
                   marker="*", s=300, color="crimson", zorder=3)
        ax.annotate('"val_accuracy"', (0.1, 100 * report_log[model][-1]["val_acc"]), va="center")
        ax.annotate("test accuracy", (0.1, report.REPORT[model]), va="center")
        for x, aug in enumerate(RECIPES, start=1):
            runs = runs_of(records, model, aug)
            if not runs:  # an empty column says why it is empty
                ax.text(x, 60, "not measured yet", ha="center", color="grey", fontsize=12)
            for key, colour, name, shift in (("test_accuracy", "black", "clean test (one dot per seed)", -0.12),
                                             ("val_accuracy", "tab:blue", "held-out validation", 0),
                                             ("repeated", "tab:orange", "the report's test protocol", 0.12)):
                values = [100 * v for v in measure(runs, key)]  # side by side: equal values stay visible
                ax.scatter([x + shift] * len(values), values, color=colour, s=60, alpha=0.8,
                           label=name if x == 1 else None, zorder=3)
        ax.set_xticks(range(len(RECIPES) + 1),
                      ["the report"] + [f"ours,\n--aug {aug}" for aug in RECIPES], fontsize=12)
        ax.set_xlim(-0.5, len(RECIPES) + 0.7)
        ax.set_title(label, fontsize=15)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("accuracy (%)", fontsize=13)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=12)
    fig.suptitle("(a) The report's numbers (stars) beside what its models measure here", fontsize=16)
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room below the axes for the legend, which hides no point
    return saved(plt, fig, path, layout=False)


def draw_logs(records, path, results):
    """Figure (b): per model, the report's log beside our --aug report and --aug none runs."""
    plt = pyplot()
    if plt is None:
        return False
    report_log = report.read_report_log()
    fig, axes = plt.subplots(2, 2, figsize=(16, 10))
    for row, (model, label) in zip(axes, MODELS.items()):
        loss, acc = row
        theirs = report_log[model]
        epochs = [r["epoch"] for r in theirs]
        loss.plot(epochs, [r["train_loss"] for r in theirs], color="crimson", lw=3, label="the report: train_loss")
        loss.plot(epochs, [r["val_loss"] for r in theirs], color="crimson", lw=3, ls=":", label="the report: val_loss")
        acc.plot(epochs, [100 * r["val_acc"] for r in theirs], color="crimson", lw=3, label='the report: "val_acc"')
        for aug, colour in (("report", "tab:blue"), ("none", "tab:green")):
            r = records.get((model, aug, 0))
            if r is None:
                continue
            h = r["run"]["history"]
            x = [e["epoch"] for e in h]
            loss.plot(x, [e["train_loss"] for e in h], color=colour, label=f"ours, --aug {aug}: training loss")
            loss.plot(x, [e["val_loss"] for e in h], color=colour, ls=":", label=f"ours, --aug {aug}: held-out loss")
            acc.plot(x, [100 * e["train_accuracy"] for e in h], color=colour,
                     label=f"ours, --aug {aug}: training accuracy")
            acc.plot(x, [100 * e["val_accuracy"] for e in h], color=colour, ls=":",
                     label=f"ours, --aug {aug}: held-out accuracy")
        loss.set_title(f"{label}: loss", fontsize=14)
        acc.set_title(f"{label}: accuracy", fontsize=14)
        loss.set_ylabel("cross-entropy loss", fontsize=12)
        acc.set_ylabel("accuracy (%)", fontsize=12)
        for ax in row:
            ax.set_xlabel("epoch", fontsize=12)
            ax.set_xticks(range(1, 21))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=9)
    fig.suptitle("(b) The report's epoch log (thick) beside our seed-0 runs with and without its augmentation",
                 fontsize=16)
    return saved(plt, fig, path)


def draw_ablation(records, path, results):
    """Figure (c): points lost against the clean test, each step alone and all steps but it."""
    plt = pyplot()
    ablations = load_extra_evaluations(results, "ablation")
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(16, 6), sharey=True)
    steps = list(next(iter(ablations.values()))["ablation"]["only"]) if ablations else []
    for ax, (model, label) in zip(axes, MODELS.items()):
        for (m, aug, seed, _), r in sorted(ablations.items()):
            if m != model or seed != 0:
                continue
            clean = r["test_accuracy"]
            filled = aug != "none"
            for kind, offset, marker in (("only", -0.12, "o"), ("without", 0.12, "s")):
                lost = [100 * (clean - r["ablation"][kind][step]["mean"]) for step in steps]
                ax.scatter([i + offset for i in range(len(steps))], lost, s=80, marker=marker,
                           facecolors=("tab:blue" if kind == "only" else "tab:orange") if filled else "none",
                           edgecolors="tab:blue" if kind == "only" else "tab:orange",
                           label=f"{'this step alone' if kind == 'only' else 'all steps but this'}, "
                                 f"trained --aug {aug}")
        ax.set_xticks(range(len(steps)), steps, fontsize=12)
        if steps:
            ax.set_xlim(-0.5, len(steps) - 0.5)
        ax.set_xlabel("step of the report's pipeline", fontsize=12)
        ax.set_title(label, fontsize=15)
        ax.grid(axis="y", alpha=0.3)
        if not ax.collections:
            ax.text(0.5, 0.5, "not measured yet", transform=ax.transAxes, ha="center", fontsize=14, color="grey")
    axes[0].set_ylabel("points lost against the clean test accuracy", fontsize=12)
    fig.suptitle("(c) Which step of the report's test pipeline costs how much (seed 0; filled: trained through it)"
                 + ("" if ablations else ":\nnot measured yet"), fontsize=16)
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    if handles:  # below the axes, where it hides no point
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=4, fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return saved(plt, fig, path, layout=False)


def draw_fit_both(records, path, results):
    """Figure (d): every test pipeline as a point (CNN, ResNet9), beside the report's star."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(10, 9))
    star = (report.REPORT["cnn"], report.REPORT["resnet9"])
    gap = star[1] - star[0]
    points = both_measured(records, results)
    for aug, filled in (("report", True), ("none", False)):
        mine = [(x, y) for a, _, x, y in points if a == aug]
        if mine:
            ax.scatter(*zip(*mine), s=70, color="tab:blue", facecolors="tab:blue" if filled else "none",
                       label=f"a test pipeline, models trained --aug {aug}")
    if points:  # name the candidate nearest to both report numbers, as the table's line does
        aug, name, x, y = nearest_to_report(points)
        ax.annotate(f"nearest: {name}\n(trained --aug {aug})", (x, y), xytext=(x + 10, y - 20),
                    fontsize=11, arrowprops=dict(arrowstyle="->", color="grey"))
    ax.scatter(*star, marker="*", s=500, color="crimson", zorder=3, label=f"the report ({star[0]}, {star[1]})")
    ax.plot([0, 100], [gap, 100 + gap], color="crimson", ls="--", lw=1,
            label=f"the report's gap: ResNet9 = CNN + {gap:.2f} points")
    ax.plot([0, 100], [0, 100], color="grey", lw=0.5, label="equal accuracy")
    ax.set_xlim(10, 90)
    ax.set_ylim(10, 90)
    ax.set_xlabel("CNN accuracy through the test pipeline (%)", fontsize=13)
    ax.set_ylabel("ResNet9 accuracy through the test pipeline (%)", fontsize=13)
    title = "(d) Every test pipeline against both report numbers (seed 0)"
    if not points:
        title += ":\nnot measured yet (needs the ResNet9 evaluations)"
    ax.set_title(title, fontsize=15)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=11, loc="upper left")
    return saved(plt, fig, path)


FIGURES = {"answer.png": draw_answer, "logs.png": draw_logs, "ablation.png": draw_ablation,
           "fit-both.png": draw_fit_both}


def saved(plt, fig, path, layout=True):
    """Write a figure at about 1,600 px wide (16 inches at 100 dpi) and free it."""
    if layout:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


# ----------------------------------------------------------------------------- pages

def rebuild(text, tables):
    """The page with each marked table replaced; raises on a marker naming no table."""
    def replace(match):
        name = match["name"]
        if name not in tables:
            raise SystemExit(f"build.py: a page marks a table '{name}' that the build does not make "
                             f"(it makes: {', '.join(tables)})")
        return match.group(1) + tables[name] + match.group(4)
    return MARKER.sub(replace, text)


def stray_percentages(text, numbers):
    """Percentages in the prose (outside the built tables) that the build did not produce."""
    prose = MARKER.sub("", text)
    return sorted({m[1] for m in PERCENT.finditer(prose) if m[1] not in numbers.seen})


def pages(root):
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def main(argv=None, root=ROOT):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 1 naming each stale table or unbuilt percentage")
    args = p.parse_args(argv)
    records, numbers = load_records(root / "results"), Numbers()
    tables = {name: make(records, numbers, *([root / "results"] if name in NEEDS_RESULTS else []))
              for name, make in TABLES.items()}
    problems = []
    for page in pages(root):
        text = page.read_text()
        built = rebuild(text, tables)
        if args.check:
            for old, new in zip(MARKER.finditer(text), MARKER.finditer(built)):
                if old["body"] != new["body"]:
                    problems.append(f"{page.relative_to(root)}: table '{old['name']}' differs from "
                                    f"what the records give (run python results/build.py)")
        elif built != text:
            page.write_text(built)
            print(f"rewrote the tables of {page.relative_to(root)}")
        for stray in stray_percentages(built, numbers):
            problems.append(f"{page.relative_to(root)}: the prose quotes {stray}%, which no record gives")
    if not args.check:
        for name, draw in FIGURES.items():
            if draw(records, root / "docs" / name, root / "results"):
                print(f"drew docs/{name}")
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{len(records)} finished runs, {sum(r['eval'] is not None for r in records.values())} evaluated")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
