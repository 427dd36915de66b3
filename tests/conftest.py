"""Shared test fixtures: a tiny CIFAR-10 written in the official format, and the real data.

The real data is found in $CIFAR10_DIR (a folder holding cifar-10-batches-py; .ci/run sets
it), or prepared from ../shared/cifar10 when that exists; tests needing it skip otherwise.
"""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "cifar10"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_batch(path, content):
    """A pickle with bytes keys, as the official Python 2 files load with encoding='bytes'."""
    with open(path, "wb") as f:
        pickle.dump(content, f, protocol=2)


def write_cifar(root, train_x, train_y, test_x, test_y):
    """Write uint8 (N, 3, 32, 32) images and labels as root/cifar-10-batches-py; returns root."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    write_batch(folder / "batches.meta", {b"label_names": [c.encode() for c in CLASSES]})
    parts = torch.arange(len(train_y)).chunk(5)
    for i, part in enumerate(parts, start=1):
        write_batch(folder / f"data_batch_{i}", {b"data": train_x[part].reshape(len(part), -1).numpy(),
                                                 b"labels": train_y[part].tolist()})
    write_batch(folder / "test_batch", {b"data": test_x.reshape(len(test_x), -1).numpy(),
                                        b"labels": test_y.tolist()})
    return Path(root)


def synthetic_images(per_class, seed):
    """Noise tinted by class (class c brightens channel c % 3 and shifts with c): learnable fast."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat_interleave(per_class)
    images = torch.randint(0, 120, (len(labels), 3, 32, 32), generator=gen)
    images[torch.arange(len(labels)), labels % 3] += 60 + 13 * labels.view(-1, 1, 1)
    return images.clamp(0, 255).to(torch.uint8), labels


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """600 training (60 a class) and 100 test images (10 a class) in the official layout."""
    train_x, train_y = synthetic_images(60, seed=1)
    test_x, test_y = synthetic_images(10, seed=2)
    return write_cifar(tmp_path_factory.mktemp("tiny"), train_x, train_y, test_x, test_y)


@pytest.fixture(scope="session")
def real_data_dir(tmp_path_factory):
    """A folder holding the real cifar-10-batches-py, or a skip saying how to provide one."""
    if os.environ.get("CIFAR10_DIR"):
        folder = Path(os.environ["CIFAR10_DIR"])
        if not (folder / "cifar-10-batches-py").is_dir():
            pytest.fail(f"CIFAR10_DIR={folder} holds no cifar-10-batches-py")
        return folder
    if (SHARED / "prepare.py").exists():
        folder = tmp_path_factory.mktemp("cifar10")
        subprocess.run([sys.executable, str(SHARED / "prepare.py"), str(folder)], check=True,
                       capture_output=True)
        return folder
    pytest.skip("real CIFAR-10 not available: set CIFAR10_DIR to a folder holding "
                "cifar-10-batches-py (.ci/run prepares one from ../shared/cifar10)")


@pytest.fixture(scope="session")
def real_cnn_run(real_data_dir, tmp_path_factory):
    """The issue's learning check, run once: the CNN, 5,000 real training images, 2 epochs.

    Returns (summary dict, output folder). About 100 s on a 2-core CPU.
    """
    import train_cnn

    out = tmp_path_factory.mktemp("real_cnn")
    result = train_cnn.main(["--subset", "5000", "--epochs", "2", "--data-dir", str(real_data_dir),
                             "--out", str(out), "--device", "cpu"])
    return result, out
