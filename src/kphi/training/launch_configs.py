"""The accelerate and DeepSpeed files kphi ships, found from the installed package.

``src/kphi/configs/`` holds them (in the wheel too): ``ddp-gpus.yaml`` (every GPU of a node), ``fsdp.yaml``
(FSDP 2, wrapping the model's ``_no_split_modules``), ``deepspeed.yaml`` (ZeRO-2, settings inline) and
``deepspeed-zero2.json`` (DeepSpeed's own format, for ``--deepspeed``). ``kphi configs`` lists them;
``kphi configs NAME`` prints one path, for ``accelerate launch --config_file "$(kphi configs fsdp)" -m kphi train ...``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import KphiError

__all__ = ["LaunchConfigError", "launch_configs", "launch_config", "describe_launch_config"]


class LaunchConfigError(KphiError, ValueError):
    """No shipped launch file has that name."""


def launch_configs() -> dict[str, Path]:
    """Every shipped launch file, by name (its file name without the extension)."""
    folder = Path(str(resources.files("kphi") / "configs"))
    return {path.stem: path for path in sorted(folder.iterdir()) if path.suffix in (".yaml", ".json")}


def launch_config(name: str) -> Path:
    """The path of the shipped launch file ``name`` (``fsdp``, ``fsdp.yaml``, ...)."""
    configs = launch_configs()
    stem = Path(name).stem if Path(name).suffix in (".yaml", ".json") else name
    if stem not in configs:
        raise LaunchConfigError(f"no launch file named {name!r}; kphi ships {', '.join(configs)}")
    return configs[stem]


def describe_launch_config(path: Path) -> str:
    """The first comment line of a YAML file (what it is for), or the format of a JSON one."""
    if path.suffix == ".json":
        return "DeepSpeed's own JSON (Trainer --deepspeed, or deepspeed_config_file in an accelerate file)"
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").rstrip(":")
    return ""
