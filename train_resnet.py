"""Train the report's ResNet9 (6,637,194 parameters) on CIFAR-10.

    python train_resnet.py --epochs 20       # the report's run, with a held-out validation split
    python train_resnet.py --val-size 0      # train on all 50,000 images, exactly as the report
    python train_resnet.py --dry-run         # check everything works, in seconds

Settings are the report's: Adam, one-cycle learning rate peaking at 0.01, weight decay 1e-4,
gradient values clipped at 0.1, batch 64, 20 epochs, its augmentation (--aug report).
"val" is 5,000 training images held out and never trained on; the test accuracy printed at
the end is clean (no augmentation) on all 10,000 test images. Expected results: the README's
answer table; each run's time: docs/results.md. On a 2-core CPU a run takes hours (an epoch
took about 10 minutes in bf16 there with two runs sharing the CPU, 5 with one run alone): use
a GPU, or split the run with --stop-after and --resume.
"""
import torch
import torch.nn as nn

import common


def conv_block(in_channels, out_channels, pool=False):
    """3x3 convolution (with bias), BatchNorm, ReLU, and optionally a 2x2 max pool."""
    layers = [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
              nn.BatchNorm2d(out_channels), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class ResNet9(nn.Module):
    """The report's ResNet9: two residual blocks of two convolutions each, x + res(x).

    Layer by layer as its table; like the table, no activation between the two linear layers.
    """

    def __init__(self, num_classes=10):
        super().__init__()
        self.prep = nn.Sequential(conv_block(3, 64), conv_block(64, 128, pool=True))   # 128 x 16 x 16
        self.res1 = nn.Sequential(conv_block(128, 128), conv_block(128, 128))
        self.down = nn.Sequential(conv_block(128, 256, pool=True), conv_block(256, 512, pool=True))  # 512 x 4 x 4
        self.res2 = nn.Sequential(conv_block(512, 512), conv_block(512, 512))
        self.classifier = nn.Sequential(nn.MaxPool2d(4), nn.Flatten(),
                                        nn.Linear(512, 128), nn.Linear(128, num_classes))

    def forward(self, x):
        x = self.prep(x)
        x = x + self.res1(x)
        x = self.down(x)
        x = x + self.res2(x)
        return self.classifier(x)


def main(argv=None):
    # the command line: the report's recipe unless a flag says otherwise
    args = common.parse_args(__doc__, argv, prog="train_resnet.py")
    device = common.setup(args, "resnet9")  # output folder, device, precision, resume, seed
    # data: uint8 tensors on the training device for the whole run
    data, _ = common.load_data(args.data_dir, device, args.val_size, args.subset, args.dry_run)
    # model, and its layer table to hold against the report's
    model = ResNet9().to(device)
    print(common.layer_table(model, device))
    if common.uses_channels_last(device, args.precision):  # NHWC: faster bf16/fp16 convolutions
        model = model.to(memory_format=torch.channels_last)
    # optimizer and the one-cycle schedule, stepped once per batch
    optimizer = torch.optim.Adam(model.parameters(), lr=args.max_lr, weight_decay=args.weight_decay)
    steps = common.steps_per_epoch(len(data["train"][1]), args.batch_size)
    scheduler = common.one_cycle(optimizer, args.max_lr, args.epochs, steps)
    # the run: each epoch train, validate, print, checkpoint; then test and save (common.fit)
    return common.fit("resnet9", model, optimizer, scheduler, data, args)


if __name__ == "__main__":
    common.cli(main)
