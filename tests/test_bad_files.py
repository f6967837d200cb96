"""A file a user hands kphi that is not what it should be: a suite, a preset, a config, a corpus definition.

Each case starts from a file that works (a bundled suite or preset), damages one field, and runs the command
that reads it. The answer must be one ``kphi: error:`` line naming what is wrong, exit status 2, no
traceback, and nothing written in the working directory but the damaged file itself.
"""

import json

import pytest
import yaml

from kphi.experiments.suites import read_suite_yaml
from kphi.presets import load_preset

from processes import run_cli

NOT_UTF8 = b"\xff\xfename: x\n"


def _suite(base: str, **changes):
    """The bundled suite ``base`` with ``changes`` applied (a value of ``None`` removes the key)."""
    data = read_suite_yaml(base)[1]
    for key, value in changes.items():
        data.pop(key) if value is None else data.__setitem__(key, value)
    return yaml.safe_dump(data)


# case -> (the file's name, its content, the command (FILE: the file), the words the error line must hold)
CASES = {
    "compare: data not a mapping": ("s.yaml", _suite("smoke", data=[1]), ["compare", "--suite", "FILE", "--dry-run", "--out", "o"],
                                    "data must be a mapping of data settings, got [1]"),
    "compare: a data setting that does not exist": ("s.yaml", _suite("smoke", data={"bogus": 1}),
                                                    ["compare", "--suite", "FILE", "--dry-run", "--out", "o"], "data: no setting 'bogus'"),
    "compare: seeds a word": ("s.yaml", _suite("smoke", seeds="abc"), ["compare", "--suite", "FILE", "--dry-run", "--out", "o"],
                              "seeds must be a whole number of at least 1, got 'abc'"),
    "compare: no seeded budgets": ("s.yaml", _suite("smoke", seeded_budgets=0), ["compare", "--suite", "FILE", "--dry-run", "--out", "o"],
                                   "seeded_budgets must be a whole number of at least 1, got 0"),
    "compare: a suite that is not UTF-8": ("s.yaml", NOT_UTF8, ["compare", "--suite", "FILE", "--dry-run", "--out", "o"],
                                           "cannot read suite"),
    "scale: seeds a word": ("s.yaml", _suite("scaling-smoke", seeds="abc"), ["scale", "--suite", "FILE", "--dry-run"],
                            "seeds must be a whole number of at least 1, got 'abc'"),
    "scale: a budget value that is no number": ("s.yaml", _suite("scaling-smoke", budget={"reference_width": 64, "reference_tokens": 1000,
                                                                                          "exponent": "x"}),
                                                ["scale", "--suite", "FILE", "--dry-run"], "every value of 'budget' must be a number"),
    "scale: data not a mapping": ("s.yaml", _suite("scaling-smoke", data=[1]), ["scale", "--suite", "FILE", "--dry-run"],
                                  "data must be a mapping"),
    "compress: a list, not a suite": ("s.yaml", "- 1\n- 2\n", ["compress", "--suite", "FILE", "--out", "o"], "is not a compress suite"),
    "compress: teacher a number": ("s.yaml", _suite("compress-smoke", teacher=5), ["compress", "--suite", "FILE", "--out", "o"],
                                   "teacher needs preset, tokens and learning_rate"),
    "compress: compressions a number": ("s.yaml", _suite("compress-smoke", compressions=5), ["compress", "--suite", "FILE", "--out", "o"],
                                        "every compression needs a label and a kind"),
    "compress: a data setting that does not exist": ("s.yaml", _suite("compress-smoke", data={"bogus": 1}),
                                                     ["compress", "--suite", "FILE", "--out", "o"], "data: no setting 'bogus'"),
    "structure: a data setting that does not exist": ("s.yaml", _suite("compress-smollm2", data={"bogus": 1}),
                                                      ["compress", "--suite", "FILE", "--out", "o"], "data: no setting 'bogus'"),
    "structure: fits a number": ("s.yaml", _suite("compress-smollm2", fits=5), ["compress", "--suite", "FILE", "--out", "o"],
                                 "every fit needs a unique label"),
    "structure: heal a number": ("s.yaml", _suite("compress-smollm2", heal=5), ["compress", "--suite", "FILE", "--out", "o"],
                                 "heal must be a mapping"),
    "preset: training a list": ("p.yaml", None, ["params", "FILE"], "'training' must be a mapping of training settings"),
    "preset: baseline a list": ("p.yaml", None, ["params", "FILE"], "'baseline' must be a preset name"),
    "preset: not UTF-8": ("p.yaml", NOT_UTF8, ["params", "FILE"], "cannot read preset"),
    "config: not UTF-8": ("config.json", NOT_UTF8, ["params", "FILE"], "cannot read"),
    "config: no key-value heads": ("config.json", None, ["params", "FILE"], "num_key_value_heads must be a positive integer, got 0"),
    "corpus: not UTF-8": ("corpus.yaml", NOT_UTF8, ["data", "prepare", "--source", "FILE", "--out", "o"], "cannot be read"),
}


def _preset_file(case: str) -> str:
    """The bundled tiny-kphi3 preset, with the case's one damage."""
    data = yaml.safe_load(load_preset("tiny-kphi3").path.read_text())
    if case == "preset: training a list":
        data["training"] = [1, 2]
    elif case == "preset: baseline a list":
        data["baseline"] = ["tiny-phi3"]
    elif case == "config: no key-value heads":
        return json.dumps({**data["config"], "num_key_value_heads": 0})
    return yaml.safe_dump(data)


@pytest.mark.parametrize("case", CASES)
def test_a_damaged_file_is_one_error_line_and_writes_nothing(case, tmp_path, monkeypatch):
    name, content, command, words = CASES[case]
    content = _preset_file(case) if content is None else content
    path = tmp_path / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    monkeypatch.chdir(tmp_path)
    result = run_cli(*[str(path) if a == "FILE" else a for a in command])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("kphi: error:") and words in last, last
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no --out, no cache, no partial output


@pytest.mark.parametrize("flags, words", [
    (["bench", "--quick", "--device", "bogus"], "--device 'bogus' is not a device torch knows"),
    (["generate", "nothing", "--prompt", "hi", "--temperature", "1e-300"],
     "temperature must be 0 (greedy decoding) or at least 0.0001, got 1e-300"),
    (["generate", "nothing", "--prompt", "hi", "--temperature", "inf"], "temperature must be a number >= 0, got inf"),
])
def test_a_flag_value_the_library_refuses_is_one_error_line(flags, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli(*flags)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert words in result.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []
