"""kphi: language models that keep their quality with a fraction of the parameters.

``import kphi`` registers the ``kphi3`` model type with transformers' ``AutoConfig``,
``AutoModel`` and ``AutoModelForCausalLM`` (no ``trust_remote_code`` needed).
"""

from .block import GroupedLinear, GroupedPointwiseBlock, group_count, interleave
from .model import KPhi3Config, KPhi3ForCausalLM, KPhi3Model, make_projection, replace_projections

__version__ = "0.1.0"

__all__ = [
    "GroupedLinear",
    "GroupedPointwiseBlock",
    "KPhi3Config",
    "KPhi3ForCausalLM",
    "KPhi3Model",
    "group_count",
    "interleave",
    "make_projection",
    "replace_projections",
]
