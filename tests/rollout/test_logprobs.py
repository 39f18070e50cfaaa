"""Token log-probs from kept logits: the chunked TokenLogp equals autograd's log-softmax, and the
entropy it records on request equals the softmax's."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from vlm_treegrpo.rollout.logprobs import TokenLogp, collect_entropy, gather_logp


def _reference(logits, col, ids, target, temperature):
    lp = torch.log_softmax(logits.float() / temperature, dim=-1)  # [N, U, V]
    picked = torch.stack([lp[n, col[n], ids[n]] for n in range(logits.shape[0])])  # [N, L]
    return torch.where(target > 0, picked, torch.zeros_like(picked))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [None, 1000, 3])
def test_gather_logp_values_and_gradients_equal_log_softmax(dtype, temperature, chunk, monkeypatch):
    monkeypatch.setattr(TokenLogp, "CHUNK", chunk)
    torch.manual_seed(0)
    N, U, V, L = 3, 20, 50, 30
    logits = torch.randn(N, U, V).to(dtype).requires_grad_()
    col = torch.randint(0, U, (N, L))
    col[:, :4] = 2  # a branch point: one predictor column shared by several tokens
    ids = torch.randint(0, V, (N, L))
    ids[0, 1] = ids[0, 0]  # and twice the same token from it
    target = (torch.rand(N, L) > 0.3).float()
    target[0, :2] = 1.0
    w = torch.randn(N, L)
    got = gather_logp(logits, col, ids, target, temperature)
    (g_got,) = torch.autograd.grad((got * w).sum(), logits)
    want = _reference(logits, col, ids, target, temperature)
    (g_want,) = torch.autograd.grad((want * w).sum(), logits)
    assert_close(got, want, atol=2e-6, rtol=1e-6)
    assert torch.equal(got[target == 0], torch.zeros_like(got[target == 0]))
    assert g_got.dtype == dtype
    assert_close(g_got.float(), g_want.float(), atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-5 if dtype == torch.float32 else 1e-2)


def test_gather_logp_without_targets_is_zero_and_keeps_the_graph():
    logits = torch.randn(2, 4, 7, requires_grad=True)
    out = gather_logp(logits, torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5))
    assert torch.equal(out, torch.zeros(2, 5))
    out.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_collect_entropy_records_the_tokens_entropy_once_per_pass(temperature, monkeypatch):
    monkeypatch.setattr(TokenLogp, "CHUNK", 3)
    torch.manual_seed(1)
    N, U, V, L = 2, 9, 40, 12
    logits = torch.randn(N, U, V, requires_grad=True)
    col = torch.randint(0, U, (N, L))
    col[0, :3] = 4  # one predictor for three tokens: its entropy counts three times
    ids = torch.randint(0, V, (N, L))
    target = (torch.rand(N, L) > 0.25).float()
    target[0, :3] = 1.0
    lp = torch.log_softmax(logits.detach() / temperature, dim=-1)
    h = -(lp.exp() * lp).sum(-1)  # [N, U]
    want = torch.stack([h[n, col[n]] for n in range(N)])[target > 0]  # [T]
    with collect_entropy() as got:
        out = gather_logp(logits, col, ids, target, temperature)
    assert len(got) == 1 and got[0][1] == want.numel()
    assert got[0][0] == pytest.approx(float(want.sum()), rel=1e-5)
    assert out.requires_grad  # (the log-probs keep their graph)
    gather_logp(logits, col, ids, target, temperature)
    assert len(got) == 1  # outside the context nothing is recorded


def test_chunk_rows_are_64_on_the_cpu_and_an_element_budget_elsewhere(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert TokenLogp.chunk_rows(49_152, cpu) == TokenLogp.chunk_rows(779, cpu) == 64
    assert TokenLogp.chunk_rows(49_152, cuda) == 1_365  # 2^26 fp32 elements on a GPU
    assert TokenLogp.chunk_rows(151_936, cuda) == 441
    assert TokenLogp.chunk_rows(10**9, cuda) == 1  # never 0
    monkeypatch.setattr(TokenLogp, "CHUNK", 5)
    assert TokenLogp.chunk_rows(49_152, cuda) == TokenLogp.chunk_rows(49_152, cpu) == 5  # a fixed CHUNK wins


def test_one_step_when_the_chunk_holds_every_row(monkeypatch):
    """Rows per step come from chunk_rows: with room for all rows, one index_select forward."""
    calls = []
    real = torch.Tensor.index_select
    monkeypatch.setattr(torch.Tensor, "index_select", lambda self, *a: calls.append(1) or real(self, *a))
    monkeypatch.setattr(TokenLogp, "CPU_ROWS", 10**6)
    logits = torch.randn(2, 300, 40, requires_grad=True)
    col = torch.arange(300).repeat(2, 1)
    gather_logp(logits, col, torch.zeros(2, 300, dtype=torch.long), torch.ones(2, 300))
    assert len(calls) == 1
    monkeypatch.setattr(TokenLogp, "CPU_ROWS", 64)
    calls.clear()
    gather_logp(logits, col, torch.zeros(2, 300, dtype=torch.long), torch.ones(2, 300))
    assert len(calls) == 10  # 600 rows in 64-row steps
