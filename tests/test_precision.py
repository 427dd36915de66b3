"""--precision: what auto picks on each kind of hardware (probes faked), and that the bf16 and
fp16 paths train deterministically and resume exactly."""
import pytest
import torch
import torch.nn as nn

import common
import train_cnn


@pytest.mark.parametrize("capabilities, unit", [
    ({"amx_bf16": True, "avx512_bf16": True}, "AMX"),     # Intel Sapphire Rapids and later
    ({"amx_bf16": False, "avx512_bf16": True}, "AVX512-BF16"),  # AMD Zen 4, Intel Cooper Lake
    ({"amx_bf16": False, "avx512_bf16": False, "avx512_f": True}, None),  # AVX-512 alone emulates
    ({}, None),
])
def test_cpu_bf16_unit_reads_the_capabilities(monkeypatch, capabilities, unit):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities, raising=False)  # torch 2.6 has none
    assert common.cpu_bf16_unit() == unit


@pytest.mark.parametrize("flags, unit", [
    ("fpu sse avx512f avx512_bf16 amx_bf16 amx_tile", "AMX"),
    ("fpu sse avx512f avx512_bf16", "AVX512-BF16"),
    ("fpu sse avx512f", None),
])
def test_a_torch_without_the_capability_probe_reads_linux_cpu_flags(monkeypatch, tmp_path, flags, unit):
    """torch 2.6 has no torch.cpu.get_capabilities: the CPU's bfloat16 units are still found."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n\n"
                       f"processor\t: 1\nmodel name\t: Test CPU\nflags\t\t: {flags}\n")
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    monkeypatch.setattr(common, "CPUINFO", cpuinfo)
    assert common.cpu_bf16_unit() == unit
    assert common.choose_precision("cpu")[0] == ("bf16" if unit else "fp32")
    assert "Test CPU" in common.device_name(torch.device("cpu"))


def test_without_the_probe_or_linux_there_is_no_bf16(monkeypatch, tmp_path):
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    monkeypatch.setattr(common, "CPUINFO", tmp_path / "no-such-file")
    assert common.cpu_bf16_unit() is None
    assert common.choose_precision("cpu")[0] == "fp32"


@pytest.mark.skipif(not hasattr(torch.cpu, "get_capabilities") or not common.CPUINFO.exists(),
                    reason="needs a torch with the probe, on Linux")
def test_linux_cpu_flags_agree_with_torchs_probe(monkeypatch):
    """On this machine, both ways find the same bfloat16 unit (or none)."""
    with_probe = common.cpu_bf16_unit()
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    assert common.cpu_bf16_unit() == with_probe


@pytest.mark.parametrize("unit, expected", [("AMX", "bf16"), ("AVX512-BF16", "bf16"), (None, "fp32")])
def test_auto_on_the_cpu(monkeypatch, unit, expected):
    monkeypatch.setattr(common, "cpu_bf16_unit", lambda: unit)
    precision, reason = common.choose_precision("cpu")
    assert precision == expected
    assert (unit or "without bfloat16") in reason


@pytest.mark.parametrize("capability, expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((8, 6), "bf16"),
                                                  ((7, 5), "fp16"), ((7, 0), "fp16"), ((6, 1), "fp32"),
                                                  ((6, 0), "fp32")])
def test_auto_on_cuda(monkeypatch, capability, expected):
    """H100/A100/RTX 30xx have bfloat16 units; Colab's T4 (7.5) and the V100 (7.0) float16 tensor
    cores only; a P100 (6.0) or a GTX 10xx (6.1) neither, so they stay in float32."""
    monkeypatch.setattr(common, "cuda_capability", lambda device: capability)
    precision, reason = common.choose_precision(torch.device("cuda"))
    assert precision == expected
    assert f"{capability[0]}.{capability[1]}" in reason


def test_asked_for_is_taken_and_emulation_is_said(monkeypatch):
    monkeypatch.setattr(common, "cpu_bf16_unit", lambda: None)
    monkeypatch.setattr(common, "cuda_capability", lambda device: (7, 5))
    assert common.choose_precision("cpu", "fp32") == ("fp32", "--precision fp32")
    assert common.choose_precision("cpu", "bf16")[0] == "bf16"
    assert "emulated" in common.choose_precision("cpu", "bf16")[1]
    assert "emulated" in common.choose_precision("cpu", "fp16")[1]
    assert "emulated" in common.choose_precision(torch.device("cuda"), "bf16")[1]
    assert common.choose_precision(torch.device("cuda"), "fp16") == ("fp16", "--precision fp16")


def test_the_run_prints_records_and_enforces_its_precision(tiny_data_dir, tmp_path, capsys):
    args = ["--data-dir", str(tiny_data_dir), "--out", str(tmp_path), "--val-size", "100",
            "--epochs", "2", "--device", "cpu", "--precision", "bf16"]
    result = train_cnn.main(args + ["--stop-after", "1"])
    assert result is None
    assert "precision: bf16 (--precision bf16" in capsys.readouterr().out
    state = torch.load(tmp_path / "cnn.pt", weights_only=True)
    assert state["config"]["precision"] == "bf16" and state["scaler"] is None
    with pytest.raises(common.UserError, match="--precision bf16, this run has --precision fp32"):
        train_cnn.main(args[:-1] + ["fp32", "--resume", str(tmp_path / "cnn.pt")])


def test_auto_on_a_resume_keeps_the_runs_precision(tiny_data_dir, tmp_path, monkeypatch, capsys):
    """A run started where auto picked bf16 and resumed where it would pick fp32 (another
    machine: a T4 after an A100 on Colab) continues in bf16 instead of being refused."""
    args = ["--data-dir", str(tiny_data_dir), "--out", str(tmp_path), "--val-size", "100",
            "--epochs", "2", "--device", "cpu"]
    train_cnn.main(args + ["--precision", "bf16", "--stop-after", "1"])
    monkeypatch.setattr(common, "cpu_bf16_unit", lambda: None)  # the other machine
    result = train_cnn.main(args + ["--resume", str(tmp_path / "cnn.pt")])
    assert result["config"]["precision"] == "bf16"
    assert "precision: bf16 (as the run started; auto would pick fp32 here)" in capsys.readouterr().out


def test_a_resume_lays_the_model_out_for_the_runs_precision(tiny_data_dir, tmp_path, monkeypatch):
    """A float32 run resumed where auto would pick bf16: the model must be put in the layout of
    the run's precision (float32's default), the same as its batches, not in auto's."""
    args = ["--data-dir", str(tiny_data_dir), "--out", str(tmp_path), "--val-size", "100",
            "--epochs", "2", "--device", "cpu"]
    train_cnn.main(args + ["--precision", "fp32", "--stop-after", "1"])
    monkeypatch.setattr(common, "cpu_bf16_unit", lambda: "AMX")  # auto: bf16 and channels_last here
    asked, layout = [], common.uses_channels_last
    monkeypatch.setattr(common, "uses_channels_last", lambda device, precision: asked.append(precision)
                        or layout(device, precision))
    result = train_cnn.main(args + ["--resume", str(tmp_path / "cnn.pt")])
    assert result["config"]["precision"] == "fp32"
    assert asked and set(asked) == {"fp32"}  # the model's layout and every batch's


def test_a_checkpoint_from_before_precision_resumes(tiny_data_dir, tmp_path):
    """Checkpoints saved before --precision existed have no such setting: they trained in fp32
    on a CPU, so they resume in fp32 (and without a scaler)."""
    args = ["--data-dir", str(tiny_data_dir), "--out", str(tmp_path), "--val-size", "100",
            "--epochs", "2", "--device", "cpu"]
    train_cnn.main(args + ["--precision", "fp32", "--stop-after", "1"])
    state = torch.load(tmp_path / "cnn.pt", weights_only=True)
    del state["config"]["precision"], state["scaler"]
    torch.save(state, tmp_path / "cnn.pt")
    result = train_cnn.main(args + ["--resume", str(tmp_path / "cnn.pt")])
    assert result["config"]["precision"] == "fp32" and len(result["history"]) == 2


def test_a_bf16_cpu_run_is_deterministic(tiny_data_dir, tmp_path):
    def run(out):
        train_cnn.main(["--data-dir", str(tiny_data_dir), "--out", str(out), "--val-size", "100",
                        "--epochs", "1", "--device", "cpu", "--precision", "bf16"])
        return torch.load(out / "cnn.pt", weights_only=True)["model"]
    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


class Tiny(nn.Module):
    """A convolution and a linear layer: float16 on a CPU is emulated, far too slow for the CNN."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, stride=4), nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(self.conv(x).relu().flatten(1))


def fit_tiny(out, *extra):
    """common.fit, the training scripts' loop, on Tiny in fp16 with a gradient scaler."""
    args = common.parse_args("", ["--out", str(out), "--epochs", "2", "--device", "cpu",
                                  "--precision", "fp16", "--batch-size", "16", *extra])
    common.setup(args, "tiny")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (96,), generator=gen)
    data = {"train": (images[:64], labels[:64]), "val": (images[64:80], labels[64:80]),
            "test": (images[80:], labels[80:])}
    model = Tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.max_lr, weight_decay=args.weight_decay)
    scheduler = common.one_cycle(optimizer, args.max_lr, args.epochs, common.steps_per_epoch(64, 16))
    common.fit("tiny", model, optimizer, scheduler, data, args)
    return torch.load(out / "tiny.pt", weights_only=True)


def test_an_fp16_run_resumes_exactly_with_its_scaler(tmp_path):
    straight = fit_tiny(tmp_path / "straight")
    assert straight["config"]["precision"] == "fp16"
    assert straight["scaler"]["scale"] > 0  # the scaler's state is saved
    fit_tiny(tmp_path / "split", "--stop-after", "1")
    resumed = fit_tiny(tmp_path / "split", "--resume", str(tmp_path / "split" / "tiny.pt"))
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    assert straight["scaler"] == resumed["scaler"]  # its growth tracker moves every step


def test_unscaled_before_clipping(tmp_path, monkeypatch):
    """The gradients that reach clip_grad_value_ are the true ones, not multiplied by the scale."""
    seen, original = [], common.clip_gradients

    def spy(model, grad_clip, clip_norm):
        seen.append(max(p.grad.abs().max().item() for p in model.parameters()))
        original(model, grad_clip, clip_norm)

    monkeypatch.setattr(common, "clip_gradients", spy)
    fit_tiny(tmp_path, "--epochs", "1")
    assert seen and max(seen) < 100  # multiplied by the scaler's 65,536 they would be in the thousands
