"""Long runs survive interruption: exact resume, atomic saves, Ctrl-C, NaN, mismatched checkpoints."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
import train_cnn
import train_resnet
from conftest import ROOT


def run_args(data_dir, out, *extra):
    return ["--data-dir", str(data_dir), "--out", str(out), "--val-size", "100", "--epochs", "2",
            "--device", "cpu", *extra]


def without_seconds(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_resume_ends_exactly_where_a_straight_run_ends(tiny_data_dir, tmp_path, capsys):
    fp32 = ("--precision", "fp32")  # the float32 path, kept tested on CPUs where auto picks bf16
    straight = train_cnn.main(run_args(tiny_data_dir, tmp_path / "straight", *fp32))
    assert train_cnn.main(run_args(tiny_data_dir, tmp_path / "split", *fp32, "--stop-after", "1")) is None
    printed = capsys.readouterr().out
    assert "stopped after epoch 1 of 2" in printed and "--resume" in printed
    halfway = torch.load(tmp_path / "split" / "cnn.pt", weights_only=True)
    assert halfway["epoch"] == 1 and halfway["test_accuracy"] is None
    resumed = train_cnn.main(run_args(tiny_data_dir, tmp_path / "split", *fp32, "--resume",
                                      str(tmp_path / "split" / "cnn.pt")))
    a = torch.load(tmp_path / "straight" / "cnn.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "cnn.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert without_seconds(straight["history"]) == without_seconds(resumed["history"])
    assert straight["test_accuracy"] == resumed["test_accuracy"]
    assert torch.equal(a["rng"]["data"], b["rng"]["data"])


def test_a_checkpoint_of_the_other_model_is_refused(tiny_data_dir, tmp_path):
    train_cnn.main(run_args(tiny_data_dir, tmp_path, "--stop-after", "1"))
    with pytest.raises(common.UserError, match="checkpoint of cnn, not resnet9"):
        train_resnet.main(run_args(tiny_data_dir, tmp_path, "--resume", str(tmp_path / "cnn.pt")))


@pytest.mark.parametrize("changed, message", [(["--max-lr", "0.02"], "--max-lr 0.01, this run has --max-lr 0.02"),
                                              (["--seed", "5"], "--seed 0, this run has --seed 5"),
                                              (["--aug", "none"], "--aug report, this run has --aug none")])
def test_a_checkpoint_with_other_settings_is_refused(changed, message, tiny_data_dir, tmp_path):
    train_cnn.main(run_args(tiny_data_dir, tmp_path, "--stop-after", "1"))
    with pytest.raises(common.UserError, match=message):
        train_cnn.main(run_args(tiny_data_dir, tmp_path, *changed, "--resume", str(tmp_path / "cnn.pt")))


def test_a_resume_never_replaces_another_runs_checkpoint(tiny_data_dir, tmp_path, monkeypatch):
    """The reported loss: a finished run in small/, an interrupted one in intr/, and a resume
    of intr/ with --out small: refused by name before any work, small/cnn.pt byte for byte."""
    small, intr = tmp_path / "small", tmp_path / "intr"
    train_cnn.main(run_args(tiny_data_dir, small, "--epochs", "1"))
    train_cnn.main(run_args(tiny_data_dir, intr, "--epochs", "4", "--stop-after", "1"))
    before = (small / "cnn.pt").read_bytes(), (small / "cnn.json").read_bytes()
    monkeypatch.setattr(common, "load_data", lambda *a, **k: pytest.fail("work began before the refusal"))
    with pytest.raises(common.UserError, match=rf"--out {small} holds another run .*leave out --out"):
        train_cnn.main(run_args(tiny_data_dir, small, "--epochs", "4", "--resume", str(intr / "cnn.pt"),
                                "--stop-after", "2"))
    assert ((small / "cnn.pt").read_bytes(), (small / "cnn.json").read_bytes()) == before


def test_a_resume_without_out_continues_in_the_checkpoints_folder(tiny_data_dir, tmp_path, monkeypatch):
    """No --out: the run continues beside its checkpoint, and writes nothing in ./runs."""
    intr = tmp_path / "intr"
    train_cnn.main(run_args(tiny_data_dir, intr, "--stop-after", "1"))
    monkeypatch.chdir(tmp_path)
    argv = [arg for arg in run_args(tiny_data_dir, intr) if arg not in ("--out", str(intr))]
    result = train_cnn.main([*argv, "--resume", str(intr / "cnn.pt")])
    assert len(result["history"]) == 2
    assert torch.load(intr / "cnn.pt", weights_only=True)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["intr"]  # no runs/ beside it


def test_a_resume_into_an_empty_folder_continues_there(tiny_data_dir, tmp_path):
    train_cnn.main(run_args(tiny_data_dir, tmp_path / "a", "--stop-after", "1"))
    result = train_cnn.main(run_args(tiny_data_dir, tmp_path / "b", "--resume", str(tmp_path / "a" / "cnn.pt")))
    assert len(result["history"]) == 2
    assert torch.load(tmp_path / "a" / "cnn.pt", weights_only=True)["epoch"] == 1  # left as it was
    assert torch.load(tmp_path / "b" / "cnn.pt", weights_only=True)["epoch"] == 2


def test_a_checkpoint_named_seed_resumes_as_report(tiny_data_dir, tmp_path):
    """The report's pipeline was called "seed" before: such checkpoints resume as --aug report."""
    train_cnn.main(run_args(tiny_data_dir, tmp_path, "--stop-after", "1"))
    state = torch.load(tmp_path / "cnn.pt", weights_only=True)
    state["config"]["aug"] = "seed"
    torch.save(state, tmp_path / "cnn.pt")
    assert common.load_checkpoint(tmp_path / "cnn.pt")["config"]["aug"] == "report"
    result = train_cnn.main(run_args(tiny_data_dir, tmp_path, "--resume", str(tmp_path / "cnn.pt")))
    assert result["config"]["aug"] == "report" and len(result["history"]) == 2


def test_a_finished_run_is_not_resumed(tiny_data_dir, tmp_path):
    train_cnn.main(run_args(tiny_data_dir, tmp_path, "--epochs", "1"))
    with pytest.raises(common.UserError, match="already finished"):
        train_cnn.main(run_args(tiny_data_dir, tmp_path, "--epochs", "1", "--resume", str(tmp_path / "cnn.pt")))


def test_ctrl_c_keeps_the_last_epoch_and_prints_the_resume_command(tiny_data_dir, tmp_path):
    """SIGINT a training subprocess after its first checkpoint; then resume by the printed command."""
    checkpoint = tmp_path / "cnn.pt"
    command = [sys.executable, "train_cnn.py", *run_args(tiny_data_dir, tmp_path, "--epochs", "200")]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert checkpoint.exists(), "no checkpoint appeared"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "Traceback" not in err and "interrupted;" in err
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["epoch"] >= 1 and f"holds epoch {saved['epoch']}" in err
    resume = shlex.split(err.split("resume with: ")[1].strip())
    assert resume[:2] == ["python", "train_cnn.py"] and resume[-2:] == ["--resume", str(checkpoint)]
    done = subprocess.run([sys.executable, *resume[1:], "--stop-after", str(saved["epoch"] + 1)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert f"resumed {checkpoint} after epoch {saved['epoch']}" in done.stdout
    assert torch.load(checkpoint, weights_only=True)["epoch"] == saved["epoch"] + 1


def test_a_failed_write_leaves_the_old_checkpoint(tiny_data_dir, tmp_path, monkeypatch):
    path = tmp_path / "cnn.pt"
    common.save_checkpoint({"version": 1}, path)

    def fail_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail_rename)
    with pytest.raises(common.UserError, match="could not write .*No space left.*intact"):
        common.save_checkpoint({"version": 2}, path)
    assert torch.load(path, weights_only=True) == {"version": 1}
    assert list(tmp_path.iterdir()) == [path]  # the temp file is cleaned up


def test_a_writer_killed_midway_leaves_the_old_checkpoint(tmp_path):
    """A process killed in the middle of writing a large checkpoint: the old one still loads."""
    path = tmp_path / "cnn.pt"
    common.save_checkpoint({"version": 1}, path)
    writer = ("import sys, torch, common\n"
              "common.save_checkpoint({'big': torch.zeros(300_000_000, dtype=torch.uint8)}, sys.argv[1])\n")
    process = subprocess.Popen([sys.executable, "-c", writer, str(path)], cwd=ROOT)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".cnn.pt.*.tmp")) and time.time() < deadline:
        time.sleep(0.01)
    process.kill()
    process.wait()
    assert torch.load(path, weights_only=True) == {"version": 1}


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_data_dir, tmp_path,
                                                                             monkeypatch):
    forward = train_cnn.CNN.forward
    calls = {"train": 0}

    def poisoned(self, x):
        out = forward(self, x)
        if self.training:
            calls["train"] += 1
            if calls["train"] == 12:  # epoch 2 (8 batches an epoch), batch 4
                return out * float("nan")
        return out

    monkeypatch.setattr(train_cnn.CNN, "forward", poisoned)
    with pytest.raises(common.UserError, match=r"non-finite loss at epoch 2, batch 4; .*cnn.pt holds epoch 1; "
                                               r"start a new run with a lower --max-lr"):
        train_cnn.main(run_args(tiny_data_dir, tmp_path))
    saved = torch.load(tmp_path / "cnn.pt", weights_only=True)
    assert saved["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_ctrl_c_while_saving_lands_after_the_save():
    """The interrupt is held back until the block ends, even with torch's threads running."""
    torch.set_num_threads(2)
    torch.ones(256, 256) @ torch.ones(256, 256)  # start torch's worker threads
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with common.ctrl_c_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # the signal arrives while the "save" is still going on
            finished.append(True)
    assert finished == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


def test_stop_after_an_epoch_the_checkpoint_already_holds_is_refused(tiny_data_dir, tmp_path):
    train_cnn.main(run_args(tiny_data_dir, tmp_path, "--epochs", "3", "--stop-after", "2"))
    with pytest.raises(common.UserError, match="--stop-after 1: .* already holds epoch 2"):
        train_cnn.main(run_args(tiny_data_dir, tmp_path, "--epochs", "3", "--stop-after", "1",
                                "--resume", str(tmp_path / "cnn.pt")))


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the training loop catches it, so the files on disk stay
    exactly as the moment it struck left them."""


def test_a_run_cut_between_its_last_epoch_and_its_test_is_finished_by_resume(
        tiny_data_dir, tmp_path, monkeypatch, capsys):
    fp32 = ("--precision", "fp32")
    straight = train_cnn.main(run_args(tiny_data_dir, tmp_path / "straight", *fp32))
    save_checkpoint, saves = common.save_checkpoint, []

    def killed(*args, **kwargs):
        raise Killed

    def killed_once_epoch_2_is_saved(state, path):
        save_checkpoint(state, path)
        saves.append(state["epoch"])
        if state["epoch"] == 2:  # the last epoch's checkpoint and JSON are written; the test is next
            monkeypatch.setattr(common, "predict", killed)

    monkeypatch.setattr(common, "save_checkpoint", killed_once_epoch_2_is_saved)
    with pytest.raises(Killed):
        train_cnn.main(run_args(tiny_data_dir, tmp_path / "cut", *fp32))
    monkeypatch.undo()
    assert saves == [1, 2]
    checkpoint = tmp_path / "cut" / "cnn.pt"
    assert not common.is_finished(common.load_checkpoint(checkpoint))  # the notebook's rule too
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2  # every epoch was saved...
    assert json.loads((tmp_path / "cut" / "cnn.json").read_text())["test_accuracy"] is None  # ...not the test
    capsys.readouterr()
    resumed = train_cnn.main(run_args(tiny_data_dir, tmp_path / "cut", *fp32, "--resume", str(checkpoint)))
    printed = capsys.readouterr().out
    assert "left to do: its test" in printed and "Epoch:" not in printed  # no training
    assert "test accuracy (clean" in printed and "next: python evaluate.py" in printed
    on_disk = json.loads((tmp_path / "cut" / "cnn.json").read_text())
    for record in (resumed, on_disk):
        assert without_seconds(record["history"]) == without_seconds(straight["history"])
        assert record["test_accuracy"] == straight["test_accuracy"]
    assert torch.load(checkpoint, weights_only=True)["test_accuracy"] == straight["test_accuracy"]
    assert common.is_finished(common.load_checkpoint(checkpoint))
    # now finished: a second resume is refused, and points at evaluate.py
    with pytest.raises(common.UserError, match="already finished all 2 epochs; evaluate it"):
        train_cnn.main(run_args(tiny_data_dir, tmp_path / "cut", *fp32, "--resume", str(checkpoint)))


def test_resume_alone_continues_with_the_checkpoints_settings(tiny_data_dir, tmp_path):
    """`--resume CHECKPOINT` needs no other flag: a run started with --aug none --seed 3 --epochs 3
    continues as it started; a flag given that differs is still refused."""
    train_cnn.main(run_args(tiny_data_dir, tmp_path, "--aug", "none", "--seed", "3", "--epochs", "3",
                            "--stop-after", "1"))
    checkpoint = str(tmp_path / "cnn.pt")
    with pytest.raises(common.UserError, match="--seed 3, this run has --seed 4"):
        train_cnn.main(["--data-dir", str(tiny_data_dir), "--device", "cpu", "--seed", "4", "--resume", checkpoint])
    result = train_cnn.main(["--data-dir", str(tiny_data_dir), "--device", "cpu", "--resume", checkpoint])
    assert len(result["history"]) == 3 and result["test_accuracy"] is not None
    config = torch.load(checkpoint, weights_only=True)["config"]
    assert (config["aug"], config["seed"], config["epochs"], config["val_size"]) == ("none", 3, 3, 100)
