"""Projection kinds: each builds, counts, initialises and fits itself; the registry names them.

The fits are checked against independent solutions: the grouped block's closed form against a direct
least-squares solve over its parameters, the activation-aware fits against the calibration objective itself.
"""

import dataclasses
from typing import ClassVar

import pytest
import torch
from torch import nn

from kphi.modeling.block import GroupedKind, GroupedPointwiseBlock
from kphi.modeling.kinds import DenseKind, ProjectionKind, calibration_error, dense_matrix
from kphi.modeling.lowrank import LowRankKind
from kphi.modeling.monarch import MonarchKind, MonarchLinear
from kphi.modeling.projections import PROJECTION_KINDS, projection_kind, replace_projections

pytestmark = pytest.mark.fast

KINDS = [
    DenseKind(),
    GroupedKind(min_channels_per_group=4, init="scaled_normal"),
    GroupedKind(min_channels_per_group=4, init="scaled_normal", branches=1),
    LowRankKind(fraction=0.3),
    MonarchKind(blocks=4, fraction=0.3),
]
SHAPES = [(16, 16), (16, 48), (32, 8)]


def _built(kind, n_in, n_out, bias=False, std=0.05):
    module = kind.build(n_in, n_out, bias=bias).double()
    with torch.no_grad():
        for sub in module.modules():
            if kind.owns(sub):
                kind.initialize(sub, std)
    return module


def test_registry_names_every_kind_and_builds_from_data():
    assert set(PROJECTION_KINDS) == {"dense", "grouped", "low_rank", "monarch"}
    kind = projection_kind({"kind": "monarch", "blocks": 2, "fraction": 0.5})
    assert isinstance(kind, MonarchKind) and kind.blocks == 2
    assert projection_kind(kind.to_dict()) == kind
    assert projection_kind("grouped") == GroupedKind()


@pytest.mark.parametrize("spec, message", [
    ({"kind": "butterfly"}, "unknown projection kind 'butterfly'"),
    ({"blocks": 2}, "with a 'kind'"),
    ({"kind": "grouped", "groups": 3}, "unexpected keyword"),
    ({"kind": "grouped", "min_channels_per_group": 0}, "positive integer"),
    ({"kind": "low_rank", "fraction": 1.5}, "fraction must be in (0, 1]"),
])
def test_bad_projection_settings_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        projection_kind(spec)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.describe())
@pytest.mark.parametrize("n_in, n_out", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_count_forward_and_dense_matrix_agree(kind, n_in, n_out, bias):
    module = _built(kind, n_in, n_out, bias)
    assert sum(p.numel() for p in module.parameters()) == kind.num_parameters(n_in, n_out, bias)
    x = torch.randn(5, 3, n_in, dtype=torch.float64)
    w = kind.dense_weight(module)
    assert w.shape == (n_out, n_in)
    expected = x @ w.T + (module.bias if bias else 0)
    torch.testing.assert_close(module(x), expected)
    if hasattr(module, "naive_forward"):
        torch.testing.assert_close(module.naive_forward(x), expected)


def test_structured_kinds_save_parameters_on_a_wide_projection():
    for kind in KINDS[1:]:
        assert kind.num_parameters(256, 768) < 0.5 * 256 * 768, kind


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.describe())
def test_initialisation_matches_a_dense_layers_output_scale(kind):
    """Every kind starts with the output std of a dense layer with weights N(0, std^2): sqrt(in) * std."""
    torch.manual_seed(0)
    n_in, n_out, std = 256, 256, 0.02
    module = _built(kind, n_in, n_out, std=std)
    y = module(torch.randn(4096, n_in, dtype=torch.float64))
    assert y.std().item() == pytest.approx(n_in**0.5 * std, rel=0.1)


@pytest.mark.parametrize("branches", [1, 2])
def test_the_default_grouped_init_is_the_reports_kaiming_uniform(branches):
    """The report's init ignores ``std``: every grouped weight ``[G, s, o]`` is ``U(-b, b)`` with
    ``b = 1 / sqrt(s * o)`` (torch's ``kaiming_uniform_(a=sqrt(5))`` on the 3-d tensor), so each output, a sum
    of ``branches * s`` products of unit inputs, has std ``sqrt(branches * s / (3 * s * o))``."""
    torch.manual_seed(0)
    kind = GroupedKind(min_channels_per_group=8, branches=branches)
    assert kind.init == "kaiming_uniform"
    module = _built(kind, 64, 128, std=0.02)
    groups = kind.groups(64, 128)
    s, o = 64 // groups, 128 // groups
    for weight in (p for p in module.parameters()):
        assert weight.abs().max().item() <= (s * o) ** -0.5
    y = module(torch.randn(8192, 64, dtype=torch.float64))
    assert y.std().item() == pytest.approx((branches * s / (3 * s * o)) ** 0.5, rel=0.1)


# --- fits ---------------------------------------------------------------------------------------------


def _grouped_lstsq(weight, groups):
    """Frobenius optimum over the block's parameters by a direct least-squares solve: the dense matrix is
    linear in theta = (first, second), so build that linear map column by column."""
    block = GroupedPointwiseBlock(weight.shape[1], weight.shape[0], groups).double()
    params = [block.first_pointwise_conv.weight, block.second_pointwise_conv.weight]
    sizes = [p.numel() for p in params]
    columns = []
    with torch.no_grad():
        for i in range(sum(sizes)):
            theta = torch.zeros(sum(sizes), dtype=torch.float64)
            theta[i] = 1
            params[0].copy_(theta[: sizes[0]].view_as(params[0]))
            params[1].copy_(theta[sizes[0]:].view_as(params[1]))
            columns.append(dense_matrix(block, block.in_features).flatten())
    design = torch.stack(columns, dim=1)
    theta = torch.linalg.lstsq(design, weight.flatten().unsqueeze(1), driver="gelsd").solution.squeeze(1)
    return torch.linalg.norm(design @ theta - weight.flatten()) / torch.linalg.norm(weight)


@pytest.mark.parametrize("n_in, n_out, m", [(8, 8, 2), (12, 8, 3), (8, 16, 4), (16, 8, 4)])
def test_grouped_frobenius_fit_reaches_the_least_squares_optimum(n_in, n_out, m):
    torch.manual_seed(1)
    weight = torch.randn(n_out, n_in, dtype=torch.float64)
    kind = GroupedKind(min_channels_per_group=m)
    block = kind.build(n_in, n_out).double()
    assert block.groups > 1
    fitted = kind.fit(block, weight)
    optimum = _grouped_lstsq(weight, block.groups)
    assert fitted.relative_error == pytest.approx(float(optimum), abs=1e-9)


@pytest.mark.parametrize("kind", KINDS[1:], ids=lambda k: k.describe())
def test_a_matrix_of_the_kinds_own_structure_is_recovered_exactly(kind):
    torch.manual_seed(2)
    source = _built(kind, 16, 32, std=0.3)
    target = kind.build(16, 32).double()
    result = kind.fit(target, kind.dense_weight(source))
    assert result.relative_error < 1e-10


def test_low_rank_frobenius_fit_is_eckart_young():
    torch.manual_seed(3)
    weight = torch.randn(24, 16, dtype=torch.float64)
    kind = LowRankKind(fraction=0.3)
    module = kind.build(16, 24).double()
    result = kind.fit(module, weight)
    s = torch.linalg.svdvals(weight)
    assert result.relative_error == pytest.approx(float(s[module.rank:].norm() / s.norm()), abs=1e-10)


def test_monarch_fit_beats_every_nearby_monarch_matrix():
    """The per-sub-block SVD is a minimum: small random moves of the fitted factors only add error."""
    torch.manual_seed(4)
    weight = torch.randn(16, 16, dtype=torch.float64)
    kind = MonarchKind(blocks=4, fraction=0.3)
    module = kind.build(16, 16).double()
    best = kind.fit(module, weight).relative_error
    assert 0 < best < 1
    with torch.no_grad():
        for _ in range(20):
            moved = MonarchLinear(16, 16, module.blocks, module.rank).double()
            moved.first.copy_(module.first + 1e-3 * torch.randn_like(module.first))
            moved.second.copy_(module.second + 1e-3 * torch.randn_like(module.second))
            assert kind.result(moved, weight).relative_error > best


def _correlated_inputs(n, dim, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    scale = torch.logspace(0, -2, dim, dtype=torch.float64)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) @ (mix * scale)


@pytest.mark.parametrize("kind", [GroupedKind(min_channels_per_group=4), LowRankKind(fraction=0.3)], ids=lambda k: k.describe())
def test_activation_fit_is_never_worse_on_calibration_data(kind):
    torch.manual_seed(5)
    weight = torch.randn(32, 16, dtype=torch.float64)
    x = _correlated_inputs(512, 16, seed=6)
    gram = x.T @ x
    frob, act = kind.build(16, 32).double(), kind.build(16, 32).double()
    kind.fit(frob, weight)
    result = kind.fit(act, weight, gram=gram)
    frobenius_error = calibration_error(gram, weight, kind.dense_weight(frob))
    assert result.calibration_error <= frobenius_error + 1e-12
    assert result.calibration_error < 0.9 * frobenius_error  # on correlated inputs it helps clearly
    # the reported error is the objective itself: ||X W^T - module(X)|| / ||X W^T||
    with torch.no_grad():
        direct = torch.linalg.norm(x @ weight.T - act(x)) / torch.linalg.norm(x @ weight.T)
    assert result.calibration_error == pytest.approx(float(direct), rel=1e-6)


def test_grouped_activation_fit_solves_each_groups_least_squares():
    torch.manual_seed(7)
    n_in, n_out = 16, 16
    weight = torch.randn(n_out, n_in, dtype=torch.float64)
    x = _correlated_inputs(400, n_in, seed=8)
    kind = GroupedKind(min_channels_per_group=4)
    block = kind.build(n_in, n_out).double()
    result = kind.fit(block, weight, gram=x.T @ x)
    # reference: one ridge least squares per output group on the columns of X the group reads, solved as a
    # plain lstsq on the design stacked over sqrt(lambda) I, lambda = 1% of the mean diagonal of its Gram
    groups, s, o = block.groups, n_in // block.groups, n_out // block.groups
    residual = 0.0
    for g in range(groups):
        rows = list(range(g * s, (g + 1) * s)) + [b * groups + g for b in range(s)]
        target = x @ weight.T[:, g * o:(g + 1) * o]
        design = x[:, rows]
        ridge = 0.01 * float((design * design).sum(0).mean())
        stacked = torch.cat([design, ridge**0.5 * torch.eye(len(rows), dtype=design.dtype)])
        padded = torch.cat([target, torch.zeros(len(rows), o, dtype=target.dtype)])
        sol = torch.linalg.lstsq(stacked, padded, driver="gelsd").solution
        residual += float(torch.linalg.norm(design @ sol - target) ** 2)
    assert result.calibration_error == pytest.approx((residual / float(torch.linalg.norm(x @ weight.T) ** 2)) ** 0.5, rel=1e-4)


def test_monarch_has_no_activation_fit_and_says_so():
    kind = MonarchKind()
    with pytest.raises(ValueError, match="no closed-form activation-aware fit"):
        kind.fit(kind.build(16, 16), torch.randn(16, 16), gram=torch.eye(16))


# --- extending the registry -----------------------------------------------------------------------------


class DiagonalPlusRowLinear(nn.Module):
    def __init__(self, n_in, n_out, bias=False):
        super().__init__()
        self.in_features, self.out_features = n_in, n_out
        self.weight = nn.Parameter(torch.empty(n_out, n_in))
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None

    def forward(self, x):
        return nn.functional.linear(x, self.weight.tril(), self.bias)


@dataclasses.dataclass
class LowerTriangularKind(ProjectionKind):
    """A toy kind for the test: lower-triangular weights (not a parameter saver, just a different class)."""

    name: ClassVar[str] = "lower_triangular"

    def build(self, n_in, n_out, bias=False):
        return DiagonalPlusRowLinear(n_in, n_out, bias)

    def num_parameters(self, n_in, n_out, bias=False):
        return n_in * n_out + (n_out if bias else 0)

    def initialize(self, module, std):
        nn.init.normal_(module.weight, std=std)

    def fit(self, module, weight, bias=None, gram=None):
        with torch.no_grad():
            module.weight.copy_(weight.tril())
        return self.result(module, weight, gram)

    def owns(self, module):
        return isinstance(module, DiagonalPlusRowLinear)


def test_a_new_kind_is_one_class_and_one_registry_entry(monkeypatch):
    monkeypatch.setitem(PROJECTION_KINDS, LowerTriangularKind.name, LowerTriangularKind)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    weights = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]

    def fit(name, old, new):
        projection_kind("lower_triangular").fit(new, old.weight.detach(), old.bias.detach())

    replaced = replace_projections(model, {"kind": "lower_triangular"}, targets=["0", "2"], on_replace=fit)
    assert replaced == ["0", "2"]
    assert isinstance(model[0], DiagonalPlusRowLinear)
    torch.testing.assert_close(model[2].weight, weights[1].tril())


def test_a_single_branch_block_is_block_diagonal_and_keeps_the_report_keys():
    """``branches=1`` is the first grouped layer alone: each output reads only its own group of inputs (its
    dense matrix is block diagonal), half the block's parameters; the report's two-branch block keeps its keys."""
    one, two = GroupedKind(4, branches=1), GroupedKind(4)
    single = _built(one, 16, 32)
    w = one.dense_weight(single)
    groups, step, out_step = single.groups, 16 // single.groups, 32 // single.groups
    mask = torch.block_diag(*[torch.ones(out_step, step, dtype=torch.bool)] * groups)
    assert w[~mask].abs().max() == 0 and w[mask].abs().min() > 0
    assert one.num_parameters(16, 32) * 2 == two.num_parameters(16, 32)
    assert sorted(dict(single.named_parameters())) == ["first_pointwise_conv.weight"]
    assert sorted(dict(two.build(16, 32).named_parameters())) == ["first_pointwise_conv.weight", "second_pointwise_conv.weight"]
    with pytest.raises(ValueError, match="branches must be 1 or 2"):
        projection_kind({"kind": "grouped", "min_channels_per_group": 4, "branches": 3})


def test_single_branch_fits_are_the_diagonal_blocks_and_their_least_squares():
    torch.manual_seed(4)
    kind = GroupedKind(4, branches=1)
    weight = torch.randn(32, 16, dtype=torch.float64)
    block = kind.build(16, 32).double()
    kind.fit(block, weight)
    mask = torch.block_diag(*[torch.ones(32 // block.groups, 16 // block.groups, dtype=torch.bool)] * block.groups)
    torch.testing.assert_close(kind.dense_weight(block), weight * mask)
    x = torch.randn(200, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)
    gram = x.T @ x
    kind.fit(block, weight, gram=gram)
    # each group's least squares over its own inputs, solved directly (the 1% ridge aside: compare loosely)
    step, out_step = 16 // block.groups, 32 // block.groups
    for g in range(block.groups):
        xs = x[:, g * step:(g + 1) * step]
        target = x @ weight.T[:, g * out_step:(g + 1) * out_step]
        direct = torch.linalg.lstsq(xs, target).solution
        fitted = block.first_pointwise_conv.weight[g].detach()
        assert torch.linalg.norm(xs @ fitted - target) <= 1.01 * torch.linalg.norm(xs @ direct - target)
