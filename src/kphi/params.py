"""What a model costs, without allocating weights (meta device): its parameters as the report counts them, and
its training FLOPs per token.

``embedding`` = input embedding + ``lm_head`` (once if tied); ``non_embedding = total - embedding``.

Training FLOPs are counted analytically (what a comparison at equal tokens hides). For a decoder with ``L`` layers, hidden size ``d``, context ``T`` and vocabulary ``V``, one token costs in a
forward pass (multiply-adds counted as 2 FLOPs, as Kaplan et al. 2020 count them)::

    2 * P_matmul                      every weight of every projection and of lm_head is used once per token
  + 2 * L * T * d_attn * 2            QK^T and AV over the context (d_attn = heads x head_dim); full T,
                                      as Kaplan et al. count it (a causal mask halves it on average)

and training costs three times the forward (backward: twice). ``P_matmul`` is every parameter of a
``nn.Linear``-like weight: the non-embedding parameters less the norms' scales, plus ``lm_head`` (``V * d``).
Embedding lookups, norms, activations, softmax and the optimizer are left out (a few percent at these
sizes). Every structured kind here (grouped block, low-rank, Monarch) uses each of its weights once per token,
so its FLOPs follow its parameter count: this is why kphi-3 costs less per token than phi-3.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .modeling.configuration_kphi3 import BOOKKEEPING_KEYS
from .presets import list_presets, load_preset, resolve_config
from .sources import HUB_ID, known_models, resolve_model_dir
from .sources.auto import KPhi3Config, KPhi3ForCausalLM, config_fields
from .sources.model_dir import load_config, read_model_config

__all__ = [
    "ParamReport", "count_parameters", "dense_counterpart", "format_params_table", "model_parameter_counts",
    "parameter_report", "report_for", "structured_report", "forward_flops_per_token", "training_flops_per_token",
]


@dataclass
class ParamReport:
    """Parameter counts of one configuration. ``percent_*`` are non-embedding percentages."""

    layers: int
    intermediate_size: int
    hidden_size: int
    total: int
    embedding: int
    non_embedding: int
    dense_same_shape_non_embedding: int
    percent_of_dense_same_shape: float
    baseline: str | None = None
    baseline_non_embedding: int | None = None
    percent_of_baseline: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def model_parameter_counts(model) -> tuple[int, int]:
    """``(total, embedding)`` parameter counts of any causal LM; ``embedding`` = input embedding + output head
    (once if tied)."""
    total = sum(p.numel() for p in model.parameters())  # tied weights are yielded once
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    count = embedding.numel()
    if head is not None and head.weight is not embedding:
        count += head.weight.numel()
    return total, count


def count_parameters(config: KPhi3Config) -> tuple[int, int]:
    """``(total, embedding)`` parameter counts of ``KPhi3ForCausalLM(config)``, built on the meta device."""
    with torch.device("meta"):
        model = KPhi3ForCausalLM(config)
    return model_parameter_counts(model)


def dense_counterpart(config: KPhi3Config) -> KPhi3Config:
    """The same shape with dense projections (whatever kind ``config`` uses: grouped, low-rank or a ``projection``)."""
    return KPhi3Config(**{**config_fields(config), "projection": {"kind": "dense"}})


def parameter_report(config: KPhi3Config, baseline: tuple[str, KPhi3Config] | None = None) -> ParamReport:
    """Counts for ``config``, its dense counterpart, and optionally a named baseline configuration."""
    total, embedding = count_parameters(config)
    non_embedding = total - embedding
    dense_total, dense_embedding = count_parameters(dense_counterpart(config))
    dense_non_embedding = dense_total - dense_embedding
    report = ParamReport(
        layers=config.num_hidden_layers,
        intermediate_size=config.intermediate_size,
        hidden_size=config.hidden_size,
        total=total,
        embedding=embedding,
        non_embedding=non_embedding,
        dense_same_shape_non_embedding=dense_non_embedding,
        percent_of_dense_same_shape=round(100.0 * non_embedding / dense_non_embedding, 2),
    )
    if baseline is not None:
        name, base_config = baseline
        base_total, base_embedding = count_parameters(base_config)
        report.baseline = name
        report.baseline_non_embedding = base_total - base_embedding
        report.percent_of_baseline = round(100.0 * non_embedding / report.baseline_non_embedding, 2)
    return report


def structured_report(config) -> ParamReport:
    """Counts for a converted model's config (``kphi_llama``, ``kphi_gpt2``, ...) against the same architecture
    with dense projections, both built on the meta device."""
    from transformers import AutoModelForCausalLM

    dense_config = type(config)(**{**{k: v for k, v in config.to_dict().items() if k not in BOOKKEEPING_KEYS}, "projection": None})
    with torch.device("meta"):
        total, embedding = model_parameter_counts(AutoModelForCausalLM.from_config(config))
        dense_total, dense_embedding = model_parameter_counts(AutoModelForCausalLM.from_config(dense_config))
    non_embedding, dense_non_embedding = total - embedding, dense_total - dense_embedding
    return ParamReport(
        layers=getattr(config, "num_hidden_layers", None),
        intermediate_size=getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None),
        hidden_size=getattr(config, "hidden_size", None),
        total=total,
        embedding=embedding,
        non_embedding=non_embedding,
        dense_same_shape_non_embedding=dense_non_embedding,
        percent_of_dense_same_shape=round(100.0 * non_embedding / dense_non_embedding, 2),
    )


def report_for(spec: str) -> tuple[str, str, ParamReport]:
    """``(name, model family, counts)`` of a preset name, a preset YAML, a ``config.json``, or any model source
    (:func:`kphi.sources.resolve_model_dir`: a directory, a ``.gguf`` file, ``smollm2-135m``, a hub id) of
    any causal LM architecture, including ``kphi convert``'s output (a Llama, GPT-2, ... with structured
    projections), which is counted against the same architecture with dense projections."""
    from pathlib import Path

    path = Path(spec)
    is_preset = spec in list_presets() or path.suffix in (".yaml", ".yml", ".json")
    is_model = path.exists() or spec in known_models() or HUB_ID.match(str(spec)) is not None
    if is_model and not is_preset:  # a bare unknown name is an unknown preset, and says so
        model_dir = resolve_model_dir(spec)
        if read_model_config(model_dir).get("model_type") not in ("kphi3", "phi3"):
            config = load_config(model_dir)
            return path.name, config.model_type, structured_report(config)
        spec = model_dir
    preset = resolve_config(spec)
    baseline = None
    if preset.baseline:
        base = load_preset(preset.baseline)
        baseline = (base.name, base.config)
    return preset.name, preset.model, parameter_report(preset.config, baseline)


def format_params_table(reports: list[tuple[str, str, ParamReport]]) -> str:
    """:func:`report_for` results as an aligned text table, one row per model."""
    headers = ["preset", "model", "layers", "interm.", "total", "embedding", "non-emb.", "% dense same shape", "% baseline"]
    rows = [
        [name, model, str(r.layers), str(r.intermediate_size), f"{r.total:,}", f"{r.embedding:,}", f"{r.non_embedding:,}",
         f"{r.percent_of_dense_same_shape:.1f}%", f"{r.percent_of_baseline:.1f}% of {r.baseline}" if r.baseline else "-"]
        for name, model, r in reports
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(row) for row in rows)])

def forward_flops_per_token(model, context_length: int) -> int:
    """Forward FLOPs per token of ``model`` (a built causal LM, the meta device is enough) at ``context_length``."""
    total, embedding = model_parameter_counts(model)
    head = model.get_output_embeddings()
    norms = sum(p.numel() for name, module in model.named_modules() if "norm" in type(module).__name__.lower()
                for p in module.parameters(recurse=False))
    matmul = total - embedding - norms + (head.weight.numel() if head is not None else 0)
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    attention = 2 * 2 * config.num_hidden_layers * context_length * heads * head_dim
    return 2 * matmul + attention


def training_flops_per_token(config, context_length: int) -> int:
    """Training FLOPs per token (3x the forward: see the module docstring) of the model ``config`` builds."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return 3 * forward_flops_per_token(model, context_length)
