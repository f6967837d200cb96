"""The grouped pointwise block against its definition."""

import math

import pytest
import torch

from kphi.modeling.block import GroupedLinear, GroupedPointwiseBlock, SingleGroupLinear, group_count, interleave


pytestmark = pytest.mark.fast


def naive_group_count(i, o, m):
    """Straight from the rule: the largest d <= min(i, o, i // m) dividing both, at least 1."""
    best = 1
    for d in range(1, min(i, o, i // m) + 1):
        if i % d == 0 and o % d == 0:
            best = d
    return best


@pytest.mark.parametrize(
    "i,o,m,expected",
    [
        (3072, 9216, 256, 12),  # phi-3 qkv_proj
        (3072, 3072, 256, 12),  # o_proj
        (3072, 18432, 256, 12),  # gate_up_proj
        (9216, 3072, 256, 32),  # down_proj: 36 is the cap, 32 the largest common divisor below it
        (64, 192, 16, 4),
        (128, 64, 16, 8),
        (64, 64, 128, 1),  # m larger than the channel count -> one group
        (7, 5, 1, 1),  # coprime sizes
        (10, 10, 3, 2),  # cap 3 does not divide 10
        (12, 18, 2, 6),
    ],
)
def test_group_count_table(i, o, m, expected):
    assert group_count(i, o, m) == expected
    assert naive_group_count(i, o, m) == expected


def test_group_count_matches_rule_exhaustively():
    for i in range(1, 40):
        for o in range(1, 40, 3):
            for m in (1, 2, 3, 5, 8, 50):
                assert group_count(i, o, m) == naive_group_count(i, o, m), (i, o, m)


def test_group_count_rejects_nonpositive_m():
    with pytest.raises(ValueError, match="min_channels_per_group"):
        group_count(8, 8, 0)


def test_interleave_definition():
    groups, step = 4, 3
    x = torch.arange(groups * step).float()
    y = interleave(x, groups)
    for a in range(groups):
        for b in range(step):
            assert y[a * step + b] == x[b * groups + a]
    # leading dimensions are carried through
    xb = torch.randn(2, 5, groups * step)
    assert torch.equal(interleave(xb, groups)[1, 3], interleave(xb[1, 3], groups))


def test_interleave_rejects_indivisible():
    with pytest.raises(ValueError, match="not divisible"):
        interleave(torch.zeros(10), 3)


def naive_block(x, w1, w2):
    """y = GL1(x) + GL2(interleave(x)) with explicit index lists and per-group loops."""
    groups, step, _ = w1.shape
    idx = [b * groups + a for a in range(groups) for b in range(step)]
    xi = x[..., idx]
    out = []
    for g in range(groups):
        sl = slice(g * step, (g + 1) * step)
        out.append(x[..., sl] @ w1[g] + xi[..., sl] @ w2[g])
    return torch.cat(out, dim=-1)


def _block(i, o, g, dtype=torch.float32):
    block = GroupedPointwiseBlock(i, o, g, dtype=dtype)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return block


# 2 x 5 rows take the batched-matmul path, 3 x 100 rows the per-group GEMM function (SMALL_INPUT_TOKENS = 256).
@pytest.mark.parametrize("rows", [(2, 5), (3, 100)], ids=["small-input", "gemm-loop"])
@pytest.mark.parametrize("i,o,g", [(64, 192, 4), (128, 64, 8), (48, 48, 12), (6, 10, 2)])
def test_block_fast_path_equals_naive_values_and_grads(i, o, g, rows):
    block = _block(i, o, g)
    x = torch.randn(*rows, i, requires_grad=True)
    fast = block(x)
    ref = naive_block(x, block.first_pointwise_conv.weight, block.second_pointwise_conv.weight)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block.naive_forward(x), ref, rtol=1e-5, atol=1e-5)

    grad_out = torch.randn_like(fast)
    grads_fast = torch.autograd.grad(fast, [x, *block.parameters()], grad_out)
    grads_ref = torch.autograd.grad(ref, [x, *block.parameters()], grad_out)
    for a, b in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [3, 300])
def test_block_bfloat16_close_to_float32(rows):
    block = _block(64, 128, 4)
    x = torch.randn(rows, 64)
    ref = block.naive_forward(x)
    out = block.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_block_parameter_count_is_2_in_out_over_g():
    block = GroupedPointwiseBlock(3072, 9216, 12, device="meta")
    assert sum(p.numel() for p in block.parameters()) == 2 * 3072 * 9216 // 12
    assert block.first_pointwise_conv.weight.shape == (12, 256, 768)


def test_single_group_block_is_dense_with_reference_key_names():
    block = GroupedPointwiseBlock(10, 6, 1)
    assert block.second_pointwise_conv is None
    names = dict(block.named_parameters())
    assert list(names) == ["first_pointwise_conv.group_layers.0.weight"]
    weight = names["first_pointwise_conv.group_layers.0.weight"]
    assert weight.shape == (6, 10)
    torch.nn.init.normal_(weight)
    x = torch.randn(4, 10)
    torch.testing.assert_close(block(x), x @ weight.T)
    assert isinstance(block.first_pointwise_conv, SingleGroupLinear)


def test_from_min_channels_uses_group_rule():
    assert GroupedPointwiseBlock.from_min_channels(9216, 3072, 256, device="meta").groups == 32
    assert GroupedPointwiseBlock.from_min_channels(64, 64, 128, device="meta").groups == 1


@pytest.mark.parametrize("module, name", [(GroupedPointwiseBlock(64, 32, 4), "GroupedPointwiseBlock"),
                                          (GroupedPointwiseBlock(64, 32, 1), "SingleGroupLinear"),  # G = 1: one layer
                                          (GroupedLinear(64, 32, 4), "GroupedLinear")])
def test_wrong_input_size_names_layer_expected_and_actual(module, name):
    with pytest.raises(ValueError) as err:
        module(torch.zeros(2, 63))
    message = str(err.value)
    assert message.startswith(name + ":")
    assert "64" in message and "63" in message


def test_indivisible_groups_rejected():
    with pytest.raises(ValueError, match="must divide"):
        GroupedLinear(10, 12, 4)


def test_init_schemes():
    layer = GroupedLinear(512, 512, 8)
    layer.reset_parameters("scaled_normal", std=0.02)
    assert layer.weight.std().item() == pytest.approx(0.02 * math.sqrt(8 / 2), rel=0.05)
    layer.reset_parameters("kaiming_uniform")
    bound = 1 / math.sqrt(64 * 64)  # torch's fan_in of a [G, s, o] tensor is s * o
    assert layer.weight.abs().max().item() <= bound
    assert layer.weight.abs().max().item() > 0.9 * bound
    with pytest.raises(ValueError, match="unknown grouped init"):
        layer.reset_parameters("xavier")


def test_fast_path_gradients_pass_gradcheck_in_float64():
    block = GroupedPointwiseBlock(12, 18, 6, dtype=torch.float64)
    for p in block.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    w1, w2 = block.first_pointwise_conv.weight, block.second_pointwise_conv.weight
    from kphi.modeling.block import _GroupedBlockFunction, grouped_block_forward

    assert torch.autograd.gradcheck(_GroupedBlockFunction.apply, (x, w1, w2))  # the hand-written backward
    assert torch.autograd.gradcheck(grouped_block_forward, (x, w1, w2))


def test_fast_path_bfloat16_gradients_close_to_reference():
    block = _block(64, 128, 4)
    x = torch.randn(300, 64, requires_grad=True)  # the per-group GEMM path
    grad_out = torch.randn(300, 128)
    ref_grads = torch.autograd.grad(block.naive_forward(x), [x, *block.parameters()], grad_out)
    bf = _block(64, 128, 4).to(torch.bfloat16)
    bf.load_state_dict({k: v.to(torch.bfloat16) for k, v in block.state_dict().items()})
    xb = x.detach().to(torch.bfloat16).requires_grad_()
    grads = torch.autograd.grad(bf(xb), [xb, *bf.parameters()], grad_out.to(torch.bfloat16))
    for got, ref in zip(grads, ref_grads):
        # bfloat16 keeps 8 bits of mantissa: errors of ~1% of the largest entry are its rounding, not a bug
        scale = ref.abs().max().item()
        torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2 * scale)


@pytest.mark.parametrize("formulation", [None, "per-group GEMMs", "two bmm", "concatenated bmm", "grouped conv1d"])
def test_fast_path_under_autocast_matches_linear_behaviour(formulation):
    """Under bf16 autocast the block (``None``: its default on the CPU, the concatenated bmm) and every
    formulation behave as ``nn.Linear`` does: a bf16 output, float32 weight gradients, naive values to bf16's
    rounding."""
    from kphi.modeling.block import FORMULATIONS

    block = _block(64, 128, 4)
    w1, w2 = block.first_pointwise_conv.weight, block.second_pointwise_conv.weight
    x = torch.randn(300, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x) if formulation is None else FORMULATIONS[formulation](x, w1, w2)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad is not None and w1.grad.dtype == torch.float32 and w2.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), block.naive_forward(x), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("formulation", ["per-group GEMMs", "two bmm", "concatenated bmm", "grouped conv1d"])
@pytest.mark.parametrize("i,o,g", [(64, 192, 4), (128, 64, 8), (48, 48, 12), (6, 10, 2)])
def test_every_formulation_equals_naive_values_and_grads(formulation, i, o, g):
    """Every formulation ``kphi bench`` times (the one-GEMM one is the default under torch.compile and off the
    CPU) against the naive loops, in values and in all three gradients."""
    from kphi.modeling.block import FORMULATIONS

    block = _block(i, o, g)
    w1, w2 = block.first_pointwise_conv.weight, block.second_pointwise_conv.weight
    x = torch.randn(37, i, requires_grad=True)
    fast, ref = FORMULATIONS[formulation](x, w1, w2), naive_block(x, w1, w2)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(fast)
    for a, b in zip(torch.autograd.grad(fast, [x, w1, w2], grad_out), torch.autograd.grad(ref, [x, w1, w2], grad_out)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
