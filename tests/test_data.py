"""The data: reading CIFAR-10 (or its archive), every way a copy can be bad, the split and subset.

No test touches the network: download_url is replaced in every test (autouse `offline`).
"""
import hashlib
import shutil
import subprocess
import sys
import tarfile
import urllib.error

import pytest
import torch
import torchvision.datasets.utils as tv_utils

import common
from conftest import CLASSES, ROOT, write_batch, write_cifar

BATCHES = "cifar-10-batches-py"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Every download attempt fails as without a connection; returns the list of attempts."""
    calls = []

    def fail(url, root, filename=None, md5=None, *args, **kwargs):
        calls.append((url, str(root), filename, md5))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_utils, "download_url", fail)
    return calls


def random_dataset(n_train=50, n_test=20, seed=0):
    """Images over the full 0-255 range and labels in random order: nothing a loader could guess."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (n_train,), generator=g),
            torch.randint(0, 256, (n_test, 3, 32, 32), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (n_test,), generator=g))


def assert_loaded(loaded, expected):
    train_x, train_y, test_x, test_y, classes = loaded
    for got, want in zip((train_x, train_y, test_x, test_y), expected):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)
    assert classes == CLASSES


@pytest.fixture
def tiny_copy(tmp_path, tiny_data_dir):
    """A copy of the tiny dataset that a test may damage."""
    shutil.copytree(tiny_data_dir / BATCHES, tmp_path / "data" / BATCHES)
    return tmp_path / "data"


def make_archive(path, source_root):
    """cifar-10-python.tar.gz as the official one: cifar-10-batches-py/ at its top. Returns its md5."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(source_root / BATCHES, arcname=BATCHES)
    return hashlib.md5(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- reading

def test_loads_a_dataset_exactly(tmp_path, offline):
    data = random_dataset()
    write_cifar(tmp_path, *data)
    loaded = common.load_cifar10(tmp_path)
    assert loaded[0].dtype == torch.uint8 and loaded[0].shape == (50, 3, 32, 32)
    assert loaded[1].dtype == torch.int64 and loaded[3].shape == (20,)
    assert_loaded(loaded, data)  # pixels round-trip exactly, in order, across the five batch files
    assert offline == []


def test_loads_the_tiny_fixture(tiny_data_dir):
    train_x, train_y, test_x, test_y, classes = common.load_cifar10(str(tiny_data_dir))  # a str works too
    assert train_x.shape == (600, 3, 32, 32) and test_x.shape == (100, 3, 32, 32)
    assert torch.equal(torch.bincount(train_y), torch.full((10,), 60))
    assert torch.equal(torch.bincount(test_y), torch.full((10,), 10))
    assert classes == CLASSES


@pytest.fixture(scope="module")
def real(real_data_dir):
    return common.load_cifar10(real_data_dir)


def test_loads_the_real_cifar10(real):
    train_x, train_y, test_x, test_y, classes = real
    assert train_x.shape == (50000, 3, 32, 32) and test_x.shape == (10000, 3, 32, 32)
    assert train_x.dtype == test_x.dtype == torch.uint8
    assert train_y.dtype == test_y.dtype == torch.int64
    assert torch.equal(torch.bincount(train_y), torch.full((10,), 5000))
    assert torch.equal(torch.bincount(test_y), torch.full((10,), 1000))
    assert classes == CLASSES
    # the well-known per-channel means of the training images (0.4914, 0.4822, 0.4465): a wrong
    # reshape (pixels interleaved, channels last) would mix the channels
    means = train_x.sum(dim=(0, 2, 3), dtype=torch.int64).double() / (50000 * 32 * 32 * 255)
    assert torch.allclose(means, torch.tensor([0.49140, 0.48216, 0.44653], dtype=torch.float64), atol=2e-4)


# ----------------------------------------------------------------------------- missing data, archive

def test_missing_folder_and_failed_download_is_one_clear_error(tmp_path, offline, capsys):
    missing = tmp_path / "nowhere"
    with pytest.raises(common.UserError) as caught:
        common.load_cifar10(missing)
    message = str(caught.value)
    assert str(missing.resolve()) in message
    assert "--data-dir" in message and "connection" in message
    assert "download failed" in message and "URLError" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no chained traceback
    assert len(offline) == 1 and offline[0][0] == common.CIFAR10_URL  # it did try, once
    assert offline[0][2] == common.CIFAR10_TGZ and offline[0][3] == common.CIFAR10_MD5
    assert common.CIFAR10_URL in capsys.readouterr().out  # and said what it was doing


def test_a_users_archive_is_checked_and_extracted_without_download(tmp_path, monkeypatch, offline):
    data = random_dataset(seed=1)
    source = write_cifar(tmp_path / "source", *data)
    target = tmp_path / "data"
    target.mkdir()
    md5 = make_archive(target / common.CIFAR10_TGZ, source)
    monkeypatch.setattr(common, "CIFAR10_MD5", md5)
    assert_loaded(common.load_cifar10(target), data)
    assert (target / BATCHES / "test_batch").is_file()
    assert offline == []


def test_an_archive_that_is_not_the_official_one_is_refused(tmp_path, offline):
    """A real tar.gz, but not the official bytes: its md5 differs, so it is not extracted."""
    source = write_cifar(tmp_path / "source", *random_dataset(seed=2))
    target = tmp_path / "data"
    target.mkdir()
    make_archive(target / common.CIFAR10_TGZ, source)
    with pytest.raises(common.UserError, match="md5") as caught:
        common.load_cifar10(target)
    assert str(target / common.CIFAR10_TGZ) in str(caught.value) and "corrupt" in str(caught.value)
    assert not (target / BATCHES).exists()
    assert offline == []


def test_a_corrupt_archive_is_one_clear_error(tmp_path, offline):
    archive = tmp_path / common.CIFAR10_TGZ
    archive.write_bytes(b"\x1f\x8b this is not the CIFAR-10 archive" * 100)
    with pytest.raises(common.UserError) as caught:
        common.load_cifar10(tmp_path)
    message = str(caught.value)
    assert str(archive) in message and "md5" in message and "corrupt" in message
    assert "download it again" in message
    assert offline == []


# ----------------------------------------------------------------------------- damaged batch files

def _rewrite(name, **entries):
    """Replace one batch file by a pickle of `entries` (bytes keys, as the official files)."""
    def damage(folder, images, labels):
        write_batch(folder / name, {key.encode(): value(images, labels) for key, value in entries.items()})
    return damage


def _truncate(folder, images, labels):
    path = folder / "data_batch_3"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(folder, images, labels):
    (folder / "data_batch_2").write_bytes(bytes(range(256)) * 40)


def _empty(folder, images, labels):
    (folder / "test_batch").write_bytes(b"")


def _missing(folder, images, labels):
    (folder / "test_batch").unlink()


def _not_a_dict(folder, images, labels):
    write_batch(folder / "data_batch_1", [1, 2, 3])


def _flat(images):
    return images.reshape(len(images), -1).numpy()


# (name, damage, file named in the message, words the message must hold)
DAMAGES = [
    ("truncated", _truncate, "data_batch_3", ["truncated"]),
    ("garbage bytes", _garbage, "data_batch_2", ["corrupt"]),
    ("empty file", _empty, "test_batch", ["truncated"]),
    ("missing file", _missing, "test_batch", ["missing"]),
    ("not a dict", _not_a_dict, "data_batch_1", ["not a CIFAR-10 batch"]),
    ("no labels entry", _rewrite("data_batch_4", data=lambda x, y: _flat(x)), "data_batch_4", ["labels"]),
    ("wrong shape", _rewrite("data_batch_1", data=lambda x, y: _flat(x)[:, :3000], labels=lambda x, y: y.tolist()),
     "data_batch_1", ["shape", "3072"]),
    ("images as 4-d", _rewrite("test_batch", data=lambda x, y: x.numpy(), labels=lambda x, y: y.tolist()),
     "test_batch", ["shape", "3072"]),
    ("float images", _rewrite("data_batch_5", data=lambda x, y: _flat(x).astype("float32"),
                              labels=lambda x, y: y.tolist()), "data_batch_5", ["uint8"]),
    ("label 10", _rewrite("data_batch_2", data=lambda x, y: _flat(x), labels=lambda x, y: [10] + y.tolist()[1:]),
     "data_batch_2", ["labels", "0..9"]),
    ("label -1", _rewrite("test_batch", data=lambda x, y: _flat(x), labels=lambda x, y: y.tolist()[:-1] + [-1]),
     "test_batch", ["labels", "0..9"]),
    ("one label short", _rewrite("data_batch_1", data=lambda x, y: _flat(x), labels=lambda x, y: y.tolist()[1:]),
     "data_batch_1", ["labels for"]),
    ("nine classes", _rewrite("batches.meta", label_names=lambda x, y: [c.encode() for c in CLASSES[:9]]),
     "batches.meta", ["classes"]),
    # malformed contents that unpickle fine: still the user's file, still one clear line
    ("meta without label_names", _rewrite("batches.meta", num_cases_per_batch=lambda x, y: 10000),
     "batches.meta", []),
    ("images not an array", _rewrite("data_batch_1", data=lambda x, y: "pixels", labels=lambda x, y: y.tolist()),
     "data_batch_1", []),
    ("labels not numbers", _rewrite("test_batch", data=lambda x, y: _flat(x), labels=lambda x, y: ["cat"] * len(y)),
     "test_batch", []),
]


@pytest.mark.parametrize("damage, filename, words", [d[1:] for d in DAMAGES], ids=[d[0] for d in DAMAGES])
def test_a_damaged_file_is_one_clear_error_naming_it(tiny_copy, offline, damage, filename, words):
    folder = tiny_copy / BATCHES
    images, labels = torch.zeros(10, 3, 32, 32, dtype=torch.uint8), torch.arange(10)
    damage(folder, images, labels)
    with pytest.raises(common.UserError) as caught:
        common.load_cifar10(tiny_copy)
    message = str(caught.value)
    assert str(folder / filename) in message
    for word in words:
        assert word in message
    assert "\n" not in message
    assert caught.value.__cause__ is None
    assert offline == []  # the folder is there: nothing to download


# ----------------------------------------------------------------------------- the same, from the command line

def run_script(args, wrapper=None, cwd=ROOT):
    command = [sys.executable, *(["-c", wrapper] if wrapper else []), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def assert_one_line_error(result, script):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{script}: error:")
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("script", ["train_cnn.py", "train_resnet.py"])
def test_cli_reports_a_damaged_batch_in_one_line(tiny_copy, tmp_path, script):
    _truncate(tiny_copy / BATCHES, None, None)
    out = tmp_path / "runs"
    result = run_script([script, "--data-dir", str(tiny_copy), "--dry-run", "--device", "cpu", "--out", str(out)])
    assert_one_line_error(result, script)
    assert "data_batch_3" in result.stderr and "truncated" in result.stderr
    assert not out.exists() or not any(out.iterdir())  # nothing saved


# Runs a script as `python <script> ...` would, with the download failing: no network is touched.
OFFLINE_WRAPPER = """
import runpy, sys, urllib.error
import torchvision.datasets.utils as utils
def fail(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
utils.download_url = fail
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_cli_reports_missing_data_and_failed_download_in_one_line(tmp_path):
    missing = tmp_path / "nowhere"
    result = run_script(["train_cnn.py", "--data-dir", str(missing), "--dry-run", "--device", "cpu",
                         "--out", str(tmp_path / "runs")], wrapper=OFFLINE_WRAPPER)
    assert_one_line_error(result, "train_cnn.py")
    assert str(missing.resolve()) in result.stderr and "--data-dir" in result.stderr
    assert "connection" in result.stderr


# ----------------------------------------------------------------------------- split and subset

def shuffled_labels(per_class, seed=0):
    labels = torch.arange(10).repeat_interleave(per_class)
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("val_size", [100, 105, 599])
def test_split_is_fixed_stratified_and_a_partition(val_size):
    labels = shuffled_labels(60)
    train, val = common.split_train_val(labels, val_size)
    again_train, again_val = common.split_train_val(labels.clone(), val_size)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)  # fixed: same on every call
    assert train.dtype == val.dtype == torch.int64
    assert len(val) == val_size and len(train) == len(labels) - val_size
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(len(labels)))  # disjoint, complete
    per_class = torch.bincount(labels[val], minlength=10)
    expected = torch.tensor([val_size // 10 + (c < val_size % 10) for c in range(10)])
    assert torch.equal(per_class, expected)


def test_split_depends_on_nothing_but_the_labels():
    """The same labels give the same split whatever the global RNG state (any --seed)."""
    labels = shuffled_labels(60)
    torch.manual_seed(123)
    first = common.split_train_val(labels, 100)
    torch.manual_seed(456)
    second = common.split_train_val(labels, 100)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[1].sort().values, torch.arange(100))  # not simply the first images


def test_split_of_the_real_training_set(real):
    train_y = real[1]
    train, val = common.split_train_val(train_y, 5000)
    assert torch.equal(torch.bincount(train_y[val]), torch.full((10,), 500))
    assert len(train) == 45000 and len(set(train.tolist()) | set(val.tolist())) == 50000


def test_val_size_zero_holds_nothing_out():
    labels = shuffled_labels(60)
    train, val = common.split_train_val(labels, 0)
    assert len(val) == 0
    assert torch.equal(train.sort().values, torch.arange(len(labels)))


def test_too_large_val_size_is_a_user_error(tiny_data_dir):
    labels = shuffled_labels(60)
    with pytest.raises(common.UserError, match="--val-size 601"):
        common.split_train_val(labels, 601)
    with pytest.raises(common.UserError, match="--val-size 600 leaves no training images"):
        common.load_data(tiny_data_dir, "cpu", val_size=600)


def test_load_data_split_subset_and_dry_run(tiny_data_dir):
    train_x, train_y, test_x, test_y, classes = common.load_cifar10(tiny_data_dir)
    data, got_classes = common.load_data(tiny_data_dir, "cpu", val_size=100)
    assert got_classes == classes == CLASSES
    train_idx, val_idx = common.split_train_val(train_y, 100)
    assert torch.equal(data["train"][0], train_x[train_idx]) and torch.equal(data["train"][1], train_y[train_idx])
    assert torch.equal(data["val"][0], train_x[val_idx]) and torch.equal(data["val"][1], train_y[val_idx])
    assert torch.equal(data["test"][0], test_x) and torch.equal(data["test"][1], test_y)
    for x, y in data.values():
        assert x.dtype == torch.uint8 and y.dtype == torch.int64 and x.device.type == "cpu"

    sub, _ = common.load_data(tiny_data_dir, "cpu", val_size=100, subset=50)
    assert torch.equal(sub["train"][0], data["train"][0][:50]) and torch.equal(sub["train"][1], data["train"][1][:50])
    for name in ("val", "test"):  # untouched by the subset
        assert all(torch.equal(a, b) for a, b in zip(sub[name], data[name]))
    # the fixture's files are sorted by class (the first 50 are all airplanes): the split's order is not
    assert len(torch.bincount(sub["train"][1], minlength=10).nonzero()) >= 5

    dry, _ = common.load_data(tiny_data_dir, "cpu", val_size=100, subset=20, dry_run=True)
    assert len(dry["train"][1]) == 20 and len(dry["test"][1]) == 100  # the tiny test set is under 500


def test_dry_run_slices_the_real_test_set(real_data_dir):
    data, _ = common.load_data(real_data_dir, "cpu", val_size=100, subset=128, dry_run=True)
    assert len(data["train"][1]) == 128 and len(data["val"][1]) == 100 and len(data["test"][1]) == 500
