"""Tokenizers for kphi models, all returned as ``transformers.PreTrainedTokenizerFast``.

Three tokenizers, because the project runs in three situations:

``"phi3"`` -- the exact phi-3 tokenizer, built offline.
    Phi-3 uses the Llama-2 sentencepiece vocabulary (32,000 pieces, BPE with byte
    fallback) plus chat tokens such as ``<|user|>``=32010, 32,064 ids in all. The
    Hugging Face hub is not always reachable, but PyPI is: the source distribution of
    ``llama-cpp-python`` ships that vocabulary as ``ggml-vocab-phi-3.gguf`` together
    with reference tokenizations made by the hub tokenizer. :func:`fetch_phi3_gguf`
    downloads and caches those files and :func:`phi3_tokenizer_from_gguf` turns the
    GGUF vocabulary into a ``tokenizers`` BPE model that reproduces every reference.
    Use it to train models that are token-compatible with phi-3.

``"phi3-hub"`` -- the same tokenizer from the hub (:func:`load_hub_phi3_tokenizer`),
    for machines that can reach it.

``"bpe"`` -- a small byte-level BPE trained on the project's own texts
    (:func:`train_bpe_tokenizer`), 4,096 tokens by default. A 32k vocabulary dominates
    the parameter count of the tiny models trained in CPU experiments; a 4k one keeps
    the embedding small and still carries every phi-3 special token, so the same data
    formatting and chat template work unchanged.

Every tokenizer carries :data:`CHAT_TEMPLATE`, which renders a conversation the way
the training data is formatted: ``<|user|>{instruction}<|end|><|assistant|>{response}<|end|>``,
with no newlines between turns. :func:`build_tokenizer` resolves a spec string to one
of the above (or to a saved tokenizer directory / a ``.gguf`` file) and is what the
rest of the project calls.

Runtime requirements: ``tokenizers`` and ``transformers``; reading a ``.gguf`` file
also needs ``gguf`` (the ``offline`` extra), and fetching it needs ``pip``.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ..errors import KphiError
from ..files import atomic_write_bytes, cache_root, pip_download, refuse_foreign_dir, staged_dir
from ..sources import known_models, resolve_model_dir
from ..sources.model_dir import pretrained_tokenizer
from .recipe import DEFAULT_VOCAB_SIZE, END, format_sample
from .sources import datasets_bars, open_source

__all__ = [
    "CHAT_TEMPLATE",
    "PHI3_GGUF_NAME",
    "PHI3_SDIST",
    "PHI3_SPECIAL_TOKENS",
    "TOKENIZER_SPECS",
    "encodes_phi3_chat_tokens",
    "TokenizerError",
    "build_tokenizer",
    "describe_tokenizer",
    "save_tokenizer",
    "train_bpe_on_source",
    "fetch_phi3_gguf",
    "load_hub_phi3_tokenizer",
    "load_reference_tokenizations",
    "phi3_tokenizer_from_gguf",
    "train_bpe_tokenizer",
]

#: The phi-3 special tokens and their ids in the phi-3 vocabulary, in id order.
#: The trained BPE tokenizer puts them at the *start* of its vocabulary, in this order
#: (``<unk>``=0, ``<s>``=1, ..., ``<|user|>``=13).
PHI3_SPECIAL_TOKENS: dict[str, int] = {
    "<unk>": 0,
    "<s>": 1,
    "</s>": 2,
    "<|endoftext|>": 32000,
    "<|assistant|>": 32001,
    "<|placeholder1|>": 32002,
    "<|placeholder2|>": 32003,
    "<|placeholder3|>": 32004,
    "<|placeholder4|>": 32005,
    "<|system|>": 32006,
    "<|end|>": 32007,
    "<|placeholder5|>": 32008,
    "<|placeholder6|>": 32009,
    "<|user|>": 32010,
}

#: Phi-3's roles of the special tokens (as in its GGUF metadata: pad is ``<|endoftext|>``).
BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, PAD_TOKEN = "<s>", "<|endoftext|>", "<unk>", "<|endoftext|>"

#: Chat template shared by every kphi tokenizer. It matches the training data format
#: ``<|user|>{instruction}<|end|><|assistant|>{response}<|end|>`` exactly: no BOS and no
#: newlines (phi-3's own template adds both; ours must agree with the data instead).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

#: The sdist that carries the phi-3 vocabulary, and where inside it the files are.
PHI3_SDIST = "llama-cpp-python==0.3.36"
PHI3_GGUF_NAME = "ggml-vocab-phi-3.gguf"
_SDIST_VOCAB_DIR = ("vendor", "llama.cpp", "models")
_PHI3_FILES = (PHI3_GGUF_NAME + ".inp", PHI3_GGUF_NAME + ".out", PHI3_GGUF_NAME)  # gguf last
_MAX_MEMBER_BYTES = 64 << 20  # the real files are < 1 MB; refuse anything absurd

#: Separator between test texts in llama.cpp's ``.inp`` files.
_VOCAB_TEST_SEPARATOR = "\n__ggml_vocab_test__\n"

HUB_PHI3_NAME = "microsoft/Phi-3-mini-4k-instruct"
TOKENIZER_SPECS = ("bpe", "phi3", "phi3-hub")

#: The tokens of phi-3's chat layout (kphi.data.recipe) that a tokenizer must keep whole to use it.
PHI3_CHAT_TOKENS = ("<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>")


class TokenizerError(KphiError, RuntimeError):
    """A tokenizer could not be built, fetched or loaded; the message says why."""


# --------------------------------------------------------------------------- fetching


def fetch_phi3_gguf(cache_dir: Path | None = None) -> Path:
    """Return the path of a cached ``ggml-vocab-phi-3.gguf``, downloading it if needed.

    The file (and its reference tokenizations ``.inp``/``.out``, stored beside it) comes
    from the ``llama-cpp-python`` sdist on PyPI, fetched with ``pip download`` in a
    subprocess so that pip's own index configuration, proxies and cache apply. Only the
    three files are extracted; the sdist is deleted afterwards.

    Args:
        cache_dir: Cache root; defaults to :func:`kphi.files.cache_root`. The files live in
            ``<cache_dir>/phi3-vocab/``.

    Raises:
        TokenizerError: pip failed (message starts with ``"could not download"``) or the
            sdist does not contain the files.
    """
    target = Path(cache_dir or cache_root()).expanduser() / "phi3-vocab"
    gguf_path = target / PHI3_GGUF_NAME
    if all((target / name).is_file() for name in _PHI3_FILES):
        return gguf_path

    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kphi-sdist-") as tmp:
        _extract_vocab_files(pip_download(PHI3_SDIST, Path(tmp), TokenizerError), target)
    return gguf_path


def _extract_vocab_files(sdist: Path, dest: Path) -> None:
    """Copy the phi-3 vocabulary files out of ``sdist`` into ``dest``, atomically.

    Archive member names are only *matched*, never used as output paths, so a crafted
    archive cannot write outside ``dest``.
    """
    wanted = {name: None for name in _PHI3_FILES}
    with tarfile.open(sdist, "r:*") as tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if (
                member.isreg()
                and len(parts) >= 4
                and parts[-4:-1] == _SDIST_VOCAB_DIR
                and parts[-1] in wanted
                and ".." not in parts
                and member.size <= _MAX_MEMBER_BYTES
            ):
                wanted[parts[-1]] = tar.extractfile(member).read()
                if all(data is not None for data in wanted.values()):
                    break
    missing = [name for name, data in wanted.items() if data is None]
    if missing:
        raise TokenizerError(f"{sdist.name} does not contain {', '.join(missing)} under {'/'.join(_SDIST_VOCAB_DIR)}/")
    for name in _PHI3_FILES:  # the .gguf is written last: its presence means "complete"
        atomic_write_bytes(dest / name, wanted[name])


def load_reference_tokenizations(gguf_path: Path) -> list[tuple[str, list[int]]]:
    """Read llama.cpp's reference tokenizations stored beside a vocabulary file.

    ``<name>.gguf.inp`` holds texts, each followed by a ``__ggml_vocab_test__`` line;
    ``<name>.gguf.out`` holds, line by line, the ids the original (hub) tokenizer gave
    each text without special tokens. Returns ``(text, ids)`` pairs.
    """
    gguf_path = Path(gguf_path)
    inp = gguf_path.with_name(gguf_path.name + ".inp").read_text(encoding="utf-8")
    out = gguf_path.with_name(gguf_path.name + ".out").read_text(encoding="utf-8")
    texts = inp.split(_VOCAB_TEST_SEPARATOR)
    if texts and texts[-1] == "":  # every text, the last included, ends with a separator
        texts.pop()
    ids = [[int(tok) for tok in line.split()] for line in out.split("\n")]
    if ids and out.endswith("\n"):
        ids.pop()
    if len(texts) != len(ids):
        raise TokenizerError(f"{gguf_path.name}: {len(texts)} test texts but {len(ids)} id lines")
    return list(zip(texts, ids))


# ------------------------------------------------------------------- GGUF -> tokenizer

#: Tokens that keep the whitespace after them; every other added token of phi-3 swallows it (``rstrip``).
_PHI3_KEEP_WHITESPACE = {"<unk>", "<s>", "<|endoftext|>"}


def phi3_tokenizer_from_gguf(path: Path) -> PreTrainedTokenizerFast:
    """Build the exact phi-3 tokenizer from a GGUF vocabulary (e.g. :func:`fetch_phi3_gguf`).

    transformers reads the file (``AutoTokenizer.from_pretrained(dir, gguf_file=name)``: sentencepiece BPE
    with byte fallback, merges ordered by piece score, bos/eos/unk/pad and whether BOS is added from the
    file's metadata); that reproduces all 46 llama.cpp reference tokenizations. kphi adds one thing the
    GGUF metadata does not carry: like the hub phi-3 tokenizer (and llama.cpp, which keys it on the model
    name), phi-3's added tokens swallow the whitespace that follows them (``rstrip``), except ``<unk>``,
    ``<s>`` and ``<|endoftext|>``. Then the phi-3 chat template is set.
    """

    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"GGUF vocabulary not found: {path}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as exc:
        raise TokenizerError(f"reading a .gguf vocabulary needs the 'gguf' package: pip install gguf ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - gguf and transformers raise ValueError/OSError/struct.error/... on bad files
        raise TokenizerError(f"cannot read GGUF file {path}: {type(exc).__name__}: {exc}") from None
    if END in tokenizer.get_vocab():  # phi-3's chat tokens: apply its whitespace rule
        updated = [
            AddedToken(t.content, special=t.special, normalized=False, lstrip=t.lstrip, single_word=t.single_word,
                       rstrip=t.content not in _PHI3_KEEP_WHITESPACE)
            for _, t in sorted(tokenizer.added_tokens_decoder.items())
        ]
        tokenizer.backend_tokenizer.add_special_tokens([t for t in updated if t.special])
        tokenizer.backend_tokenizer.add_tokens([t for t in updated if not t.special])
    return _with_chat_template(tokenizer)


# ------------------------------------------------------------------------ hub / trained


def load_hub_phi3_tokenizer(name: str = HUB_PHI3_NAME) -> PreTrainedTokenizerFast:
    """Load the phi-3 tokenizer with ``AutoTokenizer.from_pretrained`` (hub id or local dir).

    Its chat template is replaced by :data:`CHAT_TEMPLATE` so that it formats chats like
    the training data.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise TokenizerError(
            f"could not load tokenizer {name!r} with AutoTokenizer ({exc}); without network "
            "access use the offline copy, spec 'phi3'"
        ) from exc
    return _with_chat_template(tokenizer)


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, show_progress: bool = False
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``.

    The phi-3 special tokens take the first ids, in :data:`PHI3_SPECIAL_TOKENS` order
    (``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<|endoftext|>``=3, ..., ``<|user|>``=13),
    then the 256 byte symbols, then the learned merges, up to ``vocab_size`` ids in all.
    Byte-level means no text is unknown and decoding is lossless. Roles follow phi-3:
    bos ``<s>`` (added when encoding with special tokens), eos = pad = ``<|endoftext|>``.
    Training is deterministic: the same texts give the same vocabulary and merges.
    """
    minimum = len(PHI3_SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise TokenizerError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {minimum}")
    special = [AddedToken(tok, special=True, normalized=False) for tok in PHI3_SPECIAL_TOKENS]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(iter(texts), trainer=trainer)
    by_name = {str(t): t for t in special}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=by_name[BOS_TOKEN],
        eos_token=by_name[EOS_TOKEN],
        unk_token=by_name[UNK_TOKEN],
        pad_token=by_name[PAD_TOKEN],
        extra_special_tokens=[t for t in special if str(t) not in (BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)],
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
    )
    return _with_chat_template(tokenizer)


def train_bpe_on_source(source: str = "default", vocab_size: int = DEFAULT_VOCAB_SIZE, max_rows: int | None = None,
                        show_progress: bool = False) -> tuple[PreTrainedTokenizerFast, int]:
    """:func:`train_bpe_tokenizer` on the samples of a data source (:func:`kphi.data.sources.open_source`),
    formatted as training formats them; returns the tokenizer and the number of samples it saw."""
    from itertools import islice

    with datasets_bars(show_progress):
        texts = [format_sample(instruction, response) for instruction, response in islice(open_source(source), max_rows)]
    if not texts:
        raise TokenizerError(f"{source} has no usable rows (every instruction or response empty) to train a tokenizer on")
    return train_bpe_tokenizer(texts, vocab_size=vocab_size, show_progress=show_progress), len(texts)


def save_tokenizer(tokenizer: Any, out: str | Path) -> None:
    """``save_pretrained`` into ``out`` atomically; ``out`` must be new, empty or hold a tokenizer."""
    path = Path(out)
    refuse_foreign_dir(path, (path / "tokenizer_config.json").is_file(), "tokenizer")
    with staged_dir(path) as staging:
        tokenizer.save_pretrained(staging)


def _with_chat_template(tokenizer: Any) -> PreTrainedTokenizerFast:
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TokenizerError(f"expected a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
    tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ------------------------------------------------------------------------- resolver


def build_tokenizer(
    spec: str, training_texts: Iterable[str] | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """Resolve a tokenizer spec; every result carries :data:`CHAT_TEMPLATE`.

    Args:
        spec: ``"bpe"`` (train on ``training_texts``), ``"phi3"`` (exact phi-3, offline),
            ``"phi3-hub"`` (phi-3 from the Hugging Face hub; ``$KPHI_PHI3_HUB``, if set,
            names another repo id or a local snapshot to load instead), a directory written by
            ``save_pretrained``, or a ``.gguf`` vocabulary file.
        training_texts: Texts for ``"bpe"``; ignored otherwise.
        vocab_size: Vocabulary size for ``"bpe"``; ignored otherwise.

    Raises:
        TokenizerError: unknown spec, ``"bpe"`` without texts, or loading failed.
    """
    if spec == "bpe":
        if training_texts is None:
            raise TokenizerError("tokenizer spec 'bpe' trains a new tokenizer and needs training_texts")
        return train_bpe_tokenizer(training_texts, vocab_size=vocab_size)
    if spec == "phi3":
        return phi3_tokenizer_from_gguf(fetch_phi3_gguf())
    if spec == "phi3-hub":
        return load_hub_phi3_tokenizer(os.environ.get("KPHI_PHI3_HUB") or HUB_PHI3_NAME)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return phi3_tokenizer_from_gguf(path)

    if spec.strip() and (path.is_dir() or spec in known_models()):
        directory = resolve_model_dir(spec)  # a model directory, or a known model (smollm2-135m)
        tokenizer = pretrained_tokenizer(directory, TokenizerError)
        return tokenizer if _keeps_own_template(tokenizer) else _with_chat_template(tokenizer)
    raise TokenizerError(
        f"unknown tokenizer spec {spec!r}: expected one of {', '.join(repr(s) for s in TOKENIZER_SPECS)}, "
        f"a model or tokenizer directory, a known model ({', '.join(known_models())}), or a phi-3 .gguf vocabulary"
    )


def encodes_phi3_chat_tokens(tokenizer: Any) -> bool:
    """Whether every phi-3 chat token (``<|user|>``, ``<|assistant|>``, ``<|end|>``, ``<|endoftext|>``) is one token."""
    return all(len(tokenizer.encode(t, add_special_tokens=False)) == 1 for t in PHI3_CHAT_TOKENS)


def _keeps_own_template(tokenizer: Any) -> bool:
    """A model's tokenizer without phi-3's chat tokens keeps its own chat template (e.g. SmolLM2's ChatML):
    data prepared with it is formatted the way that model was trained to read."""
    return bool(getattr(tokenizer, "chat_template", None)) and not encodes_phi3_chat_tokens(tokenizer)


def describe_tokenizer(tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    """Summarize a tokenizer as a JSON-serializable dict (for ``kphi tokenizer info``)."""
    # Probe what encoding adds rather than read tok.add_bos_token: transformers 5 does not
    # save that flag, so after save/load it reads False while tokenizer.json still adds BOS.
    plain = tok.encode("a", add_special_tokens=False)
    full = tok.encode("a")
    adds_bos = tok.bos_token_id is not None and len(full) > len(plain) and full[0] == tok.bos_token_id
    adds_eos = tok.eos_token_id is not None and len(full) > len(plain) and full[-1] == tok.eos_token_id
    vocab = tok.get_vocab()
    special = {str(t): vocab[str(t)] for t in tok.all_special_tokens if str(t) in vocab}
    special.update({t: vocab[t] for t in PHI3_SPECIAL_TOKENS if t in vocab})
    info: dict[str, Any] = {
        "class": type(tok).__name__,
        "vocab_size": len(tok),
        "base_vocab_size": tok.vocab_size,
        "special_tokens": dict(sorted(special.items(), key=lambda kv: kv[1])),
        "adds_bos_token": adds_bos,
        "adds_eos_token": adds_eos,
        "has_chat_template": tok.chat_template is not None,
    }
    for role in ("bos", "eos", "unk", "pad"):
        token = getattr(tok, f"{role}_token")
        info[f"{role}_token"] = None if token is None else str(token)
        info[f"{role}_token_id"] = getattr(tok, f"{role}_token_id")
    return info
