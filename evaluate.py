"""Measure trained models honestly, beside the report's own protocol, and compare them.

    python evaluate.py runs/resnet9.pt                      # one model
    python evaluate.py runs/cnn.pt runs/resnet9.pt          # side by side, with a verdict
    python evaluate.py runs/cnn.pt --repeats 10 --tta --out eval.json   # --repeats 10 on a CPU
    python evaluate.py runs/cnn.pt --against-report         # the run's log beside the report's
    python evaluate.py runs/s*/cnn.pt runs/s*/resnet9.pt    # several seeds: mean ± std per model

For each checkpoint it reports:
  test_accuracy   clean: the 10,000 test images, normalisation only. This is the number.
  repeated        the report's protocol: the test set through an augmentation, --repeats
                  times. Only a random test pass can differ from pass to pass, so the
                  report's 100 passes most likely averaged the accuracy on distorted
                  images, not the clean accuracy (docs/how-the-report-got-its-numbers.md
                  tests that reading). --repeat-aug picks the augmentation: report
                  (default) is the report's list, whatever the model was trained with;
                  train is the checkpoint's own --aug; none gives passes equal to the clean
                  pass. --train-mode runs the passes as a test loop that forgot
                  model.eval() would: BatchNorm's statistics from each shuffled batch of 64,
                  which makes passes differ even with --repeat-aug none.
  tta_accuracy    test-time augmentation (--tta): average each image's predicted
                  probabilities with its mirror image's, then decide.
  train_accuracy  clean accuracy on the images the model trained on: what the report's
                  "val_accuracy" column (99.9%) behaves like; val_accuracy is the held-out one.

--against-report prints the run's epoch log beside the report's (report_log.csv holds the
report's two logs as data) and says which of the run's columns each report column tracks:
the one with the smallest mean absolute difference over the epochs both have.

Several checkpoints of one model (runs that differ in --seed only, e.g. from a loop over
--seed and --out) are grouped: each measure is given as mean ± sample standard deviation
(n - 1) over the runs, in the JSON as models[<model>][<measure>] = {mean, std, values}.
The verdict weighs the gap against that spread (Welch's t-test on the runs' clean test
accuracies) when each model has two or more runs; with one run each, McNemar's test on
the images one model gets right and the other does not.
"""
import argparse
import functools
import math
import statistics
import time
from pathlib import Path

import torch

import common
from report import REPORT, REPORT_LOG, read_report_log, spread, welch, t_two_sided_p, incomplete_beta  # noqa: F401

# Each column of the report's log, and the run's columns it might be measuring.
REPORT_COLUMNS = {"train_loss": ("train_loss", "val_loss"), "val_loss": ("val_loss", "train_loss"),
                  "val_acc": ("train_accuracy", "val_accuracy")}
MEASURES = {"test_accuracy": "clean test accuracy", "repeated": "report protocol",
            "tta_accuracy": "TTA accuracy", "train_accuracy": "train accuracy", "val_accuracy": "val accuracy"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="one .pt file; two to compare; several runs of each model (differing in "
                        "--seed only) for mean ± std over them")
    p.add_argument("--data-dir", help="folder holding cifar-10-batches-py (default: the folder each "
                                      "checkpoint trained on, when it still holds it; else data)")
    p.add_argument("--device", type=common.available_device, choices=common.DEVICES, default="auto",
                   help="default: auto")
    p.add_argument("--precision", choices=common.PRECISIONS,
                   help="arithmetic (default: each checkpoint's own, so the clean accuracy equals its "
                        "training run's; auto on another kind of device than it trained on)")
    p.add_argument("--repeats", type=int, default=common.REPORT_RECIPE["test_passes"],
                   help="passes of the report's protocol (default: 100, as the report; 0: skip)")
    p.add_argument("--repeat-aug", choices=[*sorted(common.AUGMENTATIONS), "train"], default="report",
                   help="what the report's protocol passes the test images through: report (the "
                        "default), the report's list, whatever the model was trained with; standard, "
                        "pad-crop-flip; none, so every pass equals the clean one; train, the "
                        "augmentation the checkpoint was trained with (its --aug)")
    p.add_argument("--train-mode", action="store_true",
                   help="run the repeated passes with the model in training mode, as a test loop "
                        "that forgot model.eval() would: BatchNorm normalises each batch of 64 by "
                        "its own statistics, and the test images are shuffled into new batches on "
                        "every pass (the clean accuracy and the checkpoint are untouched)")
    p.add_argument("--seed", type=int, default=0, help="seed of the repeated passes (default: 0)")
    p.add_argument("--tta", action="store_true", help="also measure test-time augmentation (flips)")
    p.add_argument("--ablation", action="store_true",
                   help="the test set through each step of the report's pipeline alone, and through "
                        "the pipeline without each (crop, rotate, flip, color, erase; Normalize "
                        "always), --repeats passes each: which step costs the model how much")
    p.add_argument("--against-report", action="store_true",
                   help="print the run's epoch log beside the report's, say which of the run's "
                        "columns each report column tracks, and draw it (<checkpoint>_vs_report.png)")
    p.add_argument("--out", metavar="FILE.json", help="write the results as JSON")
    args = p.parse_args(argv)
    if args.repeats < 0:
        p.error(f"--repeats must not be negative, got {args.repeats}")
    if args.ablation and not args.repeats:
        p.error("--ablation needs --repeats 1 or more (passes per pipeline)")
    if args.train_mode and not args.repeats:
        p.error("--train-mode changes the repeated passes: it needs --repeats 1 or more")
    return args


def build_model(state, path):
    """The checkpoint's model, rebuilt from the class in its training script."""
    if state.get("model_name") not in common.MODEL_SCRIPTS:
        raise common.UserError(f"{path} holds an unknown model {state.get('model_name')!r}")
    model_class = common.model_class(state["model_name"])
    model = model_class()
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as error:
        raise common.UserError(f"{path}: weights do not fit {model_class.__name__} "
                               f"({str(error).splitlines()[0][:120]})") from None
    return model


def evaluate(path, args, device):
    """Every measurement of one checkpoint, as a dict (the JSON's content)."""
    started = time.perf_counter()
    state = common.load_checkpoint(path)
    config = state["config"]
    precision, reason = evaluation_precision(config, device, args.precision)
    data_dir = data_folder(config, args.data_dir)
    print(f"{path}: precision {precision} ({reason}), data from {data_dir}")
    model = build_model(state, path).to(device)
    if common.uses_channels_last(device, precision):  # the layout predict() gives its batches
        model = model.to(memory_format=torch.channels_last)
    data, classes = common.load_data(data_dir, device, config["val_size"],
                                     config["subset"], config["dry_run"])
    test_x, test_y = data["test"]
    common.predict(model, test_x[:common.EVAL_BATCH], precision=precision)  # warm-up: the
    # first call loads kernels (cuDNN/cuBLAS start-up), which would inflate the time estimate
    start = time.perf_counter()
    logits = common.predict(model, test_x, precision=precision)
    correct = logits.argmax(dim=1) == test_y
    correct.any().item()  # waits for a GPU to finish, so the clock below is honest
    one_pass = time.perf_counter() - start
    result = {
        "checkpoint": str(path), "model": state["model_name"], "params": common.count_params(model),
        "epochs": state["epoch"], "planned_epochs": config["epochs"], "dry_run": config["dry_run"],
        "not_the_reports_schedule": schedule_differences(config), "aug": config["aug"], "seed": config["seed"],
        "train_seconds": sum(row["seconds"] for row in state["history"]),
        "test_accuracy": correct.float().mean().item(),
        "per_class": per_class(correct, test_y, classes),
        "confusion": confusion(logits.argmax(dim=1), test_y).tolist(),
        "repeated": None, "tta_accuracy": None,
        "train_accuracy": accuracy(model, *data["train"], precision),
        "val_accuracy": accuracy(model, *data["val"], precision) if len(data["val"][1]) else None,
        "precision": precision, "against_report": None, "ablation": None,
        # where and by what code it was measured, as a training run's JSON says it
        "device": common.device_name(device), "torch": torch.__version__, "git_commit": common.git_commit(),
        "classes": classes, "correct": correct.cpu(),  # "correct" is for the comparison, not the JSON
    }
    if args.repeats:
        aug = config["aug"] if args.repeat_aug == "train" else args.repeat_aug
        mode = ", the model in training mode" if args.train_mode else ""
        print(f"{path}: the report's protocol, {args.repeats} passes of --aug {aug}{mode}: "
              f"about {args.repeats * one_pass:.0f} s here", flush=True)
        result["repeated"] = {**passes(model, test_x, test_y, common.AUGMENTATIONS[aug], args, precision),
                              "aug": aug, "train_mode": args.train_mode}
    if args.ablation:
        print(f"{path}: the ablation, {2 * len(common.REPORT_STEPS)} pipelines of {args.repeats} "
              f"passes: about {2 * len(common.REPORT_STEPS) * args.repeats * one_pass:.0f} s here", flush=True)
        result["ablation"] = ablation(model, test_x, test_y, args, precision)
    if args.tta:
        result["tta_accuracy"] = common.tta_accuracy(model, test_x, test_y, precision)
    if args.against_report:
        result["against_report"] = against_report(state["history"], read_report_log()[state["model_name"]])
        result["against_report"]["like_for_like"] = not result["not_the_reports_schedule"]
    result["eval_seconds"] = time.perf_counter() - started
    return result


def passes(model, images, labels, augment, args, precision):
    """The report's protocol through `augment`: --repeats seeded passes, their mean and spread."""
    accuracies = common.repeated_accuracies(model, images, labels, augment, args.repeats, args.seed,
                                            precision, args.train_mode)
    over = spread(accuracies)  # std over the passes: None for one pass
    return {"n": len(accuracies), "mean": over["mean"], "std": over["std"], "accuracies": accuracies}


def ablation(model, images, labels, args, precision):
    """The report's pipeline taken apart: each step alone, and the pipeline without each.

    Every pipeline starts from the same seed and augment_report draws every random number
    whichever steps are on, so "crop only" and "without rotate" crop the same boxes and
    "erase only" blanks the boxes of the whole pipeline: the pipelines differ by their steps,
    not by new random draws."""
    steps = common.REPORT_STEPS
    result = {"only": {}, "without": {}}
    for step in steps:
        for kind, kept in (("only", (step,)), ("without", tuple(s for s in steps if s != step))):
            augment = functools.partial(common.augment_report, steps=kept)
            measured = passes(model, images, labels, augment, args, precision)
            result[kind][step] = {"mean": measured["mean"], "std": measured["std"]}
    return result


def format_ablation(r):
    """One row per step of the report's pipeline: the accuracy with it alone, and without it."""
    a, rep = r["ablation"], r["repeated"]  # --ablation needs --repeats, so rep is there

    def cell(m):
        return pct(m["mean"]) + (f" ± {100 * m['std']:.2f}" if m["std"] is not None else "")

    lines = [f"{r['checkpoint']}: the report's test pipeline taken apart, {rep['n']} passes each "
             f"(clean: {pct(r['test_accuracy'])}; through --aug {rep['aug']}: {pct(rep['mean'])})",
             f"  {'step':<8} {'this step alone':>18} {'all but this step':>19}"]
    lines += [f"  {step:<8} {cell(a['only'][step]):>18} {cell(a['without'][step]):>19}" for step in a["only"]]
    return "\n".join(lines)


def data_folder(config, given):
    """--data-dir if given; else the folder the run trained on, while it still holds CIFAR-10."""
    if given:
        return given
    trained_on = config.get("data_dir")
    if trained_on and (Path(trained_on) / "cifar-10-batches-py").is_dir():
        return trained_on
    return "data"


# The report's schedule: a run with other values cannot be compared with its log line for line.
SCHEDULE_KEYS = ("epochs", "batch_size", "max_lr", "weight_decay", "grad_clip", "clip_norm")
REPORT_SCHEDULE = {**{key: common.REPORT_RECIPE[key] for key in SCHEDULE_KEYS}, "subset": 0, "dry_run": False}


def schedule_differences(config):
    """The flags by which a run's schedule differs from the report's: [] for none."""
    differences = []
    for key, value in REPORT_SCHEDULE.items():
        if config.get(key) != value:
            flag = "--" + key.replace("_", "-")
            differences.append(flag if isinstance(value, bool) else f"{flag} {config.get(key)} (the report's: {value})")
    return differences


def evaluation_precision(config, device, requested):
    """(precision, why): by default the checkpoint's own, so that the clean test accuracy here
    equals the one its training run printed; on another kind of device, or with --precision,
    what choose_precision says."""
    if requested is None and torch.device(config["device"]).type == device.type:
        return common.saved_setting(config, "precision"), "as trained"
    return common.choose_precision(device, requested or "auto")


def accuracy(model, images, labels, precision):
    return common.loss_and_accuracy(common.predict(model, images, precision=precision), labels)[1]


def per_class(correct, labels, classes):
    return {name: correct[labels == c].float().mean().item() for c, name in enumerate(classes)}


def confusion(predicted, labels):
    """10x10 counts: row = true class, column = predicted class."""
    counts = torch.bincount(labels * common.NUM_CLASSES + predicted, minlength=common.NUM_CLASSES ** 2)
    return counts.view(common.NUM_CLASSES, common.NUM_CLASSES).cpu()


def pct(value):
    return "-" if value is None else f"{100 * value:.2f}%"


def unfinished(r):
    return r["epochs"] < r["planned_epochs"]


def run_kind(r):
    """How far the run got, in words, for every line that names it."""
    if r["dry_run"]:
        return "a dry run"
    if unfinished(r):
        return f"UNFINISHED: epoch {r['epochs']} of {r['planned_epochs']}"
    return f"{r['epochs']} epochs"


def format_result(r):
    lines = [f"{r['checkpoint']}: {r['model']}, {r['params']:,} params, {run_kind(r)} "
             f"(--aug {r['aug']}), {r['train_seconds']:.0f} s of training"]
    rows = [("clean test accuracy", pct(r["test_accuracy"]), "all test images, normalisation only")]
    if r["repeated"]:
        rep = r["repeated"]
        rows.append((f"report protocol ({rep['n']} passes)",
                     pct(rep["mean"]) + (f" ± {100 * rep['std']:.2f}" if rep["std"] is not None else ""),
                     f"test images through --aug {rep['aug']}"
                     + (", in training mode" if rep.get("train_mode") else "")))
    if r["tta_accuracy"] is not None:
        rows.append(("TTA (image + mirror)", pct(r["tta_accuracy"]), "averaged probabilities"))
    rows.append(("train accuracy (clean)", pct(r["train_accuracy"]), 'what the report\'s "val_accuracy" behaves like'))
    rows.append(("val accuracy (held out)", pct(r["val_accuracy"]), "never trained on"))
    lines += [f"  {name:<28} {value:>16}   {note}" for name, value, note in rows]
    lines.append("  per class: " + ", ".join(f"{n} {100 * a:.1f}%" for n, a in r["per_class"].items()))
    lines.append("  confusion (rows: true class, columns: predicted):")
    short = [name[:5] for name in r["classes"]]
    lines.append("  " + " " * 7 + "".join(f"{s:>6}" for s in short))
    for name, row in zip(short, r["confusion"]):
        lines.append(f"  {name:>6} " + "".join(f"{v:>6}" for v in row))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the report's logs

def against_report(history, report):
    """The run's epochs beside the report's, and for each report column, how far it lies from
    each run column it might be measuring (mean absolute difference over the shared epochs)."""
    run = {row["epoch"]: row for row in history}
    pairs = [(rep, run[rep["epoch"]]) for rep in report if rep["epoch"] in run]
    columns = {}
    for column, candidates in REPORT_COLUMNS.items():
        mad = {}
        for name in candidates:
            diffs = [abs(rep[column] - ours[name]) for rep, ours in pairs if ours[name] is not None]
            mad[name] = sum(diffs) / len(diffs) if diffs else None  # None: --val-size 0, no val
        known = {name: value for name, value in mad.items() if value is not None}
        columns[column] = {"mean_abs_difference": mad, "tracks": min(known, key=known.get) if known else None}
    rows = [{"epoch": rep["epoch"], "report": {c: rep[c] for c in REPORT_COLUMNS},
             "run": {c: ours[c] for c in ("train_loss", "val_loss", "train_accuracy", "val_accuracy")}}
            for rep, ours in pairs]
    return {"epochs": len(rows), "report_epochs": len(report), "rows": rows, "columns": columns}


def format_against_report(r):
    """The table, epoch by epoch, then one line per report column: which run column it tracks."""
    a = r["against_report"]

    def num(value, percent=False):
        return "-" if value is None else f"{100 * value:.1f}%" if percent else f"{value:.4f}"

    lines = [f"{r['checkpoint']} against the report's {r['model']} log ({a['epochs']} of its "
             f"{a['report_epochs']} epochs):",
             *([f"  NOT like for like: this run has {', '.join(r['not_the_reports_schedule'])}; its "
                f"schedule is not the report's, so its columns cannot be compared with the report's "
                f"epoch for epoch (shown, not measured against it)"] if not a["like_for_like"] else []),
             f"  {'':>5} | {'train_loss':^17} | {'val_loss':^17} | {'report':>7} {'run':>7} {'run':>7}",
             f"  {'epoch':>5} | {'report':>8} {'run':>8} | {'report':>8} {'run':>8} | "
             f"{'val_acc':>7} {'train':>7} {'val':>7}"]
    for row in a["rows"]:
        rep, run = row["report"], row["run"]
        lines.append(f"  {row['epoch']:>5} | {num(rep['train_loss']):>8} {num(run['train_loss']):>8} | "
                     f"{num(rep['val_loss']):>8} {num(run['val_loss']):>8} | {num(rep['val_acc'], True):>7} "
                     f"{num(run['train_accuracy'], True):>7} {num(run['val_accuracy'], True):>7}")
    for column, found in a["columns"].items():
        scale, unit = (100, " points") if column == "val_acc" else (1, "")
        mads = ", ".join(f"{name} {scale * mad:.4g}{unit}" if mad is not None else f"{name} -"
                         for name, mad in found["mean_abs_difference"].items())
        tracks = f"tracks the run's {found['tracks']}" if found["tracks"] else "has no run column to track"
        lines.append(f"  the report's {column} {tracks} (mean absolute difference: {mads})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- several runs

def group_by_model(paths):
    """{model: [checkpoint paths]}, in the order given. The runs of one model must differ in
    --seed only: a group with anything else would average two different experiments."""
    groups, settings, first = {}, {}, None
    for path in paths:
        state = common.load_checkpoint(path)
        name, meta = state.get("model_name"), {"config": state["config"], "epoch": state["epoch"]}
        del state  # keep only the settings: a ResNet9 checkpoint is 80 MB
        first = first or (path, meta)
        if meta["config"].get("dry_run") != first[1]["config"].get("dry_run"):  # before any work
            raise common.UserError(f"{first[0]} and {path}: one is a --dry-run, tested on 500 images, "
                                   f"the other not: compare runs of the same kind")
        for earlier in settings.get(name, []):
            check_same_run(*earlier, path, meta)
        settings.setdefault(name, []).append((path, meta))
        groups.setdefault(name, []).append(path)
    return groups


def check_same_run(path_a, a, path_b, b):
    """Two runs of one model: finished, every run setting equal but the seed, seeds different."""
    for path, run in ((path_a, a), (path_b, b)):
        if run["epoch"] < run["config"]["epochs"]:
            raise common.UserError(f"{path} holds epoch {run['epoch']} of {run['config']['epochs']}: "
                                   f"finish it (--resume) before grouping it with other runs")
    for key in common.RUN_SETTINGS:
        setting_a, setting_b = common.saved_setting(a["config"], key), common.saved_setting(b["config"], key)
        if key != "seed" and setting_a != setting_b:
            raise common.UserError(f"{path_a} and {path_b} differ in --{key.replace('_', '-')} "
                                   f"({setting_a} vs {setting_b}): group only runs that differ in --seed")
    if a["config"]["seed"] == b["config"]["seed"]:
        raise common.UserError(f"{path_a} and {path_b} both have --seed {a['config']['seed']}: "
                               f"one run given twice would count twice; group runs of different seeds")


def summarise(groups, results):
    """Per model: how many runs, and each measure's mean ± std over them (the JSON's "models")."""
    by_path = {r["checkpoint"]: r for r in results}
    models = {}
    for name, paths in groups.items():
        runs = [by_path[str(path)] for path in paths]
        models[name] = {"n": len(runs), "checkpoints": [r["checkpoint"] for r in runs]}
        for measure in MEASURES:
            values = [r[measure]["mean"] if measure == "repeated" and r[measure] else r[measure] for r in runs]
            models[name][measure] = spread(values)
        if models[name]["repeated"]:
            models[name]["repeated"]["aug"] = runs[0]["repeated"]["aug"]
            models[name]["repeated"]["train_mode"] = runs[0]["repeated"]["train_mode"]
    return models


def format_models(models):
    """One column per model: mean ± std over its runs (percent, std in points)."""
    def cell(s):
        if s is None:
            return "-"
        return pct(s["mean"]) + (f" ± {100 * s['std']:.2f}" if s["std"] is not None else " (1 run)")

    names = [f"{name} (n={m['n']})" for name, m in models.items()]
    augs = {m["repeated"]["aug"] for m in models.values() if m["repeated"]}
    labels = {**MEASURES, "repeated": f"report protocol ({augs.pop()})" if len(augs) == 1 else "report protocol"}
    lines = ["over the runs of each model: mean ± sample standard deviation (points)",
             f"{'':<26}" + "".join(f"{n:>24}" for n in names)]
    for measure, label in labels.items():
        lines.append(f"{label:<26}" + "".join(f"{cell(m[measure]):>24}" for m in models.values()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the verdict

def compare(a, b):
    """Side-by-side table and a verdict computed from the numbers."""
    rows = [("params", lambda r: f"{r['params']:,}"), ("train seconds", lambda r: f"{r['train_seconds']:.0f}"),
            ("train accuracy", lambda r: pct(r["train_accuracy"])), ("val accuracy", lambda r: pct(r["val_accuracy"])),
            ("clean test accuracy", lambda r: pct(r["test_accuracy"])),
            ("report protocol", lambda r: pct(r["repeated"]["mean"]) if r["repeated"] else "-"),
            ("TTA accuracy", lambda r: pct(r["tta_accuracy"]))]
    names = [f"{r['model']} ({Path(r['checkpoint']).name})" for r in (a, b)]
    table = [f"{'':<22}{names[0]:>24}{names[1]:>24}"]
    table += [f"{label:<22}{fmt(a):>24}{fmt(b):>24}" for label, fmt in rows]
    for r in (a, b):
        if unfinished(r) and not r["dry_run"]:
            table.append(f"{r['checkpoint']} is {run_kind(r)}: this compares it as it stands now")
    return "\n".join(table), verdict(a, b)


def verdict(a, b):
    """Which model is better on clean test accuracy, whether that is more than noise, and
    what that says of the report's conclusion (the ResNet is better).

    Noise: McNemar's test on the images exactly one of the two models gets right. That is the
    test set's noise for these two trained networks, not how much another seed would change them.
    """
    better, worse = (a, b) if a["test_accuracy"] >= b["test_accuracy"] else (b, a)
    gap = 100 * (better["test_accuracy"] - worse["test_accuracy"])
    only_better = int((better["correct"] & ~worse["correct"]).sum())
    only_worse = int((worse["correct"] & ~better["correct"]).sum())
    z = (only_better - only_worse) / math.sqrt(max(only_better + only_worse, 1))
    p = 2 * statistics.NormalDist().cdf(-abs(z))  # two-sided: z is about normal for 10+ such images
    result = {"test": "mcnemar", "better": better["model"], "better_checkpoint": better["checkpoint"],
              "gap_points": gap, "mcnemar_z": z, "mcnemar_p": p, "significant": p < 0.05}
    text = (f"{better['model']} is better: {pct(better['test_accuracy'])} vs {pct(worse['test_accuracy'])} "
            f"clean test accuracy, {gap:.2f} points; ")
    text += ("more than test-set noise" if result["significant"] else "within test-set noise") + \
            f" (McNemar z = {z:.1f}, p = {p:.2g}: {only_better} images only it gets right, {only_worse} only the other)."
    text += ("\nOne run of each: McNemar weighs the test set's noise for these two trained networks, "
             "not how much a new seed changes them; for that, train several seeds of each and "
             "evaluate them together (README: Several seeds).")
    result["text"] = text + report_conclusion(result, {r["model"]: r["test_accuracy"] for r in (a, b)}, [a, b])
    return result


def verdict_over_seeds(models, runs):
    """The verdict for two models with several runs each: the gap between their mean clean test
    accuracies, weighed against how much that accuracy varies from seed to seed.

    Welch's t-test (unequal variances, Welch-Satterthwaite degrees of freedom), two-sided,
    significant at p < 0.05. It needs two or more runs of each model: with fewer, no test.
    """
    ranked = sorted(models.items(), key=lambda item: -item[1]["test_accuracy"]["mean"])
    (better_name, better), (_, worse) = ranked
    high, low = better["test_accuracy"], worse["test_accuracy"]
    gap = 100 * (high["mean"] - low["mean"])
    result = {"test": "welch", "better": better_name, "gap_points": gap,
              "n": {name: m["n"] for name, m in models.items()},
              "welch_t": None, "df": None, "p_value": None, "significant": None}
    text = (f"{better_name} is better: {pct(high['mean'])} vs {pct(low['mean'])} mean clean test accuracy "
            f"over {better['n']} and {worse['n']} runs, {gap:.2f} points; ")
    if min(m["n"] for m in models.values()) < 2:
        result["text"] = text + ("not tested: the spread over seeds needs two or more runs of each model ("
                                 + ", ".join(f"{name} has {m['n']}" for name, m in models.items()) + ").")
        if set(models) == {"cnn", "resnet9"}:
            result["report_conclusion"] = None
        return result
    t, df, p = welch(high["values"], low["values"])
    result.update(welch_t=t, df=df, p_value=p, significant=p < 0.05)
    stat = f"t = {t:.2f}, df = {df:.1f}, p = {p:.3g}" if t is not None else f"no spread at all, p = {p:g}"
    text += ("more than the spread over seeds" if result["significant"] else "within the spread over seeds")
    text += f" (Welch's {stat})."
    result["text"] = text + report_conclusion(result, {n: m["test_accuracy"]["mean"] for n, m in models.items()}, runs)
    return result


# What the verdict says of the report's conclusion (the ResNet beats the CNN), in the JSON and in words.
CONCLUSIONS = {"holds": "holds: the ResNet9 is better, beyond the noise",
               "not shown": "is not shown: the gap is within the noise (which does not refute it either)",
               "reversed": "is reversed: the CNN is better, beyond the noise"}


def report_conclusion(result, accuracies, runs):
    """Sets result["report_conclusion"] ("holds", "not shown", "reversed"; None for dry runs)
    when the two models are the report's; returns its line, with what limits it."""
    if set(accuracies) != {"cnn", "resnet9"}:
        return ""
    if any(r["dry_run"] for r in runs):
        result["report_conclusion"] = None
        return "\nNo verdict on the report's conclusion: dry runs check the code, they measure nothing."
    if not result["significant"]:
        outcome = "not shown"
    else:
        outcome = "holds" if accuracies["resnet9"] > accuracies["cnn"] else "reversed"
    result["report_conclusion"] = outcome
    limits = [f"{r['checkpoint']} is {run_kind(r)}" for r in runs if unfinished(r)]
    limits += sorted({d for r in runs for d in r["not_the_reports_schedule"]})
    line = (f"\nThe report's conclusion (the ResNet beats the CNN; it measured {REPORT['resnet9']}% vs "
            f"{REPORT['cnn']}%) {CONCLUSIONS[outcome]}, on clean test accuracy")
    return line + (f"; for these runs only, not the report's schedule ({'; '.join(limits)})." if limits else ".")


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
    print(f"device: {common.device_name(device)}")
    groups = group_by_model([Path(path) for path in args.checkpoints])
    common.git_commit()  # read now (it is cached): the code that measures is the code at the start
    results = [evaluate(Path(path), args, device) for path in args.checkpoints]
    for r in results:
        print(format_result(r))
        plot_confusion(r)
        if r["ablation"]:
            print(format_ablation(r))
        if r["against_report"]:
            print(format_against_report(r))
            plot_against_report(r)
    if any(r["dry_run"] for r in results):
        print("dry run: a check of the code (1 epoch of 128 training images, tested on 500), "
              "not a measurement; its numbers say nothing of the models or of the report")
    output = results[0]
    if len(results) == 2 and len(groups) == 2:  # one run of each model: image by image
        table, judged = compare(*results)
        print("\n" + table + "\n\n" + judged["text"])
        output = {"checkpoints": results, "comparison": judged}
    elif len(results) > len(groups):  # several runs of a model: over the seeds
        models = summarise(groups, results)
        judged = verdict_over_seeds(models, results) if len(models) == 2 else None
        print("\n" + format_models(models) + ("\n\n" + judged["text"] if judged else ""))
        output = {"checkpoints": results, "models": models, "comparison": judged}
    for r in results:
        del r["correct"]
    if args.out:
        common.write_json(args.out, output)
        print(f"wrote {args.out}")
    return output


def plot_confusion(r):
    """<checkpoint>_confusion.png beside the checkpoint, when matplotlib is installed."""
    plt = common.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(r["confusion"], cmap="Blues")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true",
           title=f"{r['model']}: clean test accuracy {pct(r['test_accuracy'])}")
    ax.set_xticklabels(r["classes"], rotation=45, ha="right")
    ax.set_yticklabels(r["classes"])
    fig.colorbar(image)
    fig.tight_layout()
    common.save_figure(fig, Path(r["checkpoint"]).with_name(Path(r["checkpoint"]).stem + "_confusion.png"))


def plot_against_report(r):
    """<checkpoint>_vs_report.png beside the checkpoint: the report's log (all its epochs) and
    the run's, losses left, accuracies right, when matplotlib is installed."""
    plt = common.pyplot()
    if plt is None:
        return
    report, rows = read_report_log()[r["model"]], r["against_report"]["rows"]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [row["epoch"] for row in report]
    for column, style in (("train_loss", "k-"), ("val_loss", "k--")):
        loss_ax.plot(epochs, [row[column] for row in report], style, label=f"report {column}")
    acc_ax.plot(epochs, [100 * row["val_acc"] for row in report], "k--", label="report val_acc")
    ours = [row["epoch"] for row in rows]
    for column, ax, scale in (("train_loss", loss_ax, 1), ("val_loss", loss_ax, 1),
                              ("train_accuracy", acc_ax, 100), ("val_accuracy", acc_ax, 100)):
        if rows and rows[0]["run"][column] is not None:
            ax.plot(ours, [scale * row["run"][column] for row in rows], "o-", label=f"run {column}")
    loss_ax.set(xlabel="epoch", ylabel="loss", title=f"{r['model']}: loss, the report's and this run's")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{r['model']}: accuracy")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    loss_ax.legend()
    acc_ax.legend()
    fig.tight_layout()
    common.save_figure(fig, Path(r["checkpoint"]).with_name(Path(r["checkpoint"]).stem + "_vs_report.png"))


if __name__ == "__main__":
    common.cli(main)
