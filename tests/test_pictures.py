"""The pictures: training curves, confusion matrices, and what the model sees.

matplotlib is optional for the training scripts: these tests need it (requirements-dev.txt)
and skip without it, except the one that checks the clear error when it is missing.
"""
import sys

import pytest
import torch

import common
import evaluate
import show_augmentations
import train_cnn
from conftest import ROOT

PICTURE = ROOT / "docs" / "augmentations.png"  # shown in docs/decisions.md
PICTURE_SIZE = (800, 570)  # figsize (8, 5.7) at 100 dpi


def png_size(path):
    """(width, height) of a PNG, after decoding every pixel: a truncated file fails here."""
    image_module = pytest.importorskip("PIL.Image")  # pillow: a matplotlib requirement
    with image_module.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


def test_training_curves_and_confusion_matrices_are_written(tiny_data_dir, tmp_path):
    pytest.importorskip("matplotlib")
    train_cnn.main(["--dry-run", "--data-dir", str(tiny_data_dir), "--out", str(tmp_path), "--device", "cpu"])
    evaluate.main([str(tmp_path / "dry-run" / "cnn.pt"), "--repeats", "0", "--data-dir", str(tiny_data_dir),
                   "--device", "cpu"])
    assert png_size(tmp_path / "dry-run" / "cnn_curves.png") == (1000, 400)  # figsize (10, 4), 100 dpi
    assert png_size(tmp_path / "dry-run" / "cnn_confusion.png") == (600, 500)  # figsize (6, 5), 100 dpi


def test_the_curves_say_what_train_is_and_count_epochs_in_whole_numbers(tmp_path, monkeypatch):
    """Train below val is no bug with heavy augmentation: the legend says train is measured on
    augmented batches. Epochs are whole numbers: no tick at 1.5."""
    pytest.importorskip("matplotlib")
    drawn = []
    monkeypatch.setattr(common, "save_figure", lambda fig, path: drawn.append(fig) or True)
    history = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 1.5 / e, "train_accuracy": 0.1 * e,
                "val_accuracy": 0.12 * e} for e in (1, 2, 3)]
    assert common.plot_curves(history, tmp_path / "c.png", "cnn")
    for ax in drawn[0].axes:
        labels = [text.get_text() for text in ax.get_legend().get_texts()]
        assert labels[0].startswith("train (augmented batches") and labels[1].startswith("val (held out")
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
        assert ticks and all(float(t).is_integer() for t in ticks)


def test_the_augmentation_picture_is_written(tiny_data_dir, tmp_path):
    pytest.importorskip("matplotlib")
    show_augmentations.main(["--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "what.png")])
    assert png_size(tmp_path / "what.png") == PICTURE_SIZE


def test_the_picture_rows_are_clean_then_seeded_random_draws():
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rows = show_augmentations.pictures(images, seed=0)
    labels = [label for label, _ in rows]
    assert labels == ["clean (none)", "standard, draw 1", "standard, draw 2",
                      "report, draw 1", "report, draw 2", "report, draw 3", "report, draw 4"]
    pixels = [picture for _, picture in rows]
    assert torch.allclose(pixels[0], common.to_float(images), atol=1e-6)  # Normalize undone exactly
    assert all(p.shape == images.shape and p.min() >= -1e-6 and p.max() <= 1 + 1e-6 for p in pixels)
    assert not torch.equal(pixels[3], pixels[4])  # each draw is new, as each of the report's passes
    again = show_augmentations.pictures(images, seed=0)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(rows, again))  # the same seed, the same picture
    other = show_augmentations.pictures(images, seed=1)
    assert not torch.equal(other[3][1], pixels[3])


def test_without_matplotlib_the_picture_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    with pytest.raises(common.UserError, match="matplotlib is needed .* pip install matplotlib"):
        # checked before the data is touched: this folder does not exist, and nothing is downloaded
        show_augmentations.main(["--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "x.png")])
    assert not (tmp_path / "none").exists()


def test_the_augmentations_picture_is_committed_small_and_shown_with_its_command():
    assert PICTURE.stat().st_size < 300_000
    assert png_size(PICTURE) == PICTURE_SIZE
    page = (ROOT / "docs" / "decisions.md").read_text()  # the page on the pipelines shows it
    assert "python show_augmentations.py --data-dir data --out docs/augmentations.png" in page
    assert "](augmentations.png)" in page
