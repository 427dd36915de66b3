"""results/build.py: the pages' tables come from the records, and --check catches a typed number."""
import importlib.util
import json
from pathlib import Path

import pytest

import evaluate

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("build", ROOT / "results" / "build.py")
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)

PAGE = """# A page

Prose quoting the report: 44.53% and 66.02%.

<!-- build: answer -->
<!-- end build -->

<!-- build: verdicts -->
<!-- end build -->
"""


def write_run(root, model, aug, seed, test, val, repeated, finished=True, precision="bf16"):
    """A training record and its evaluation, as train_*.py and evaluate.py --out write them."""
    folder = root / "results" / "runs" / f"{aug}-s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"epoch": epoch, "last_lr": 0.001, "train_loss": 1.5, "train_accuracy": 0.45, "val_loss": 1.1,
             "val_accuracy": val, "seconds": 30.0} for epoch in (1, 2)]
    run = {"model": model, "config": {"aug": aug, "epochs": 2}, "seed": seed,
           "history": rows, "test_accuracy": test if finished else None,
           "train_seconds": 600.0, "device": "cpu (test, 1 thread)", "precision": precision,
           "git_commit": "0123456789abcdef"}
    (folder / f"{model}.json").write_text(json.dumps(run))
    evaluation = {"model": model, "aug": aug, "seed": seed, "test_accuracy": test, "val_accuracy": val,
                  "repeated": {"mean": repeated, "n": 20, "aug": "report"}}
    (root / "results" / "eval").mkdir(exist_ok=True)
    (root / "results" / "eval" / f"{aug}-s{seed}-{model}.json").write_text(json.dumps(evaluation))


@pytest.fixture
def project(tmp_path):
    """A project tree with two seeds of each model trained by the report's recipe."""
    for seed, (cnn, resnet) in enumerate([(0.6243, 0.7157), (0.6274, 0.7132)]):
        write_run(tmp_path, "cnn", "report", seed, cnn, cnn + 0.001, cnn - 0.13)
        write_run(tmp_path, "resnet9", "report", seed, resnet, resnet + 0.005, resnet - 0.14)
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(PAGE)
    return tmp_path


def test_the_repositorys_pages_match_its_records(capsys):
    """The CI gate: every table in README.md and docs/*.md is what the committed records give,
    and no percentage in the prose is one the records do not."""
    assert build.main(["--check"]) == 0, capsys.readouterr().err


def test_build_fills_the_tables_from_the_records(project):
    assert build.main([], root=project) == 0
    page = (project / "README.md").read_text()
    # the CNN over its 2 seeds: mean 62.585%, sample std 0.219 points
    assert "62.59% ± 0.22 (n = 2)" in page
    assert "71.45% ± 0.18 (n = 2)" in page
    t, df, p = evaluate.welch([0.7157, 0.7132], [0.6243, 0.6274])
    # the gap, 71.445 - 62.585 points, with the standard error of a difference of two means
    assert f"| 8.86 ± 0.20 | {p:.2g} (df = {df:.1f}) | yes |" in page
    assert "| `--aug none` | 0 and 0 |" in page  # a recipe with no runs yet says so
    assert build.main(["--check"], root=project) == 0


def test_check_names_a_hand_edited_table_and_changes_nothing(project, capsys):
    build.main([], root=project)
    edited = (project / "README.md").read_text().replace("62.59%", "62.95%")
    (project / "README.md").write_text(edited)
    assert build.main(["--check"], root=project) == 1
    assert "README.md: table 'answer' differs" in capsys.readouterr().err
    assert (project / "README.md").read_text() == edited


def test_check_catches_a_percentage_typed_into_the_prose(project, capsys):
    build.main([], root=project)
    page = project / "README.md"
    page.write_text(page.read_text() + "\nThe CNN scored 62.43% on its first seed.\n")
    assert build.main(["--check"], root=project) == 0  # 62.43 is seed 0's record: it is built
    page.write_text(page.read_text() + "\nAn old run scored 64.93%.\n")
    assert build.main(["--check"], root=project) == 1
    assert "quotes 64.93%" in capsys.readouterr().err


def test_a_new_record_makes_the_pages_stale(project):
    build.main([], root=project)
    write_run(project, "cnn", "report", 2, 0.6295, 0.639, 0.4959)
    assert build.main(["--check"], root=project) == 1
    build.main([], root=project)
    assert "(n = 3)" in (project / "README.md").read_text()


def test_a_run_still_training_is_not_a_result(project):
    write_run(project, "cnn", "none", 0, 0.69, 0.69, 0.25, finished=False)
    assert build.load_records(project / "results").keys() == {
        ("cnn", "report", 0), ("cnn", "report", 1), ("resnet9", "report", 0), ("resnet9", "report", 1)}


def test_without_matplotlib_the_tables_are_still_built(project, monkeypatch):
    monkeypatch.setattr(build, "pyplot", lambda: None)
    assert build.main([], root=project) == 0
    assert "62.59%" in (project / "README.md").read_text()
    assert not (project / "docs" / "answer.png").exists()
    assert build.main(["--check"], root=project) == 0


def test_figure_a_is_drawn_with_matplotlib(project):
    pytest.importorskip("matplotlib")
    build.main([], root=project)
    assert (project / "docs" / "answer.png").read_bytes()[:4] == b"\x89PNG"


def test_a_marker_naming_no_table_is_refused(project):
    (project / "README.md").write_text("<!-- build: nonsense -->\n<!-- end build -->\n")
    with pytest.raises(SystemExit, match="nonsense"):
        build.main(["--check"], root=project)


def write_extra(root, kind, model, aug, seed, test, pipeline, mean, ablation=None):
    """An ablation or train-mode evaluation, as evaluate.py --out writes it."""
    folder = root / "results" / "eval" / kind
    folder.mkdir(parents=True, exist_ok=True)
    record = {"model": model, "aug": aug, "seed": seed, "test_accuracy": test, "ablation": ablation,
              "repeated": {"mean": mean, "std": 0.004, "n": 5, "aug": pipeline, "train_mode": kind == "train-mode"}}
    name = f"{aug}-s{seed}-{model}" + (f"-{pipeline}" if kind == "train-mode" else "")
    (folder / f"{name}.json").write_text(json.dumps(record))


def test_every_test_pipeline_is_set_against_both_report_numbers(project):
    """The fit-both table: a pipeline appears once both models are measured through it, with
    the farther of its two distances to the report's 44.53% and 66.02%."""
    page = project / "docs" / "how.md"
    page.write_text("<!-- build: fit-both -->\n<!-- end build -->\n<!-- build: train-mode -->\n<!-- end build -->\n"
                    "<!-- build: ablation -->\n<!-- end build -->\n")
    build.main([], root=project)
    assert "not measured yet" in page.read_text()
    steps = {"only": {s: {"mean": 0.5, "std": 0.01} for s in ("crop", "rotate", "flip", "color", "erase")},
             "without": {s: {"mean": 0.45, "std": 0.01} for s in ("crop", "rotate", "flip", "color", "erase")}}
    write_extra(project, "ablation", "cnn", "report", 0, 0.6243, "report", 0.49, steps)
    write_extra(project, "train-mode", "cnn", "report", 0, 0.6243, "none", 0.4453)
    assert build.main(["--check"], root=project) == 1  # new records: the pages are stale
    build.main([], root=project)
    text = page.read_text()
    assert "| CNN | `--aug report`, seed 0 | crop | 12.43 | 17.43 |" in text  # points lost
    assert "44.53% ± 0.40 (5 passes)" in text
    assert "train mode, --repeat-aug none" not in text  # the CNN alone: no fit-both row yet
    write_extra(project, "train-mode", "resnet9", "report", 0, 0.7157, "none", 0.6702)
    build.main([], root=project)
    fit = page.read_text().split("<!-- build: fit-both -->")[1].split("<!-- end build -->")[0]
    assert "| `--aug report` | train mode, --repeat-aug none | 44.53 | 67.02 | 22.49 | 1.00 |" in fit
    assert ("The nearest to both report numbers: train mode, --repeat-aug none (models trained "
            "`--aug report`), 1.00 points from the farther one.") in fit
    assert "On other seeds: not measured yet." in fit
    write_extra(project, "train-mode", "cnn", "report", 1, 0.6274, "none", 0.4812)  # does the fit hold?
    build.main([], root=project)
    fit = page.read_text().split("<!-- build: fit-both -->")[1].split("<!-- end build -->")[0]
    assert "The same pipeline on other seeds: CNN seed 1 48.12%." in fit
    assert "| `--aug report` | train mode, --repeat-aug none | 44.53 | 67.02 |" in fit  # seed 0's row stays
    assert build.main(["--check"], root=project) == 0


def test_the_figures_are_drawn_from_the_records(project):
    pytest.importorskip("matplotlib")
    steps = {kind: {s: {"mean": 0.5, "std": 0.01} for s in ("crop", "rotate", "flip", "color", "erase")}
             for kind in ("only", "without")}
    write_extra(project, "ablation", "cnn", "report", 0, 0.6243, "report", 0.49, steps)
    build.main([], root=project)
    for name in ("answer.png", "logs.png", "ablation.png", "fit-both.png"):
        assert (project / "docs" / name).read_bytes()[:4] == b"\x89PNG", name


def test_a_gap_within_the_seed_noise_is_not_called_a_difference(project):
    """Two recipes whose seeds overlap: the cost table and the findings give the gap and say it
    is within the noise; a gap far outside the seeds' spread is called beyond it."""
    for seed, test in enumerate([0.6300, 0.6200]):
        write_run(project, "cnn", "none", seed, test, test, 0.25)
    build_page = project / "README.md"
    build_page.write_text("<!-- build: cost -->\n<!-- end build -->\n<!-- build: findings -->\n<!-- end build -->\n")
    assert build.main([], root=project) == 0
    page = build_page.read_text()
    p = evaluate.welch([0.7157, 0.7132], [0.6243, 0.6274])[2]
    assert (f"the ResNet9 scores 8.86 points above the CNN (2 seeds of the ResNet9, 2 of the CNN; Welch's p = {p:.2g}: "
            "beyond the seed-to-seed noise).") in page
    assert "for the CNN: gained it 0.09 points against no augmentation (2 seeds of `--aug none`, 2 of `--aug report`; " in page
    assert "the ResNet9 against the CNN: not measured yet." in page  # --aug none has no ResNet9 run
    row = next(line for line in page.splitlines() if line.startswith("| CNN | `--aug none`"))
    # report 62.585 minus none 62.50: 0.09 points, far inside a spread of 0.7
    assert "| 2 and 2 | 0.09 ± " in row and row.endswith("| no: within the noise of this many seeds |")


def test_one_seed_gets_no_verdict(project):
    """A recipe with one seed of a model: the finding gives the gap and says it is not a verdict."""
    write_run(project, "cnn", "none", 0, 0.6300, 0.6300, 0.25)
    write_run(project, "resnet9", "none", 0, 0.7000, 0.7000, 0.30)
    build_page = project / "README.md"
    build_page.write_text("<!-- build: findings -->\n<!-- end build -->\n")
    assert build.main([], root=project) == 0
    page = build_page.read_text()
    assert ("the ResNet9 scores 7.00 points above the CNN (1 seed of the ResNet9, 1 of the CNN: "
            "with one seed, not yet a verdict).") in page
    assert "Welch's p" not in page.split("(`--aug none`)")[1].splitlines()[0]


def test_a_mean_over_seeds_of_different_precisions_says_so(project):
    """A seed trained in fp32 (a CPU without bfloat16) beside seeds in bf16: the answer table's
    row says its mean mixes the two; a recipe trained in one precision says nothing."""
    write_run(project, "resnet9", "report", 2, 0.7200, 0.7200, 0.58, precision="fp32")
    assert build.main([], root=project) == 0
    page = (project / "README.md").read_text()
    assert "|  | ours, `--aug report` (seeds in bf16 and fp32) | " in page
    assert page.count("(seeds in") == 1  # the CNN's two bf16 seeds are not flagged
