"""Build kphi's held-out English evaluation text and its multiple-choice task from CPython's own documentation.

Source: ``pydoc_data.topics`` (the Python Language Reference topics that ``help()`` shows), which every CPython
ships; licence: PSF License Agreement (Python documentation). It is English technical prose that none of kphi's
training corpora (chitchat-dataset, chatterbot-corpus, LaMini-instruction: chat pairs) contains.

Writes, from the running Python (the committed files were made with CPython 3.11.7):
* ``src/kphi/data/heldout/python-reference.txt``: prose paragraphs (no code, no grammar), one per line;
* ``src/kphi/data/heldout/python-reference-next-sentence.jsonl``: for each paragraph with two or more sentences,
  its first sentence, the true next sentence and three next sentences of other paragraphs (seeded shuffle).

    python scripts/make-heldout.py
"""

import json
import random
import re
import sys
from pathlib import Path

import pydoc_data.topics

OUT = Path(__file__).resolve().parent.parent / "src" / "kphi" / "data" / "heldout"
SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")


def prose_paragraphs(text: str) -> list[str]:
    """Unindented paragraphs of 200+ characters that read as sentences (no code, grammar or tables)."""
    kept = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or any(line.startswith((" ", "\t")) for line in lines):
            continue
        paragraph = " ".join(line.strip() for line in lines)
        letters = sum(c.isalpha() or c == " " for c in paragraph) / max(1, len(paragraph))
        if len(paragraph) >= 200 and letters > 0.85 and paragraph.endswith(".") and "::=" not in paragraph:
            kept.append(paragraph)
    return kept


def main() -> None:
    paragraphs = [p for name in sorted(pydoc_data.topics.topics) for p in prose_paragraphs(pydoc_data.topics.topics[name])]
    paragraphs = list(dict.fromkeys(paragraphs))  # topics repeat some paragraphs
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "python-reference.txt").write_text("\n".join(paragraphs) + "\n")
    pairs = []
    for p in paragraphs:
        sentences = SENTENCE_END.split(p)
        if len(sentences) >= 2 and 30 <= len(sentences[0]) <= 300 and 30 <= len(sentences[1]) <= 300:
            pairs.append((sentences[0], sentences[1]))
    rng = random.Random(0)
    with (OUT / "python-reference-next-sentence.jsonl").open("w") as handle:
        for i, (context, truth) in enumerate(pairs):
            others = [pairs[j][1] for j in rng.sample([j for j in range(len(pairs)) if j != i], 3)]
            choices = [truth, *others]
            rng.shuffle(choices)
            handle.write(json.dumps({"context": context, "choices": choices, "label": choices.index(truth)}) + "\n")
    print(f"{len(paragraphs)} paragraphs ({sum(map(len, paragraphs)):,} characters), {len(pairs)} questions; "
          f"Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
