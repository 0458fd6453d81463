"""Chunked token log-probs equal the naive full-logits path (values and gradients)."""

from __future__ import annotations

import pytest
import torch

from halos_core.logprobs import TokenLogprobModel, naive_token_logps, token_logps


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def _batch(vocab):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (3, 19), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 13:] = 0
    attn[2, 7:] = 0
    labels = ids.clone()
    labels[:, :4] = -100
    labels[attn == 0] = -100
    return ids, attn, labels


@pytest.mark.parametrize("chunk_tokens", [1, 7, 16, 10_000])
def test_chunked_equals_naive_values_and_grads(model, chunk_tokens):
    ids, attn, labels = _batch(model.config.vocab_size)
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.linspace(0.5, 1.5, 18)  # a non-uniform upstream gradient

    a, ma = token_logps(model, ids, attn, labels, chunk_tokens=chunk_tokens)
    ga = torch.autograd.grad((a * weights).sum(), params)
    b, mb = naive_token_logps(model, ids, attn, labels)
    gb = torch.autograd.grad((b * weights).sum(), params)

    assert a.shape == (3, 18) and a.dtype == torch.float32
    assert torch.equal(ma, mb) and torch.equal(ma, labels[:, 1:] != -100)
    assert (a[~ma] == 0).all()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_no_grad_path_and_wrapper(model):
    ids, attn, labels = _batch(model.config.vocab_size)
    with torch.no_grad():
        a, _ = token_logps(model, ids, attn, labels, chunk_tokens=5)
        b, _ = naive_token_logps(model, ids, attn, labels)
        c, _ = TokenLogprobModel(model, chunk_tokens=5)(ids, attn, labels)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert torch.equal(a, c)
