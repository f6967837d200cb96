"""``kphi convert``: a transformers causal LM (Llama, Mistral, Qwen2, Phi-3, GPT-2, kphi-3) with structured projections.

:func:`convert` takes a model directory, a model or a config and returns the same architecture with every
targeted projection replaced by a projection kind (:mod:`kphi.modeling.projections`), the rest of the weights copied:

* ``fit="frobenius"`` (the default when the source has weights): each projection is the kind's closest
  module to the trained dense weight (closed form per kind; ``FitResult.relative_error`` says what is left);
* ``fit="activations"``: the closest module *on calibration inputs*: one pass of the dense model over
  ``calibration`` tokens collects ``C = X^T X`` of every projection's input, and each kind solves
  ``min ||X W^T - module(X)||`` from ``C`` (per group for the grouped block). Every projection sees the dense
  model's activations (not those of already-compressed layers), so all fits come from the same single pass;
* ``fit="none"``: the projections are initialised afresh (as the model's own init does).

:func:`convert_to_dir` writes the result as a model directory that loads with ``AutoModelForCausalLM``
after ``import kphi``, and with ``trust_remote_code=True`` where kphi is not installed (the modeling files are
copied beside the weights by transformers' custom-code mechanism), plus ``kphi-convert.json``: the kind, the
targets, the parameter counts and each projection's fit error.

The package: :mod:`~kphi.convert.targets` (the converted config), :mod:`~kphi.convert.calibration` (Gram
matrices of calibration inputs), :mod:`~kphi.convert.conversion` (:func:`convert`),
:mod:`~kphi.convert.allocate` (which kind each projection gets under ``--keep``),
:mod:`~kphi.convert.reconstruct` (layer-wise reconstruction), :mod:`~kphi.convert.heldout` (held-out scores),
:mod:`~kphi.convert.to_dir` (:func:`convert_to_dir`).
"""

from ..errors import ConvertError
from .calibration import CALIBRATION_TOKENS, calibration_grams
from .conversion import FITS, ConvertResult, convert, non_embedding_parameters
from .targets import layer_projection_names, parse_override
from .heldout import heldout_bits_per_byte
from .to_dir import CONVERT_MARKER, convert_to_dir, write_converted

__all__ = [
    "CALIBRATION_TOKENS", "CONVERT_MARKER", "ConvertError", "ConvertResult", "FITS", "calibration_grams", "convert",
    "convert_to_dir", "write_converted", "heldout_bits_per_byte", "layer_projection_names", "non_embedding_parameters", "parse_override",
]
