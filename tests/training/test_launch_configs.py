"""The accelerate/DeepSpeed launch files ship inside the package (and the wheel) and parse as accelerate reads them."""

import subprocess
import sys
import zipfile

import pytest

from processes import run_cli

from kphi.training.launch_configs import LaunchConfigError, launch_config, launch_configs


def test_every_shipped_launch_file_parses_as_accelerate_reads_it():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = launch_configs()
    assert set(configs) == {"ddp-gpus", "fsdp", "deepspeed", "deepspeed-zero2"}
    expected = {"ddp-gpus": "MULTI_GPU", "fsdp": "FSDP", "deepspeed": "DEEPSPEED"}
    for name, kind in expected.items():
        config = load_config_from_file(str(configs[name]))
        assert config.distributed_type.value == kind, name
    fsdp = load_config_from_file(str(configs["fsdp"])).fsdp_config
    # no layer class named: accelerate wraps the model's _no_split_modules, so converted models shard too
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and "fsdp_transformer_layer_cls_to_wrap" not in fsdp
    deepspeed = load_config_from_file(str(configs["deepspeed"])).deepspeed_config
    assert deepspeed["zero_stage"] == 2 and "deepspeed_config_file" not in deepspeed  # no path relative to a checkout


def test_kphi_configs_prints_a_path_or_one_line_for_an_unknown_name():
    run = run_cli("configs", "fsdp")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(launch_config("fsdp")) and launch_config("fsdp.yaml") == launch_config("fsdp")
    bad = run_cli("configs", "fsdp3")
    assert bad.returncode == 2 and bad.stderr.startswith("kphi: error: no launch file named 'fsdp3'")
    with pytest.raises(LaunchConfigError):
        launch_config("ddp")


def test_the_wheel_carries_the_launch_files(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path), str(root)], capture_output=True, text=True, timeout=300)
    if build.returncode != 0 and "No module named" in build.stderr:
        pytest.skip(f"cannot build a wheel here: {build.stderr.strip().splitlines()[-1]}")
    assert build.returncode == 0, build.stderr
    wheel = next(tmp_path.glob("kphi-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in launch_configs():
        assert any(n.startswith("kphi/configs/") and Path(n).stem == name for n in names), name
