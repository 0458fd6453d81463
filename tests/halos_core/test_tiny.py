"""The tiny local model is deterministic and usable by the data path (nothing downloaded)."""

from __future__ import annotations

from halos_core.run_dir import tree_sha256
from halos_core.tiny import build_tiny_model


def test_same_seed_same_bytes_other_seed_differs(tmp_path, tiny_model_dir, tiny_sha):
    again = build_tiny_model(tmp_path / "again", seed=0)
    assert tree_sha256(again) == tiny_sha
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes()
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert tree_sha256(other) != tiny_sha


def test_loads_with_auto_classes_and_chat_template_is_a_prefix(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = tiny_tokenizer
    assert model.config.vocab_size == len(tok)
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    conv = [{"role": "user", "content": "Tell me about the apple."}]
    prompt = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
    full = tok.apply_chat_template(
        conv + [{"role": "assistant", "content": "The apple is fine, thanks."}], tokenize=True, return_dict=False
    )
    assert full[: len(prompt)] == prompt
    assert full[-1] == tok.eos_token_id


def test_cli(tmp_path, tiny_sha):
    from halos_core.tiny import main

    assert main([str(tmp_path / "cli")]) == 0
    assert tree_sha256(tmp_path / "cli") == tiny_sha
