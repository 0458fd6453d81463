"""Chunked token log-probs equal the naive full-logits path (values and gradients) and stay under
a memory bound the naive path exceeds."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from halos_core.logprobs import (
    DEFAULT_CHUNK_TOKENS,
    TokenLogprobModel,
    chunk_tokens_for,
    naive_token_logps,
    token_logps,
)


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


# --------------------------------------------------------------------------- memory bound


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensors created inside the mode that are alive at once (and the largest).

    torch's CPU allocator keeps no statistics, so every op's output storage is recorded when it
    is created and released when its storage is freed (a finalizer on the storage). Outputs that
    share an input's storage (views, in-place ops) are not new memory. Parameters and inputs that
    existed before the mode are not counted; gradients created inside it are (backward included:
    on CPU the autograd engine runs in this thread, inside the mode).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.largest = 0

    def _free(self, key: int, nbytes: int) -> None:
        if self.live.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in inputs or key in self.live:
                continue
            self.live[key] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            self.largest = max(self.largest, nbytes)
            weakref.finalize(storage, self._free, key, nbytes)
        return out


def test_live_tensor_bytes_counts_allocations_not_views():
    with LiveTensorBytes() as mem:
        a = torch.ones(1000, 250)  # 1 MB
        view = a[:10]
        del a
        assert mem.current == 1_000_000  # the view keeps the storage alive
        del view
        assert mem.current == 0
        b = torch.zeros(100)
        b.add_(1)  # in place: nothing new
    assert mem.peak == mem.largest == 1_000_000


@pytest.fixture(scope="module")
def big_vocab_model():
    """A one-layer Llama with a 32k vocabulary: the LM head dominates the memory of log-probs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32_000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config)


def _measure(model, fn, grad: bool) -> tuple[LiveTensorBytes, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with LiveTensorBytes() as mem, torch.set_grad_enabled(grad):
        logps, _ = fn()
        if grad:
            logps.sum().backward()
        out = logps.detach().clone()
        del logps
    model.zero_grad(set_to_none=True)
    return mem, out


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "forward+backward"])
def test_chunked_logps_stay_under_the_bound_the_naive_path_exceeds(big_vocab_model, grad):
    """Bound: one float32 [batch, tokens, vocab] tensor (125 MiB here). The naive path (full
    logits + log_softmax) exceeds it; the trainer's wrapper, with chunks of ~8 MiB of logits,
    keeps its peak of live tensor bytes under half of it with backward (which includes the
    gradients of the 32k x 64 embedding and LM head, 16 MiB, and ~4 chunks of recomputed logits
    and their gradients) and under an eighth without; its largest tensor is one chunk's logits.
    The chunked peak does not grow with the number of tokens, the bound and the naive path do."""
    model, vocab = big_vocab_model, 32_000
    batch, tokens = 2, 512
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, tokens), generator=g)
    attn = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :16] = -100
    bound = batch * tokens * vocab * 4

    wrapper = TokenLogprobModel(model, chunk_bytes=8 << 20)
    assert wrapper.chunk_tokens == chunk_tokens_for(vocab, 8 << 20) == 65
    chunk_bytes = batch * (wrapper.chunk_tokens // batch) * vocab * 4

    naive, expected = _measure(model, lambda: naive_token_logps(model, ids, attn, labels), grad)
    chunked, got = _measure(model, lambda: wrapper(ids, attn, labels), grad)

    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert naive.largest >= batch * (tokens - 1) * vocab * 4  # materialises [B, T(-1), V] float32
    assert naive.peak > bound
    assert chunked.largest <= chunk_bytes
    assert chunked.peak < (bound / 2 if grad else bound / 8)
    # record the figures in the test log
    print(
        f"grad={grad}: bound {bound / 2**20:.1f} MiB; naive peak {naive.peak / 2**20:.1f} MiB "
        f"(largest {naive.largest / 2**20:.1f}); chunked peak {chunked.peak / 2**20:.1f} MiB "
        f"(largest {chunked.largest / 2**20:.1f})"
    )


def test_chunk_size_follows_the_vocabulary():
    assert chunk_tokens_for(512) == DEFAULT_CHUNK_TOKENS
    assert chunk_tokens_for(128_256) == (512 << 20) // (4 * 128_256) == 1046
    assert chunk_tokens_for(10**9) == 1


def test_a_cache_shard_that_cannot_be_written_does_not_fail_the_round(tmp_path):
    """The shard is written after the round trained: a full disk there costs later rounds a
    recomputation (a warning), never the finished round."""
    from halos_core.logprobs import ReferenceLogpCache

    cache = ReferenceLogpCache(str(tmp_path), reference_sha256="ab", precision="no")
    cache.new["k"] = torch.zeros(3)
    cache.directory.parent.mkdir(parents=True, exist_ok=True)
    cache.directory.write_text("a file where the shard directory should be")  # mkdir fails: OSError
    with pytest.warns(UserWarning, match="not written"):
        cache.flush("round")
    assert cache.new == {} and not list(tmp_path.glob("**/.tmp-*"))
