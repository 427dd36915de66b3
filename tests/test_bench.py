"""bench.py end to end in seconds: tiny sizes, the CNN, random images (no data folder)."""
import json

import bench


def test_bench_writes_consistent_numbers(tmp_path):
    out = tmp_path / "bench.json"
    returned = bench.main(["--device", "cpu", "--images", "256", "--steps", "1", "--model", "cnn",
                           "--data-dir", str(tmp_path / "no-data"), "--json", str(out)])
    result = json.loads(out.read_text())
    assert result == returned
    assert result["data"] == "random"  # no cifar-10-batches-py there: random images, and said so
    for key in ("batched_images_per_s", "torchvision_images_per_s", "augment_speedup",
                "step_seconds_bare", "step_seconds_full", "torchvision_first_batch_s"):
        assert result[key] > 0, key
    speedup = result["batched_images_per_s"] / result["torchvision_images_per_s"]
    assert abs(result["augment_speedup"] - speedup) <= 1e-6 * speedup
    bare, full = result["step_seconds_bare"], result["step_seconds_full"]
    assert abs(result["pipeline_overhead"] - (full - bare) / full) < 1e-9
    assert result["pipeline_overhead"] < 1  # a fraction of the step, not a percentage
    assert (result["images"], result["steps_per_block"], result["model"]) == (256, 1, "cnn")
    assert result["device_type"] == "cpu" and result["torch"] and result["device"]
    assert result["goals"]["pipeline_overhead_under_10pct_on_gpu"] is None  # a GPU goal, not judged on CPU
    # (d): both precisions timed side by side on a CPU; float16, emulated there, is not
    assert result["step_seconds_fp32"] > 0 and result["step_seconds_bf16"] > 0
    assert "step_seconds_fp16" not in result
    assert result["precision"] in ("fp32", "bf16") and result["precision_reason"]
