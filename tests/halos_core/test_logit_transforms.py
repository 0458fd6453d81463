"""Models that post-process the LM head's logits (Gemma-2 soft-capping, Granite logits_scaling,
Cohere logit_scale): the chunked log-probs apply the same transform, so they equal log_softmax of
the model's own logits; post-processing the chunked path does not reproduce is refused."""

from __future__ import annotations

import pytest
import torch

from halos_core.logprobs import TokenLogprobModel, UnsupportedLogits, logit_transform, naive_token_logps, token_logps

SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
)


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=16, final_logit_softcapping=3.0))


def _granite():
    from transformers import GraniteConfig, GraniteForCausalLM

    return GraniteForCausalLM(GraniteConfig(**SMALL, logits_scaling=8.0))


def _cohere():
    from transformers import CohereConfig, CohereForCausalLM

    return CohereForCausalLM(CohereConfig(**SMALL, logit_scale=0.25))


@pytest.mark.parametrize("build", [_gemma2, _granite, _cohere], ids=["gemma2", "granite", "cohere"])
def test_chunked_logps_equal_the_models_own_logits(build):
    torch.manual_seed(0)
    model = build().float().eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40)  # logits large enough for the transform to matter
    ids = torch.randint(0, 64, (2, 10))
    attn = torch.ones_like(ids)
    attn[1, 7:] = 0
    labels = ids.clone()
    labels[:, :3] = -100
    labels[attn == 0] = -100
    with torch.no_grad():
        expected, mask = naive_token_logps(model, ids, attn, labels)
        untransformed, _ = token_logps(model, ids, attn, labels, chunk_tokens=3, transform=None)
        assert not torch.allclose(untransformed, expected, atol=1e-3)  # the transform matters here
        got, got_mask = token_logps(model, ids, attn, labels, chunk_tokens=3)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        assert torch.equal(got_mask, mask)
        packed, _ = token_logps(model, ids, attn, labels, chunk_tokens=3, packing=True)
        torch.testing.assert_close(packed, expected, rtol=0, atol=1e-5)
        wrapped = TokenLogprobModel(model, chunk_tokens=3)
        got, _ = wrapped(ids, attn, labels)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_unsupported_logit_post_processing_is_refused():
    from transformers import FalconH1Config, GraniteConfig, LlamaConfig, RecurrentGemmaConfig

    assert logit_transform(LlamaConfig(**SMALL)) is None
    for config in (
        FalconH1Config(lm_head_multiplier=0.5),
        RecurrentGemmaConfig(logits_soft_cap=30.0),
    ):
        with pytest.raises(UnsupportedLogits):
            logit_transform(config)
    weird = LlamaConfig(**SMALL)
    weird.logits_scaling = 2.0  # HyperCLOVA X multiplies by it: not Granite's division
    with pytest.raises(UnsupportedLogits):
        logit_transform(weird)
    assert logit_transform(GraniteConfig(**SMALL, logits_scaling=1.0)) is None
