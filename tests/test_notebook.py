"""colab.ipynb run top to bottom by a real Jupyter kernel, and the progress line inside an epoch.

The notebook tests need nbclient and ipykernel (requirements-dev.txt, which .ci/run installs);
without them they skip. NOTEBOOK_DRY_RUN=1 makes every training cell a --dry-run on the CPU.
"""
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import common
from conftest import ROOT

NOTEBOOK = ROOT / "colab.ipynb"
OUTPUTS = ["augmentations.png", "cnn.pt", "cnn.json", "cnn_curves.png", "cnn_confusion.png", "cnn_vs_report.png",
           "resnet9.pt", "resnet9.json", "resnet9_curves.png", "resnet9_confusion.png", "resnet9_vs_report.png",
           "evaluation.json"]


def copy_of_project(folder):
    """The scripts, their data file and the notebook alone in a fresh folder, so the outputs land
    there, not in runs/ (evaluate.py --against-report reads report_log.csv beside it)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in [*ROOT.glob("*.py"), ROOT / "report_log.csv", NOTEBOOK]:
        shutil.copy(path, folder)
    return folder


def kernel_run(folder, data_dir, monkeypatch, settings=None, only=None):
    """A client that runs the notebook in a fresh kernel in `folder`, as a test run: call .execute().

    settings: {NAME: value}, each `NAME = ...` line of the notebook's code set to it, as a student
    edits the first cell; only: the ids of the cells to run, in the notebook's order (all: None).
    """
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")  # the notebook shows pictures
    monkeypatch.setenv("NOTEBOOK_DRY_RUN", "1")  # the kernel inherits the environment
    monkeypatch.setenv("CIFAR10_DIR", str(data_dir))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a runtime without a GPU, on any machine
    monkeypatch.setenv("PYTHONPATH", str(fake_colab(folder)))  # google.colab.drive, as on Colab
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for name, value in (settings or {}).items():
        set_line(notebook, name, value)
    if only is not None:
        notebook.cells = [cell for cell in notebook.cells if cell.get("id") in only]
    return nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": str(folder)}})


FAKE_DRIVE = """\
from pathlib import Path


def mount(mountpoint):
    log = Path(__file__).parents[2] / "mounts.log"
    with open(log, "a") as f:
        f.write(mountpoint + "\\n")
    if not Path(mountpoint).is_relative_to(log.parent):  # never outside the test's folder
        raise RuntimeError("mounted outside the test's folder")
    (Path(mountpoint) / "MyDrive").mkdir(parents=True, exist_ok=True)
"""


def fake_colab(folder):
    """A google.colab whose drive.mount(mountpoint) is logged in fake-colab/mounts.log."""
    package = folder / "fake-colab" / "google" / "colab"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "drive.py").write_text(FAKE_DRIVE)
    return folder / "fake-colab"


def set_line(notebook, name, value):
    """`NAME = value` instead of the notebook's `NAME = ...`: there must be exactly one such line."""
    found = 0
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        lines = cell.source.split("\n")
        for i, line in enumerate(lines):
            if line.startswith(f"{name} = "):
                lines[i], found = f"{name} = {value!r}", found + 1
        cell.source = "\n".join(lines)
    assert found == 1, f"{found} lines set {name} in the notebook"


ON_A_CPU = {"GO_ON_WITHOUT_GPU": True}  # a dry run trains on the CPU: the first cell says go on


def cells(notebook):
    return {cell.id: cell for cell in notebook.cells if cell.cell_type == "code"}


def text(cell):
    return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")


def pictures(cell):
    return sum("image/png" in out.get("data", {}) for out in cell.outputs)


def test_the_committed_notebook_is_clean_and_calls_the_scripts_through_run():
    notebook = json.loads(NOTEBOOK.read_text())
    assert notebook["metadata"]["accelerator"] == "GPU"  # Colab opens a GPU runtime for it
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert all(cell["outputs"] == [] and cell["execution_count"] is None for cell in code)
    lines = [line.strip() for cell in code for line in cell["source"]]
    # "!" commands run whichever python is on PATH and never fail their cell
    assert not [line for line in lines if line.startswith("!")]
    for script in ("train_cnn.py", "train_resnet.py", "evaluate.py", "show_augmentations.py"):
        assert any(f'("{script}"' in line for line in lines), script


def git(folder, *words):
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *words],
                   cwd=folder, check=True, capture_output=True)


def test_the_setup_cell_stops_on_the_placeholder_and_clones_the_branch_it_names(tmp_path, monkeypatch):
    setup = json.loads(NOTEBOOK.read_text())["cells"][2]
    assert setup["id"] == "setup" and "REPO_URL" in setup["source"][0]  # its first line says so
    content = tmp_path / "content"  # Colab's /content: the notebook alone, no scripts
    content.mkdir()
    client = kernel_run(content, tmp_path, monkeypatch, only=["setup"])
    with pytest.raises(Exception, match="REPO_URL is still the placeholder: set it"):
        client.execute()
    assert not (content / "cifar10-report").exists()
    # A repository whose branch "notebook" holds a file its default branch lacks.
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "common.py").write_text("")
    git(repo, "add", "common.py")
    git(repo, "commit", "-q", "-m", "main")
    git(repo, "checkout", "-q", "-b", "notebook")
    (repo / "only_on_the_branch.txt").write_text("")
    git(repo, "add", "only_on_the_branch.txt")
    git(repo, "commit", "-q", "-m", "notebook")
    git(repo, "checkout", "-q", "main")
    settings = {"REPO_URL": repo.as_uri(), "BRANCH": "notebook"}  # file://: --depth 1 holds
    kernel_run(content, tmp_path, monkeypatch, settings, only=["setup"]).execute()
    assert (content / "cifar10-report" / "only_on_the_branch.txt").exists()


def test_the_notebook_runs_top_to_bottom_and_a_rerun_trains_nothing(tiny_data_dir, tmp_path, monkeypatch):
    folder = copy_of_project(tmp_path)
    notebook = kernel_run(folder, tiny_data_dir, monkeypatch, ON_A_CPU).execute()
    for cell in cells(notebook).values():
        assert cell.execution_count is not None
        assert not [out for out in cell.outputs if out.output_type == "error"]
    assert sorted(path.name for path in (folder / "runs" / "dry-run").iterdir()) == sorted(OUTPUTS)
    ran = cells(notebook)
    assert sum(map(pictures, ran.values())) == 8  # what the model sees, two curves, two beside the report's,
    assert pictures(ran["plots"]) == 6  # two confusion matrices, and the curves without augmentation
    # Without augmentation (TRY_NO_AUGMENTATION as committed): the CNN again, in its own folder.
    no_aug = folder / "runs" / "no-augmentation" / "dry-run"
    assert sorted(path.name for path in no_aug.iterdir()) == ["cnn.json", "cnn.pt", "cnn_curves.png"]
    assert json.loads((no_aug / "cnn.json").read_text())["config"]["aug"] == "none"
    assert "--aug none" in text(ran["train-no-aug"]) and "Epoch: 1/1" in text(ran["train-no-aug"])
    assert pictures(ran["train-no-aug"]) == 1
    # GO_ON_WITHOUT_GPU: no stop, and the estimate comes from steps timed on this machine
    estimate = text(ran["device"])
    assert "estimated from 1 training step of each model, timed here in " in estimate
    assert "for the CNN and " in estimate
    assert "20 epochs of both and 10 of the CNN without augmentation, about " in estimate
    assert "Epoch: 1/1" in text(ran["train-cnn"]) and "Epoch: 1/1" in text(ran["train-resnet"])
    # USE_DRIVE as committed: no mount, and the outputs' fate said once
    assert not (folder / "fake-colab" / "mounts.log").exists()
    said = "".join(text(cell) for cell in ran.values())
    assert said.count("the outputs go to runs/ on this runtime: it disappears when the runtime ends") == 1
    assert "No verdict on the report's conclusion: dry runs check the code" in text(ran["evaluate"])
    assert "against the report's cnn log" in text(ran["evaluate"])  # --against-report
    # A session cut after the last checkpoint, before the script drew the curves: the notebook draws
    # them from the JSON; a JSON missing too is one sentence, not an error.
    dry_run = Path("runs", "dry-run")  # as the notebook names it, in the folder
    (folder / dry_run / "cnn_curves.png").unlink()
    (folder / dry_run / "resnet9.json").unlink()
    # After a disconnection, Run all again: finished models are skipped, not trained over.
    again = cells(kernel_run(folder, tiny_data_dir, monkeypatch, ON_A_CPU).execute())
    assert "nothing to train" in text(again["train-cnn"]) and "nothing to train" in text(again["train-resnet"])
    assert "nothing to train" in text(again["train-no-aug"])
    assert "No verdict on the report's conclusion" in text(again["evaluate"])
    assert text(again["plots"]) == f"no curves for the resnet9: {dry_run / 'resnet9.json'} is not there " \
                                   "(a run writes it after its first epoch)\n"
    assert pictures(again["plots"]) == 5  # the CNN's curves, from cnn.json; the four pictures evaluate.py drew
    # Pictures the scripts did not draw: one sentence each, the others shown.
    (folder / dry_run / "cnn_confusion.png").unlink()
    (folder / dry_run / "resnet9_vs_report.png").unlink()
    # And TRY_NO_AUGMENTATION = False skips that run.
    ran = cells(kernel_run(folder, tiny_data_dir, monkeypatch, {**ON_A_CPU, "TRY_NO_AUGMENTATION": False},
                           only=["setup", "device", "outputs", "run-helper", "plots", "train-no-aug"]).execute())
    assert text(ran["train-no-aug"]) == "skipped: TRY_NO_AUGMENTATION = False in the first cell\n"
    plots = ran["plots"]
    assert text(plots).splitlines() == [
        f"no curves for the resnet9: {dry_run / 'resnet9.json'} is not there "
        "(a run writes it after its first epoch)",
        f"no resnet9 log beside the report's: {dry_run / 'resnet9_vs_report.png'} is not there",
        f"no confusion matrix of the cnn: {dry_run / 'cnn_confusion.png'} is not there"]
    assert pictures(plots) == 3


def test_with_drive_the_outputs_and_the_cifar10_archive_are_kept_there(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    folder = copy_of_project(tmp_path / "runtime-1")
    (folder / "download.py").write_text(  # what the first script's download leaves in the data folder
        "import sys\nfrom pathlib import Path\nPath(sys.argv[1]).parent.mkdir(parents=True)\n"
        "Path(sys.argv[1]).write_bytes(b'the archive')\n")
    settings = {**ON_A_CPU, "USE_DRIVE": True, "DRIVE_MOUNT": str(folder / "fake-colab" / "drive")}
    opening = ["setup", "device", "outputs", "run-helper"]
    client = kernel_run(folder, tmp_path / "data-1", monkeypatch, settings, only=opening)
    client.nb.cells.append(nbformat.v4.new_code_cell('run("download.py", ARCHIVE)'))
    ran = cells(client.execute())
    drive = folder / "fake-colab" / "drive" / "MyDrive" / "cifar10-runs"
    assert (folder / "fake-colab" / "mounts.log").read_text() == f"{folder / 'fake-colab' / 'drive'}\n"
    assert f"outputs: {drive / 'dry-run'}" in text(ran["outputs"])
    assert "disappears when the runtime ends" not in text(ran["outputs"])
    assert (drive / "cifar-10-python.tar.gz").read_bytes() == b"the archive"  # copied after the download
    # A new runtime, its local disk empty, the same Drive: the archive comes back before any script.
    again = copy_of_project(tmp_path / "runtime-2")
    shutil.copytree(folder / "fake-colab" / "drive", again / "fake-colab" / "drive")
    settings["DRIVE_MOUNT"] = str(again / "fake-colab" / "drive")
    kernel_run(again, tmp_path / "data-2", monkeypatch, settings, only=opening[:3]).execute()
    assert (tmp_path / "data-2" / "cifar-10-python.tar.gz").read_bytes() == b"the archive"


def test_without_a_gpu_run_all_stops_before_any_work(tmp_path, monkeypatch):
    folder = copy_of_project(tmp_path)
    client = kernel_run(folder, tmp_path, monkeypatch, only=["setup", "device"])  # the first cell as committed
    with pytest.raises(Exception, match="This runtime has no GPU: choose one in Runtime → Change runtime "
                                        "type → GPU and Run all again, or set GO_ON_WITHOUT_GPU = True"):
        client.execute()
    assert "estimated from" not in text(cells(client.nb)["device"])  # stopped before timing anything


def test_a_failing_script_fails_its_cell_and_stops_the_notebook(tiny_data_dir, tmp_path, monkeypatch):
    folder = copy_of_project(tmp_path)
    script = folder / "train_resnet.py"  # broken as a script; its model still imports (the estimate times it)
    broken = 'if __name__ == "__main__":\n    import sys\n    sys.exit("train_resnet.py: error: broken on purpose")\n'
    script.write_text(broken + script.read_text())
    client = kernel_run(folder, tiny_data_dir, monkeypatch, ON_A_CPU)
    with pytest.raises(Exception, match="train_resnet.py failed .exit code 1.") as failed:
        client.execute()
    assert type(failed.value).__name__ == "CellExecutionError"  # nbclient's: a cell raised
    ran = cells(client.nb)
    assert "broken on purpose" in text(ran["train-resnet"])  # the script's own message, in its cell
    assert ran["train-cnn"].execution_count is not None and ran["evaluate"].execution_count is None


# ----------------------------------------------------------------------------- progress

class Terminal(io.StringIO):
    """A stdout that says it is a terminal, as Colab's `!python` pseudo-terminal does."""

    def isatty(self):
        return True


def progress_then_epoch_line(stdout, monkeypatch):
    """What a script prints during an epoch of 10 batches, then its epoch line."""
    monkeypatch.setattr(sys, "stdout", stdout)
    progress = common.Progress(epoch=1, steps=10, batch_size=64)
    progress.start = progress.last = progress.start - 2  # started 2 s ago: the next tick draws
    progress.tick(5)
    progress.close()
    print("Epoch: 1/20, last_lr: 0.00040, train_loss: 2.3026, val_loss: 2.3026, val_accuracy: 10.0%, 9.9 s")


def colab_shows(text):
    """Colab's rendering: each "\\r" clears back to the last newline."""
    return "\n".join(line.split("\r")[-1] for line in text.split("\n"))


def jupyter_shows(text):
    """A terminal's and Jupyter's rendering: each "\\r" goes back to the line's start and overwrites."""
    lines = []
    for line in text.split("\n"):
        shown = ""
        for part in line.split("\r"):
            shown = part + shown[len(part):]
        lines.append(shown.rstrip())
    return "\n".join(lines)


def test_progress_in_a_terminal_or_colab_redraws_in_place_and_leaves_only_the_epoch_line(monkeypatch):
    monkeypatch.delenv("CIFAR10_PROGRESS", raising=False)
    stdout = Terminal()
    progress_then_epoch_line(stdout, monkeypatch)
    written = stdout.getvalue()
    assert written.startswith("\r  epoch 1: 5/10 batches, ") and "ETA 0:0" in written
    epoch_line = written.split("\r")[-1]
    assert epoch_line.startswith("Epoch: 1/20") and epoch_line.endswith("\n")
    assert colab_shows(written) == jupyter_shows(written) == epoch_line


def test_progress_through_a_pipe_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.delenv("CIFAR10_PROGRESS", raising=False)
    with open(tmp_path / "log", "w") as log:  # python train_cnn.py > log
        progress_then_epoch_line(log, monkeypatch)
    assert (tmp_path / "log").read_bytes().startswith(b"Epoch: 1/20")  # nothing before it
    monkeypatch.setenv("CIFAR10_PROGRESS", "1")  # what the notebook's run() sets for its pipe
    with open(tmp_path / "cell", "w") as cell:
        progress_then_epoch_line(cell, monkeypatch)
    written = (tmp_path / "cell").read_bytes().decode()  # "\r" as written
    assert written.startswith("\r  epoch 1: 5/10 batches")
    assert colab_shows(written) == jupyter_shows(written) == written.split("\r")[-1]
