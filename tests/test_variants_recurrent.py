"""Recurrent batch norm and the BN-LSTM against the equations of Cooijmans et al. (2016)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from batchnorm.variants.recurrent import BNLSTM, BNLSTMCell, RecurrentBatchNorm1d

EPS = 1e-5


def test_statistics_are_kept_per_step_and_reused_past_max_steps():
    gen = torch.Generator().manual_seed(0)
    layer = RecurrentBatchNorm1d(3, max_steps=2, momentum=None, dtype=torch.float64)
    assert torch.equal(layer.weight, torch.full((3,), 0.1, dtype=torch.float64))  # paper's γ init
    inputs = [torch.randn(6, 3, generator=gen, dtype=torch.float64) * (t + 1) + t for t in range(4)]
    outputs = [layer(x, step=t) for t, x in enumerate(inputs)]
    for x, y in zip(inputs, outputs, strict=True):
        torch.testing.assert_close(y, F.batch_norm(x, None, None, layer.weight, layer.bias, True))
    # step 0 alone in row 0; steps 1, 2, 3 share row 1 (cumulative average of three batches)
    torch.testing.assert_close(layer.running_mean[0], inputs[0].mean(0))
    torch.testing.assert_close(
        layer.running_mean[1], torch.stack([x.mean(0) for x in inputs[1:]]).mean(0)
    )
    torch.testing.assert_close(
        layer.running_var[1], torch.stack([x.var(0) for x in inputs[1:]]).mean(0)
    )
    assert layer.num_batches_tracked.tolist() == [1, 3]
    layer.eval()
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    expected = F.batch_norm(
        x, layer.running_mean[1], layer.running_var[1], layer.weight, layer.bias
    )
    torch.testing.assert_close(layer(x, step=9), expected)
    assert "max_steps=2" in repr(layer)


def test_rejects_bad_steps_and_sizes():
    layer = RecurrentBatchNorm1d(3, max_steps=2)
    with pytest.raises(ValueError, match="step"):
        layer(torch.randn(4, 3), step=-1)
    with pytest.raises(ValueError, match="2D"):
        layer(torch.randn(4, 3, 2), step=0)
    with pytest.raises(ValueError, match="max_steps"):
        RecurrentBatchNorm1d(3, max_steps=0)
    untracked = RecurrentBatchNorm1d(3, max_steps=2, track_running_stats=False)
    x = torch.randn(4, 3)
    torch.testing.assert_close(
        untracked.eval()(x, step=0),
        F.batch_norm(x, None, None, untracked.weight, untracked.bias, True),
    )


def _paper_bnlstm(x, lengths, cell: BNLSTMCell, params):
    """Equations (6)–(8) of the paper, statistics over the running sequences of each step.

    A step where fewer than two sequences run uses that step's population statistics, which
    are tracked here too (momentum 0.1, unbiased variance of the running sequences).
    """
    w_ih, w_hh, b, g_ih, g_hh, g_c, b_c = params
    steps, batch, _ = x.shape
    hidden_size = cell.hidden_size
    h = x.new_zeros(batch, hidden_size)
    c = x.new_zeros(batch, hidden_size)
    population = {}  # (norm name, row) -> (mean, var)

    def bn(v, gamma, beta, real, name, t):
        row = min(t, cell.bn_c.max_steps - 1)
        mean0, var0 = population.get((name, row), (0.0, 1.0))
        if int(real.sum()) < 2:
            mu, var = mean0, var0
        else:
            mu, var = v[real].mean(0), v[real].var(0, unbiased=False)
            unbiased = v[real].detach().var(0)
            population[name, row] = (0.9 * mean0 + 0.1 * mu.detach(), 0.9 * var0 + 0.1 * unbiased)
        return gamma * (v - mu) / torch.sqrt(var + EPS) + beta

    outputs = []
    for t in range(steps):
        real = torch.as_tensor(lengths) > t  # (N,)
        gates_h = bn(h @ w_hh.T, g_hh, 0.0, real, "hh", t)
        gates = gates_h + bn(x[t] @ w_ih.T, g_ih, 0.0, real, "ih", t) + b
        i, f, g, o = gates.chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(bn(c_new, g_c, b_c, real, "c", t))
        h = torch.where(real[:, None], h_new, h)
        c = torch.where(real[:, None], c_new, c)
        outputs.append(torch.where(real[:, None], h_new, 0.0))
    return torch.stack(outputs), h, c


@pytest.mark.parametrize("lengths", [[5, 5, 5, 5], [5, 4, 4, 2], [5, 3, 2, 1]])
def test_bnlstm_matches_paper_equations_with_gradients(lengths):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    lstm = BNLSTM(3, 4, max_steps=3, dtype=torch.float64)
    cell = lstm.cells[0]
    with torch.no_grad():  # make every parameter matter
        for p in (
            cell.bias,
            cell.bn_ih.weight,
            cell.bn_hh.weight,
            cell.bn_c.weight,
            cell.bn_c.bias,
        ):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5 + 0.3)
    params = [
        cell.weight_ih,
        cell.weight_hh,
        cell.bias,
        cell.bn_ih.weight,
        cell.bn_hh.weight,
        cell.bn_c.weight,
        cell.bn_c.bias,
    ]
    reference_params = [p.detach().clone().requires_grad_() for p in params]
    x = torch.randn(5, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()

    expected, h_ref, c_ref = _paper_bnlstm(
        x_ref, lengths, cell, reference_params
    )  # before stats move
    out, (h, c) = lstm(x, lengths=lengths)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(h[0], h_ref)
    torch.testing.assert_close(c[0], c_ref)
    weights = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    ((out * weights).sum() + h.sum() + c.square().sum()).backward()
    ((expected * weights).sum() + h_ref.sum() + c_ref.square().sum()).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for p, q in zip(params, reference_params, strict=True):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("lengths", [None, [3, 3, 2], [3, 2, 1]])
def test_bnlstm_gradcheck(lengths):
    torch.manual_seed(2)
    lstm = BNLSTM(2, 2, max_steps=3, batch_first=True, dtype=torch.float64)
    x = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)  # (N, T, I)
    h0 = torch.randn(1, 3, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(1, 3, 2, dtype=torch.float64, requires_grad=True)

    def run(x, h0, c0):
        out, (h, c) = lstm(x, (h0, c0), lengths=lengths)
        return out, h, c

    assert torch.autograd.gradcheck(run, (x, h0, c0), eps=1e-6, atol=1e-5)


def test_batch_first_mask_and_layers_agree():
    torch.manual_seed(3)
    first = BNLSTM(3, 4, max_steps=4, num_layers=2, batch_first=True)
    second = BNLSTM(3, 4, max_steps=4, num_layers=2)
    second.load_state_dict(first.state_dict())
    x = torch.randn(4, 5, 3)  # (N, T, I)
    lengths = torch.tensor([5, 4, 2, 3])
    mask = torch.arange(5)[None, :] < lengths[:, None]  # (N, T)
    out_a, (h_a, c_a) = first(x, lengths=lengths)
    out_b, (h_b, c_b) = second(x.transpose(0, 1), mask=mask.T)
    torch.testing.assert_close(out_a, out_b.transpose(0, 1))
    torch.testing.assert_close(h_a, h_b)
    torch.testing.assert_close(c_a, c_b)
    assert h_a.shape == (2, 4, 4)
    assert torch.equal(out_a[2, 2:], torch.zeros(3, 4))  # padded outputs are 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lengths": [5, 5, 5]}, ValueError, "lengths"),
        ({"lengths": [6, 5, 5, 5]}, ValueError, r"1\.\.5"),
        (
            {"lengths": [5, 5, 5, 5], "mask": torch.ones(5, 4, dtype=torch.bool)},
            ValueError,
            "not both",
        ),
        ({"mask": torch.ones(5, 4)}, TypeError, "torch.bool"),
        ({"mask": torch.ones(4, 5, dtype=torch.bool)}, ValueError, r"\(5, 4\)"),
    ],
)
def test_bnlstm_rejects_bad_lengths_and_masks(kwargs, error, match):
    lstm = BNLSTM(3, 4, max_steps=2)
    with pytest.raises(error, match=match):
        lstm(torch.randn(5, 4, 3), **kwargs)


def test_bnlstm_rejects_bad_shapes():
    lstm = BNLSTM(3, 4, max_steps=2)
    with pytest.raises(ValueError, match="input_size=3"):
        lstm(torch.randn(5, 4, 2))
    with pytest.raises(ValueError, match="state"):
        lstm(torch.randn(5, 4, 3), (torch.zeros(1, 4, 4), torch.zeros(2, 4, 4)))
    cell = BNLSTMCell(3, 4, max_steps=2)
    with pytest.raises(ValueError, match="input"):
        cell(torch.randn(4, 2), (torch.zeros(4, 4), torch.zeros(4, 4)), step=0)
    with pytest.raises(ValueError, match="state"):
        cell(torch.randn(4, 3), (torch.zeros(3, 4), torch.zeros(4, 4)), step=0)
    with pytest.raises(ValueError, match="num_layers"):
        BNLSTM(3, 4, max_steps=2, num_layers=0)
    with pytest.raises(ValueError, match="hidden_size"):
        BNLSTMCell(3, 0, max_steps=2)
