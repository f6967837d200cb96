"""Preparation speed of a text corpus against the ``tokenizers`` library's own batch encoding, side by side.

Both sides read the same first ``--mb`` megabytes of the corpus's training documents, with the same trained
tokenizer, in one process, alternating, ``--repeats`` times each; the medians and their ratio are printed (and
written as JSON with ``--json``):

* ``tokenizers``: ``Tokenizer.encode_batch`` over the texts in batches (the Rust library alone: the ceiling);
* ``kphi``: the whole packing path of ``kphi data prepare`` — encode, pack into rows, hash, and write the rows
  to an Arrow file opened as a ``datasets.Dataset`` — on the same texts.

    python scripts/bench-prepare.py --corpus python-source --tokenizer PREPARED/tokenizer --mb 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def _texts(corpus, megabytes: float) -> list[str]:
    texts, size = [], 0
    for doc in corpus.documents():
        if doc.heldout:
            continue
        texts.append(doc.text)
        size += len(doc.text.encode("utf-8"))
        if size >= megabytes * 1e6:
            break
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="python-source")
    parser.add_argument("--tokenizer", required=True, help="a saved tokenizer directory (a prepared corpus's tokenizer/)")
    parser.add_argument("--mb", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import datasets
    from transformers import AutoTokenizer

    from kphi.data.corpora import open_corpus
    from kphi.data.prepare_text import _BATCH_DOCUMENTS, pack_texts, write_rows

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    texts = _texts(open_corpus(args.corpus), args.mb)
    total_bytes = sum(len(t.encode("utf-8")) for t in texts)

    def ceiling() -> None:
        for start in range(0, len(texts), _BATCH_DOCUMENTS):
            tokenizer.backend_tokenizer.encode_batch(texts[start:start + _BATCH_DOCUMENTS], add_special_tokens=False)

    def kphi_path() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            rows = pack_texts(texts, tokenizer, tokenizer.eos_token_id, 256, counts={})
            write_rows(rows, Path(tmp) / "rows.arrow")

    timings: dict[str, list[float]] = {"tokenizers": [], "kphi": []}
    for _ in range(args.repeats):
        for name, fn in (("tokenizers", ceiling), ("kphi", kphi_path)):
            started = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - started)
    medians = {k: statistics.median(v) for k, v in timings.items()}
    report = {"corpus": args.corpus, "documents": len(texts), "bytes": total_bytes, "repeats": args.repeats,
              "seconds": timings, "median_seconds": medians,
              "mb_per_second": {k: total_bytes / 1e6 / v for k, v in medians.items()},
              "kphi_throughput_vs_tokenizers": medians["tokenizers"] / medians["kphi"]}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
