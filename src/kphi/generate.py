"""Using a trained model: one reply (``kphi generate``) or a conversation (``kphi chat``).

The report's users load a checkpoint, prompt it in the phi-3 chat format
``<|user|>{message}<|end|><|assistant|>`` and sample with top_p 0.5 and repetition penalty 1.2. This module
does exactly that with transformers' own pieces: the tokenizer's chat template
(``apply_chat_template(..., add_generation_prompt=True)``), ``model.generate`` and a ``TextStreamer``.

From Python::

    from kphi.generate import SamplingSettings, generate_reply, load_for_generation

    model, tokenizer = load_for_generation("runs/tiny")
    reply = generate_reply(model, tokenizer, "What is the capital of Peru?", SamplingSettings(seed=0))
    reply = generate_reply(model, tokenizer, [{"role": "user", "content": "Hi"}], stream=print_piece)

Generation stops at ``<|end|>`` (end of an assistant turn) or at the end-of-text token. A prompt that does
not fit in the model's context (``max_position_embeddings``) together with room for the reply is cut from
the left, with a warning; a conversation (:class:`ChatSession`) drops its oldest turns first.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO, Union

from .data.recipe import END
from .errors import KphiError
from .settings import invalid_setting, setting

__all__ = [
    "prompt_messages",
    "ChatSession",
    "GenerationError",
    "SamplingSettings",
    "chat_loop",
    "context_length",
    "encode_prompt",
    "generate_reply",
    "load_for_generation",
    "stop_token_ids",
]

END_TOKEN = END  # the chat recipe's end of a turn

Messages = list[dict[str, str]]
Stream = Union[Callable[[str], Any], TextIO, None]


class GenerationError(KphiError, ValueError):
    """The model, tokenizer or prompt cannot be used for generation; the message says why."""


#: The report's sampling. ``kphi train`` writes it into every model directory's ``generation_config.json``,
#: and from there it is the default of ``kphi generate``/``chat`` (the model's generation config is the
#: single source of sampling defaults; :class:`SamplingSettings` only overrides it).
REPORT_SAMPLING = {"do_sample": True, "top_p": 0.5, "repetition_penalty": 1.2, "max_new_tokens": 128}


#: The lowest sampling temperature taken; below it sampling is greedy in all but name, and ``logits / t``
#: overflows to inf as ``t`` nears 0.
MIN_TEMPERATURE = 1e-4


@dataclass
class SamplingSettings:
    """How replies are sampled: every field left ``None`` comes from the model's ``generation_config``."""

    max_new_tokens: int | None = setting(None, minimum=1)
    """Most tokens in a reply, fewer when the context is nearly full (default: the model's; 128 for kphi runs)."""
    temperature: float | None = setting(None, minimum=0)
    """Softmax temperature; ``0`` means greedy decoding (default: the model's)."""
    top_p: float | None = setting(None, above=0, maximum=1)
    """Nucleus sampling: sample among the most likely tokens that make up this much probability (default: the
    model's; 0.5 for kphi runs)."""
    repetition_penalty: float | None = setting(None, above=0)
    """Divides the logits of tokens already in the sequence; 1.0: none (default: the model's; 1.2 for kphi runs)."""
    seed: int | None = setting(None, minimum=0, maximum=2**32 - 1)
    """Seed for sampling (same seed, same model, same prompt: same reply)."""

    def validate(self) -> None:
        problem = invalid_setting(self)
        if problem:
            raise GenerationError(problem)
        if self.temperature and self.temperature < MIN_TEMPERATURE:  # logits / t overflows as t nears 0
            raise GenerationError(f"temperature must be 0 (greedy decoding) or at least {MIN_TEMPERATURE:g}, "
                                  f"got {self.temperature!r}")

    def resolve(self, model_config) -> "SamplingSettings":
        """Every field filled: this object's values over the model's ``generation_config`` (``model_config``)."""
        def pick(name, fallback):
            mine = getattr(self, name)
            theirs = getattr(model_config, name, None) if model_config is not None else None
            return mine if mine is not None else (theirs if theirs is not None else fallback)

        sampling = bool(getattr(model_config, "do_sample", False)) if model_config is not None else False
        temperature = self.temperature if self.temperature is not None else (pick("temperature", 1.0) if sampling else 0.0)
        return SamplingSettings(
            max_new_tokens=pick("max_new_tokens", REPORT_SAMPLING["max_new_tokens"]),
            temperature=temperature,
            top_p=pick("top_p", 1.0),
            repetition_penalty=pick("repetition_penalty", 1.0),
            seed=self.seed,
        )

    @property
    def do_sample(self) -> bool:
        return bool(self.temperature) and self.temperature > 0


# --------------------------------------------------------------------------- loading


def _warn_stderr(message: str) -> None:
    print(f"kphi: {message}", file=sys.stderr, flush=True)


def load_for_generation(model_dir: str | Path, *, device: str | None = None, dtype: Any = None):
    """``(model, tokenizer)`` from a model directory (``kphi train`` output, an export, any causal LM dir).

    The model is in eval mode on ``device`` (default: CUDA when available, else CPU). Raises
    :class:`GenerationError` when ``model_dir`` is not a model directory, has no tokenizer, or fails to load.
    """
    import torch

    from .sources.model_dir import (  # here: the command line reads SamplingSettings without torch
        load_model,
        load_tokenizer,
    )

    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def context_length(model) -> int:
    """Tokens the model attends over: ``config.max_position_embeddings``."""
    value = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(value, int) or value < 2:
        raise GenerationError(f"the model config has no usable max_position_embeddings ({value!r})")
    return value


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Ids that end a reply: ``<|end|>``, the tokenizer's end of text and the generation config's eos ids."""
    ids: list[int] = []
    end = tokenizer.convert_tokens_to_ids(END_TOKEN)
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        ids.append(end)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in config_eos if isinstance(config_eos, list) else [config_eos]:
        if isinstance(value, int):
            ids.append(value)
    return list(dict.fromkeys(ids))


# --------------------------------------------------------------------------- prompts


def _as_messages(messages_or_prompt: str | Messages) -> Messages:
    if isinstance(messages_or_prompt, str):
        if not messages_or_prompt.strip():
            raise GenerationError("the prompt is empty")
        return [{"role": "user", "content": messages_or_prompt}]
    messages = list(messages_or_prompt)
    if not messages:
        raise GenerationError("the conversation is empty")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            raise GenerationError(f"each message must be a dict with 'role' and 'content' (text), got {message!r}")
    if messages[-1]["role"] == "user" and not messages[-1]["content"].strip():
        raise GenerationError("the prompt is empty")
    return messages


def prompt_messages(prompt: str, system: str | None = None, raw: bool = False) -> str | Messages:
    """What to send for one prompt: the text as is (``raw``), else chat messages (an optional system message,
    then the prompt as the user's)."""
    if not prompt.strip():
        raise GenerationError("the prompt is empty")
    if raw:
        if system:
            raise GenerationError("--system needs the chat template; it cannot be combined with --raw")
        return prompt
    return [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": prompt}]


def encode_prompt(tokenizer, messages_or_prompt: str | Messages, *, raw: bool = False) -> list[int]:
    """Token ids of the prompt: chat messages (or a string as one user message) rendered through the chat
    template with the generation prompt (``...<|end|><|assistant|>``); with ``raw=True`` the string as is.

    Like the training data, no BOS or other special token is added beyond what the template writes.
    """
    if raw:
        if not isinstance(messages_or_prompt, str):
            raise GenerationError("raw prompts are strings; pass messages without raw=True")
        if not messages_or_prompt.strip():
            raise GenerationError("the prompt is empty")
        return tokenizer(messages_or_prompt, add_special_tokens=False)["input_ids"]
    messages = _as_messages(messages_or_prompt)
    if not getattr(tokenizer, "chat_template", None):
        raise GenerationError("the tokenizer has no chat template; pass the prompt as raw text (--raw)")
    try:
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as err:  # noqa: BLE001 - jinja errors (e.g. an unknown role) are the user's input
        raise GenerationError(f"the chat template rejected the conversation: {err}") from None
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def _fit(ids: list[int], context: int, max_new_tokens: int, warn: Callable[[str], None]) -> tuple[list[int], int]:
    """Cut ``ids`` from the left so that the prompt plus room for the reply fit the context.

    Room kept for the reply: ``min(max_new_tokens, context // 2)``. Returns the ids and the number of new
    tokens allowed (``min(max_new_tokens, context - len(ids))``).
    """
    budget = context - min(max_new_tokens, context // 2)
    if len(ids) > budget:
        warn(
            f"the prompt has {len(ids)} tokens but the context holds {context}: dropped its first "
            f"{len(ids) - budget} tokens (kept the last {budget}, leaving room for the reply)"
        )
        ids = ids[-budget:]
    return ids, min(max_new_tokens, context - len(ids))


# --------------------------------------------------------------------------- generation


def _stream_callback(stream: Stream) -> Callable[[str], Any] | None:
    if stream is None:
        return None
    if callable(stream):
        return stream
    if hasattr(stream, "write"):
        def write(text: str) -> None:
            stream.write(text)
            stream.flush()

        return write
    raise TypeError(f"stream must be a callable or a writable text stream, got {type(stream).__name__}")


def _make_streamer(tokenizer, callback: Callable[[str], Any]):
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        """transformers' TextStreamer (prompt skipped, special tokens dropped) feeding a callback.

        Leading whitespace of the reply is dropped, so the streamed text is the returned reply.
        """

        started = False

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if not self.started:
                text = text.lstrip()
                self.started = bool(text)
            if text:
                callback(text)

    return CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _generate_from_ids(model, tokenizer, ids: list[int], settings: SamplingSettings, stream: Stream,
                       warn: Callable[[str], None]) -> str:
    import torch
    from transformers import GenerationConfig, set_seed

    settings.validate()
    settings = settings.resolve(getattr(model, "generation_config", None))
    ids, max_new = _fit(ids, context_length(model), settings.max_new_tokens, warn)
    if not ids:
        raise GenerationError("the prompt encodes to no tokens")
    stops = stop_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else None)
    options: dict[str, Any] = dict(
        max_new_tokens=max_new,
        do_sample=settings.do_sample,
        repetition_penalty=settings.repetition_penalty,
        eos_token_id=stops or None,
        pad_token_id=pad,
    )
    if settings.do_sample:
        options.update(temperature=settings.temperature, top_p=settings.top_p)
    else:  # neutral values, so that the model's sampling settings (filled in for unset ones) stay unused
        options.update(temperature=1.0, top_p=1.0)
    config = GenerationConfig(**options)
    callback = _stream_callback(stream)
    streamer = _make_streamer(tokenizer, callback) if callback is not None else None
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    if settings.seed is not None:
        set_seed(settings.seed)
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=config,
            streamer=streamer,
        )
    new = output[0, input_ids.shape[1]:].tolist()
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def generate_reply(
    model,
    tokenizer,
    messages_or_prompt: str | Messages,
    settings: SamplingSettings | None = None,
    stream: Stream = None,
    *,
    raw: bool = False,
    warn: Callable[[str], None] | None = None,
) -> str:
    """The model's reply to a prompt (one user message) or a conversation (chat messages).

    ``stream``: a callable receiving the reply's text piece by piece as it is generated, or a text stream
    to write them to (flushed after each). ``raw=True`` sends a string as is, without the chat template.
    ``warn`` receives notes such as a truncated prompt (default: printed on stderr). Returns the reply
    without special tokens, stripped of surrounding whitespace.
    """
    settings = settings or SamplingSettings()
    ids = encode_prompt(tokenizer, messages_or_prompt, raw=raw)
    return _generate_from_ids(model, tokenizer, ids, settings, stream, warn or _warn_stderr)


# --------------------------------------------------------------------------- chat


@dataclass
class ChatSession:
    """A multi-turn conversation: the history is kept as messages and rendered through the chat template.

    When the history no longer fits the context (with room for the reply), the oldest turns (a user
    message and its reply) are dropped and ``warn`` is told; a system message is kept.
    """

    model: Any
    tokenizer: Any
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    system: str | None = None
    warn: Callable[[str], None] = _warn_stderr
    history: Messages = field(default_factory=list)

    def reset(self) -> None:
        self.history.clear()

    def messages(self) -> Messages:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def ask(self, text: str, stream: Stream = None) -> str:
        """Send one user message; returns (and streams) the reply, which joins the history."""
        if not text.strip():
            raise GenerationError("the message is empty")
        self.settings.validate()
        context = context_length(self.model)
        max_new = self.settings.resolve(getattr(self.model, "generation_config", None)).max_new_tokens
        budget = context - min(max_new, context // 2)
        turn = {"role": "user", "content": text}
        ids = encode_prompt(self.tokenizer, self.messages() + [turn])
        dropped = 0
        while len(ids) > budget and self.history:
            del self.history[:2]  # the oldest user message and its reply
            dropped += 1
            ids = encode_prompt(self.tokenizer, self.messages() + [turn])
        if dropped:
            self.warn(
                f"the conversation no longer fits the context of {context} tokens: "
                f"dropped the {dropped} oldest turn{'s' if dropped > 1 else ''}"
            )
        reply = _generate_from_ids(self.model, self.tokenizer, ids, self.settings, stream, self.warn)
        self.history += [turn, {"role": "assistant", "content": reply}]
        return reply


CHAT_HELP = "commands: /reset clears the conversation, /exit (or Ctrl-D) ends it"


def chat_loop(session: ChatSession, stdin: TextIO | None = None, stdout: TextIO | None = None,
              stderr: TextIO | None = None, interactive: bool | None = None) -> int:
    """Read messages from ``stdin`` and write each reply to ``stdout``, ending with a newline.

    Interactive (a terminal on both ends): a ``you> `` prompt, replies streamed as they are generated, a
    help line on stderr, Ctrl-C stops a reply. Otherwise (a script feeding stdin) stdout carries only the
    finished replies, one per input message (a reply may span several lines), and notes go to stderr. ``/reset``
    clears the history, ``/exit`` or end of input ends the chat. Returns the number of replies.
    """
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    if interactive is None:
        interactive = stdin.isatty() and stdout.isatty()
    note = lambda message: print(message, file=stderr, flush=True)  # noqa: E731
    if interactive:
        note(f"kphi chat ({CHAT_HELP})")
        try:
            import readline  # noqa: F401  (line editing for input())
        except ImportError:  # pragma: no cover - not on every platform
            pass
    replies = 0
    while True:
        try:
            if interactive:
                line = input("you> ") if stdin is sys.stdin else _prompted_readline(stdin, stdout)
            else:
                line = stdin.readline()
                if not line:
                    break
        except EOFError:
            if interactive:
                print(file=stdout, flush=True)
            break
        except KeyboardInterrupt:
            print(file=stdout, flush=True)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            note("(conversation cleared)")
            continue
        if text in ("/help", "/?"):
            note(CHAT_HELP)
            continue
        if not interactive:  # the finished reply, one block per message: easy to read from a script
            print(session.ask(text), file=stdout, flush=True)
            replies += 1
            continue
        try:
            session.ask(text, stream=stdout)
        except KeyboardInterrupt:
            print(file=stdout, flush=True)
            note("(reply interrupted; it is not kept in the conversation)")
            continue
        print(file=stdout, flush=True)
        replies += 1
    return replies


def _prompted_readline(stdin: TextIO, stdout: TextIO) -> str:
    stdout.write("you> ")
    stdout.flush()
    line = stdin.readline()
    if not line:
        raise EOFError
    return line
