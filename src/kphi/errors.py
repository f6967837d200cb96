"""One error type for every failure caused by input.

A :class:`KphiError` is a problem with something the user gave — a file, a directory, a setting — and its
message says what and where. The command line prints it as one ``kphi: error: ...`` line and exits with
status 2; library callers catch it (or the module's own subclass, e.g. ``TrainError``). Each module raises
its own subclass where it detects the problem — a broken model directory is a ``ModelDirError`` whichever
command read it, an occupied output directory an ``OutputDirError`` — rather than being handed an error class
to raise. Anything else that escapes is a bug in kphi.
"""

from __future__ import annotations

__all__ = ["ConvertError", "EvalError", "ExperimentError", "KphiError", "first_line", "validator_cause"]


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message, or its type's name when the message is empty: what a one-line
    ``kphi: error:`` shows of an error raised by a library."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def validator_cause(err: BaseException) -> BaseException:
    """The validator's own error inside a strict dataclass's ``StrictDataclassError`` (its ``__cause__``, whose
    message names the field); ``err`` itself otherwise."""
    from huggingface_hub.errors import StrictDataclassError

    return err.__cause__ if isinstance(err, StrictDataclassError) and err.__cause__ is not None else err


class KphiError(Exception):
    """A failure caused by input; the message names what is wrong and where."""


class EvalError(KphiError, ValueError):
    """An evaluation that cannot run as asked (a missing file, a vocabulary mismatch, a bad setting)."""


class ConvertError(KphiError, ValueError):
    """The source cannot be converted as asked (unsupported architecture, bad kind or settings, no data)."""


class ExperimentError(KphiError, RuntimeError):
    """An experiment (compare, budgets, scaling, compress) cannot run as asked; the message says why."""
