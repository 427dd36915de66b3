"""Train the report's plain CNN (1,125,258 parameters) on CIFAR-10.

    python train_cnn.py --epochs 20          # the report's run, with a held-out validation split
    python train_cnn.py --val-size 0         # train on all 50,000 images, exactly as the report
    python train_cnn.py --dry-run            # check everything works, in seconds

Settings are the report's: Adam, one-cycle learning rate peaking at 0.01, weight decay 1e-4,
gradient values clipped at 0.1, batch 64, 20 epochs, its augmentation (--aug report).
"val" is 5,000 training images held out and never trained on; the test accuracy printed at
the end is clean (no augmentation) on all 10,000 test images. Expected results: the README's
answer table; each run's time: docs/results.md. Then compare with:
python evaluate.py runs/cnn.pt runs/resnet9.pt
"""
import torch
import torch.nn as nn

import common


class CNN(nn.Module):
    """Three 3x3 convolutions at full resolution, one average pool, two linear layers.

    As the report's layer table: the first convolution has no bias, the others do, and no
    activation stands between the two linear layers (the table lists none).
    """

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AvgPool2d(2),  # 64 x 16 x 16
        )
        self.classifier = nn.Sequential(nn.Linear(64 * 16 * 16, 64), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def main(argv=None):
    # the command line: the report's recipe unless a flag says otherwise
    args = common.parse_args(__doc__, argv, prog="train_cnn.py")
    device = common.setup(args, "cnn")  # output folder, device, precision, resume, seed
    # data: uint8 tensors on the training device for the whole run
    data, _ = common.load_data(args.data_dir, device, args.val_size, args.subset, args.dry_run)
    # model, and its layer table to hold against the report's
    model = CNN().to(device)
    print(common.layer_table(model, device))
    if common.uses_channels_last(device, args.precision):  # NHWC: faster bf16/fp16 convolutions
        model = model.to(memory_format=torch.channels_last)
    # optimizer and the one-cycle schedule, stepped once per batch
    optimizer = torch.optim.Adam(model.parameters(), lr=args.max_lr, weight_decay=args.weight_decay)
    steps = common.steps_per_epoch(len(data["train"][1]), args.batch_size)
    scheduler = common.one_cycle(optimizer, args.max_lr, args.epochs, steps)
    # the run: each epoch train, validate, print, checkpoint; then test and save (common.fit)
    return common.fit("cnn", model, optimizer, scheduler, data, args)


if __name__ == "__main__":
    common.cli(main)
