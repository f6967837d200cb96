"""The ``kphi`` command run as a real subprocess."""

import json
import subprocess
import sys


def run_kphi(*args, **kw):
    return subprocess.run([sys.executable, "-m", "kphi", *args], capture_output=True, text=True, timeout=300, **kw)


def test_params_json_reports_the_report_count():
    result = run_kphi("params", "JP47D55C", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["non_embedding"] == 35_011_584
    assert report["total"] == report["embedding"] + report["non_embedding"]


def test_params_table_lists_all_presets():
    result = run_kphi("params")
    assert result.returncode == 0, result.stderr
    for name in ("JP47D54C", "JP47D55C", "JP47D56C", "tiny-phi3", "tiny-kphi3"):
        assert name in result.stdout
    assert "35,011,584" in result.stdout


def test_unknown_preset_is_one_clear_line_and_exit_2():
    result = run_kphi("params", "JP00")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "unknown preset 'JP00'" in result.stderr
    assert "Traceback" not in result.stderr


def test_inconsistent_config_file_is_rejected(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "kphi3", "hidden_size": 100, "num_attention_heads": 32}))
    result = run_kphi("params", str(bad))
    assert result.returncode == 2
    assert "divisible by num_attention_heads" in result.stderr
    assert "Traceback" not in result.stderr
