"""Pictures of what the model sees: a few test images, clean and through each --aug pipeline.

    python show_augmentations.py --data-dir data --out docs/augmentations.png

One column per class (its first test image). The top row is the clean image, as the honest
test pass sees it (--aug none: normalisation only). Then --aug standard, then the report's own
pipeline, --aug report, several random draws each: the report ran its test images through --aug report
"100 times", and every pass drew new crops, rotations and erasings, as these rows do.
Grey boxes are the erasing (value 0 after Normalize), black corners the rotation's fill.
Needs matplotlib (pip install matplotlib; Colab has it). The same --seed gives the same picture.
"""
import argparse

import torch

import common

DRAWS = {"none": 1, "standard": 2, "report": 4}  # rows per pipeline: a random one needs several


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="show_augmentations.py", description=__doc__,
                                formatter_class=common.HelpFormatter)
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py (downloaded if missing)")
    p.add_argument("--out", default="runs/augmentations.png", help="the PNG to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    return p.parse_args(argv)


def pictures(images, seed):
    """[(row label, float images in [0, 1])]: each pipeline's output with Normalize undone."""
    gen = torch.Generator().manual_seed(seed)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (common.MEAN, common.STD))
    rows = []
    for aug, draws in DRAWS.items():
        for draw in range(1, draws + 1):
            label = "clean (none)" if aug == "none" else f"{aug}, draw {draw}"
            rows.append((label, common.AUGMENTATIONS[aug](images, gen) * std + mean))
    return rows


def main(argv=None):
    args = parse_args(argv)
    plt = common.pyplot()  # checked first: no point loading the data for a picture that cannot be drawn
    if plt is None:
        raise common.UserError("matplotlib is needed to draw the picture: pip install matplotlib")
    _, _, test_x, test_y, classes = common.load_cifar10(args.data_dir)
    first = [int((test_y == c).nonzero()[0]) for c in range(common.NUM_CLASSES)]
    rows = pictures(test_x[first], args.seed)
    fig, axes = plt.subplots(len(rows), len(first), figsize=(8, 5.7), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c, image in enumerate(images):
            ax = axes[r, c]
            ax.imshow(image.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set(xticks=[], yticks=[])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
            if r == 0:
                ax.set_title(classes[c], fontsize=9)
    fig.suptitle("What the model sees: test images, clean and through each --aug pipeline")
    fig.tight_layout()
    try:
        common.save_atomic(args.out, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    common.cli(main)
