"""lm-evaluation-harness on kphi's models and on any model directory, offline.

``run_tasks(model, ["kphi_next_sentence", "hellaswag", ...])`` runs tasks through lm_eval's Python API
(``lm_eval.simple_evaluate``) with its ``hf`` backend on the model's directory (any source that
:func:`kphi.sources.resolve_model_dir` takes). kphi's model types are registered with transformers' Auto
classes in this process (``import kphi``), so ``kphi3`` and ``kphi convert``'s ``kphi_*`` models load without
``trust_remote_code``.

kphi ships its own tasks (:data:`KPHI_TASKS`) as local JSON-lines data: their task YAMLs are
written at run time into a temporary folder that lm_eval's ``TaskManager`` includes, with the installed data
file's absolute path (lm_eval's ``dataset_path: json`` + ``data_files``). Any other task name is lm_eval's own
(which may need its dataset from the hub).
"""

from __future__ import annotations

import functools
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import EvalError, first_line
from ..sources import auto as _registers_kphi_models  # noqa: F401  (kphi's model types with the Auto classes)
from ..sources import resolve_model_dir

#: lm-evaluation-harness tasks kphi ships (offline): name -> JSON-lines file in ``kphi/data/heldout``.
KPHI_TASKS = {"kphi_next_sentence": "python-reference-next-sentence.jsonl"}

__all__ = ["run_tasks", "write_kphi_task_yamls"]

#: The multiple-choice format of kphi's next-sentence task (rows: context, choices, label).
NEXT_SENTENCE_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_kphi_task_yamls(folder: Path) -> list[str]:
    """Write one task YAML per kphi task into ``folder``; returns the task names."""
    for name, data_file in KPHI_TASKS.items():
        data = Path(str(resources.files("kphi") / "data" / "heldout" / data_file)).resolve()
        (folder / f"{name}.yaml").write_text(NEXT_SENTENCE_YAML.format(name=name, data=data))
    return list(KPHI_TASKS)


def run_tasks(model: str, tasks: list[str], limit: int | None = None, batch_size: int = 8) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of lm_eval's tasks on ``model`` (float32, on the CPU unless CUDA is there)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalError('--tasks needs lm-evaluation-harness: pip install "kphi[eval]"') from None
    import torch

    directory = resolve_model_dir(model)
    manager, _folder = _task_index(TaskManager)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise EvalError(f"unknown lm_eval task(s) {', '.join(unknown)}; kphi's own: {', '.join(KPHI_TASKS)}")
    try:
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(directory), "dtype": "float32",
                        "device": "cuda" if torch.cuda.is_available() else "cpu"},
            tasks=tasks, task_manager=manager, limit=limit, batch_size=batch_size, log_samples=False,
        )
    except (OSError, ValueError) as err:  # a dataset or model lm_eval cannot reach or read
        raise EvalError(f"lm_eval could not run {', '.join(tasks)} on {model}: {first_line(err)}") from None
    return {task: _numbers(metrics) for task, metrics in results["results"].items()}


@functools.lru_cache(maxsize=1)
def _task_index(task_manager_class: type) -> tuple[Any, tempfile.TemporaryDirectory]:
    """lm_eval's task index with kphi's tasks included, built once per process (indexing lm_eval's thousands of
    task YAMLs takes seconds), and the folder of kphi's task YAMLs it points into, kept with it for as long as
    the process runs (removed at exit)."""
    folder = tempfile.TemporaryDirectory(prefix="kphi-lm-eval-tasks-")
    write_kphi_task_yamls(Path(folder.name))
    manager = task_manager_class(include_path=folder.name)
    return manager, folder


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """lm_eval's ``"acc,none": 0.5`` entries as ``"acc": 0.5`` (stderr included), without its labels."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key.split(",")[0]] = float(value)
    return out
