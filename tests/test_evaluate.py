"""evaluate.py: clean accuracy, the report's repeated passes, TTA, the comparison, bad checkpoints."""
import json
import pickle
import subprocess
import sys

import pytest
import torch

import common
import evaluate
import train_cnn
import train_resnet
from conftest import ROOT


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
    again = evaluate.main(evaluate_args(runs, ckpt, "--repeats", "3", "--seed", "1"))["repeated"]
    other = evaluate.main(evaluate_args(runs, ckpt, "--repeats", "3", "--seed", "2"))["repeated"]
    assert first == again
    assert first["n"] == 3 and len(first["accuracies"]) == 3
    assert first["mean"] == pytest.approx(sum(first["accuracies"]) / 3)
    assert first["accuracies"] != other["accuracies"]


def test_tta_leaves_the_clean_accuracy_alone(runs):
    ckpt = str(runs["dir"] / "cnn.pt")
    plain = evaluate.main(evaluate_args(runs, ckpt, "--repeats", "0"))
    with_tta = evaluate.main(evaluate_args(runs, ckpt, "--repeats", "0", "--tta"))
    assert with_tta["test_accuracy"] == plain["test_accuracy"]
    assert 0 <= with_tta["tta_accuracy"] <= 1


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
    repeated = common.repeated_accuracies(model, test_x, test_y, common.augment_seed, 3)
    assert len(set(repeated)) == 3  # the passes differ: the test pass is random
    assert sum(repeated) / 3 < clean - 0.02


def test_train_and_val_accuracy_are_reported(runs):
    result = evaluate.main(evaluate_args(runs, str(runs["dir"] / "cnn.pt"), "--repeats", "0"))
    assert 0 <= result["train_accuracy"] <= 1 and 0 <= result["val_accuracy"] <= 1
    final = runs["cnn"]["history"][-1]
    assert result["val_accuracy"] == pytest.approx(final["val_accuracy"])  # the same held-out images


def test_two_checkpoints_are_compared(runs, tmp_path, capsys):
    out = tmp_path / "both.json"
    result = evaluate.main(evaluate_args(runs, str(runs["dir"] / "cnn.pt"), str(runs["dir"] / "resnet9.pt"),
                                         "--repeats", "2", "--tta", "--out", str(out)))
    printed = capsys.readouterr().out
    for label in ("params", "train seconds", "clean test accuracy", "report protocol", "TTA accuracy"):
        assert label in printed
    assert "1,125,258" in printed and "6,637,194" in printed
    comparison = result["comparison"]
    accuracies = {r["model"]: r["test_accuracy"] for r in result["checkpoints"]}
    assert comparison["better"] == max(accuracies, key=accuracies.get)
    assert comparison["gap_points"] == pytest.approx(100 * abs(accuracies["cnn"] - accuracies["resnet9"]))
    holds = accuracies["resnet9"] > accuracies["cnn"] and comparison["significant"]
    assert comparison["report_conclusion_holds"] == holds
    assert ("holds" if holds else "does NOT hold") in comparison["text"]
    saved = json.loads(out.read_text())
    assert [r["model"] for r in saved["checkpoints"]] == ["cnn", "resnet9"]
    assert saved["comparison"]["better"] == comparison["better"]


def test_verdict_counts_disagreements():
    base = {"checkpoint": "x", "params": 1}
    a = {**base, "model": "cnn", "test_accuracy": 0.5, "correct": torch.tensor([True] * 50 + [False] * 50)}
    b = {**base, "model": "resnet9", "test_accuracy": 0.9, "correct": torch.tensor([True] * 90 + [False] * 10)}
    judged = evaluate.verdict(a, b)
    assert judged["better"] == "resnet9" and judged["gap_points"] == pytest.approx(40)
    assert judged["mcnemar_z"] == pytest.approx(40 / 40 ** 0.5) and judged["significant"]
    assert judged["report_conclusion_holds"]
    b["correct"] = torch.tensor([True] * 51 + [False] * 49)
    b["test_accuracy"] = 0.51
    judged = evaluate.verdict(a, b)
    assert not judged["significant"] and not judged["report_conclusion_holds"]
    assert "within test-set noise" in judged["text"]


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
             "garbage": (folder / "garbage.pt", "not a PyTorch checkpoint|refused by the safe loader"),
             "other program": (folder / "other.pt", "not written by train_cnn.py or train_resnet.py"),
             "code (torch.save)": (folder / "evil.pt", "refused by the safe loader"),
             "code (pickle)": (folder / "evil.pkl", "refused by the safe loader")}
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
    for argv in (["a.pt", "b.pt", "c.pt"], ["a.pt", "--repeats", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            evaluate.parse_args(argv)
        assert exit_info.value.code == 2
