"""evaluate.py: clean accuracy, the report's repeated passes, TTA, the comparison, bad checkpoints,
the report's logs beside a run's, several seeds of each model."""
import contextlib
import copy
import io
import json
import math
import pickle
import re
import subprocess
import sys

import pytest
import torch

import common
import evaluate
import train_cnn
import train_resnet
from conftest import ROOT

SEED_MD = ROOT.parent / "shared" / "SEED.md"


@pytest.fixture(scope="module")
def runs(tiny_data_dir, tmp_path_factory):
    """A CNN (2 epochs) and a ResNet9 (dry run) trained on the tiny dataset."""
    out = tmp_path_factory.mktemp("runs")
    common_args = ["--data-dir", str(tiny_data_dir), "--out", str(out), "--val-size", "100", "--device", "cpu"]
    cnn = train_cnn.main([*common_args, "--epochs", "2"])
    resnet = train_resnet.main([*common_args, "--epochs", "1", "--subset", "64"])
    return {"dir": out, "data": tiny_data_dir, "cnn": cnn, "resnet9": resnet}


def evaluate_args(runs, *extra):
    return ["--data-dir", str(runs["data"]), "--device", "cpu", *extra]


def test_clean_accuracy_equals_the_training_runs(runs):
    result = evaluate.main(evaluate_args(runs, str(runs["dir"] / "cnn.pt"), "--repeats", "0"))
    assert result["test_accuracy"] == runs["cnn"]["test_accuracy"]
    assert result["repeated"] is None and result["tta_accuracy"] is None
    assert result["params"] == 1_125_258


def test_an_evaluation_records_where_by_what_code_and_how_long(runs, tmp_path):
    out = tmp_path / "eval.json"
    evaluate.main(evaluate_args(runs, str(runs["dir"] / "cnn.pt"), "--repeats", "2", "--out", str(out)))
    record = json.loads(out.read_text())
    assert record["device"] == common.device_name(torch.device("cpu"))
    assert record["torch"] == torch.__version__
    assert record["git_commit"] == common.git_commit()
    assert 0 < record["eval_seconds"] < 600


def test_per_class_accuracies_average_to_the_clean_accuracy(runs):
    result = evaluate.main(evaluate_args(runs, str(runs["dir"] / "cnn.pt"), "--repeats", "0"))
    per_class = list(result["per_class"].values())
    assert len(per_class) == 10 and list(result["per_class"])[0] == "airplane"
    assert sum(per_class) / 10 == pytest.approx(result["test_accuracy"])  # 10 test images a class
    confusion = torch.tensor(result["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == 100
    assert confusion.trace() / 100 == pytest.approx(result["test_accuracy"])


def test_repeated_passes_are_seeded(runs):
    ckpt = str(runs["dir"] / "cnn.pt")
    first = evaluate.main(evaluate_args(runs, ckpt, "--repeats", "3", "--seed", "1"))["repeated"]
    again = evaluate.main(evaluate_args(runs, ckpt, "--repeats", "3", "--seed", "1",
                                        "--repeat-aug", "train"))["repeated"]  # trained with seed
    other = evaluate.main(evaluate_args(runs, ckpt, "--repeats", "3", "--seed", "2"))["repeated"]
    assert first == again and first["aug"] == "report"
    assert first["n"] == 3 and len(first["accuracies"]) == 3
    assert first["mean"] == pytest.approx(sum(first["accuracies"]) / 3)
    assert first["accuracies"] != other["accuracies"]


def test_tta_leaves_the_clean_accuracy_alone(runs):
    ckpt = str(runs["dir"] / "cnn.pt")
    plain = evaluate.main(evaluate_args(runs, ckpt, "--repeats", "0"))
    with_tta = evaluate.main(evaluate_args(runs, ckpt, "--repeats", "0", "--tta"))
    assert with_tta["test_accuracy"] == plain["test_accuracy"]
    state = common.load_checkpoint(ckpt)  # the same measure, by hand: each image and its mirror
    model = evaluate.build_model(state, ckpt).eval()
    test_x, test_y = common.load_data(runs["data"], "cpu", 100)[0]["test"]
    with torch.no_grad(), common.autocast("cpu", state["config"]["precision"]):
        views = [model(common.to_layout(common.augment_none(x), state["config"]["precision"])).float()
                 for x in (test_x, test_x.flip(-1))]
    by_hand = ((views[0].softmax(1) + views[1].softmax(1)).argmax(1) == test_y).float().mean().item()
    assert with_tta["tta_accuracy"] == pytest.approx(by_hand)


def test_tta_averages_an_image_with_its_mirror():
    """A model that looks at the left half only: class 0 if it is bright. Each test image is
    of class 0 and has one half bright; only averaging both views gets both right."""
    class LeftHalf(torch.nn.Module):
        def forward(self, x):
            score = 10 * x[..., :16].mean(dim=(1, 2, 3))
            return torch.stack([score, torch.zeros_like(score)], dim=1)

    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    images[0, ..., :16], images[0, ..., 16:] = 166, 115  # left +0.3, right -0.1 after Normalize
    images[1, ..., :16], images[1, ..., 16:] = 115, 166  # mirrored: the plain view gets it wrong
    labels = torch.tensor([0, 0])
    assert common.loss_and_accuracy(common.predict(LeftHalf(), images), labels)[1] == 0.5
    assert common.tta_accuracy(LeftHalf(), images, labels) == 1.0


def test_report_protocol_lies_below_clean_accuracy_on_real_data(real_cnn_run, real_data_dir):
    """The report's 100 passes measure accuracy on distorted test images: below the clean number."""
    _, out = real_cnn_run
    state = common.load_checkpoint(out / "cnn.pt")
    model = evaluate.build_model(state, out / "cnn.pt")
    _, _, test_x, test_y, _ = common.load_cifar10(real_data_dir)
    test_x, test_y = test_x[:2000], test_y[:2000]
    clean = common.loss_and_accuracy(common.predict(model, test_x), test_y)[1]
    repeated = common.repeated_accuracies(model, test_x, test_y, common.augment_report, 3)
    assert sum(repeated) / 3 < clean - 0.02
    gen = torch.Generator().manual_seed(0)  # the passes differ image by image: the test pass is random
    first, second = (common.predict(model, test_x, common.augment_report, gen).argmax(1) for _ in range(2))
    assert (first != second).float().mean() > 0.05


def test_train_and_val_accuracy_are_reported(runs):
    ckpt = runs["dir"] / "cnn.pt"
    result = evaluate.main(evaluate_args(runs, str(ckpt), "--repeats", "0"))
    final = runs["cnn"]["history"][-1]
    assert result["val_accuracy"] == pytest.approx(final["val_accuracy"])  # the same held-out images
    state = common.load_checkpoint(ckpt)  # clean accuracy on the 500 training images, by hand
    model = evaluate.build_model(state, ckpt).eval()
    train_x, train_y = common.load_data(runs["data"], "cpu", 100)[0]["train"]
    assert len(train_y) == 500
    with torch.no_grad(), common.autocast("cpu", state["config"]["precision"]):
        logits = model(common.to_layout(common.augment_none(train_x), state["config"]["precision"])).float()
    # equal to the by-hand accuracy on the training images: a measure of its own, whatever the
    # val accuracy is (on a tiny model the two can be equal by chance)
    assert result["train_accuracy"] == pytest.approx((logits.argmax(1) == train_y).float().mean().item())


def test_two_checkpoints_are_compared(runs, tmp_path, capsys):
    out = tmp_path / "both.json"
    result = evaluate.main(evaluate_args(runs, str(runs["dir"] / "cnn.pt"), str(runs["dir"] / "resnet9.pt"),
                                         "--repeats", "2", "--tta", "--out", str(out)))
    printed = capsys.readouterr().out
    for label in ("params", "train seconds", "clean test accuracy", "report protocol", "TTA accuracy"):
        assert label in printed
    assert "1,125,258" in printed and "6,637,194" in printed
    comparison = result["comparison"]
    right = {}  # each model's right answers, image by image, from its own forward pass
    for name in ("cnn", "resnet9"):
        state = common.load_checkpoint(runs["dir"] / f"{name}.pt")
        model = evaluate.build_model(state, name).eval()
        test_x, test_y = common.load_data(runs["data"], "cpu", 100)[0]["test"]
        right[name] = common.predict(model, test_x, precision=state["config"]["precision"]).argmax(1) == test_y
    accuracies = {name: correct.float().mean().item() for name, correct in right.items()}
    assert accuracies == {r["model"]: r["test_accuracy"] for r in result["checkpoints"]}
    better, worse = sorted(right, key=accuracies.get, reverse=True)
    only_better, only_worse = int((right[better] & ~right[worse]).sum()), int((right[worse] & ~right[better]).sum())
    assert comparison["better"] == better
    assert comparison["mcnemar_z"] == pytest.approx((only_better - only_worse) / max(only_better + only_worse, 1) ** 0.5)
    assert f"{only_better} images only it gets right, {only_worse} only the other" in comparison["text"]
    assert "not how much a new seed changes them" in comparison["text"]
    assert comparison["report_conclusion"] in ("holds", "not shown", "reversed")
    assert "for these runs only, not the report's schedule" in comparison["text"]  # 2 and 1 epochs
    assert "--epochs 2 (the report's: 20)" in comparison["text"] and "--subset 64" in comparison["text"]
    saved = json.loads(out.read_text())
    assert [r["model"] for r in saved["checkpoints"]] == ["cnn", "resnet9"]
    assert saved["comparison"]["better"] == comparison["better"]


def judged_run(model, right, wrong, **changes):
    """What verdict() reads of one evaluated run: `right` images right, then `wrong` wrong."""
    return {"checkpoint": f"{model}.pt", "params": 1, "model": model, "test_accuracy": right / (right + wrong),
            "correct": torch.tensor([True] * right + [False] * wrong), "dry_run": False, "epochs": 20,
            "planned_epochs": 20, "not_the_reports_schedule": [], **changes}


def test_verdict_counts_disagreements_and_says_what_it_shows():
    cnn = judged_run("cnn", 50, 50)
    judged = evaluate.verdict(cnn, judged_run("resnet9", 90, 10))  # 40 images only the ResNet9 gets
    assert judged["better"] == "resnet9" and judged["gap_points"] == pytest.approx(40)
    assert judged["mcnemar_z"] == pytest.approx(40 / 40 ** 0.5) and judged["significant"]
    assert judged["report_conclusion"] == "holds" and "conclusion (the ResNet beats the CNN" in judged["text"]
    judged = evaluate.verdict(cnn, judged_run("resnet9", 51, 49))  # 1 image: noise
    assert not judged["significant"] and judged["report_conclusion"] == "not shown"
    assert "within test-set noise" in judged["text"] and "is not shown" in judged["text"]
    assert "does not refute it" in judged["text"] and "NOT hold" not in judged["text"]
    judged = evaluate.verdict(cnn, judged_run("resnet9", 20, 80))  # the CNN, 30 images better
    assert judged["better"] == "cnn" and judged["report_conclusion"] == "reversed"
    assert "is reversed: the CNN is better" in judged["text"]
    assert "for these runs only" not in judged["text"]  # the report's schedule, finished


def test_no_verdict_on_the_report_from_dry_runs_and_unfinished_runs_are_said():
    judged = evaluate.verdict(judged_run("cnn", 10, 90, dry_run=True), judged_run("resnet9", 90, 10, dry_run=True))
    assert judged["report_conclusion"] is None and "dry runs check the code" in judged["text"]
    assert "holds" not in judged["text"]
    short = judged_run("resnet9", 90, 10, epochs=3)
    judged = evaluate.verdict(judged_run("cnn", 50, 50), short)
    assert "resnet9.pt is UNFINISHED: epoch 3 of 20" in judged["text"]
    assert "UNFINISHED: epoch 3 of 20" in evaluate.run_kind(short)


class RunsCode:
    """Unpickling this would create a file: the safe loader must refuse, not run it."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def bad_checkpoints(folder, good):
    marker = folder / "code-ran"
    cases = {"missing": (folder / "missing.pt", "does not exist"),
             "empty": (folder / "empty.pt", "is empty"),
             "truncated": (folder / "truncated.pt", "truncated or not a PyTorch checkpoint"),
             "garbage": (folder / "garbage.pt", "is not a checkpoint"),
             "other program": (folder / "other.pt", "not written by train_cnn.py or train_resnet.py"),
             "code (torch.save)": (folder / "evil.pt", "refused by the safe loader"),
             "code (pickle)": (folder / "evil.pkl", "is not a checkpoint")}
    (folder / "empty.pt").write_bytes(b"")
    data = good.read_bytes()
    (folder / "truncated.pt").write_bytes(data[:len(data) // 2])
    (folder / "garbage.pt").write_bytes(b"\x00this is not a checkpoint\xff" * 40)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, folder / "other.pt")
    torch.save({"program": common.PROGRAM, "model": RunsCode(str(marker))}, folder / "evil.pt")
    with open(folder / "evil.pkl", "wb") as f:
        pickle.dump(RunsCode(str(marker)), f)
    return cases, marker


def test_bad_checkpoints_give_one_line_and_run_nothing(runs, tmp_path):
    cases, marker = bad_checkpoints(tmp_path, runs["dir"] / "cnn.pt")
    assert not marker.exists()
    for name, (path, message) in cases.items():
        with pytest.raises(common.UserError, match=message):
            evaluate.main(evaluate_args(runs, str(path), "--repeats", "0"))
        assert not marker.exists(), f"loading the {name} checkpoint ran its code"


@pytest.mark.parametrize("case", ["truncated", "code (pickle)"])
def test_bad_checkpoints_through_the_command_line(case, runs, tmp_path):
    cases, marker = bad_checkpoints(tmp_path, runs["dir"] / "cnn.pt")
    path, _ = cases[case]
    done = subprocess.run([sys.executable, "evaluate.py", str(path), *evaluate_args(runs)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate.py: error:") and str(path) in lines[0]
    assert not marker.exists()


def test_weights_that_do_not_fit_are_refused(runs, tmp_path):
    state = torch.load(runs["dir"] / "cnn.pt", weights_only=True)
    state["model_name"] = "resnet9"  # CNN weights labelled as a ResNet9
    torch.save(state, tmp_path / "mislabelled.pt")
    with pytest.raises(common.UserError, match="weights do not fit ResNet9"):
        evaluate.main(evaluate_args(runs, str(tmp_path / "mislabelled.pt"), "--repeats", "0"))


def test_evaluate_cli_errors(capsys):
    for argv in (["a.pt", "--repeats", "-1"], ["a.pt", "--repeat-aug", "flip"]):
        with pytest.raises(SystemExit) as exit_info:
            evaluate.parse_args(argv)
        assert exit_info.value.code == 2


# ----------------------------------------------------------------------------- --repeat-aug

@pytest.fixture(scope="module")
def seed_runs(tiny_data_dir, tmp_path_factory):
    """Two CNNs trained WITHOUT augmentation (--aug none), 1 epoch, seeds 0 and 1: runs/s0, runs/s1."""
    out = tmp_path_factory.mktemp("seeds")
    summaries = [train_cnn.main(["--data-dir", str(tiny_data_dir), "--out", str(out / f"s{seed}"),
                                 "--val-size", "100", "--device", "cpu", "--epochs", "1", "--aug", "none",
                                 "--seed", str(seed)]) for seed in (0, 1)]
    return {"data": tiny_data_dir, "paths": [str(out / f"s{seed}" / "cnn.pt") for seed in (0, 1)],
            "summaries": summaries, "dir": out}


def quietly(argv):
    """evaluate.main(argv) and what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = evaluate.main(argv)
    return result, printed.getvalue()


@pytest.fixture(scope="module")
def grouped(seed_runs):
    """Both seed runs evaluated together (the report's protocol by default, 3 passes), with JSON."""
    out = seed_runs["dir"] / "grouped.json"
    result, printed = quietly(evaluate_args(seed_runs, *seed_runs["paths"], "--repeats", "3", "--out", str(out)))
    return result, printed, json.loads(out.read_text())


@pytest.fixture(scope="module")
def unaugmented(seed_runs):
    """Seed 0's run: --repeat-aug none, 2 passes, and --against-report."""
    return quietly(evaluate_args(seed_runs, seed_runs["paths"][0], "--repeats", "2", "--repeat-aug", "none",
                                 "--against-report"))


def test_report_protocol_uses_the_reports_augmentation_whatever_the_training(grouped, seed_runs):
    """Models trained with --aug none: by default the report's 100 passes still go through its
    pipeline (--aug report), as the report's test did, seeded by --seed; the passes differ."""
    result, printed, _ = grouped
    for r in result["checkpoints"]:
        assert r["aug"] == "none" and r["repeated"]["aug"] == "report"
        assert f"{r['checkpoint']}: the report's protocol, 3 passes of --aug report" in printed
    first = result["checkpoints"][0]  # by hand: its 3 passes through the report's pipeline, seed 0
    state = common.load_checkpoint(first["checkpoint"])
    precision = state["config"]["precision"]
    model = evaluate.build_model(state, first["checkpoint"])
    if common.uses_channels_last("cpu", precision):  # the layout evaluate.py gives it
        model = model.to(memory_format=torch.channels_last)
    test_x, test_y = common.load_data(seed_runs["data"], "cpu", 100)[0]["test"]
    by_hand = common.repeated_accuracies(model, test_x, test_y, common.augment_report, 3, 0, precision)
    assert first["repeated"]["accuracies"] == by_hand
    gen = torch.Generator().manual_seed(0)
    passes = [common.predict(model, test_x, common.augment_report, gen, precision).argmax(1) for _ in range(2)]
    assert (passes[0] != passes[1]).any()  # a random test pass: no two passes alike
    # (that the passes lie below the clean accuracy is measured on real data, above: on 100
    # synthetic images after one epoch, the clean accuracy itself is about chance)


def test_repeat_aug_none_gives_the_clean_accuracy_every_pass(unaugmented):
    result, printed = unaugmented
    assert result["repeated"]["aug"] == "none" and result["repeated"]["n"] == 2
    assert result["repeated"]["accuracies"] == [result["test_accuracy"]] * 2
    assert "2 passes of --aug none" in printed


# ----------------------------------------------------------------------------- the report's logs

def seed_md_logs():
    """The two logs in SEED.md's code block: {"cnn": [[epoch, last_lr, train_loss, val_loss, val_acc %]]}."""
    block = SEED_MD.read_text().split("Epoch logs (as reported):")[1].split("```")[1]
    logs, model = {}, None
    for line in block.splitlines():
        if line.strip() in ("CNN", "ResNet"):
            model = {"CNN": "cnn", "ResNet": "resnet9"}[line.strip()]
        elif re.fullmatch(r"\s*\d+(\s+[\d.]+){3}\s+[\d.]+%\s*", line):
            logs.setdefault(model, []).append([float(word) for word in line.replace("%", "").split()])
    return logs


def test_report_log_equals_seed_md():
    if not SEED_MD.exists():
        pytest.skip(f"{SEED_MD} is not here")
    expected, logs = seed_md_logs(), evaluate.read_report_log()
    assert set(logs) == set(expected) == {"cnn", "resnet9"}
    for model, rows in expected.items():
        assert len(rows) == len(logs[model]) == 20
        for (epoch, last_lr, train_loss, val_loss, val_acc), row in zip(rows, logs[model]):
            assert (row["epoch"], row["last_lr"], row["train_loss"], row["val_loss"]) == \
                   (epoch, last_lr, train_loss, val_loss)
            assert row["val_acc"] == pytest.approx(val_acc / 100, abs=1e-12)  # a fraction, as in the JSON


def test_report_log_spot_values():
    logs = evaluate.read_report_log()
    assert [len(logs["cnn"]), len(logs["resnet9"])] == [20, 20]
    assert logs["cnn"][0] == {"epoch": 1, "last_lr": 0.00104, "train_loss": 1.2251, "val_loss": 1.1340,
                              "val_acc": 0.562}
    assert logs["resnet9"][19]["train_loss"] == 0.0160 and logs["resnet9"][19]["val_acc"] == 0.998
    assert logs["cnn"][19]["val_loss"] == 1.0908


def test_against_report_prints_the_reports_epoch_beside_the_runs(unaugmented, seed_runs):
    result, printed = unaugmented
    run = seed_runs["summaries"][0]["history"][0]
    line = next(line for line in printed.splitlines() if "1.2251" in line)
    for value in (f"{run['train_loss']:.4f}", "1.1340", f"{run['val_loss']:.4f}", "56.2%",
                  f"{100 * run['train_accuracy']:.1f}%", f"{100 * run['val_accuracy']:.1f}%"):
        assert value in line
    found = result["against_report"]
    assert found["epochs"] == 1 and found["report_epochs"] == 20  # a short run: the epochs it has
    val_acc = found["columns"]["val_acc"]
    assert val_acc["mean_abs_difference"] == {"train_accuracy": pytest.approx(abs(0.562 - run["train_accuracy"])),
                                              "val_accuracy": pytest.approx(abs(0.562 - run["val_accuracy"]))}
    assert val_acc["tracks"] == min(val_acc["mean_abs_difference"], key=val_acc["mean_abs_difference"].get)
    assert f"the report's val_acc tracks the run's {val_acc['tracks']}" in printed
    try:
        import matplotlib  # noqa: F401  (optional: the picture only when it is installed)
    except ImportError:
        return
    assert (seed_runs["dir"] / "s0" / "cnn_vs_report.png").stat().st_size > 0


def test_against_report_picks_the_closest_column_and_skips_missing_val():
    """The report's CNN log beside a made-up run whose columns (nearly) equal the report's:
    each report column tracks the run column it (nearly) equals. --val-size 0: no val columns."""
    report = evaluate.read_report_log()["cnn"]
    history = [{"epoch": row["epoch"], "train_loss": row["train_loss"], "val_loss": row["val_loss"] + 0.001,
                "train_accuracy": row["val_acc"], "val_accuracy": 0.4} for row in report[:3]]
    columns = evaluate.against_report(history, report)["columns"]
    assert [columns[c]["tracks"] for c in ("train_loss", "val_loss", "val_acc")] == \
           ["train_loss", "val_loss", "train_accuracy"]
    assert columns["val_loss"]["mean_abs_difference"]["val_loss"] == pytest.approx(0.001)
    assert columns["val_acc"]["mean_abs_difference"]["train_accuracy"] == 0
    for row in history:
        row["val_loss"] = row["val_accuracy"] = None
    columns = evaluate.against_report(history, report)["columns"]
    assert columns["val_loss"]["mean_abs_difference"]["val_loss"] is None
    assert columns["val_loss"]["tracks"] == "train_loss"


# ----------------------------------------------------------------------------- several seeds

def test_runs_of_one_model_are_grouped(grouped, seed_runs):
    result, printed, saved = grouped
    accuracies = [s["test_accuracy"] for s in seed_runs["summaries"]]  # each training run's own
    mean = (accuracies[0] + accuracies[1]) / 2
    std = math.sqrt(((accuracies[0] - mean) ** 2 + (accuracies[1] - mean) ** 2) / (2 - 1))
    cnn = result["models"]["cnn"]
    assert list(result["models"]) == ["cnn"] and cnn["n"] == 2 and cnn["checkpoints"] == seed_runs["paths"]
    assert cnn["test_accuracy"]["values"] == accuracies
    assert cnn["test_accuracy"]["mean"] == pytest.approx(mean)
    assert cnn["test_accuracy"]["std"] == pytest.approx(std)
    repeated = [r["repeated"]["mean"] for r in result["checkpoints"]]
    assert cnn["repeated"]["values"] == repeated and cnn["repeated"]["aug"] == "report"
    assert cnn["repeated"]["mean"] == pytest.approx(sum(repeated) / 2)
    assert cnn["tta_accuracy"] is None  # no --tta
    assert result["comparison"] is None  # one model: nothing to compare
    assert f"{100 * mean:.2f}% ± {100 * std:.2f}" in printed and "cnn (n=2)" in printed
    assert saved["models"]["cnn"]["test_accuracy"] == cnn["test_accuracy"]
    assert [r["checkpoint"] for r in saved["checkpoints"]] == seed_runs["paths"]


def edited_copy(source, target, **changes):
    """A copy of a checkpoint with some of its config (or "epoch") changed."""
    state = torch.load(source, weights_only=True)
    for key, value in changes.items():
        if key == "epoch":
            state["epoch"] = value
        else:
            state["config"][key] = value
    torch.save(state, target)
    return str(target)


def test_runs_of_other_settings_are_refused_by_name(seed_runs, tmp_path):
    s0, s1 = seed_runs["paths"]
    cases = [(edited_copy(s1, tmp_path / "aug.pt", aug="report"), r"differ in --aug \(none vs report\)"),
             (edited_copy(s1, tmp_path / "lr.pt", max_lr=0.001), r"differ in --max-lr \(0.01 vs 0.001\)"),
             (edited_copy(s1, tmp_path / "fp16.pt", precision="fp16"), r"differ in --precision \(\w+ vs fp16\)"),
             (edited_copy(s0, tmp_path / "again.pt"), "both have --seed 0")]
    for path, message in cases:
        with pytest.raises(common.UserError, match=f"^{re.escape(s0)} and {re.escape(path)} {message}"):
            evaluate.main(evaluate_args(seed_runs, s0, path, "--repeats", "0"))
    unfinished = edited_copy(s1, tmp_path / "short.pt", epoch=0)
    with pytest.raises(common.UserError, match=f"^{re.escape(unfinished)} holds epoch 0 of 1: finish it"):
        evaluate.main(evaluate_args(seed_runs, s0, unfinished, "--repeats", "0"))
    dry = edited_copy(s1, tmp_path / "dry.pt", dry_run=True)
    with pytest.raises(common.UserError, match="one is a --dry-run"):
        evaluate.main(evaluate_args(seed_runs, s0, dry, "--repeats", "0"))


def test_t_distribution_p_values():
    """Two-sided p-values of Student's t, against published tables."""
    assert evaluate.t_two_sided_p(2.0, 10) == pytest.approx(0.07339, abs=1e-5)
    assert evaluate.t_two_sided_p(-2.0, 10) == evaluate.t_two_sided_p(2.0, 10)
    assert evaluate.t_two_sided_p(2.228, 10) == pytest.approx(0.05, abs=1e-4)  # the 5% critical value
    assert evaluate.t_two_sided_p(12.706, 1) == pytest.approx(0.05, abs=1e-5)
    assert evaluate.t_two_sided_p(1.0, 1) == pytest.approx(0.5)  # Cauchy: P(|T| > 1) = 1/2
    assert evaluate.t_two_sided_p(1.96, 1e6) == pytest.approx(0.05, abs=1e-4)  # the normal's
    assert evaluate.t_two_sided_p(0.0, 5) == 1.0
    assert evaluate.incomplete_beta(2, 3, 0.4) == pytest.approx(0.5248)  # binomial: P(X >= 2), X ~ B(4, 0.4)


RUNS = [judged_run("cnn", 1, 1), judged_run("resnet9", 1, 1)]  # finished, the report's schedule


def seeded(values):
    return {"n": len(values), "test_accuracy": evaluate.spread(values)}


def test_verdict_over_seeds_weighs_the_gap_against_the_spread():
    cnn, resnet = [0.50, 0.52, 0.51], [0.60, 0.63, 0.62]
    judged = evaluate.verdict_over_seeds({"cnn": seeded(cnn), "resnet9": seeded(resnet)}, RUNS)
    se2 = [evaluate.spread(v)["std"] ** 2 / 3 for v in (resnet, cnn)]  # squared standard errors, by hand
    t = (sum(resnet) / 3 - sum(cnn) / 3) / math.sqrt(sum(se2))
    df = sum(se2) ** 2 / (se2[0] ** 2 / 2 + se2[1] ** 2 / 2)
    assert judged["test"] == "welch" and judged["better"] == "resnet9"
    assert judged["gap_points"] == pytest.approx(10.667, abs=1e-3)
    assert judged["welch_t"] == pytest.approx(t) and judged["df"] == pytest.approx(df)
    assert judged["p_value"] == pytest.approx(evaluate.t_two_sided_p(t, df)) and judged["p_value"] < 0.05
    assert judged["significant"] and judged["report_conclusion"] == "holds"
    assert "more than the spread over seeds" in judged["text"] and "holds" in judged["text"]
    judged = evaluate.verdict_over_seeds({"cnn": seeded([0.50, 0.60]), "resnet9": seeded([0.52, 0.61])}, RUNS)
    assert judged["better"] == "resnet9" and not judged["significant"]  # 1.5 points, seeds vary by 7
    assert judged["report_conclusion"] == "not shown" and "is not shown" in judged["text"]
    assert "within the spread over seeds" in judged["text"]
    judged = evaluate.verdict_over_seeds({"cnn": seeded(resnet), "resnet9": seeded(cnn)}, RUNS)
    assert judged["better"] == "cnn" and judged["report_conclusion"] == "reversed"


def test_verdict_over_seeds_needs_two_runs_of_each():
    judged = evaluate.verdict_over_seeds({"cnn": seeded([0.50, 0.52]), "resnet9": seeded([0.6])}, RUNS)
    assert judged["better"] == "resnet9" and judged["gap_points"] == pytest.approx(9)
    assert judged["significant"] is None and judged["report_conclusion"] is None
    assert "not tested" in judged["text"] and "resnet9 has 1" in judged["text"]
    assert evaluate.spread([0.6]) == {"mean": 0.6, "std": None, "values": [0.6]}


# ----------------------------------------------------------------------------- what is printed is what was shown

@pytest.fixture(scope="module")
def dry_runs(tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dry")
    for module in (train_cnn, train_resnet):
        module.main(["--dry-run", "--data-dir", str(tiny_data_dir), "--out", str(out), "--device", "cpu"])
    return out / "dry-run"


def test_dry_runs_are_said_and_judge_nothing_of_the_report(dry_runs, tiny_data_dir):
    result, printed = quietly(["--data-dir", str(tiny_data_dir), "--device", "cpu", "--repeats", "0",
                               str(dry_runs / "cnn.pt"), str(dry_runs / "resnet9.pt")])
    assert printed.count("dry run: a check of the code") == 1
    assert result["comparison"]["report_conclusion"] is None
    assert "No verdict on the report's conclusion" in printed
    assert not re.search(r"conclusion .*(holds|is not shown|is reversed)", printed)


def test_an_unfinished_run_is_marked_wherever_it_is_printed(runs, tmp_path):
    short = edited_copy(runs["dir"] / "resnet9.pt", tmp_path / "resnet9.pt", epoch=0, epochs=3)
    result, printed = quietly(evaluate_args(runs, str(runs["dir"] / "cnn.pt"), short, "--repeats", "0"))
    assert f"{short}: resnet9, 6,637,194 params, UNFINISHED: epoch 0 of 3" in printed
    assert f"{short} is UNFINISHED: epoch 0 of 3: this compares it as it stands now" in printed
    assert f"{short} is UNFINISHED: epoch 0 of 3" in result["comparison"]["text"]


def test_against_report_says_when_the_schedule_is_not_the_reports(seed_runs, tmp_path):
    short = seed_runs["paths"][0]  # 1 epoch on 500 images
    result, printed = quietly(evaluate_args(seed_runs, short, "--repeats", "0", "--against-report"))
    assert result["against_report"]["like_for_like"] is False
    assert "NOT like for like: this run has --epochs 1 (the report's: 20)" in printed
    same = edited_copy(short, tmp_path / "cnn.pt", epochs=20)  # the report's schedule, epoch 1 of 20
    result, printed = quietly(evaluate_args(seed_runs, same, "--repeats", "0", "--against-report"))
    assert result["against_report"]["like_for_like"] is True and "like for like" not in printed
    assert "UNFINISHED: epoch 1 of 20" in printed


def test_the_data_folder_defaults_to_the_one_the_run_trained_on(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/ here: the checkpoint's own folder must be used
    result, printed = quietly([str(runs["dir"] / "cnn.pt"), "--repeats", "0", "--device", "cpu"])
    assert result["test_accuracy"] == runs["cnn"]["test_accuracy"]
    assert f"data from {runs['data'].resolve()}" in printed
    assert not (tmp_path / "data").exists()


def test_a_failed_download_leaves_no_empty_folder(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    def offline(*args, **kwargs):
        (tmp_path / "data").mkdir(exist_ok=True)  # as torchvision's download_url does first
        raise OSError("no network")
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", offline)
    with pytest.raises(common.UserError, match="the download failed"):
        common.load_cifar10(tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_files_that_are_not_checkpoints_are_named_plainly(runs, tmp_path):
    with pytest.raises(common.UserError, match=rf"cnn.json is not a checkpoint .*: the run's checkpoint is "
                                               rf"{re.escape(str(runs['dir'] / 'cnn.pt'))}$"):
        evaluate.main(evaluate_args(runs, str(runs["dir"] / "cnn.json"), "--repeats", "0"))
    folder = runs["data"] / "cifar-10-batches-py"
    with pytest.raises(common.UserError, match=rf"cifar-10-batches-py folder itself: .*--data-dir {re.escape(str(runs['data']))}$"):
        evaluate.main(["--data-dir", str(folder), "--device", "cpu", str(runs["dir"] / "cnn.pt"), "--repeats", "0"])


def test_checkpoints_named_seed_load_and_group_as_report(seed_runs, tmp_path):
    """Before its rename, the report's pipeline was --aug seed: such runs group with report runs."""
    old = edited_copy(seed_runs["paths"][0], tmp_path / "old.pt", aug="seed")
    new = edited_copy(seed_runs["paths"][1], tmp_path / "new.pt", aug="report")
    result, _ = quietly(evaluate_args(seed_runs, old, new, "--repeats", "0"))
    assert [r["aug"] for r in result["checkpoints"]] == ["report", "report"]
    assert result["models"]["cnn"]["n"] == 2


def test_ablation_takes_the_reports_pipeline_apart():
    """A model that sees only the mean colour of an image is blind to a mirror image: with
    the flip alone its accuracy is the clean one in every pass. Each other step changes it."""
    class MeanColour(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.side = torch.nn.Linear(3, 10), slice(None)

        def forward(self, x):
            return self.linear(x[..., self.side].mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = MeanColour()
    halves = torch.randint(0, 256, (200, 3, 1, 2), dtype=torch.uint8)  # a colour each side
    images = halves.repeat_interleave(32, dim=2).repeat_interleave(16, dim=3)
    labels = common.predict(model, images).argmax(1)  # right on every clean image
    args = evaluate.parse_args(["x.pt", "--repeats", "3", "--ablation"])
    found = evaluate.ablation(model, images, labels, args, "fp32")
    assert set(found) == {"only", "without"}
    assert list(found["only"]) == list(found["without"]) == list(common.REPORT_STEPS)
    assert found["only"]["flip"] == {"mean": 1.0, "std": 0.0}
    for step in ("crop", "rotate", "erase"):
        assert found["only"][step]["mean"] < 1.0, step
    assert found["without"]["flip"]["mean"] < 1.0  # the rest of the pipeline still distorts
    model.side = slice(0, 16)  # now it sees the left half only: a mirror image changes its mind
    labels = common.predict(model, images).argmax(1)
    flipped = evaluate.ablation(model, images, labels, args, "fp32")["only"]["flip"]["mean"]
    assert 0.85 < flipped < 1.0  # p = 0.1: about one image in ten is mirrored
    with pytest.raises(SystemExit):
        evaluate.parse_args(["x.pt", "--ablation", "--repeats", "0"])


# ----------------------------------------------------------------------------- a loop without model.eval()

def test_train_mode_passes_are_a_test_loop_that_forgot_eval(runs):
    """--train-mode: each pass shuffles the test images into batches of 64 and runs them with
    BatchNorm in training mode; the clean accuracy and the checkpoint are untouched."""
    ckpt = runs["dir"] / "cnn.pt"
    before = ckpt.read_bytes()
    result = evaluate.main(evaluate_args(runs, str(ckpt), "--repeats", "3", "--repeat-aug", "none",
                                         "--train-mode"))
    assert ckpt.read_bytes() == before
    assert result["test_accuracy"] == runs["cnn"]["test_accuracy"]
    assert result["repeated"]["train_mode"] is True and result["repeated"]["n"] == 3
    state = common.load_checkpoint(ckpt)  # by hand: shuffle, batches of 64, batch statistics
    model = evaluate.build_model(state, ckpt).train()
    test_x, test_y = common.load_data(runs["data"], "cpu", 100)[0]["test"]
    gen = torch.Generator().manual_seed(0)
    by_hand = []
    for _ in range(3):
        order, correct = torch.randperm(len(test_x), generator=gen), 0
        for batch in order.split(64):
            with common.autocast("cpu", state["config"]["precision"]), torch.no_grad():
                correct += (model(common.augment_none(test_x[batch])).argmax(1) == test_y[batch]).sum().item()
        by_hand.append(correct / len(test_x))
    assert result["repeated"]["accuracies"] == pytest.approx(by_hand)  # float32 means
    plain = evaluate.main(evaluate_args(runs, str(ckpt), "--repeats", "1", "--repeat-aug", "none"))
    assert plain["repeated"]["train_mode"] is False


def test_train_mode_predictions_change_with_the_batches_and_leave_the_model_alone(real_cnn_run, real_data_dir):
    _, out = real_cnn_run
    model = evaluate.build_model(common.load_checkpoint(out / "cnn.pt"), out / "cnn.pt")
    _, _, test_x, test_y, _ = common.load_cifar10(real_data_dir)
    test_x, test_y = test_x[:2000], test_y[:2000]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    clean = common.predict(model, test_x).argmax(1)
    gen = torch.Generator().manual_seed(0)
    forgetful = copy.deepcopy(model)
    first, second = (common.predict_in_train_mode(forgetful, test_x, gen=gen).argmax(1) for _ in range(2))
    assert (first != second).float().mean() > 0.01  # no augmentation, yet the passes differ
    assert (first != clean).float().mean() > 0.01
    common.repeated_accuracies(model, test_x, test_y, common.augment_none, 2, train_mode=True)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # running stats kept
    assert torch.equal(common.predict(model, test_x).argmax(1), clean)


def test_train_mode_needs_passes(capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["x.pt", "--repeats", "0", "--train-mode"])
    assert "--train-mode changes the repeated passes: it needs --repeats 1 or more" in capsys.readouterr().err
