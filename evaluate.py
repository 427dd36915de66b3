"""Measure trained models honestly, beside the report's own protocol, and compare them.

    python evaluate.py runs/resnet9.pt                      # one model
    python evaluate.py runs/cnn.pt runs/resnet9.pt          # side by side, with a verdict
    python evaluate.py runs/cnn.pt --repeats 10 --tta --out eval.json   # --repeats 10 on a CPU

For each checkpoint it reports:
  test_accuracy   clean: the 10,000 test images, normalisation only. This is the number.
  repeated        the report's protocol: the test set through the TRAINING augmentation,
                  --repeats times. Only a random test pass can differ from pass to pass,
                  so the report's 100 passes averaged the accuracy on distorted images,
                  not the clean accuracy: that is what its 44.53% / 66.02% are.
  tta_accuracy    repeated passes done right (--tta): average each image's predicted
                  probabilities with its mirror image's, then decide.
  train_accuracy  clean accuracy on the images the model trained on: what the report's
                  "val_accuracy" column (99.9%) behaves like; val_accuracy is the held-out one.
"""
import argparse
import importlib
import math
import sys
import time
from pathlib import Path

import torch

import common

# Which script defines each model: the model is imported from there, never copied.
MODELS = {"cnn": ("train_cnn", "CNN"), "resnet9": ("train_resnet", "ResNet9")}
REPORT = {"cnn": 44.53, "resnet9": 66.02}  # the report's test accuracies (mean of 100 runs)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="one or two .pt files")
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py (default: data)")
    p.add_argument("--device", choices=common.DEVICES, default="auto", help="default: auto")
    p.add_argument("--precision", choices=common.PRECISIONS, default="auto",
                   help="arithmetic, as in training (default: auto, what this device does natively)")
    p.add_argument("--repeats", type=int, default=100,
                   help="passes of the report's protocol (default: 100, as the report; 0: skip)")
    p.add_argument("--seed", type=int, default=0, help="seed of the repeated passes (default: 0)")
    p.add_argument("--tta", action="store_true", help="also measure test-time augmentation (flips)")
    p.add_argument("--out", metavar="FILE.json", help="write the results as JSON")
    args = p.parse_args(argv)
    if len(args.checkpoints) > 2:
        p.error("give one checkpoint, or two to compare")
    if args.repeats < 0:
        p.error(f"--repeats must not be negative, got {args.repeats}")
    common.check_device(p, args.device)
    return args


def build_model(state, path):
    """The checkpoint's model, rebuilt from the class in its training script."""
    if state.get("model_name") not in MODELS:
        raise common.UserError(f"{path} holds an unknown model {state.get('model_name')!r}")
    module_name, class_name = MODELS[state["model_name"]]
    model = getattr(importlib.import_module(module_name), class_name)()
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as error:
        raise common.UserError(f"{path}: weights do not fit {class_name} "
                               f"({str(error).splitlines()[0][:120]})") from None
    return model


def evaluate(path, args, device):
    """Every measurement of one checkpoint, as a dict (the JSON's content)."""
    state = common.load_checkpoint(path)
    model = build_model(state, path).to(device)
    if common.uses_channels_last(device, args.precision):  # the layout predict() gives its batches
        model = model.to(memory_format=torch.channels_last)
    config = state["config"]
    data, classes = common.load_data(args.data_dir, device, config["val_size"],
                                     config["subset"], config["dry_run"])
    test_x, test_y = data["test"]
    common.predict(model, test_x[:common.EVAL_BATCH], precision=args.precision)  # warm-up: the
    # first call loads kernels (cuDNN/cuBLAS start-up), which would inflate the time estimate
    start = time.perf_counter()
    logits = common.predict(model, test_x, precision=args.precision)
    correct = logits.argmax(dim=1) == test_y
    correct.any().item()  # waits for a GPU to finish, so the clock below is honest
    one_pass = time.perf_counter() - start
    result = {
        "checkpoint": str(path), "model": state["model_name"], "params": common.count_params(model),
        "epochs": state["epoch"], "aug": config["aug"],
        "train_seconds": sum(row["seconds"] for row in state["history"]),
        "test_accuracy": correct.float().mean().item(),
        "per_class": per_class(correct, test_y, classes),
        "confusion": confusion(logits.argmax(dim=1), test_y).tolist(),
        "repeated": None, "tta_accuracy": None,
        "train_accuracy": accuracy(model, *data["train"], args.precision),
        "val_accuracy": accuracy(model, *data["val"], args.precision) if len(data["val"][1]) else None,
        "precision": args.precision,
        "classes": classes, "correct": correct.cpu(),  # "correct" is for the comparison, not the JSON
    }
    if args.repeats:
        print(f"{path}: the report's protocol, {args.repeats} passes of the training augmentation: "
              f"about {args.repeats * one_pass:.0f} s here", flush=True)
        augment = common.AUGMENTATIONS[config["aug"]]
        accuracies = common.repeated_accuracies(model, test_x, test_y, augment, args.repeats, args.seed,
                                                args.precision)
        mean = sum(accuracies) / len(accuracies)
        std = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / max(len(accuracies) - 1, 1))
        result["repeated"] = {"n": len(accuracies), "mean": mean, "std": std, "accuracies": accuracies}
    if args.tta:
        result["tta_accuracy"] = common.tta_accuracy(model, test_x, test_y, args.precision)
    return result


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


def format_result(r):
    lines = [f"{r['checkpoint']}: {r['model']}, {r['params']:,} params, {r['epochs']} epochs "
             f"(--aug {r['aug']}), {r['train_seconds']:.0f} s of training"]
    rows = [("clean test accuracy", pct(r["test_accuracy"]), "all test images, normalisation only")]
    if r["repeated"]:
        rep = r["repeated"]
        rows.append((f"report protocol ({rep['n']} passes)",
                     f"{pct(rep['mean'])} ± {100 * rep['std']:.2f}", "test images through the training augmentation"))
    if r["tta_accuracy"] is not None:
        rows.append(("TTA (image + mirror)", pct(r["tta_accuracy"]), "averaged probabilities"))
    rows.append(("train accuracy (clean)", pct(r["train_accuracy"]), 'what the report\'s "val_accuracy" measured'))
    rows.append(("val accuracy (held out)", pct(r["val_accuracy"]), "never trained on"))
    lines += [f"  {name:<28} {value:>16}   {note}" for name, value, note in rows]
    lines.append("  per class: " + ", ".join(f"{n} {100 * a:.1f}%" for n, a in r["per_class"].items()))
    lines.append("  confusion (rows: true class, columns: predicted):")
    short = [name[:5] for name in r["classes"]]
    lines.append("  " + " " * 7 + "".join(f"{s:>6}" for s in short))
    for name, row in zip(short, r["confusion"]):
        lines.append(f"  {name:>6} " + "".join(f"{v:>6}" for v in row))
    return "\n".join(lines)


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
    return "\n".join(table), verdict(a, b)


def verdict(a, b):
    """Which model is better on clean test accuracy, whether that is more than noise, and
    whether the report's conclusion (the ResNet is better) holds on honest numbers.

    Noise: McNemar's test on the images exactly one of the two models gets right.
    """
    better, worse = (a, b) if a["test_accuracy"] >= b["test_accuracy"] else (b, a)
    gap = 100 * (better["test_accuracy"] - worse["test_accuracy"])
    only_better = int((better["correct"] & ~worse["correct"]).sum())
    only_worse = int((worse["correct"] & ~better["correct"]).sum())
    z = (only_better - only_worse) / math.sqrt(max(only_better + only_worse, 1))
    result = {"better": better["model"], "better_checkpoint": better["checkpoint"], "gap_points": gap,
              "mcnemar_z": z, "significant": abs(z) > 1.96}
    text = (f"{better['model']} is better: {pct(better['test_accuracy'])} vs {pct(worse['test_accuracy'])} "
            f"clean test accuracy, {gap:.2f} points; ")
    text += ("more than test-set noise" if result["significant"] else "within test-set noise") + \
            f" (McNemar z = {z:.1f}: {only_better} images only it gets right, {only_worse} only the other)."
    models = {r["model"]: r for r in (a, b)}
    if set(models) == {"cnn", "resnet9"}:
        holds = models["resnet9"]["test_accuracy"] > models["cnn"]["test_accuracy"] and result["significant"]
        result["report_conclusion_holds"] = holds
        text += (f"\nThe report's conclusion (the ResNet beats the CNN; it measured {REPORT['resnet9']}% vs "
                 f"{REPORT['cnn']}%) {'holds' if holds else 'does NOT hold'} on clean test accuracy.")
    result["text"] = text
    return result


def main(argv=None):
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    args.precision, reason = common.choose_precision(device, args.precision)
    print(f"device: {common.device_name(device)}, precision: {args.precision} ({reason})")
    results = [evaluate(Path(path), args, device) for path in args.checkpoints]
    for r in results:
        print(format_result(r))
        plot_confusion(r)
    output = results[0]
    if len(results) == 2:
        sizes = [len(r["correct"]) for r in results]
        if sizes[0] != sizes[1]:
            raise common.UserError(f"the two checkpoints were tested on {sizes[0]:,} and {sizes[1]:,} "
                                   f"images (a --dry-run uses 500): compare runs of the same kind")
        table, judged = compare(*results)
        print("\n" + table + "\n\n" + judged["text"])
        output = {"checkpoints": results, "comparison": judged}
    for r in results:
        del r["correct"]
    if args.out:
        common.write_json(args.out, output)
        print(f"wrote {args.out}")
    return output


def plot_confusion(r):
    """<checkpoint>_confusion.png beside the checkpoint, when matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(r["confusion"], cmap="Blues")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true",
           title=f"{r['model']}: clean test accuracy {pct(r['test_accuracy'])}")
    ax.set_xticklabels(r["classes"], rotation=45, ha="right")
    ax.set_yticklabels(r["classes"])
    fig.colorbar(image)
    fig.tight_layout()
    path = Path(r["checkpoint"]).with_name(Path(r["checkpoint"]).stem + "_confusion.png")
    try:
        fig.savefig(path, dpi=100)
    except OSError as error:
        print(f"could not write {path} ({error}); skipped", file=sys.stderr)
    plt.close(fig)


if __name__ == "__main__":
    common.cli(main)
