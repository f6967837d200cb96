"""Score every complete checkpoint of a healing run on the structure study's held-out prose, as the study scores
its end model (the first 32 KB of kphi's held-out English text, windows of 1,024 tokens every 512), and plot
bits per byte against healing tokens as a multiple of the source's.

    python scripts/score-checkpoints.py RUN_DIR SOURCE_BITS_PER_BYTE OUT.json [--plot OUT.png]

RUN_DIR is a ``kphi train`` run directory (``heal/NAME/run`` of a compress study) holding ``checkpoint-N``
folders and its tokenizer; tokens per step come from its ``kphi-run.json``. Scores already in OUT.json are
kept, so a long run can be scored as its checkpoints appear.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

import kphi  # noqa: F401  (registers kphi's model types with the Auto classes)
from kphi.eval.bits import evaluate_text, heldout_sample
from kphi.files import atomic_write_text
from kphi.sources.model_dir import TOKENIZER_FILES, load_model, load_tokenizer
from kphi.training.callbacks import is_complete_checkpoint


def score(model_dir: Path) -> dict:
    model = load_model(model_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(model_dir)
    return evaluate_text(model, tokenizer, [heldout_sample(32768)], str(model_dir), 1024, 512, False).to_dict()


def checkpoint_as_model_dir(run: Path, checkpoint: Path, into: Path) -> Path:
    """A checkpoint holds weights and config; the tokenizer files are the run's."""
    for name in ("config.json", "model.safetensors"):
        shutil.copy(checkpoint / name, into / name)
    for name in (*TOKENIZER_FILES, "chat_template.jinja", "generation_config.json"):
        if (run / name).is_file():
            shutil.copy(run / name, into / name)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("source_bits_per_byte", type=float)
    parser.add_argument("out", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    record = json.loads((args.run / "kphi-run.json").read_text())
    settings = record["settings"]
    tokens_per_step = settings["batch_size"] * settings["context_length"] * settings.get("gradient_accumulation_steps", 1)
    scores = json.loads(args.out.read_text()) if args.out.is_file() else {}
    checkpoints = sorted(args.run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for checkpoint in filter(is_complete_checkpoint, checkpoints):
        step = checkpoint.name.split("-")[1]
        if step in scores:
            continue
        with tempfile.TemporaryDirectory() as folder:
            result = score(checkpoint_as_model_dir(args.run, checkpoint, Path(folder)))
        scores[step] = {"tokens": int(step) * tokens_per_step, "bits_per_byte": result["bits_per_byte"],
                        "x_source": result["bits_per_byte"] / args.source_bits_per_byte}
        atomic_write_text(args.out, json.dumps(dict(sorted(scores.items(), key=lambda kv: int(kv[0]))), indent=1))
        print(f"step {step}: {result['bits_per_byte']:.4f} bits per byte", flush=True)
    if args.plot:
        plot(scores, args.source_bits_per_byte, args.plot)


def plot(scores: dict, source: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted((s["tokens"], s["bits_per_byte"]) for s in scores.values())
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([t for t, _ in points], [b for _, b in points], marker="o", label="compressed, healing")
    ax.axhline(source, color="black", linestyle="--", linewidth=1, label="source")
    ax.axhline(1.3 * source, color="grey", linestyle=":", linewidth=1, label="1.3x the source")
    ax.set_xlabel("healing tokens")
    ax.set_ylabel("bits per byte, held-out prose")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
