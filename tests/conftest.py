"""Shared fixtures: a deterministic seed for every test and one trained model directory."""

import os

# The CLI runs in this process in most tests (processes.run_cli): offline, as a user's subprocess would be.
# huggingface_hub reads HF_HUB_OFFLINE when it is imported, so this comes before any import of it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under ``pytest -n N`` every worker (and every process a test starts) computes on one thread: N workers with
# torch's default of one thread per core oversubscribe the cores, and the tiny models' many small kernels then
# wait on each other (measured: the converted-models fixture of tests/convert took 222 s with 2 threads per
# worker beside another busy process, 33 s with one).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import kphi  # noqa: F401, E402  (registers the kphi3 model type with the Auto classes)


#: The modules that take longest, run first. Under ``pytest -n 2 --dist loadfile`` a module runs whole on one
#: worker; collected alphabetically, the two heaviest (test_train, test_transformers_common) came last and left
#: the other worker idle at the end. Longest first evens the two workers out. Order within a module is kept.
HEAVY_FIRST = ["test_train.py", "test_transformers_common.py", "test_convert.py", "test_compress.py", "test_allocate.py",
               "test_model_sources.py", "test_distill.py", "test_budgets.py", "test_compare.py", "test_evaluate.py",
               "test_export.py", "test_scaling.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session", autouse=True)
def _kphi_cache_of_this_session(tmp_path_factory):
    """Prepared data and tokenizers go to a cache of this test session, never to the user's ``KPHI_CACHE``:
    set for this process and inherited by every ``kphi`` subprocess (tests that need their own pass ``cache=``)."""
    import os

    previous = os.environ.get("KPHI_CACHE")
    os.environ["KPHI_CACHE"] = str(tmp_path_factory.mktemp("kphi-cache"))
    yield
    if previous is None:
        os.environ.pop("KPHI_CACHE", None)
    else:
        os.environ["KPHI_CACHE"] = previous


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory):
    """A model directory exactly as ``kphi train`` leaves it (3 steps of the tiny preset), shared by test files."""
    from corpus import prepare_small
    from processes import run_cli

    root = tmp_path_factory.mktemp("trained")
    out = root / "model"
    args = ["train", "--preset", "tiny-kphi3", "--context-length", "32", "--batch-size", "4", "--logging-steps", "1",
            "--data", str(prepare_small(root)), "--out", str(out), "--max-steps", "3", "--quiet"]
    result = run_cli(*args, timeout=300)
    assert result.returncode == 0, result.stderr
    return out
