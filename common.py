"""What train_cnn.py, train_resnet.py and evaluate.py share, written once.

Sections, in the order a run uses them:
  data          read CIFAR-10 (or download it), held-out split, subset
  augmentation  the report's pipeline as batched tensor ops on the training device
  model         layer-table summary, device, autocast
  training      arguments, one-cycle schedule, the epoch loop with clipping
  checkpoints   atomic saves, safe loading, exact resume
  evaluation    clean accuracy, the report's repeated passes, test-time augmentation

Functions take what they use and return numbers, except the training loop (fit and its
helpers), which prints the run's log as it goes, and the one-line errors of cli().

Two kinds of comments: plain ones explain the method, for a student reading how the report's
run works; those starting "impl:" explain an implementation choice (speed on a device, safe
files, a torch quirk) that a reader following the method can skip.
"""
import argparse
import copy
import contextlib
import functools
import importlib
import json
import math
import os
import pickle
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from report import UserError, format_row  # noqa: F401  (plain Python: results/build.py needs no torch)

# The report's recipe, written once: the training scripts' defaults, the schedule evaluate.py
# holds a run against before comparing it with the report's log, and bench.py's batch size.
REPORT_RECIPE = {
    "epochs": 20,            # one-cycle over 20 epochs
    "batch_size": 64,
    "max_lr": 0.01,          # the one-cycle schedule's peak learning rate, with Adam
    "weight_decay": 1e-4,
    "grad_clip": 0.1,        # each gradient value clipped to +-0.1
    "clip_norm": False,      # by value, not by norm (the report does not say: see docs/decisions.md)
    "aug": "report",         # its augmentation pipeline (see augment_report)
    "test_passes": 100,      # its test accuracy: "averaged over 100 runs"
}
MEAN = STD = (0.5, 0.5, 0.5)  # the report's Normalize: pixels in [0, 1] -> [-1, 1]
NUM_CLASSES = 10
IMAGE_SIZE = 32
SPLIT_SEED = 0  # the validation split is fixed: every run and every seed holds out the same images
EVAL_BATCH = 200  # impl: no gradients, so larger than training; larger still is slower on CPU
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"  # torchvision's
CIFAR10_TGZ = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # md5 of the official archive (torchvision's)
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
UMASK = os.umask(0o022)  # impl: reading the umask means setting it: read it once and put it back
os.umask(UMASK)


def cli(main):
    """Run main(); a UserError becomes `<script>: error: ...` on stderr and exit code 1, Ctrl-C exit 130."""
    name = Path(sys.argv[0]).name
    try:
        return main()
    except UserError as error:
        sys.exit(f"{name}: error: {error}")
    except KeyboardInterrupt:  # outside the training loop, which handles its own
        print(f"\n{name}: interrupted", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------- data

def load_cifar10(data_dir):
    """Return (train_x, train_y, test_x, test_y, classes) from data_dir/cifar-10-batches-py.

    Images are uint8 (N, 3, 32, 32), labels int64. The pickle files are read directly:
    torchvision.datasets.CIFAR10 insists on the official md5 sums and refuses any other
    copy. When the folder is missing, the official archive is used (downloaded if needed).
    """
    data_dir = Path(data_dir)
    folder = data_dir / "cifar-10-batches-py"
    if not folder.is_dir() and (data_dir / "data_batch_1").is_file():
        raise UserError(f"{data_dir} is the cifar-10-batches-py folder itself: pass the folder "
                        f"that holds it, --data-dir {data_dir.parent}")
    if not folder.is_dir():
        _fetch_archive(data_dir)
    meta = _read_pickle(folder / "batches.meta")
    names = meta.get("label_names")
    if not isinstance(names, (list, tuple)):
        raise UserError(f"{folder / 'batches.meta'} has no list of label_names: not CIFAR-10's")
    if len(names) != NUM_CLASSES:
        raise UserError(f"{folder / 'batches.meta'} lists {len(names)} classes, expected 10")
    classes = [_text(name) for name in names]
    train_x, train_y = _read_batches([folder / name for name in TRAIN_FILES])
    test_x, test_y = _read_batches([folder / "test_batch"])
    return train_x, train_y, test_x, test_y, classes


def _fetch_archive(data_dir):
    """Extract cifar-10-python.tar.gz into data_dir, downloading it first if it is absent."""
    from torchvision.datasets.utils import check_integrity, download_url, extract_archive

    archive = data_dir / CIFAR10_TGZ
    if not archive.exists():
        print(f"{data_dir / 'cifar-10-batches-py'} not found: downloading {CIFAR10_URL}", flush=True)
        made_folder = not data_dir.exists()
        try:
            download_url(CIFAR10_URL, str(data_dir), CIFAR10_TGZ, CIFAR10_MD5)
        except Exception as error:  # offline, server down, proxy...: all mean the same to the user
            if made_folder:  # leave no empty folder behind to puzzle the user
                with contextlib.suppress(OSError):
                    data_dir.rmdir()
            raise UserError(
                f"CIFAR-10 not found in {data_dir.resolve()} (no cifar-10-batches-py folder, no "
                f"{CIFAR10_TGZ}) and the download failed ({type(error).__name__}: {error}). "
                f"Fix: get a connection and rerun, or point --data-dir at a folder holding "
                f"cifar-10-batches-py (or {CIFAR10_TGZ})") from None
    if not check_integrity(str(archive), CIFAR10_MD5):
        raise UserError(f"{archive} is incomplete or corrupt (md5 is not the official "
                        f"{CIFAR10_MD5}); delete it and download it again")
    try:
        extract_archive(str(archive), str(data_dir))
    except Exception as error:  # a full disk, a damaged archive that passed the md5 by chance...
        raise UserError(f"could not extract {archive} into {data_dir} ({type(error).__name__}: "
                        f"{error}); free some space or delete the archive and download it again") from None


def _read_pickle(path):
    if not path.is_file():
        raise UserError(f"{path} is missing; the folder should hold batches.meta, "
                        f"{', '.join(TRAIN_FILES)} and test_batch")
    try:
        with open(path, "rb") as f:
            content = pickle.load(f, encoding="latin1")  # the official files are Python 2 pickles
    except Exception as error:
        raise UserError(f"{path} is truncated or corrupt ({type(error).__name__}); "
                        f"replace it with a fresh copy of CIFAR-10") from None
    if not isinstance(content, dict):
        raise UserError(f"{path} is not a CIFAR-10 batch file (holds a {type(content).__name__})")
    return {_text(key): value for key, value in content.items()}


def _text(value):
    return value.decode() if isinstance(value, bytes) else str(value)


def _read_batches(paths):
    images, labels = [], []
    for path in paths:
        batch = _read_pickle(path)
        if "data" not in batch or "labels" not in batch:
            raise UserError(f"{path} has no 'data' or 'labels' entry: not a CIFAR-10 batch file")
        try:
            data = torch.as_tensor(batch["data"])
            label = torch.as_tensor(batch["labels"], dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError) as error:
            raise UserError(f"{path}: 'data' or 'labels' is not an array of numbers "
                            f"({type(error).__name__}): not a CIFAR-10 batch file") from None
        if data.dtype != torch.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise UserError(f"{path}: images have shape {tuple(data.shape)} and type {data.dtype}, "
                            f"expected (N, 3072) uint8")
        if label.shape != (data.shape[0],):
            raise UserError(f"{path}: {label.numel()} labels for {data.shape[0]} images")
        if label.numel() and (label.min() < 0 or label.max() >= NUM_CLASSES):
            raise UserError(f"{path}: labels range from {label.min()} to {label.max()}, expected 0..9")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(label)
    return torch.cat(images), torch.cat(labels)


def split_train_val(labels, val_size):
    """Indices (train, val): a fixed, class-stratified held-out split of the training set.

    val_size // 10 images of each class (the remainder from the first classes) are held
    out, chosen by a permutation seeded with SPLIT_SEED. The training indices keep that
    permuted order, so their first N are a roughly class-balanced subset.
    """
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    held_out = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(NUM_CLASSES):
        wanted = val_size // NUM_CLASSES + (c < val_size % NUM_CLASSES)
        members = order[labels[order] == c]
        if wanted > len(members):
            raise UserError(f"--val-size {val_size} needs {wanted} images of class {c}, "
                            f"the training set has {len(members)}")
        held_out[members[:wanted]] = True
    return order[~held_out[order]], order[held_out[order]]


def load_data(data_dir, device, val_size, subset=0, dry_run=False):
    """The run's data on `device` as uint8: {"train", "val", "test": (images, labels)}, classes.

    Training (first `subset` images when given) and validation come from the fixed split;
    the test set is whole, except in a dry run.
    """
    train_x, train_y, test_x, test_y, classes = load_cifar10(data_dir)
    train_idx, val_idx = split_train_val(train_y, val_size)
    if len(train_idx) == 0:
        raise UserError(f"--val-size {val_size} leaves no training images")
    if subset > len(train_idx):
        raise UserError(f"--subset {subset} is more than the {len(train_idx):,} training images")
    if subset:
        train_idx = train_idx[:subset]
    if dry_run:  # a check of the code, not a measurement: a slice of the test set will do
        test_x, test_y = test_x[:500], test_y[:500]
    data = {"train": (train_x[train_idx], train_y[train_idx]),
            "val": (train_x[val_idx], train_y[val_idx]),
            "test": (test_x, test_y)}
    return {name: (x.to(device), y.to(device)) for name, (x, y) in data.items()}, classes


# ----------------------------------------------------------------------------- augmentation
# Every image gets its own random parameters, drawn from one torch.Generator on the batch's
# device, and the whole batch is transformed at once. (torchvision.transforms.v2 applied to a
# batch draws ONE set of parameters for all of it, which is not the report's pipeline.)
# Where the report gives no magnitude, torchvision's default for the named transform is used.

CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # RandomResizedCrop defaults
MAX_ROTATION = 20.0  # degrees, the report's
FLIP_P = 0.1  # the report's
JITTER_P = 0.1  # the report's
# ColorJitter's defaults are 0 (no change) and RandomAdjustSharpness has none, so we choose:
# each factor uniform in [1 - JITTER, 1 + JITTER], the range of ColorJitter(0.2, 0.2, 0.2),
# applied in one fixed order (brightness, contrast, saturation, sharpness), where ColorJitter
# shuffles the order of its three for every image.
JITTER = 0.2
ERASE_P = 0.75  # the report's
ERASE_SCALE, ERASE_RATIO = (0.02, 0.33), (0.3, 3.3)  # RandomErasing defaults, value 0
PAD = 4  # the `standard` augmentation: 4-pixel padded random crop
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


@functools.cache
def _constant(values, device, dtype=torch.float32):
    """A small constant tensor, made once per device. (impl: building it from a Python list
    every batch would be a host-to-device copy on every training step of a GPU run.)"""
    return torch.tensor(values, dtype=dtype, device=device)


def _uniform(n, low, high, gen, device):
    return low + (high - low) * torch.rand(n, generator=gen, device=device)


def _randint_below(bound, gen):
    """One integer in [0, bound) per entry of the float tensor `bound`."""
    return (torch.rand(bound.shape, generator=gen, device=bound.device) * bound).floor()


def sample_boxes(n, area, scale, ratio, fits, gen, device, tries=10):
    """Sample (height, width) as RandomResizedCrop / RandomErasing do, n at once.

    Each draws up to `tries` (area fraction, log-uniform aspect) pairs and keeps the first
    whose rounded size `fits`. Returns h, w (float) and whether any try fitted.
    """
    target = area * _uniform(n * tries, *scale, gen, device)
    aspect = torch.exp(_uniform(n * tries, math.log(ratio[0]), math.log(ratio[1]), gen, device))
    w = torch.sqrt(target * aspect).round().view(n, tries)
    h = torch.sqrt(target / aspect).round().view(n, tries)
    ok = fits(h, w)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # first fitting try (0 when none)
    return h.gather(1, first)[:, 0], w.gather(1, first)[:, 0], ok.any(dim=1)


def sample_crops(n, gen, device, size=IMAGE_SIZE):
    """RandomResizedCrop.get_params for n images: (top, left, height, width), float."""
    h, w, found = sample_boxes(n, size * size, CROP_SCALE, CROP_RATIO,
                               lambda h, w: (h > 0) & (h <= size) & (w > 0) & (w <= size), gen, device)
    # No fit in 10 tries: torchvision falls back to a centre crop with the ratio clamped into
    # CROP_RATIO, which for a square image is the whole image.
    h, w = torch.where(found, h, size), torch.where(found, w, size)
    return _randint_below(size - h + 1, gen), _randint_below(size - w + 1, gen), h, w


def sample_erasures(n, gen, device, size=IMAGE_SIZE):
    """RandomErasing.get_params for n images: (top, left, height, width); 0x0 when none fits."""
    # RandomErasing's ratio is height / width, RandomResizedCrop's width / height: swap.
    w, h, found = sample_boxes(n, size * size, ERASE_SCALE, ERASE_RATIO,
                               lambda w, h: (h < size) & (w < size), gen, device)
    h, w = h * found, w * found
    return _randint_below(size - h + 1, gen), _randint_below(size - w + 1, gen), h, w


def resample(images, top, left, height, width, degrees, flip):
    """Crop each box, resize it to full size, rotate it and maybe flip it: ONE bilinear resampling.

    For each output pixel (normalised coordinates in [-1, 1]): flip its x and rotate it, which
    gives (u, v), where it lies in the resized crop. What falls outside the crop is 0 (black),
    as RandomRotation's default fill after the crop; the rest is read from the box, clamped to
    the box's edge pixels as a resize does. torchvision resamples twice (bilinear crop, then a
    nearest-neighbour rotation); one pass is faster and blurs less. (impl: the coordinates are
    built as separate x and y planes: ops on (n, 32, 32, 2) grids are slow on CPUs.)
    """
    n, _, size, _ = images.shape
    angle = torch.deg2rad(degrees).view(n, 1, 1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    sign = 1.0 - 2.0 * flip.to(images.dtype).view(n, 1, 1)  # -1 mirrors x
    centres = (2 * torch.arange(size, dtype=images.dtype, device=images.device) + 1) / size - 1
    x, y = centres.view(1, 1, size), centres.view(1, size, 1)
    u = (cos * sign) * x - sin * y
    v = (sin * sign) * x + cos * y
    inside = ((u.abs() <= 1) & (v.abs() <= 1)).unsqueeze(1)
    w, h = width.view(n, 1, 1), height.view(n, 1, 1)
    edge_x, edge_y = 1 - 1 / w, 1 - 1 / h  # the box's outermost pixel centres, in crop coordinates
    grid_x = (2 * left.view(n, 1, 1) + w) / size - 1 + w / size * u.clamp(-edge_x, edge_x)
    grid_y = (2 * top.view(n, 1, 1) + h) / size - 1 + h / size * v.clamp(-edge_y, edge_y)
    grid = torch.stack([grid_x, grid_y], dim=-1).to(images.dtype)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out * inside


def _grayscale(images):
    weights = _constant(GRAY, images.device, images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def _blend(images, other, factor):
    """factor * images + (1 - factor) * other, clamped to [0, 1]: how torchvision adjusts color."""
    return torch.lerp(other, images, factor.view(-1, 1, 1, 1)).clamp_(0, 1)


def _blurred(images):
    """torchvision's adjust_sharpness degenerate image: a 3x3 smoothing, borders kept."""
    kernel = _constant(((1, 1, 1), (1, 5, 1), (1, 1, 1)), images.device, images.dtype) / 13
    blurred = images.clone()
    blurred[..., 1:-1, 1:-1] = F.conv2d(images, kernel.expand(3, 1, 3, 3), groups=3)
    return blurred


def color_jitter(images, gen):
    """With p=JITTER_P per image: brightness, contrast, saturation and sharpness, in that order.

    Each is torchvision's blend with a reference image (black, mean grey, greyscale, blurred).
    The result is the same on every device; only the way to compute it differs (see below).
    """
    return jitter_chosen(images, *sample_jitter(len(images), gen, images.device))


def sample_jitter(n, gen, device):
    """color_jitter's random draws: which images it changes, and each one's four factors."""
    chosen = torch.rand(n, generator=gen, device=device) < JITTER_P
    factors = _uniform(4 * n, 1 - JITTER, 1 + JITTER, gen, device).view(4, n)
    return chosen, factors


def jitter_chosen(images, chosen, factors):
    way = _jitter_all_keep_chosen if images.is_cuda else _jitter_only_chosen
    return way(images, chosen, factors)


def _jitter_all_keep_chosen(images, chosen, factors):
    """impl, the GPU's way: jitter every image and keep the chosen ones with torch.where;
    picking them out (nonzero) would make the GPU wait for the count."""
    return torch.where(chosen.view(-1, 1, 1, 1), _jitter(images, *factors), images)


def _jitter_only_chosen(images, chosen, factors):
    """impl, the CPU's way: jitter only the ~10% chosen images."""
    picked = chosen.nonzero().squeeze(1)
    out = images.clone()
    out[picked] = _jitter(images[picked], *factors[:, picked])
    return out


def _jitter(images, brightness, contrast, saturation, sharpness):
    out = (images * brightness.view(-1, 1, 1, 1)).clamp_(0, 1)  # a blend with black
    out = _blend(out, _grayscale(out).mean(dim=(1, 2, 3), keepdim=True), contrast)
    out = _blend(out, _grayscale(out), saturation)
    return _blend(out, _blurred(out), sharpness)


def erase(images, gen):
    """RandomErasing(p=ERASE_P, value=0): zero a box per chosen image, by a mask."""
    return erase_boxes(images, *sample_erase(len(images), gen, images.device, images.shape[-1]))


def sample_erase(n, gen, device, size=IMAGE_SIZE):
    """erase's random draws: which images it blanks, and each one's box (top, left, h, w)."""
    chosen = torch.rand(n, generator=gen, device=device) < ERASE_P
    return (chosen, *sample_erasures(n, gen, device, size))


def erase_boxes(images, chosen, top, left, h, w):
    n, _, size, _ = images.shape
    top, left, h, w = (t.view(n, 1) for t in (top, left, h, w))
    pos = torch.arange(size, device=images.device).view(1, size)
    rows = (pos >= top) & (pos < top + h) & chosen.view(n, 1)  # an image not chosen has no rows
    cols = (pos >= left) & (pos < left + w)
    return images.masked_fill(rows.view(n, 1, size, 1) & cols.view(n, 1, 1, size), 0.0)


def to_float(images):
    """uint8 [0, 255] -> float [0, 1], as ToTensor."""
    return images.float().div_(255)


def normalize(images):
    """The report's Normalize(0.5, 0.5) for float [0, 1] images: -> [-1, 1]."""
    mean = _constant(MEAN, images.device).view(1, 3, 1, 1)
    std = _constant(STD, images.device).view(1, 3, 1, 1)
    return (images - mean).div_(std)


REPORT_STEPS = ("crop", "rotate", "flip", "color", "erase")  # the report's pipeline, in order


def augment_report(images, gen, steps=REPORT_STEPS):
    """The report's training pipeline (uint8 batch -> normalised float batch).

    Crop (scale 0.08-1) + rotation (+-20 deg) + flip (p=0.1) in one resampling, then with
    p=0.1 color jitter, then Normalize, then erasing (p=0.75) with value 0, which after
    normalisation is mid-grey, as in the report's order. `steps` leaves some out (evaluate.py
    --ablation); Normalize is always done. Every step's random numbers are drawn, in the same
    order, whichever steps are on: a step left out changes nothing else, so each pipeline of
    the ablation sees the very same crops, angles, flips, colours and boxes as the whole one.
    """
    n, device = len(images), images.device
    top, left, h, w = sample_crops(n, gen, device)
    degrees = _uniform(n, -MAX_ROTATION, MAX_ROTATION, gen, device)
    flip = torch.rand(n, generator=gen, device=device) < FLIP_P
    jitter = sample_jitter(n, gen, device)
    erasure = sample_erase(n, gen, device)
    if "crop" not in steps:  # the whole image as the box: no crop, no resize
        top, left = torch.zeros_like(top), torch.zeros_like(left)
        h, w = torch.full_like(h, IMAGE_SIZE), torch.full_like(w, IMAGE_SIZE)
    if "rotate" not in steps:
        degrees = torch.zeros_like(degrees)
    if "flip" not in steps:
        flip = torch.zeros_like(flip)
    out = resample(to_float(images), top, left, h, w, degrees, flip)
    if "color" in steps:
        out = jitter_chosen(out, *jitter)
    out = normalize(out)
    return erase_boxes(out, *erasure) if "erase" in steps else out


def augment_standard(images, gen):
    """The usual CIFAR recipe: 4-pixel zero-padded random crop and flip with p=0.5."""
    n, _, size, _ = images.shape
    device = images.device
    padded = F.pad(to_float(images), (PAD, PAD, PAD, PAD))
    dy = torch.randint(0, 2 * PAD + 1, (n, 1), generator=gen, device=device)
    dx = torch.randint(0, 2 * PAD + 1, (n, 1), generator=gen, device=device)
    pos = torch.arange(size, device=device).view(1, size)
    rows, cols = (dy + pos).view(n, 1, size, 1), (dx + pos).view(n, 1, 1, size)
    batch = torch.arange(n, device=device).view(n, 1, 1, 1)
    channel = torch.arange(3, device=device).view(1, 3, 1, 1)
    out = padded[batch, channel, rows, cols]
    flip = torch.rand(n, generator=gen, device=device) < 0.5
    return normalize(torch.where(flip.view(n, 1, 1, 1), out.flip(-1), out))


def augment_none(images, gen=None):
    """No augmentation: the test pipeline, normalisation only."""
    return normalize(to_float(images))


AUGMENTATIONS = {"report": augment_report, "standard": augment_standard, "none": augment_none}


# ----------------------------------------------------------------------------- model

# Which script defines each model: evaluate.py and bench.py import it from there, never copy it.
MODEL_SCRIPTS = {"cnn": ("train_cnn", "CNN"), "resnet9": ("train_resnet", "ResNet9")}


def model_class(name):
    module, class_name = MODEL_SCRIPTS[name]
    return getattr(importlib.import_module(module), class_name)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def layer_table(model, device="cpu"):
    """The model's layers in torchsummary's format, the report's table: type, output shape, params.

    Forward hooks on the leaf modules record each output shape; one eval-mode forward of a
    zero batch, so BatchNorm's running statistics are left untouched.
    """
    rows, hooks = [], []

    def record(module, inputs, output):
        name = f"{type(module).__name__}-{len(rows) + 1}"
        shape = str([-1] + list(output.shape[1:]))
        params = sum(p.numel() for p in module.parameters())
        rows.append(f"{name:>20}  {shape:>25} {params:>15,}")

    for module in model.modules():
        if not list(module.children()):
            hooks.append(module.register_forward_hook(record))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE, device=device))
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    line = "-" * 64
    header = f"{'Layer (type)':>20}  {'Output Shape':>25} {'Param #':>15}"
    return "\n".join([line, header, "=" * 64, *rows, "=" * 64,
                      f"Total params: {count_params(model):,}", line])


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --precision: what the hardware does natively. A format the hardware only emulates costs
# time instead of saving it (float16 on a CPU: there --precision fp16 is for the tests only).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_bf16_unit():
    """The CPU's bfloat16 matrix instructions ("AMX" or "AVX512-BF16"), or None.

    Not torch.ops.mkldnn._is_mkldnn_bf16_supported(): it says yes on any AVX-512 CPU,
    including those that only emulate bfloat16, slowly.
    """
    found = cpu_capabilities()
    for key, unit in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16")):
        if found.get(key):
            return unit
    return None


def cpu_capabilities():
    """The CPU's instruction sets and name, as torch.cpu.get_capabilities() reports them. Older
    torch (2.6) lacks it: there, the flags Linux lists in /proc/cpuinfo, which use the same
    names (amx_bf16, avx512_bf16); elsewhere {}."""
    probe = getattr(torch.cpu, "get_capabilities", None)
    return probe() if probe else linux_cpu_flags()


CPUINFO = Path("/proc/cpuinfo")


def linux_cpu_flags():
    """{flag: True for each of the first CPU's flags, "cpu_name": its model name}; {} off Linux."""
    try:
        lines = CPUINFO.read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first CPU's: all cores are alike
    found = {flag: True for flag in fields.get("flags", "").split()}
    if fields.get("model name"):
        found["cpu_name"] = fields["model name"]
    return found


def cuda_capability(device):
    return torch.cuda.get_device_capability(device)


def choose_precision(device, requested="auto"):
    """(precision, why) for --precision on this device: "auto" picks what it does natively."""
    device = torch.device(device)
    if requested != "auto":
        return requested, f"--precision {requested}" + emulation_warning(device, requested)
    if device.type == "cuda":
        major, minor = cuda_capability(device)
        if major >= 8:  # Ampere and later: bfloat16 tensor cores
            return "bf16", f"CUDA compute capability {major}.{minor}: native bfloat16"
        if major >= 7:  # T4 (7.5), V100 (7.0): no native bfloat16, but float16 tensor cores
            return "fp16", f"CUDA compute capability {major}.{minor}: no native bfloat16, float16 with a gradient scaler"
        # P100 (6.0), GTX 10xx (6.1): no tensor cores at all, so float16 would gain little
        return "fp32", f"CUDA compute capability {major}.{minor}: no bfloat16 or float16 tensor cores"
    if device.type == "cpu":
        unit = cpu_bf16_unit()
        if unit:
            return "bf16", f"CPU with {unit}"
        return "fp32", "CPU without bfloat16 instructions, which would emulate bfloat16"
    return "fp32", f"{device.type}: float32"


def emulation_warning(device, precision):
    """A note for a precision asked for that this device only emulates, slowly; else ""."""
    if device.type == "cpu" and precision == "fp16":
        return ", emulated on this CPU: very slow, for tests only"
    if device.type == "cpu" and precision == "bf16" and not cpu_bf16_unit():
        return ", emulated on this CPU (no bfloat16 instructions): compare with bench.py"
    if device.type == "cuda" and precision == "bf16" and cuda_capability(device)[0] < 8:
        return ", emulated on this GPU (compute capability below 8.0): fp16 is native"
    return ""


def autocast(device, precision):
    """Mixed precision for the forward pass: matrix products in bf16/fp16, the rest float32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AUTOCAST_DTYPES[precision])


def uses_channels_last(device, precision):
    """NHWC memory layout where its kernels are faster: cuDNN's, and oneDNN's bf16/fp16 ones
    on the CPU. float32 on the CPU keeps PyTorch's default layout."""
    return torch.device(device).type == "cuda" or precision != "fp32"


def to_layout(batch, precision):
    """A batch in the memory layout the model was put in (see uses_channels_last)."""
    if uses_channels_last(batch.device, precision):
        return batch.contiguous(memory_format=torch.channels_last)
    return batch


def grad_scaler(device, precision):
    """float16 gradients underflow: the scaler multiplies the loss up before backward and
    divides it out again before clipping. For fp32 and bf16 it is disabled and passes through."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "mps (Apple GPU)"
    name = cpu_capabilities().get("cpu_name") or platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    return f"cpu ({name}, {threads} thread{'' if threads == 1 else 's'})"


# ----------------------------------------------------------------------------- training

# The settings that decide what a run computes: a resumed run must match them all.
RUN_SETTINGS = ("epochs", "batch_size", "max_lr", "weight_decay", "grad_clip", "clip_norm",
                "aug", "val_size", "subset", "seed", "device", "precision", "dry_run")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each default, and the script's docstring as it is written."""


def parse_args(description, argv=None, prog=None):
    """The training scripts' command line, with the report's recipe as defaults. Each value is
    checked as it is read (argparse's one-line error); what needs the machine is in setup()."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter,
                                allow_abbrev=False)  # impl: so next_step can find --resume and --stop-after
    recipe = REPORT_RECIPE
    p.add_argument("--epochs", type=positive_int, default=recipe["epochs"], help="training epochs")
    p.add_argument("--batch-size", type=positive_int, default=recipe["batch_size"], help="images per training step")
    p.add_argument("--max-lr", type=positive_float, default=recipe["max_lr"], help="peak of the one-cycle learning rate")
    p.add_argument("--weight-decay", type=non_negative_float, default=recipe["weight_decay"], help="Adam's weight decay")
    p.add_argument("--grad-clip", type=non_negative_float, default=recipe["grad_clip"],
                   help="clip each gradient value to +-this (0: off)")
    p.add_argument("--clip-norm", action="store_true", default=recipe["clip_norm"],
                   help="clip the gradients' total norm instead of each value")
    p.add_argument("--aug", choices=sorted(AUGMENTATIONS), default=recipe["aug"],
                   help="training augmentation: report (the report's pipeline), standard (pad-crop-flip) or none")
    p.add_argument("--val-size", type=non_negative_int, default=5000,
                   help="training images held out for validation (0: train on all 50,000 as the report)")
    p.add_argument("--subset", type=non_negative_int, default=0, help="train on only this many images (0: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed for weights, order and augmentation")
    p.add_argument("--device", type=available_device, choices=DEVICES, default="auto",
                   help="where to train (auto: cuda if there is one, else cpu; mps is untested)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="arithmetic: auto picks bf16 on GPUs and CPUs with native bfloat16, fp16 "
                        "(with a gradient scaler) on older GPUs such as Colab's T4, else fp32")
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py (downloaded if missing)")
    p.add_argument("--out", help="folder for the checkpoint, JSON and curves (default: runs; "
                                 "with --resume, the checkpoint's own folder)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (CUDA; fixed shapes: a few graphs, each compiled once)")
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue the run saved in this checkpoint")
    p.add_argument("--stop-after", type=positive_int, metavar="K", help="end cleanly after epoch K (resume later)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the whole run in seconds: 1 epoch, 128 training, 100 val and 500 test "
                        "images, saved under OUT/dry-run")
    args = p.parse_args(argv)
    args.prog, args.argv = p.prog, list(sys.argv[1:] if argv is None else argv)  # for next_step
    if args.dry_run:
        args.epochs, args.subset, args.val_size = 1, 128, 100
    return args


def _number(text, kind, strict):
    """text as an int or a finite float, > 0 (strict) or >= 0; else argparse's one-line error."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0 or (strict and value == 0):
        raise argparse.ArgumentTypeError(f"must be {'positive' if strict else 'zero or more'}, got {text}")
    return value


def positive_int(text):
    return _number(text, int, strict=True)


def non_negative_int(text):
    return _number(text, int, strict=False)


def positive_float(text):
    return _number(text, float, strict=True)


def non_negative_float(text):
    return _number(text, float, strict=False)


DEVICES = ["auto", "cpu", "cuda", "mps"]


def available_device(name):
    """--device cuda/mps where there is none: argparse's one-line error, before any work."""
    if name == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("no CUDA GPU is available here (use --device cpu or auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError("no Apple GPU is available here (use --device cpu or auto)")
    return name


def setup(args, name):
    """Everything before the data and the model: the output folder (never another run's), the
    device and precision, the checkpoint to resume (read once, into args.resumed), the seed."""
    args.out = output_folder(args.out, args.resume, args.dry_run)
    args.device = str(resolve_device(args.device))
    args.precision_asked = args.precision  # "auto" on a resume means: as the run started
    args.precision, args.precision_reason = choose_precision(args.device, args.precision)
    check_outputs(name, args)
    args.resumed = load_checkpoint(args.resume) if args.resume else None
    if args.resumed:
        take_saved_settings(args.resumed["config"], args)
        keep_precision(args.resumed["config"], args)
    torch.manual_seed(args.seed)  # the weights' initialisation
    git_commit()  # read now: the code that runs is the code at the start
    if torch.device(args.device).type == "cuda":
        torch.backends.cudnn.benchmark = True  # impl: every shape is fixed: pick the fastest kernels once
    print(f"device: {device_name(torch.device(args.device))}, precision: {args.precision} "
          f"({args.precision_reason})")
    if args.dry_run:
        print("dry run: a check that the code runs end to end (1 epoch of 128 images, 500 test "
              "images), not a measurement: two steps at the peak learning rate can leave any "
              "loss, even 20 or more, and chance accuracy (10%)")
    return torch.device(args.device)


def output_folder(out, resume, dry_run):
    """--out as given; else a resumed run continues in its checkpoint's folder, a new one in
    runs/. A dry run writes under <out>/dry-run, never over a real run's files."""
    if out is None and resume:
        return str(Path(resume).parent)
    out = Path(out or "runs")
    return str(out / "dry-run") if dry_run else str(out)


def check_outputs(name, args):
    """Refuse a run that would replace a checkpoint it was not asked to continue."""
    target = output_paths(args.out, name)["checkpoint"]
    if not target.exists():
        return
    if not args.resume:
        raise UserError(f"{target} exists: continue it with --resume {target}, or choose another "
                        f"--out (or delete it)")
    if Path(args.resume).exists() and not target.samefile(args.resume):
        raise UserError(f"--out {args.out} holds another run ({target}); continuing {args.resume} "
                        f"there would replace it: leave out --out to continue in "
                        f"{Path(args.resume).parent}, or choose an --out without a {target.name}")


def one_cycle(optimizer, max_lr, epochs, steps_per_epoch):
    """PyTorch's OneCycleLR with its defaults, as the report's logged learning rates show."""
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, epochs=epochs,
                                               steps_per_epoch=steps_per_epoch)


def steps_per_epoch(num_images, batch_size):
    return math.ceil(num_images / batch_size)  # the last, smaller batch is kept: 782 for 50,000


def clip_gradients(model, grad_clip, clip_norm):
    if grad_clip and clip_norm:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    elif grad_clip:
        nn.utils.clip_grad_value_(model.parameters(), grad_clip)  # the ResNet9 tutorial's choice


class NonFiniteLoss(Exception):
    pass


def check_finite(losses, epoch):
    """Stop the run at a NaN or infinite loss: every step after it would be NaN too."""
    bad = ~torch.isfinite(losses)
    if bad.any():
        raise NonFiniteLoss(f"non-finite loss at epoch {epoch}, batch {int(bad.nonzero()[0]) + 1}")


class Progress:
    """`epoch 3: 120/704 batches, 2300 img/s, ETA 4:12`, rewritten in place where a person watches.

    That is a terminal, Colab's `!python` (a pseudo-terminal), or a notebook cell fed through
    a pipe with CIFAR10_PROGRESS=1 (colab.ipynb's run() sets it): notebooks, like terminals,
    redraw a line that starts with "\\r". Output redirected to a log file gets none of it.
    """

    def __init__(self, epoch, steps, batch_size):
        self.epoch, self.steps, self.batch_size = epoch, steps, batch_size
        self.start = self.last = time.perf_counter()
        self.show = sys.stdout.isatty() or os.environ.get("CIFAR10_PROGRESS") == "1"

    def tick(self, done):
        """Redraw the line if a second has passed since the last time; True when it did."""
        now = time.perf_counter()
        if now - self.last < 1.0:
            return False
        self.last = now
        if self.show:
            rate = done / (now - self.start)
            eta = int((self.steps - done) / rate)
            print(f"\r  epoch {self.epoch}: {done}/{self.steps} batches, "
                  f"{rate * self.batch_size:.0f} img/s, ETA {eta // 60}:{eta % 60:02d} ",
                  end="", flush=True)
        return True

    def close(self):
        if self.show:
            print("\r" + " " * 70 + "\r", end="", flush=True)


def train_step(model, optimizer, scheduler, scaler, inputs, targets, args):
    """One step: forward in the run's precision, loss, backward, clipping, Adam, the schedule.

    With fp16 the scaler's backward runs on a scaled-up loss, and unscale_ divides it out
    before clipping, so clipping at 0.1 means what it means in float32; a step whose gradients
    overflowed is skipped. For fp32 and bf16 the scaler is disabled: each call passes through.
    """
    with autocast(inputs.device, args.precision):
        logits = model(inputs)
        loss = F.cross_entropy(logits, targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    clip_gradients(model, args.grad_clip, args.clip_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return logits, loss


def fit(name, model, optimizer, scheduler, data, args):
    """The whole run. Each epoch: train (augment each batch, one step), validate on the held-out
    images, print the report's log line, checkpoint. Then test once, on the clean test images,
    and save. Returns the run's record (<name>.json), or None when --stop-after ended it early.
    """
    device = torch.device(args.device)
    gen = torch.Generator(device).manual_seed(args.seed)  # epoch order and augmentation
    scaler = grad_scaler(device, args.precision)
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "gen": gen}
    history = restore(args.resumed, args.resume, name, parts, args) if args.resume else []
    paths = output_paths(args.out, name)
    check_outputs(name, args)  # setup did too, before any work; fit is the one that writes
    # impl: fixed shapes: one graph each for the training batch, the epoch's smaller last batch
    # and the evaluation batch, compiled once; dynamic shapes would recompile slower, general code.
    forward = torch.compile(model, dynamic=False) if args.compile else model
    augment = AUGMENTATIONS[args.aug]
    train_x, train_y = data["train"]
    steps = steps_per_epoch(len(train_y), args.batch_size)
    first = len(history) + 1
    last = args.epochs if args.stop_after is None else min(args.epochs, args.stop_after)
    saved = (args.resume, first - 1)  # the checkpoint on disk, and the epoch it holds
    try:
        for epoch in range(first, last + 1):
            start = time.perf_counter()
            # train: every training image once, in a new random order, augmented on the device
            forward.train()
            order = torch.randperm(len(train_y), generator=gen, device=device)
            loss_sums = torch.zeros(steps, device=device)  # impl: on the device, no GPU wait per step
            correct = torch.zeros((), dtype=torch.int64, device=device)
            progress = Progress(epoch, steps, args.batch_size)
            for step in range(steps):
                batch = order[step * args.batch_size:(step + 1) * args.batch_size]
                inputs, targets = to_layout(augment(train_x[batch], gen), args.precision), train_y[batch]
                last_lr = optimizer.param_groups[0]["lr"]  # the rate this batch uses: the report's last_lr
                logits, loss = train_step(forward, optimizer, scheduler, scaler, inputs, targets, args)
                loss_sums[step] = loss.detach().float() * len(batch)
                correct += (logits.argmax(dim=1) == targets).sum()
                if progress.tick(step + 1):  # impl: once a second; every step would stall a GPU
                    check_finite(loss_sums[:step + 1], epoch)
            progress.close()
            check_finite(loss_sums, epoch)
            row = {"epoch": epoch, "last_lr": last_lr, "train_loss": loss_sums.sum().item() / len(train_y),
                   "train_accuracy": correct.item() / len(train_y)}
            # validate: the held-out images, clean (the report had none)
            row["val_loss"], row["val_accuracy"] = validate(forward, *data["val"], args.precision)
            row["seconds"] = time.perf_counter() - start
            history.append(row)
            # print and checkpoint
            print(format_row(row, args.epochs), flush=True)
            if epoch == first and last > epoch:
                print(time_left(row["seconds"], epoch, last), flush=True)
            with ctrl_c_deferred():  # a Ctrl-C now lands after the files are written
                save_checkpoint(checkpoint(name, parts, args, history), paths["checkpoint"])
                saved = (paths["checkpoint"], epoch)
                write_json(paths["json"], summary(name, model, args, history))
        if last < args.epochs:
            print(f"stopped after epoch {last} of {args.epochs}; {next_step(saved, args)}")
            return None
        # test: once, at the end, on the whole clean test set
        test_x, test_y = data["test"]
        test_accuracy = loss_and_accuracy(predict(forward, test_x, precision=args.precision), test_y)[1]
        record = summary(name, model, args, history, test_accuracy)
        save_checkpoint(checkpoint(name, parts, args, history, test_accuracy), paths["checkpoint"])
        write_json(paths["json"], record)
    except KeyboardInterrupt:
        print(f"\ninterrupted; {next_step(saved, args)}", file=sys.stderr)
        sys.exit(130)
    except NonFiniteLoss as error:  # resuming would replay the same steps into the same NaN
        raise UserError(f"{error}; {on_disk(saved)}; start a new run with a lower --max-lr") from None
    print_end(record, paths, len(test_y))
    return record


def validate(model, images, labels, precision):
    """(loss, accuracy) on the held-out images; (None, None) when none are held out."""
    if not len(labels):
        return None, None
    return loss_and_accuracy(predict(model, images, precision=precision), labels)


def print_end(record, paths, test_images):
    """The test accuracy, the curves, what was saved and what to run next."""
    print(f"test accuracy (clean, {test_images:,} images): {100 * record['test_accuracy']:.2f}%  "
          f"train time: {record['train_seconds']:.0f} s")
    plotted = plot_curves(record["history"], paths["curves"], record["model"])
    print(f"saved {paths['checkpoint']}, {paths['json']}" + (f", {paths['curves']}" if plotted else ""))
    print(f"next: python evaluate.py {shlex.quote(str(paths['checkpoint']))} --tta  "
          f"(the report's protocol too: 100 passes; --repeats 10 on a CPU)")


def time_left(seconds, epoch, last):
    """After the first epoch: how long the rest will take at its pace."""
    minutes = seconds * (last - epoch) / 60
    when = f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"
    return f"about {when} left for epochs {epoch + 1}-{last}, at this epoch's pace"


def output_paths(out, name):
    out = Path(out)
    return {"checkpoint": out / f"{name}.pt", "json": out / f"{name}.json",
            "curves": out / f"{name}_curves.png"}


def on_disk(saved):
    path, epoch = saved
    return f"{path} holds epoch {epoch}" if epoch else "no epoch finished, so nothing was saved"


def next_step(saved, args):
    """What is on disk, and the exact command that continues: the same flags, plus --resume."""
    path, epoch = saved
    if not epoch:
        return on_disk(saved)
    argv, skip = [], False
    for arg in args.argv:  # drop an earlier --resume/--stop-after and their values
        if skip or arg.split("=")[0] in ("--resume", "--stop-after"):
            skip = not skip and "=" not in arg
            continue
        argv.append(arg)
    command = shlex.join(["python", args.prog, *argv, "--resume", str(path)])
    return f"{on_disk(saved)}\nresume with: {command}"


def summary(name, model, args, history, test_accuracy=None):
    """What <name>.json holds: the run's config, numbers and what is needed to trust and repeat it."""
    return {
        "model": name, "config": config_of(args), "params": count_params(model),
        "history": history, "test_accuracy": test_accuracy,
        "train_seconds": sum(row["seconds"] for row in history),
        "device": device_name(torch.device(args.device)), "precision": args.precision,
        "torch": torch.__version__,
        "cuda": torch.version.cuda, "seed": args.seed, "git_commit": git_commit(),
    }


def config_of(args):
    config = {key: value for key, value in vars(args).items()
              if key not in ("argv", "prog", "precision_reason", "precision_asked", "resumed")}
    config["data_dir"] = str(Path(args.data_dir).resolve())  # so evaluate.py finds it from anywhere
    return config


@functools.cache  # read once, at setup: the code that runs is the code at the start
def git_commit():
    """The checkout's commit, with "+dirty" when tracked files differ from it; None outside git."""
    def git(*words):
        return subprocess.run(["git", *words], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        return (commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def pyplot():
    """matplotlib.pyplot drawing to files, or None: matplotlib is optional (Colab has it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path):
    """Write the figure as a PNG and close it; True if written. A plot is not worth failing a
    finished run for: a write error is one line on stderr."""
    try:
        save_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
        return True
    except UserError as error:
        print(f"{error}; plot skipped", file=sys.stderr)
        return False
    finally:
        pyplot().close(fig)


def plot_curves(history, path, title):
    """Loss and accuracy per epoch, as a PNG, when matplotlib is installed (it is optional)."""
    plt = pyplot()
    if plt is None:
        return False
    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    # train is measured on the augmented batches while the model learns; val on clean held-out
    # images after the epoch: with heavy augmentation, train lies BELOW val, and that is no bug
    labels = {"train": "train (augmented batches, during the epoch)", "val": "val (held out, clean)"}
    for split in ("train", "val"):
        if history and history[-1][f"{split}_loss"] is not None:
            loss_ax.plot(epochs, [row[f"{split}_loss"] for row in history], "o-", label=labels[split])
            acc_ax.plot(epochs, [100 * row[f"{split}_accuracy"] for row in history], "o-", label=labels[split])
    loss_ax.set(xlabel="epoch", ylabel="loss", title=f"{title}: loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{title}: accuracy")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- checkpoints

PROGRAM = "cifar10-report"  # marks checkpoints written by this project's training scripts
ZIP_MAGIC = b"PK\x03\x04"  # the first bytes of every file torch.save writes


def checkpoint(name, parts, args, history, test_accuracy=None):
    """Everything a resumed run needs, in types that torch.load(weights_only=True) accepts.
    `parts`: the run's model, optimizer, scheduler, gradient scaler and generator (gen)."""
    # Training draws from `gen`; the global CUDA generator is saved for whatever else might.
    cuda_states = [torch.cuda.get_rng_state()] if args.device == "cuda" else []
    scaler = parts["scaler"]
    return {
        "program": PROGRAM, "model_name": name, "model": parts["model"].state_dict(),
        "optimizer": parts["optimizer"].state_dict(), "scheduler": parts["scheduler"].state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "epoch": history[-1]["epoch"], "history": history, "config": config_of(args),
        "rng": {"torch": torch.get_rng_state(), "cuda": cuda_states, "data": parts["gen"].get_state()},
        "test_accuracy": test_accuracy,
    }


def save_atomic(path, write):
    """write(file) to a temp file in the same folder, fsync it, then rename it over `path`.

    A crash, Ctrl-C or full disk mid-write leaves the previous file whole: a rename within
    one folder either happens entirely or not at all.
    """
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)  # impl: mkstemp makes it private; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException as error:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(error, OSError):
            raise UserError(f"could not write {path} ({error.strerror or error}); "
                            f"the previous version, if any, is intact") from None
        raise


@contextlib.contextmanager
def ctrl_c_deferred():
    """Hold a Ctrl-C back while the block runs, then raise it: the checkpoint and the record of
    it agree. (Blocking the signal would not do: the kernel may hand it to one of torch's
    threads.) Only the main thread can set handlers; elsewhere the atomic write must do."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


def save_checkpoint(state, path):
    save_atomic(path, lambda f: torch.save(state, f))


def write_json(path, obj):
    save_atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def load_checkpoint(path):
    """Load a checkpoint of this project without running any code stored in it.

    weights_only=True unpickles tensors and plain containers only, so a file built to run
    code when unpickled is refused, not executed. Every problem is one UserError line.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty")
    with open(path, "rb") as f:
        if f.read(4) != ZIP_MAGIC:  # torch.save writes a zip archive; a JSON, a picture... is not one
            raise UserError(f"{path} is not a checkpoint (not a PyTorch file)" + _checkpoint_hint(path))
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles: we say it in one line
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} was refused by the safe loader, unread: it holds objects other "
                        f"than tensors and plain containers, which our training scripts never "
                        f"save, and unpickling them could run code") from None
    except Exception as error:
        raise UserError(f"{path} is truncated or not a PyTorch checkpoint "
                        f"({type(error).__name__})") from None
    if not isinstance(state, dict) or state.get("program") != PROGRAM:
        raise UserError(f"{path} was not written by train_cnn.py or train_resnet.py")
    if state["config"].get("aug") == "seed":  # "seed" is another name of the report's pipeline:
        state["config"]["aug"] = "report"  # such checkpoints load, resume and group as --aug report
    return state


def _checkpoint_hint(path):
    """For a file that is not a checkpoint: the one the user probably meant."""
    for name in ("cnn.pt", "resnet9.pt"):
        if path.name.startswith(Path(name).stem) and path.with_name(name).is_file():
            return f": the run's checkpoint is {path.with_name(name)}"
    return ": pass the .pt file a training run saved, e.g. runs/cnn.pt"


def saved_setting(config, key):
    """A run setting as a checkpoint saved it. A checkpoint that names no precision trained in
    float32 on a CPU and in bfloat16 on CUDA."""
    if key == "precision" and key not in config:
        return "bf16" if config.get("device") == "cuda" else "fp32"
    return config.get(key)


def take_saved_settings(config, args):
    """On a resume, a setting not given on the command line is the checkpoint's: `--resume
    CHECKPOINT` alone continues the run as it started. One given that differs is refused
    (restore). The device and the precision follow their own rules (auto, keep_precision)."""
    given = {word.split("=")[0] for word in args.argv if word.startswith("--")}
    for key in RUN_SETTINGS:
        if key not in ("device", "precision", "dry_run") and "--" + key.replace("_", "-") not in given:
            setattr(args, key, saved_setting(config, key))


def keep_precision(config, args):
    """--precision auto on a resume continues in the precision the run started in: on another
    machine (a T4 after an A100, say) auto may pick another, and one run keeps one."""
    saved = saved_setting(config, "precision")
    if args.precision_asked == "auto" and saved != args.precision:
        args.precision, args.precision_reason = saved, f"as the run started; auto would pick {args.precision} here"


def is_finished(state):
    """A run is finished once its test is recorded: that comes after its last epoch."""
    return state.get("test_accuracy") is not None


def restore(state, path, name, parts, args):
    """Load a checkpoint's state into the run's parts (see checkpoint); returns its history.

    A run whose last epoch was saved but whose test never ran (a run cut in its last minute)
    resumes too: with nothing left to train, it goes straight to the test."""
    if state["model_name"] != name:
        raise UserError(f"{path} is a checkpoint of {state['model_name']}, not {name}: "
                        f"resume it with its own script")
    for key in RUN_SETTINGS:
        saved, now = saved_setting(state["config"], key), getattr(args, key)
        if saved != now:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{path} was made with {flag} {saved}, this run has {flag} {now}: "
                            f"resume with the checkpoint's settings")
    if is_finished(state):
        raise UserError(f"{path} already finished all {args.epochs} epochs; "
                        f"evaluate it with: python evaluate.py {path}")
    if args.stop_after is not None and args.stop_after <= state["epoch"] < args.epochs:
        raise UserError(f"--stop-after {args.stop_after}: {path} already holds epoch {state['epoch']}")
    model, scaler = parts["model"], parts["scaler"]
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise UserError(f"{path}: its weights do not fit {name} ({str(error).splitlines()[0][:100]})") from None
    parts["optimizer"].load_state_dict(state["optimizer"])
    parts["scheduler"].load_state_dict(state["scheduler"])
    if scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"][0])
    parts["gen"].set_state(state["rng"]["data"])
    left = "its test" if state["epoch"] >= args.epochs else f"epochs {state['epoch'] + 1}-{args.epochs}"
    print(f"resumed {path} after epoch {state['epoch']}; left to do: {left}")
    return state["history"]


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def predict(model, images, augment=augment_none, gen=None, precision="fp32"):
    """Logits (float32) for uint8 images, in eval mode, EVAL_BATCH images at a time."""
    model.eval()
    logits = []
    for start in range(0, len(images), EVAL_BATCH):
        batch = to_layout(augment(images[start:start + EVAL_BATCH], gen), precision)
        with autocast(images.device, precision):
            logits.append(model(batch).float())
    return torch.cat(logits)


def loss_and_accuracy(logits, labels):
    loss = F.cross_entropy(logits, labels).item()
    return loss, (logits.argmax(dim=1) == labels).float().mean().item()


def repeated_accuracies(model, images, labels, augment, repeats, seed=0, precision="fp32",
                        train_mode=False):
    """The report's test protocol: the test set through an augmentation, `repeats` times.

    A pass can only differ from the next if it is random, which a clean test pass is not.
    train_mode: the passes of a test loop that forgot model.eval() (see predict_in_train_mode).
    """
    gen = torch.Generator(images.device).manual_seed(seed)
    one_pass = predict_in_train_mode if train_mode else predict
    if train_mode:
        model = copy.deepcopy(model)  # train mode updates BatchNorm's running statistics
    return [loss_and_accuracy(one_pass(model, images, augment, gen, precision), labels)[1]
            for _ in range(repeats)]


@torch.no_grad()
def predict_in_train_mode(model, images, augment=augment_none, gen=None, precision="fp32",
                          batch_size=REPORT_RECIPE["batch_size"]):
    """Logits as a test loop without model.eval() gets them, in the images' own order.

    In training mode BatchNorm normalises each batch by that batch's own statistics, so an
    image's prediction depends on the images it is batched with; a shuffled loader batches
    them anew on every pass. Here: batches of the report's 64, shuffled by `gen`."""
    model.train()
    order = torch.randperm(len(images), generator=gen, device=images.device)
    logits = torch.empty(len(images), NUM_CLASSES, device=images.device)
    for start in range(0, len(images), batch_size):
        picked = order[start:start + batch_size]
        batch = to_layout(augment(images[picked], gen), precision)
        with autocast(images.device, precision):
            logits[picked] = model(batch).float()
    return logits


def tta_accuracy(model, images, labels, precision="fp32"):
    """Test-time augmentation (TTA): average the predicted probabilities of each image
    and its mirror image, then take the most probable class."""
    probs = (predict(model, images, precision=precision).softmax(dim=1)
             + predict(model, images.flip(-1), precision=precision).softmax(dim=1))
    return (probs.argmax(dim=1) == labels).float().mean().item()
