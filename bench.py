"""Race the batched augmentation against torchvision, and measure what it costs a training step.

    python bench.py                          # cuda if available, else cpu; CIFAR-10 from data/
    python bench.py --device cpu --json runs/bench_cpu.json --data-dir /tmp/cifar
    python bench.py --device cuda --json runs/bench_cuda.json --model cnn

Four measurements, side by side in one process, all of the report's pipeline (--aug report)
on batches of 64 images:
  (a) batched      common.augment_report on uint8 batches already on the device, every image
                   with its own random parameters from a generator on the device. After a
                   warm-up; on CUDA the clock is read only after a synchronize.
  (b) torchvision  torchvision_pipeline("report") applied one image at a time by a
                   DataLoader with 2 worker processes, as a Colab notebook does. Timed: one
                   full pass over the same images, from creating the iterator (the workers
                   start then, as at every epoch of a notebook) to the last batch received on
                   the CPU. It starts from uint8 tensors, not the PIL images a notebook's
                   CIFAR10 dataset gives, and the copy to the GPU is not counted: both only
                   flatter (b).
  (c) step         seconds per training step of a real model, (1) bare: a fixed, already
                   normalised batch on the device; (2) full: the training loop's path, a
                   permuted slice of the uint8 images on the device, augment_report, forward,
                   loss, backward, clip_grad_value_(0.1), Adam, OneCycle. At the precision
                   the training scripts' --precision auto picks on this device.
                   pipeline overhead = (full - bare) / full.
  (d) precision    seconds per bare step at each precision, side by side: fp32 and bf16 on
                   every device (bf16 is emulated, and slow, on CPUs without bfloat16
                   instructions: that is why auto picks fp32 there), fp16 on CUDA only
                   (float16 on a CPU is emulated, some 100x slower: not timed).

What this project aims for: augment_speedup = (a) / (b) of at least 10 on a 2-core CPU, and
a pipeline overhead under 10% of a step on a GPU. Without CIFAR-10 in --data-dir, random uint8
images are used instead (the output and the JSON say so): the timings barely depend on content.
Another busy process skews every number here, (a) most: its many small operations each split
across all the CPU's threads, and when one core is busy each waits for the slowest thread.
The load average is recorded and a warning printed; rerun when the machine is idle.
"""
import argparse
import itertools
import os
import statistics
import time
from pathlib import Path

import torch
import torchvision
import torchvision.transforms.v2 as T
from torch.utils.data import DataLoader, Dataset

import common

BATCH = common.REPORT_RECIPE["batch_size"]  # the report's batch size
WORKERS = 2  # a Colab notebook's DataLoader(num_workers=2)
TRAIN_IMAGES = 50_000  # the size of the random stand-in for CIFAR-10's training set
ROUNDS = 3  # (c) alternates bare and full blocks this many times and keeps the medians
# Defaults by device: a ResNet9 step takes about a second on a 2-core CPU and milliseconds on a
# GPU, and the default run should stay within about 3 minutes on the CPU.
DEFAULTS = {"cpu": {"images": 10_000, "steps": 5, "warmup_steps": 1},
            "cuda": {"images": 50_000, "steps": 100, "warmup_steps": 10}}
BUSY_LOAD = 0.5  # a load average above this at the start means another process is competing
AUGMENT_WARMUP = 5  # batches before (a)'s clock starts: first calls allocate and load kernels


class HelpFormatter(common.HelpFormatter):
    """--help shows each default, and the docstring above with its layout kept."""

    def _get_help_string(self, action):  # no "(default: None)": those helps say what happens
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where (a) and (c) run; (b) always runs on the CPU, as in a notebook")
    p.add_argument("--json", metavar="FILE", help="also write the numbers to this JSON file (default: none)")
    p.add_argument("--data-dir", default="data",
                   help="folder holding cifar-10-batches-py (random images when it is missing)")
    p.add_argument("--images", type=int, help="images augmented by (a) and by (b) "
                   f"(default by device: {DEFAULTS['cpu']['images']:,} on cpu, {DEFAULTS['cuda']['images']:,} on cuda)")
    p.add_argument("--steps", type=int, help="timed training steps per block in (c), "
                   f"{ROUNDS} blocks each of bare and full "
                   f"(default by device: {DEFAULTS['cpu']['steps']} on cpu, {DEFAULTS['cuda']['steps']} on cuda)")
    p.add_argument("--model", choices=sorted(common.MODEL_SCRIPTS), default="resnet9", help="the model trained in (c)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is available here (use --device cpu or auto)")
    args.device = common.resolve_device(args.device)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the training scripts: fixed shapes, fastest kernels
    defaults = DEFAULTS[args.device.type]
    args.images = defaults["images"] if args.images is None else args.images
    args.steps = defaults["steps"] if args.steps is None else args.steps
    args.warmup_steps = defaults["warmup_steps"]
    if not BATCH <= args.images <= TRAIN_IMAGES:
        p.error(f"--images must be between {BATCH} and {TRAIN_IMAGES:,}, got {args.images}")
    if not 0 < args.steps <= 1000:  # 1000 keeps (c) inside the one-cycle schedule's 15,640 steps
        p.error(f"--steps must be between 1 and 1000, got {args.steps}")
    return args


# ----------------------------------------------------------------------------- data

def load_images(data_dir):
    """CIFAR-10's training images and labels (uint8, CPU) and where they came from.

    A bench should not start a 170 MB download, so a missing folder means random images.
    """
    data_dir = Path(data_dir)
    if (data_dir / "cifar-10-batches-py").is_dir() or (data_dir / common.CIFAR10_TGZ).is_file():
        train_x, train_y, *_ = common.load_cifar10(data_dir)
        return train_x, train_y, "cifar10"
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (TRAIN_IMAGES, 3, 32, 32), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, common.NUM_CLASSES, (TRAIN_IMAGES,), generator=gen)
    return images, labels, "random"


def load_average():
    """The 1-minute load average before the bench starts (None where the OS has none, e.g.
    Windows). Above ~0.5 another process is busy, and on a 2-core CPU that skews every number."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def synchronize(device):
    """Wait for the GPU to finish what was queued: CUDA calls return before the work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- (a) batched

def time_batched(images, device):
    """Images per second of common.augment_report, batch by batch over `images` on `device`."""
    images = images.to(device)
    gen = torch.Generator(device).manual_seed(0)
    for _ in range(AUGMENT_WARMUP):
        common.augment_report(images[:BATCH], gen)
    synchronize(device)
    start = time.perf_counter()
    for first in range(0, len(images), BATCH):
        common.augment_report(images[first:first + BATCH], gen)
    synchronize(device)
    return len(images) / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- (b) torchvision

def torchvision_pipeline(aug="report"):
    """The same augmentation written with torchvision transforms, applied one image at a time.

    Not used for training: it is the peer that (b) races, and the tests compare with.
    Input: one uint8 (3, 32, 32) tensor.
    """
    J = common.JITTER

    class RandomSharpness(T.Transform):  # torchvision has a fixed-factor version only
        def transform(self, inpt, params):
            return T.functional.adjust_sharpness(inpt, float(torch.empty(()).uniform_(1 - J, 1 + J)))

    to_input = [T.ToDtype(torch.float32, scale=True)]
    norm = [T.Normalize(common.MEAN, common.STD)]
    if aug == "none":
        return T.Compose(to_input + norm)
    if aug == "standard":
        crop = T.RandomCrop(common.IMAGE_SIZE, padding=common.PAD)
        return T.Compose(to_input + [crop, T.RandomHorizontalFlip()] + norm)
    return T.Compose(to_input + [
        T.RandomResizedCrop(common.IMAGE_SIZE, scale=common.CROP_SCALE, ratio=common.CROP_RATIO),
        T.RandomRotation(common.MAX_ROTATION),
        T.RandomHorizontalFlip(common.FLIP_P),
        T.RandomApply([T.ColorJitter(J, J, J), RandomSharpness()], p=common.JITTER_P),
    ] + norm + [T.RandomErasing(common.ERASE_P, common.ERASE_SCALE, common.ERASE_RATIO, value=0)])


class PerImage(Dataset):
    """uint8 (3, 32, 32) image tensors and labels, each image transformed when it is fetched."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def time_torchvision(images, labels):
    """(images per second, seconds to the first batch) of one pass of the notebook's loader."""
    transform = torchvision_pipeline("report")
    for image in images[:BATCH]:  # warm-up: lazy imports and first calls, inherited by the workers
        transform(image)
    loader = DataLoader(PerImage(images, labels, transform), batch_size=BATCH, shuffle=True,
                        num_workers=WORKERS)
    start = time.perf_counter()
    first_batch = None
    for _ in loader:  # iter(loader) starts the worker processes: their start-up is timed too
        if first_batch is None:
            first_batch = time.perf_counter() - start
    return len(images) / (time.perf_counter() - start), first_batch


# ----------------------------------------------------------------------------- (c) training step

def make_step(name, device, precision):
    """A function that takes one training step, as the loop in common.fit does (less its loss and
    accuracy bookkeeping), on a fresh model with the report's optimizer and schedule."""
    settings = common.parse_args(None, ["--device", device.type, "--precision", precision])  # the report's
    torch.manual_seed(0)
    model = common.model_class(name)().to(device).train()
    if common.uses_channels_last(device, precision):  # as train_*.py
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.max_lr, weight_decay=settings.weight_decay)
    steps = common.steps_per_epoch(TRAIN_IMAGES, settings.batch_size)
    scheduler = common.one_cycle(optimizer, settings.max_lr, settings.epochs, steps)
    scaler = common.grad_scaler(device, precision)

    def step(inputs, targets):
        common.train_step(model, optimizer, scheduler, scaler, inputs, targets, settings)

    return step


def bare_batches(images, labels, precision):
    """The same normalised batch, already on the device, at every step: no data handling."""
    inputs = common.to_layout(common.augment_none(images[:BATCH]), precision)
    return itertools.repeat((inputs, labels[:BATCH]))


def full_batches(images, labels, gen, precision):
    """The training loop's data path (common.fit): a permutation per pass over the
    images, then per step a slice of it, gathered from the uint8 images and augmented."""
    while True:
        order = torch.randperm(len(labels), generator=gen, device=labels.device)
        for first in range(0, len(labels) - BATCH + 1, BATCH):
            batch = order[first:first + BATCH]
            yield common.to_layout(common.augment_report(images[batch], gen), precision), labels[batch]


def time_steps(step, batches, steps, device):
    """Seconds per step over `steps` steps. No sync inside the loop, as in training: the CPU
    may queue the next batch's augmentation while the GPU still runs the previous step."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(*next(batches))
    synchronize(device)
    return (time.perf_counter() - start) / steps


def time_training(name, images, labels, device, steps, warmup_steps, precision):
    """Median seconds per step, {"bare": ..., "full": ...}.

    Blocks of bare and full steps alternate, so a burst of load from another process hits
    one round of both rather than one of the two; the median drops that round.
    """
    step = make_step(name, device, precision)
    images, labels = images.to(device), labels.to(device)
    gen = torch.Generator(device).manual_seed(0)
    sources = {"bare": (step, bare_batches(images, labels, precision)),
               "full": (step, full_batches(images, labels, gen, precision))}
    return alternate(sources, device, steps, warmup_steps)


def time_precisions(name, images, labels, device, steps, warmup_steps, precisions):
    """Median seconds per bare step at each precision, {"fp32": ..., "bf16": ...}: each its
    own fresh model, blocks alternating as in time_training."""
    images, labels = images.to(device), labels.to(device)
    sources = {p: (make_step(name, device, p), bare_batches(images, labels, p)) for p in precisions}
    return alternate(sources, device, steps, warmup_steps)


def alternate(sources, device, steps, warmup_steps):
    """{kind: (step, batches)} -> {kind: median seconds per step over ROUNDS alternating blocks}."""
    for step, batches in sources.values():
        time_steps(step, batches, warmup_steps, device)
    times = {kind: [] for kind in sources}
    for _ in range(ROUNDS):
        for kind, (step, batches) in sources.items():
            times[kind].append(time_steps(step, batches, steps, device))
    return {kind: statistics.median(seconds) for kind, seconds in times.items()}


def precisions_to_time(device):
    """fp32 and bf16 on every CPU (bf16 where it is emulated shows why auto avoids it); on CUDA
    fp32, fp16, and bf16 where it is native (compute capability 8.0 and up: older GPUs refuse
    or emulate it)."""
    if device.type != "cuda":
        return ["fp32", "bf16"]
    return ["fp32", "bf16", "fp16"] if common.cuda_capability(device)[0] >= 8 else ["fp32", "fp16"]


# ----------------------------------------------------------------------------- report

def measure(args):
    """All three measurements; returns what the JSON holds."""
    load = load_average()
    images, labels, source = load_images(args.data_dir)
    sample = slice(0, args.images)  # (a) and (b) see the same images
    batched = time_batched(images[sample], args.device)
    torchvision_rate, first_batch = time_torchvision(images[sample], labels[sample])
    precision, reason = common.choose_precision(args.device)
    step = time_training(args.model, images, labels, args.device, args.steps, args.warmup_steps, precision)
    by_precision = time_precisions(args.model, images, labels, args.device, args.steps, args.warmup_steps,
                                   precisions_to_time(args.device))
    speedup = batched / torchvision_rate
    overhead = (step["full"] - step["bare"]) / step["full"]
    return {
        "augment_speedup": speedup,
        "batched_images_per_s": batched,
        "torchvision_images_per_s": torchvision_rate,
        "torchvision_first_batch_s": first_batch,
        "step_seconds_bare": step["bare"],
        "step_seconds_full": step["full"],
        "pipeline_overhead": overhead,
        "augment_share_of_step": BATCH / batched / step["full"],  # (a)'s time per batch, alone
        "precision": precision, "precision_reason": reason,
        **{f"step_seconds_{p}": seconds for p, seconds in by_precision.items()},
        "model": args.model, "device": common.device_name(args.device), "device_type": args.device.type,
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_average": load,
        "data": source, "data_dir": str(args.data_dir),
        "images": args.images, "batch_size": BATCH, "workers": WORKERS, "steps_per_block": args.steps,
        "rounds": ROUNDS, "warmup_steps": args.warmup_steps, "augment_warmup_batches": AUGMENT_WARMUP,
        # each goal is judged on the kind of device it was set for, and is null on the other
        "goals": {"augment_speedup_at_least_10_on_cpu": judge(speedup >= 10, args.device.type, "cpu"),
                  "pipeline_overhead_under_10pct_on_gpu": judge(overhead < 0.10, args.device.type, "cuda")},
    }


def judge(met, device_type, goal_device):
    """True/False for a goal set for this kind of device, None for one set for the other kind."""
    return bool(met) if device_type == goal_device else None


def row(label, value, note=""):
    return f"  {label:<52}{value:>12}  {note}".rstrip()


def goal_note(goal, met):
    return f"goal {goal}: " + {True: "met", False: "MISSED", None: "not judged on this device"}[met]


def table(r):
    """The printed summary: one row per number, the goal beside the two that have one."""
    data = ("CIFAR-10 training images" if r["data"] == "cifar10"
            else f"RANDOM uint8 images: no CIFAR-10 in {r['data_dir']}")
    goals = r["goals"]
    return "\n".join([
        f"device: {r['device']}, torch {r['torch']}, torchvision {r['torchvision']}",
        f"data: {data}",
        f"augmentation (the report's), {r['images']:,} images in batches of {r['batch_size']}"
        .ljust(54) + "images/s".rjust(12),
        row(f"(a) batched, common.augment_report on {r['device_type']}", f"{r['batched_images_per_s']:,.0f}"),
        row(f"(b) torchvision per image, DataLoader, {r['workers']} workers",
            f"{r['torchvision_images_per_s']:,.0f}",
            f"one pass incl. worker start-up (first batch {r['torchvision_first_batch_s']:.2f} s)"),
        row("augment_speedup (a) / (b)", f"{r['augment_speedup']:.1f}x",
            goal_note(">= 10x on CPU", goals["augment_speedup_at_least_10_on_cpu"])),
        f"training step, {r['model']}, {r['precision']}, median of {r['rounds']} blocks of "
        f"{r['steps_per_block']} steps"
        .ljust(54) + "s/step".rjust(12),
        row("(1) bare: a fixed normalised batch on the device", f"{r['step_seconds_bare']:.4f}"),
        row("(2) full: permuted slice, augment_report, step", f"{r['step_seconds_full']:.4f}"),
        row("pipeline overhead (full - bare) / full", f"{100 * r['pipeline_overhead']:.1f}%",
            goal_note("< 10% on GPU", goals["pipeline_overhead_under_10pct_on_gpu"])),
        row("(a)'s time for one batch / full step", f"{100 * r['augment_share_of_step']:.1f}%",
            "the same cost, estimated without subtracting two noisy times"),
        f"(d) bare step by precision (auto picks {r['precision']}: {r['precision_reason']})"
        .ljust(54) + "s/step".rjust(12),
        *[row(f"step_seconds_{p}", f"{r[f'step_seconds_{p}']:.4f}",
              f"{r['step_seconds_fp32'] / r[f'step_seconds_{p}']:.2f}x fp32's speed")
          for p in common.PRECISIONS if f"step_seconds_{p}" in r],
    ])


def main(argv=None):
    args = parse_args(argv)
    result = measure(args)
    print(table(result))
    if result["load_average"] is not None and result["load_average"] > BUSY_LOAD:
        print(f"WARNING: load average {result['load_average']:.1f} when the bench started: another "
              f"process was using the CPU, so these timings may be skewed; rerun when it is idle")
    if result["pipeline_overhead"] < 0:
        print("note: a negative overhead means the difference is below the timing noise")
    if args.json:
        common.write_json(args.json, result)
        print(f"saved {args.json}")
    return result


if __name__ == "__main__":
    common.cli(main)
