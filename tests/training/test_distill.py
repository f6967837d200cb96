"""Healing by distillation: ``kphi train --init-from STUDENT --distill-from TEACHER``.

The loss is checked against a per-position reference; runs train (in-process), get killed (a real process),
resume to the same losses, and leave a normal model directory holding the student only.
"""


import pytest
import torch
from safetensors import safe_open
from torch.nn import functional as F

from corpus import prepare_small
from processes import kill_after_checkpoint, run_cli
from processes import train_losses as losses
from kphi.convert import convert_to_dir
from kphi.training.distill import distillation_loss

TINY = ["--preset", "tiny-phi3", "--context-length", "32", "--batch-size", "4", "--logging-steps", "1", "--quiet"]




@pytest.mark.fast
def test_distillation_loss_is_the_temperature_scaled_kl_on_labelled_positions():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.tensor([[3, 1, -100, 4, 2], [-100, -100, 6, 0, 5]])
    temperature = 2.0
    terms = []
    for b in range(2):
        for t in range(4):  # logits at t predict labels[t + 1]
            if labels[b, t + 1] == -100:
                continue
            p = F.softmax(teacher[b, t] / temperature, dim=-1)
            q = F.softmax(student[b, t] / temperature, dim=-1)
            terms.append((p * (p.log() - q.log())).sum())
    expected = temperature**2 * torch.stack(terms).mean()
    torch.testing.assert_close(distillation_loss(student, teacher, labels, temperature), expected)
    assert float(distillation_loss(teacher, teacher, labels, temperature)) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(distillation_loss(student, teacher, labels, temperature, num_items=len(terms) * 2), expected / 2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Prepared data, a dense teacher trained for 6 steps, and the teacher compressed into a grouped student."""
    root = tmp_path_factory.mktemp("distill")
    prepared = prepare_small(root)
    teacher = root / "teacher"
    run = run_cli("train", *TINY, "--data", str(prepared), "--out", str(teacher), "--max-steps", "6", "--learning-rate", "3e-3")
    assert run.returncode == 0, run.stderr
    student = root / "student"
    convert_to_dir(teacher, student, kind={"kind": "grouped", "min_channels_per_group": 16}, progress=False)
    return prepared, teacher, student


def distill_args(prepared, teacher, student, out, steps=10):
    return ["train", *TINY, "--data", str(prepared), "--init-from", str(student), "--distill-from", str(teacher),
            "--distill-alpha", "0.7", "--distill-temperature", "2", "--out", str(out), "--max-steps", str(steps),
            "--save-steps", "2", "--eval-steps", "5"]


@pytest.fixture(scope="module")
def full_distill_run(setup, tmp_path_factory):
    prepared, teacher, student = setup
    out = tmp_path_factory.mktemp("runs") / "full"
    run = run_cli(*distill_args(prepared, teacher, student, out))
    assert run.returncode == 0, run.stderr
    return out


def test_distillation_trains_the_student_into_a_normal_model_dir(setup, full_distill_run, tmp_path):
    prepared, teacher, student = setup
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(full_distill_run)
    start = AutoModelForCausalLM.from_pretrained(student)
    with safe_open(str(full_distill_run / "model.safetensors"), framework="pt") as handle:
        saved = set(handle.keys())
    assert saved == set(start.state_dict())  # the student's tensors, nothing of the teacher
    assert any(not torch.equal(p, start.get_parameter(n)) for n, p in model.named_parameters())
    curve = losses(full_distill_run)
    assert len(curve) == 10
    # the mixed loss differs from plain training from the same start: the teacher is in the loop
    plain = tmp_path / "plain"
    run = run_cli("train", *TINY, "--data", str(prepared), "--init-from", str(student), "--out", str(plain), "--max-steps", "10",
               "--save-steps", "2", "--eval-steps", "5")
    assert run.returncode == 0, run.stderr
    assert losses(plain)[1] != pytest.approx(curve[1], rel=1e-3)


def test_distillation_resumes_after_a_kill_to_the_same_losses(setup, full_distill_run, tmp_path):
    prepared, teacher, student = setup
    out = tmp_path / "killed"
    kill_after_checkpoint(distill_args(prepared, teacher, student, out), out, step=4)
    resumed = run_cli(*distill_args(prepared, teacher, student, out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    expected, got = losses(full_distill_run), losses(out)
    for step in range(5, 11):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def test_a_teacher_with_another_vocabulary_is_refused(setup, tmp_path):
    prepared, teacher, student = setup
    from corpus import write_corpus
    from kphi.data.prepare import PrepareSettings, prepare_dataset

    corpus = write_corpus(tmp_path / "c.jsonl", pairs=100, seed=3)
    small_vocab = prepare_dataset(PrepareSettings(source=str(corpus), tokenizer="bpe", vocab_size=280, context_length=32,
                                                  validation_rows=10), out_dir=tmp_path / "p280", cache_dir=tmp_path / "cache", progress=False)
    run = run_cli("train", *TINY, "--data", str(small_vocab), "--init-from", str(student), "--out", str(tmp_path / "x"), "--max-steps", "2")
    assert run.returncode == 2 and "vocabulary" in run.stderr and "Traceback" not in run.stderr
    run = run_cli("train", *TINY, "--data", str(prepared), "--distill-from", str(tmp_path), "--out", str(tmp_path / "y"), "--max-steps", "2")
    assert run.returncode == 2 and "not a model directory" in run.stderr
