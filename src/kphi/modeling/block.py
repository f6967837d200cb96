"""The grouped pointwise block: the one idea of kphi-3, and its projection kind.

A dense projection ``y = x @ W`` with ``W`` of shape ``[in, out]`` costs ``in * out`` parameters and
multiply-adds per token. kphi-3 replaces it with two *grouped* pointwise convolutions (grouped linear
layers) whose outputs are summed; the second one sees a channel-interleaved copy of the input, so that
every output channel mixes information from every group:

    y = GL_first(x) + GL_second(interleave(x))          # G > 1, parameters 2 * in * out / G
    y = x @ W                                          # G == 1 (no second branch)

Definitions (``G`` groups, ``s = in / G`` input channels per group, ``o = out / G`` output channels per group):

* grouped linear, weight ``W: [G, s, o]``:  with ``x`` viewed as ``[..., G, s]``,
  ``y[..., g, :] = x[..., g, :] @ W[g]``, flattened back to ``[..., out]``. No bias.
* ``interleave(x)``: view the last dim as ``[s, G]``, transpose to ``[G, s]``, flatten; i.e. for
  ``a in [0, G)``, ``b in [0, s)``: ``interleave(x)[a*s + b] = x[b*G + a]``.
* group count rule (:func:`group_count`): the largest ``d`` with ``1 <= d <= min(in, out, in // m)`` that
  divides both ``in`` and ``out``, where ``m`` is ``min_channels_per_group``.

The parameter names (``first_pointwise_conv``, ``second_pointwise_conv``, ``group_layers.0``) are those of
the report's published checkpoints, so their ``model.safetensors`` files load without key renaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from .kinds import ProjectionKind, copy_bias, calibration_error, dense_matrix

#: The initialisations of grouped weights (:func:`init_grouped_weight`).
GROUPED_INIT_SCHEMES = ("scaled_normal", "kaiming_uniform")

#: The init of a grouped projection that names none: the report's ``kaiming_uniform``. Configurations written
#: with the legacy fields keep ``scaled_normal`` (:data:`LEGACY_GROUPED_INIT` in ``configuration_kphi3``).
DEFAULT_GROUPED_INIT = "kaiming_uniform"

__all__ = [
    "group_count",
    "interleave",
    "GroupedLinear",
    "SingleGroupLinear",
    "GroupedPointwiseBlock",
    "grouped_block_forward",
    "concatenated_bmm_forward",
    "grouped_conv1d_forward",
    "per_group_gemm_forward",
    "FORMULATIONS",
    "grouped_frobenius_fit",
    "grouped_activation_fit",
    "GroupedKind",
]


def group_count(in_features: int, out_features: int, min_channels_per_group: int) -> int:
    """Number of groups ``G`` for a projection ``in_features -> out_features``.

    The largest ``d`` with ``1 <= d <= min(in, out, in // m)`` dividing both ``in`` and ``out``; at least 1.
    ``m <= 0`` is not a grouping setting (``m < 0`` means "dense" and is handled by the caller).
    """
    if in_features <= 0 or out_features <= 0:
        raise ValueError(f"projection sizes must be positive, got in={in_features}, out={out_features}")
    if min_channels_per_group <= 0:
        raise ValueError(f"min_channels_per_group must be positive to group, got {min_channels_per_group}")
    upper = min(in_features, out_features, in_features // min_channels_per_group)
    for d in range(max(upper, 1), 0, -1):
        if in_features % d == 0 and out_features % d == 0:
            return d
    return 1


def interleave(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Channel interleave of the last dimension: ``[..., s*G] -> [..., G*s]`` with ``out[a*s+b] = x[b*G+a]``.

    This materialises a copy; the block's fast path never calls it (it reads ``x`` through a strided view).
    """
    *lead, channels = x.shape
    if channels % groups:
        raise ValueError(f"interleave: {channels} channels are not divisible by {groups} groups")
    step = channels // groups
    return x.reshape(*lead, step, groups).transpose(-1, -2).reshape(*lead, channels)


def _check_last_dim(x: torch.Tensor, expected: int, layer: str) -> None:
    if x.shape[-1] != expected:
        raise ValueError(
            f"{layer}: expected input with last dimension {expected}, got shape {tuple(x.shape)} "
            f"(last dimension {x.shape[-1]})"
        )


class GroupedLinear(nn.Module):
    """Grouped pointwise convolution ``in -> out`` with ``G`` groups; weight ``[G, in/G, out/G]``, no bias.

    Input ``[..., in]`` -> output ``[..., out]``. The weight is created empty: the owning
    :class:`~transformers.PreTrainedModel` initialises it in ``_init_weights`` (see ``kphi.sources.auto``), or call
    :meth:`reset_parameters` when using the layer on its own.
    """

    def __init__(self, in_features: int, out_features: int, groups: int, *, device=None, dtype=None):
        super().__init__()
        if groups < 1 or in_features % groups or out_features % groups:
            raise ValueError(
                f"GroupedLinear: {groups} groups must divide in_features={in_features} and out_features={out_features}"
            )
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.weight = nn.Parameter(
            torch.empty(groups, in_features // groups, out_features // groups, device=device, dtype=dtype)
        )

    def reset_parameters(self, scheme: str = DEFAULT_GROUPED_INIT, std: float = 0.02) -> None:
        """Initialise in place; see :func:`init_grouped_weight` for the schemes."""
        with torch.no_grad():
            init_grouped_weight(self.weight, scheme, std)

    def naive_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reference: one matmul per group, straight from the definition."""
        _check_last_dim(x, self.in_features, "GroupedLinear")
        step = self.in_features // self.groups
        parts = [x[..., g * step : (g + 1) * step] @ self.weight[g] for g in range(self.groups)]
        return torch.cat(parts, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_last_dim(x, self.in_features, "GroupedLinear")
        lead = x.shape[:-1]
        xg = x.reshape(-1, self.groups, self.in_features // self.groups).transpose(0, 1)  # [G, N, s]
        y = torch.bmm(xg, self.weight)  # [G, N, o]
        return y.transpose(0, 1).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, groups={self.groups}"


class SingleGroupLinear(nn.Module):
    """The ``G == 1`` case: a plain dense projection ``in -> out`` (weight ``[out, in]``, no bias).

    It wraps the ``nn.Linear`` in ``group_layers[0]`` only so that the parameter is named
    ``first_pointwise_conv.group_layers.0.weight``, as in the report's checkpoints.
    """

    def __init__(self, in_features: int, out_features: int, *, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.groups = in_features, out_features, 1
        self.group_layers = nn.ModuleList([nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)])

    def naive_forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_last_dim(x, self.in_features, "SingleGroupLinear")
        return x @ self.group_layers[0].weight.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_last_dim(x, self.in_features, "SingleGroupLinear")
        return self.group_layers[0](x)


def init_grouped_weight(weight: torch.Tensor, scheme: str, std: float, branches: int = 2) -> torch.Tensor:
    """Initialise a grouped weight ``[G, s, o]`` of a block with ``branches`` grouped layers, in place.

    * ``"scaled_normal"``: ``N(0, (std * sqrt(G / branches))^2)``. Each output of the block sums
      ``branches * in / G`` products instead of the dense layer's ``in``, so this scale gives the block the
      output variance of a dense layer initialised with ``N(0, std^2)`` (phi-3's ``initializer_range``): the
      model starts from the same signal scale as the baseline it is compared with.
    * ``"kaiming_uniform"`` (the default, :data:`DEFAULT_GROUPED_INIT`): the reference implementation's init,
      ``kaiming_uniform_(a=sqrt(5))`` applied to the 3-d tensor, so torch computes ``fan_in = s * o``, i.e.
      ``U(-1/sqrt(s*o), 1/sqrt(s*o))``; it ignores ``std``.
    """
    groups = weight.shape[0]
    if scheme == "scaled_normal":
        return weight.normal_(0.0, std * math.sqrt(groups / branches))
    if scheme == "kaiming_uniform":
        return nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    raise ValueError(f"unknown grouped init scheme {scheme!r}; choose one of {', '.join(GROUPED_INIT_SCHEMES)}")


def _interleaved_copy(x: torch.Tensor, groups: int, step: int) -> torch.Tensor:
    """``interleave(x)`` for ``x: [N, G*s]`` as ``[N, G, s]``: a per-row transpose of ``[s, G]``.

    This layout (rather than ``[G, N, s]``) keeps the copy cache-friendly (each row is transposed in
    place of its own), and ``xi[:, g]`` is still a matrix a GEMM reads directly (row stride ``in``).
    """
    return x.view(x.shape[0], step, groups).transpose(1, 2).contiguous()


class _GroupedBlockFunction(torch.autograd.Function):
    """``y = GL_first(x) + GL_second(interleave(x))`` for ``x: [N, in]``, ``w_first, w_second: [G, s, o]``.

    Written by hand because no library op computes it at the speed of its FLOP count: ``torch.bmm`` on
    ``[G, N, s]`` views produces ``[G, N, o]`` and needs a transposing copy of the output (and of the
    input gradient), and grouped ``conv1d`` is slower still on CPU. Here every group is one GEMM whose
    result is written straight into its column slice of ``y`` (a strided view GEMM accepts), so the only
    data movement beyond the GEMMs is one ``[N, G, s]`` copy of the interleaved input (made in the
    forward and again in the backward, rather than saved: the function keeps only ``x`` and the weights)
    and one strided add that scatters the interleaved branch's input gradient back.

    Backward, per group ``g`` (``gy_g = grad_y[:, g*o:(g+1)*o]``, ``xi = interleave(x)`` as ``[N, G, s]``)::

        grad_w_first[g]  = x[:, g*s:(g+1)*s]^T @ gy_g        grad_x[:, g*s:(g+1)*s] = gy_g @ w_first[g]^T
        grad_w_second[g] = xi[:, g]^T @ gy_g                 grad_xi[:, g]          = gy_g @ w_second[g]^T
        grad_x += un-interleave(grad_xi)
    """

    @staticmethod
    def forward(ctx, x, w_first, w_second):
        n = x.shape[0]
        groups, step, out_per_group = w_first.shape
        xi = _interleaved_copy(x, groups, step)  # [N, G, s]
        y = torch.empty(n, groups * out_per_group, dtype=x.dtype, device=x.device)
        for g in range(groups):
            y_g = y[:, g * out_per_group : (g + 1) * out_per_group]
            torch.mm(x[:, g * step : (g + 1) * step], w_first[g], out=y_g)
            y_g.addmm_(xi[:, g], w_second[g])
        ctx.save_for_backward(x, w_first, w_second)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, w_first, w_second = ctx.saved_tensors
        n = x.shape[0]
        groups, step, out_per_group = w_first.shape
        grad_y = grad_y.contiguous()
        grad_x = grad_first = grad_second = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x)
            grad_xi = torch.empty(n, groups, step, dtype=x.dtype, device=x.device)
            for g in range(groups):
                gy_g = grad_y[:, g * out_per_group : (g + 1) * out_per_group]
                torch.mm(gy_g, w_first[g].t(), out=grad_x[:, g * step : (g + 1) * step])
                torch.mm(gy_g, w_second[g].t(), out=grad_xi[:, g])
            grad_x.view(n, step, groups).add_(grad_xi.transpose(1, 2))  # un-interleave
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gy = grad_y.view(n, groups, out_per_group).transpose(0, 1)  # [G, N, o], strided
            if ctx.needs_input_grad[1]:
                grad_first = torch.bmm(x.view(n, groups, step).permute(1, 2, 0), gy)
            if ctx.needs_input_grad[2]:
                grad_second = torch.bmm(_interleaved_copy(x, groups, step).permute(1, 2, 0), gy)
        return grad_x, grad_first, grad_second


#: Below this many rows (decoding, small prompts) two ``torch.bmm`` calls on strided views beat the per-group
#: GEMM loop of :class:`_GroupedBlockFunction`, whose fixed cost is ``4 G`` small calls; measured on 2 CPU
#: cores the crossover lies between 128 and 512 rows for the phi-3 shapes (``kphi bench`` reports decode).
SMALL_INPUT_TOKENS = 256


def _batched_matmul_forward(x: torch.Tensor, w_first: torch.Tensor, w_second: torch.Tensor) -> torch.Tensor:
    """The block as two batched matmuls over ``[G, N, s]`` views; autograd through torch's own ops."""
    n = x.shape[0]
    groups, step, out_per_group = w_first.shape
    first = x.reshape(n, groups, step).transpose(0, 1)  # [G, N, s]
    second = x.reshape(n, step, groups).permute(2, 0, 1)  # [G, N, s], interleaved
    y = torch.baddbmm(torch.bmm(first, w_first), second, w_second)  # [G, N, o]
    return y.transpose(0, 1).reshape(n, groups * out_per_group)


def concatenated_bmm_forward(x: torch.Tensor, w_first: torch.Tensor, w_second: torch.Tensor) -> torch.Tensor:
    """The block as **one** batched GEMM: ``[x_g || interleave(x)_g] @ [W_first[g]; W_second[g]]`` per group.

    ``[G, N, 2s] @ [G, 2s, o] -> [G, N, o]``: a fixed number of kernels whatever ``G`` (a concatenation, one
    ``bmm``, one transposing copy; autograd's backward likewise), and nothing but torch ops, so
    ``torch.compile(fullgraph=True)`` captures it whole and CUDA graphs can replay it. The per-group path's
    ``4 G`` small GEMMs are launch-bound on a GPU.
    """
    n = x.shape[0]
    groups, step, out_per_group = w_first.shape
    first = x.reshape(n, groups, step).transpose(0, 1)  # [G, N, s]
    second = x.reshape(n, step, groups).permute(2, 0, 1)  # [G, N, s], interleaved
    y = torch.bmm(torch.cat([first, second], dim=-1), torch.cat([w_first, w_second], dim=1))  # [G, N, o]
    return y.transpose(0, 1).reshape(n, groups * out_per_group)


def grouped_conv1d_forward(x: torch.Tensor, w_first: torch.Tensor, w_second: torch.Tensor) -> torch.Tensor:
    """The block as torch's grouped convolution (what "grouped pointwise convolution" names): one ``conv1d``
    with ``G`` groups over ``[N, G * 2s, 1]``, group ``g`` reading ``[x_g || interleave(x)_g]`` through the
    kernel ``[W_first[g]; W_second[g]]^T`` of shape ``[o, 2s, 1]``. Kept for ``kphi bench``: on CPU it is
    slower than the GEMM formulations."""
    n = x.shape[0]
    groups, step, out_per_group = w_first.shape
    both = torch.cat([x.reshape(n, groups, step), x.reshape(n, step, groups).transpose(1, 2)], dim=-1)  # [N, G, 2s]
    kernel = torch.cat([w_first, w_second], dim=1).transpose(1, 2).reshape(groups * out_per_group, 2 * step, 1)
    return torch.nn.functional.conv1d(both.reshape(n, groups * 2 * step, 1), kernel, groups=groups).view(n, -1)


def per_group_gemm_forward(x: torch.Tensor, w_first: torch.Tensor, w_second: torch.Tensor) -> torch.Tensor:
    """The block as :class:`_GroupedBlockFunction` (``4 G`` GEMMs per forward and backward, written into place),
    with autocast applied as it is for ``nn.Linear``: operands cast to the autocast dtype, GEMMs run with it off."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, w_first, w_second = x.to(dtype), w_first.to(dtype), w_second.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return _GroupedBlockFunction.apply(x.contiguous(), w_first, w_second)
    if not (x.dtype == w_first.dtype == w_second.dtype):
        raise ValueError(f"GroupedPointwiseBlock: input dtype {x.dtype} differs from weight dtype {w_first.dtype}")
    return _GroupedBlockFunction.apply(x.contiguous(), w_first, w_second)


#: Every way of computing the block that ``kphi bench --formulations`` times, each ``(x [N, in], W_first,
#: W_second [G, s, o]) -> [N, G*o]`` and each tested against the naive loops (values and gradients).
FORMULATIONS = {
    "per-group GEMMs": per_group_gemm_forward,
    "two bmm": _batched_matmul_forward,
    "concatenated bmm": concatenated_bmm_forward,
    "grouped conv1d": grouped_conv1d_forward,
}


def grouped_block_forward(x: torch.Tensor, w_first: torch.Tensor, w_second: torch.Tensor) -> torch.Tensor:
    """``GL_first(x) + GL_second(interleave(x))`` for ``x: [N, in]`` and weights ``[G, s, o]`` -> ``[N, G*o]``.

    Which formulation runs (:data:`FORMULATIONS`; ``kphi bench --formulations`` times them all):

    * under ``torch.compile`` and on any device but the CPU: :func:`concatenated_bmm_forward` (one graph, O(1)
      kernels; the GPU default is chosen by construction and has not been measured on a GPU yet);
    * on the CPU under bf16 autocast: :func:`concatenated_bmm_forward` as well (measured on 2 cores at 2048
      rows: faster than the per-group loop at 4 of phi-3's 5 benchmarked shapes, BENCHMARKS.md);
    * on the CPU in full precision: :class:`_GroupedBlockFunction` for ``N >= SMALL_INPUT_TOKENS`` rows (the
      fastest measured at 3 of the 5 shapes, within 1% at a fourth), two batched matmuls below that.

    Differentiable in ``x`` and both weights. Under autocast (mixed-precision training) the operands are cast
    to the autocast dtype first, as autocast does for ``nn.Linear``; the hand-written GEMMs then run with
    autocast off.
    """
    if torch.compiler.is_compiling() or x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return concatenated_bmm_forward(x, w_first, w_second)
    if x.shape[0] < SMALL_INPUT_TOKENS:
        return _batched_matmul_forward(x, w_first, w_second)
    return per_group_gemm_forward(x, w_first, w_second)


class GroupedPointwiseBlock(nn.Module):
    """kphi-3's replacement for a dense projection ``in -> out`` (input ``[..., in]``, output ``[..., out]``).

    ``G > 1``: ``y = GL_first(x) + GL_second(interleave(x))`` with two :class:`GroupedLinear` of ``G`` groups
    (``2 * in * out / G`` parameters). ``G == 1``: one dense projection (:class:`SingleGroupLinear`).
    ``branches=1`` (an ablation, not the report's block): ``y = GL_first(x)`` alone, ``in * out / G``
    parameters, each output reading one group of inputs only.
    """

    def __init__(self, in_features: int, out_features: int, groups: int, *, bias: bool = False, branches: int = 2,
                 device=None, dtype=None):
        super().__init__()
        if branches not in (1, 2):
            raise ValueError(f"a grouped block has 1 or 2 branches, got {branches!r}")
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        # GPT-2's and Qwen2's projections carry a bias; the report's kphi-3 blocks do not (no ``bias`` key)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        if groups == 1:
            self.first_pointwise_conv = SingleGroupLinear(in_features, out_features, device=device, dtype=dtype)
            self.second_pointwise_conv = None
        else:
            self.first_pointwise_conv = GroupedLinear(in_features, out_features, groups, device=device, dtype=dtype)
            self.second_pointwise_conv = (
                GroupedLinear(in_features, out_features, groups, device=device, dtype=dtype) if branches == 2 else None
            )

    @classmethod
    def from_min_channels(cls, in_features: int, out_features: int, min_channels_per_group: int, **kw):
        """Block with ``G = group_count(in, out, m)`` groups."""
        return cls(in_features, out_features, group_count(in_features, out_features, min_channels_per_group), **kw)

    def naive_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reference path: per-group loops and an explicit interleaved copy, straight from the definition."""
        y = self.first_pointwise_conv.naive_forward(x)
        if self.second_pointwise_conv is not None:
            y = y + self.second_pointwise_conv.naive_forward(interleave(x, self.groups))
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.second_pointwise_conv is None:
            y = self.first_pointwise_conv(x)
        else:
            _check_last_dim(x, self.in_features, "GroupedPointwiseBlock")
            lead = x.shape[:-1]
            y = grouped_block_forward(
                x.reshape(-1, self.in_features), self.first_pointwise_conv.weight, self.second_pointwise_conv.weight
            ).view(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        bias = ", bias=True" if self.bias is not None else ""
        branches = ", branches=1" if self.groups > 1 and self.second_pointwise_conv is None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, groups={self.groups}{bias}{branches}"


# --- the grouped kind: build, count, initialise and fit the block ----------------------------------------


def _grouped_supports(in_features: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of ``M = W^T: [in, out]`` that each branch's group ``g`` reads, as ``[G, s]`` tensors.

    First branch: group ``g`` reads rows ``g*s + b``; second (interleaved) branch: rows ``b*G + g``
    (``b in [0, s)``). Both write the output columns ``[g*o, (g+1)*o)``.
    """
    step = in_features // groups
    g = torch.arange(groups).unsqueeze(1)
    b = torch.arange(step).unsqueeze(0)
    return g * step + b, b * groups + g


def grouped_frobenius_fit(matrix: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The block closest to a dense ``matrix: [in, out]`` (``y = x @ matrix``) in Frobenius norm.

    The block computes ``y = x @ M(A, B)`` with ``M(A, B)[g*s + b, g-th column block] += A[g, b]`` and
    ``M(A, B)[b*G + g, g-th column block] += B[g, b]``: each weight row of either branch lands on one row
    segment of ``M`` (``o`` entries), and nothing else does. So ``||matrix - M(A, B)||^2`` splits into
    independent terms, one per row segment:

    * a segment reached by one branch only is matched exactly (``A`` or ``B`` takes the segment of ``matrix``);
    * a segment reached by both (row ``i`` with ``i // s == i % G``: the two supports overlap there) only
      constrains the sum ``A[g, b] + B[g, b']``; every split is optimal and we take the minimum-norm one,
      half each;
    * segments reached by neither (all other column blocks of every row) stay zero: their squared sum is
      the irreducible error, ``||matrix||^2 - ||matrix on the supports||^2``.

    Returns ``(A, B)`` of shape ``[G, s, o]`` (the block's ``first``/``second`` weight layout).
    """
    in_features, out_features = matrix.shape
    out_step = out_features // groups
    blocks = matrix.reshape(in_features, groups, out_step)  # [in, G, o]: column block g of row i
    first_rows, second_rows = _grouped_supports(in_features, groups)
    g = torch.arange(groups).unsqueeze(1)
    first = blocks[first_rows, g].clone()  # [G, s, o]
    second = blocks[second_rows, g].clone()
    overlap = (first_rows % groups) == g  # row g*s+b is also the interleaved branch's row for group g
    gi, bi = overlap.nonzero(as_tuple=True)
    first[gi, bi] *= 0.5
    second[gi, first_rows[gi, bi] // groups] *= 0.5
    return first, second


def grouped_activation_fit(
    matrix: torch.Tensor, gram: torch.Tensor, groups: int, damping: float = 1e-2
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block minimising ``||X @ matrix - block(X)||_F`` on calibration inputs with ``gram = X^T X``.

    Output column block ``g`` of the block is ``X[:, S_g] @ [A[g]; B[g]]`` with ``S_g`` the ``2s`` rows both
    branches read (:func:`_grouped_supports`), so each group is an independent least-squares problem
    whose normal equations need only the Gram matrix::

        C[S_g, S_g] @ theta_g = C[S_g, :] @ matrix[:, g-th column block],    theta_g = [A[g]; B[g]]: [2s, o]

    A row in both supports makes ``C[S_g, S_g]`` singular (two equal columns of ``X[:, S_g]``), and real
    activations make it ill-conditioned; a ridge of ``damping * mean(diag C[S_g, S_g])`` (1%, GPTQ's default
    dampening) makes it solvable, splits such rows evenly as the Frobenius fit does, and keeps the fit from
    chasing directions the calibration rows barely visit. Returns ``(A, B)``, each ``[G, s, o]``.
    """
    in_features, out_features = matrix.shape
    step, out_step = in_features // groups, out_features // groups
    first_rows, second_rows = _grouped_supports(in_features, groups)
    first = matrix.new_empty(groups, step, out_step)
    second = matrix.new_empty(groups, step, out_step)
    for g in range(groups):
        rows = torch.cat([first_rows[g], second_rows[g]])
        lhs = gram[rows][:, rows]
        lhs = lhs + damping * lhs.diagonal().mean().clamp_min(1e-12) * torch.eye(len(rows), dtype=lhs.dtype)
        rhs = gram[rows] @ matrix[:, g * out_step : (g + 1) * out_step]
        theta = torch.linalg.solve(lhs, rhs)
        first[g], second[g] = theta[:step], theta[step:]
    return first, second


@dataclass
class GroupedKind(ProjectionKind):
    """The report's grouped pointwise block, ``G = group_count(in, out, min_channels_per_group)`` groups.

    ``init``: ``"kaiming_uniform"`` (the report's, the default) or ``"scaled_normal"`` (dense-equivalent
    output variance), see :func:`init_grouped_weight`. ``branches``: 2 (the report's block) or 1 (the first grouped
    layer alone, no interleaved branch: an ablation of what the interleave earns).
    """

    name: ClassVar[str] = "grouped"
    min_channels_per_group: int = 256
    """m in the group rule: G is the largest divisor of in and out with in // G >= m (the cpu presets use 32)."""
    init: str = field(default=DEFAULT_GROUPED_INIT, metadata={"choices": GROUPED_INIT_SCHEMES})
    """initialisation of the grouped weights: kaiming_uniform (the report's, the default) or scaled_normal (a dense layer's output scale)."""
    branches: int = field(default=2, metadata={"choices": (1, 2)})
    """2: the report's block; 1: the first grouped layer alone, no interleaved branch (an ablation)."""

    def __post_init__(self):
        if not isinstance(self.min_channels_per_group, int) or self.min_channels_per_group <= 0:
            raise ValueError(f"grouped: min_channels_per_group must be a positive integer, got {self.min_channels_per_group!r}")
        if self.init not in GROUPED_INIT_SCHEMES:
            raise ValueError(f"grouped: init must be one of {', '.join(GROUPED_INIT_SCHEMES)}, got {self.init!r}")
        if self.branches not in (1, 2):
            raise ValueError(f"grouped: branches must be 1 or 2, got {self.branches!r}")

    def groups(self, in_features: int, out_features: int) -> int:
        return group_count(in_features, out_features, self.min_channels_per_group)

    def build(self, in_features, out_features, bias=False):
        return GroupedPointwiseBlock(in_features, out_features, self.groups(in_features, out_features), bias=bias,
                                     branches=self.branches)

    def num_parameters(self, in_features, out_features, bias=False):
        groups = self.groups(in_features, out_features)
        weights = in_features * out_features * (self.branches if groups > 1 else 1) // groups
        return weights + (out_features if bias else 0)

    def initialize(self, module, std):
        """Each :class:`GroupedLinear` by ``self.init``; a block's own bias to zero. (A ``G == 1`` block holds
        an ``nn.Linear``, which the owning model initialises as it does every linear layer.)"""
        from transformers import initialization as init

        if isinstance(module, GroupedLinear) and not getattr(module.weight, "_is_hf_initialized", False):
            init_grouped_weight(module.weight, self.init, std, self.branches)
        elif isinstance(module, GroupedPointwiseBlock) and module.bias is not None:
            init.zeros_(module.bias)

    def fit(self, module, weight, bias=None, gram=None):
        matrix = weight.double().T  # [in, out]
        with torch.no_grad():
            if module.groups == 1:
                module.first_pointwise_conv.group_layers[0].weight.copy_(weight)
            elif module.second_pointwise_conv is None:
                module.first_pointwise_conv.weight.copy_(_single_branch_fit(matrix, module.groups, None if gram is None else gram.double()))
            else:
                first, second = grouped_frobenius_fit(matrix, module.groups)
                if gram is not None:
                    candidate = grouped_activation_fit(matrix, gram.double(), module.groups)
                    # the damped solve is the calibration optimum up to the ridge; keep whichever is better there
                    first, second = _better_on_calibration(module, weight, gram, (first, second), candidate)
                module.first_pointwise_conv.weight.copy_(first)
                module.second_pointwise_conv.weight.copy_(second)
        copy_bias(module, bias)
        return self.result(module, weight, gram, "activations" if gram is not None else "frobenius")

    def owns(self, module):
        return isinstance(module, (GroupedPointwiseBlock, GroupedLinear))


def _single_branch_fit(matrix: torch.Tensor, groups: int, gram: torch.Tensor | None) -> torch.Tensor:
    """The first grouped layer alone closest to ``matrix: [in, out]``: ``[G, s, o]``. In Frobenius norm that is
    ``matrix``'s diagonal blocks; on calibration inputs each group solves its least squares over its own rows
    (ridge as :func:`grouped_activation_fit`)."""
    in_features, out_features = matrix.shape
    step, out_step = in_features // groups, out_features // groups
    out = matrix.new_empty(groups, step, out_step)
    for g in range(groups):
        rows, cols = slice(g * step, (g + 1) * step), slice(g * out_step, (g + 1) * out_step)
        if gram is None:
            out[g] = matrix[rows, cols]
        else:
            lhs = gram[rows, rows]
            lhs = lhs + 1e-2 * lhs.diagonal().mean().clamp_min(1e-12) * torch.eye(step, dtype=lhs.dtype)
            out[g] = torch.linalg.solve(lhs, gram[rows] @ matrix[:, cols])
    return out


def _better_on_calibration(module, weight, gram, *candidates):
    best, best_error = None, float("inf")
    for first, second in candidates:
        module.first_pointwise_conv.weight.copy_(first)
        module.second_pointwise_conv.weight.copy_(second)
        error = calibration_error(gram, weight, dense_matrix(module, module.in_features))
        if error < best_error:
            best, best_error = (first, second), error
    return best
