"""Every subcommand that reads a model directory answers every broken file with one line and status 2.

The table below damages one thing at a time in a real model directory (as ``kphi train`` leaves it) and
feeds it to each command that reads it. The answer must be a single ``kphi: error:`` line naming the
problem, exit status 2, no traceback, the directory byte-for-byte unchanged and nothing written.
"""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from kphi.cli import main

from processes import run_cli


def _set_config(**changes):
    def mutate(d: Path):
        config = json.loads((d / "config.json").read_text())
        config.update(changes)
        (d / "config.json").write_text(json.dumps(config))
    return mutate


def _truncate(name, keep=0.5):
    def mutate(d: Path):
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: int(len(data) * keep)])
    return mutate


def _write(name, text):
    return lambda d: (d / name).write_text(text)


def _edit_json(name, edit):
    def mutate(d: Path):
        value = json.loads((d / name).read_text())
        edit(value)
        (d / name).write_text(json.dumps(value))
    return mutate


def _remove(name):
    return lambda d: (d / name).unlink()


# damage -> (how, the words the message must contain, whether only the config is read)
DAMAGE = {
    "no such directory": (None, "does not exist", True),
    "empty directory": ("empty", "no config.json", True),
    "foreign directory": ("foreign", "no config.json", True),
    "config missing": (_remove("config.json"), "no config.json", True),
    "config empty": (_write("config.json", ""), "config.json", True),
    "config truncated": (_truncate("config.json"), "config.json", True),
    "config wrong type": (_write("config.json", "[1, 2]"), "config.json", True),
    "config not UTF-8": (lambda d: (d / "config.json").write_bytes(b"\xff\xfe{}"), "config.json", True),
    "config impossible shape": (_set_config(hidden_size=30), "hidden_size (30)", True),
    "config no key-value heads": (_set_config(num_key_value_heads=0), "num_key_value_heads must be a positive integer", True),
    "config unknown projection kind": (_set_config(projection={"kind": "sparse"}), "unknown projection kind 'sparse'", True),
    "weights missing": (_remove("model.safetensors"), "model.safetensors is missing", False),
    "weights empty": (_write("model.safetensors", ""), "model.safetensors", False),
    "weights truncated": (_truncate("model.safetensors", 0.7), "not a complete safetensors file", False),
    "weights wrong type": (_write("model.safetensors", "not tensors at all"), "model.safetensors", False),
    "weights wrong shape": (_set_config(intermediate_size=64), "wrong shape", False),
    "weights of a smaller model": (_set_config(num_hidden_layers=3), "tensors missing", False),
    "weight index not a map": (_write("model.safetensors.index.json", '{"weight_map": ["model.safetensors"]}'), "weight_map", False),
    "weight index outside the directory": (_write("model.safetensors.index.json", '{"weight_map": {"w": "../model.safetensors"}}'),
                                           "weight_map", False),
    "tokenizer truncated": (_truncate("tokenizer.json"), "tokenizer.json", False),
    "tokenizer without added tokens": (_edit_json("tokenizer.json", lambda t: t.pop("added_tokens")), "missing key 'added_tokens'", False),
    "tokenizer vocabulary wrong type": (_edit_json("tokenizer.json", lambda t: t["model"].__setitem__("vocab", 5)),
                                        "cannot load the tokenizer", False),
    "tokenizer config wrong type": (_write("tokenizer_config.json", "7"), "tokenizer_config.json", False),
    "generation config truncated": (_truncate("generation_config.json"), "generation_config.json", False),
}

COMMANDS = {
    "generate": lambda d, tmp: ["generate", str(d), "--prompt", "hi", "--max-new-tokens", "2"],
    "chat": lambda d, tmp: ["chat", str(d)],
    "export": lambda d, tmp: ["export", str(d), str(tmp / "exported")],
    "export --onnx": lambda d, tmp: ["export", str(d), str(tmp / "exported"), "--onnx"],
    "params": lambda d, tmp: ["params", str(d)],
    "train --preset": lambda d, tmp: ["train", "--preset", str(d), "--max-steps", "1", "--out", str(tmp / "run")],
}
CONFIG_ONLY = {"params", "train --preset"}


def _snapshot(root: Path) -> dict[str, str]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _damaged_copy(model_dir: Path, tmp: Path, damage: str) -> Path:
    how = DAMAGE[damage][0]
    target = tmp / "model"
    if how is None:
        return target  # never created
    target.mkdir()
    if how == "foreign":
        (target / "notes.txt").write_text("mine")
    elif how != "empty":
        for item in model_dir.iterdir():
            if item.is_file():
                shutil.copy2(item, target / item.name)
        how(target)
    return target


CASES = [
    (command, damage)
    for command in COMMANDS
    for damage, (_, _, config_only) in DAMAGE.items()
    if command not in CONFIG_ONLY or config_only
]


@pytest.mark.parametrize("command,damage", CASES, ids=[f"{c}|{d}" for c, d in CASES])
def test_broken_input_is_one_line_and_exit_2(trained_model_dir, tmp_path, capsys, monkeypatch, command, damage):
    monkeypatch.setattr("sys.stdin", open("/dev/null"))
    target = _damaged_copy(trained_model_dir, tmp_path, damage)
    before = _snapshot(target)
    status = main(COMMANDS[command](target, tmp_path))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("kphi: error:")]
    assert status == 2, err
    assert len(errors) == 1 and DAMAGE[damage][1] in errors[0], err
    assert "Traceback" not in err
    assert _snapshot(target) == before
    assert not (tmp_path / "exported").exists() and not (tmp_path / "run").exists()


def test_the_undamaged_directory_works_with_every_command(trained_model_dir, tmp_path, capsys, monkeypatch):
    """The table's control: the same commands succeed on the directory the damage starts from."""
    monkeypatch.setattr("sys.stdin", open("/dev/null"))
    for command in ("generate", "chat", "export", "params"):
        assert main(COMMANDS[command](trained_model_dir, tmp_path)) == 0, (command, capsys.readouterr().err)
        shutil.rmtree(tmp_path / "exported", ignore_errors=True)


@pytest.mark.parametrize("command", ["generate", "export"])
def test_a_truncated_weights_file_in_a_real_process(trained_model_dir, tmp_path, command):
    target = _damaged_copy(trained_model_dir, tmp_path, "weights truncated")
    result = run_cli(*COMMANDS[command](target, tmp_path), cache=tmp_path / "cache")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("kphi: error:")
