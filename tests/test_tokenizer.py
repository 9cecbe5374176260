"""Tokenizer loading, stop tokens, and IncrementalDetokenizer against tokenizer.decode."""

from __future__ import annotations

import json
import random
import re

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from professional_nano_llm.loader import ModelSource, resolve_model
from professional_nano_llm.tokenizer import IncrementalDetokenizer, eos_token_ids, load_tokenizer

TEXTS = [
    "Hello, world! Plain ASCII with  two spaces and a newline\nhere.",
    "Emoji: 👋🏽 🤖🤖 🇫🇷 👨‍👩‍👧 done",
    "CJK: 日本語のテキストと中文字符，还有한국어.",
    "Accents: café naïve résumé Ångström — “quotes” …",
]
CHAT = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def smollm2() -> tuple[ModelSource, PreTrainedTokenizerBase]:
    source = resolve_model(None)
    return source, load_tokenizer(source)


@pytest.fixture(scope="module")
def sentencepiece_like() -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer: "▁" word starts, byte fallback, and a decoder that strips one leading
    space, so a token decodes differently at the start of a text than after the prompt."""
    corpus = ["Hello world, this is a small corpus.", "The quick brown fox jumps over the lazy dog!",
              "Hello again: world peace, naive cafe."] * 3
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    special = ["<unk>", "<s>", "</s>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=150, special_tokens=special,
                                                         show_progress=False))
    trained = json.loads(tok.to_str())["model"]
    vocab = trained["vocab"]
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    merges = [tuple(m) for m in trained["merges"]]
    tok.model = models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def detokenize(tokenizer, prompt: list[int], output: list[int], chunk: int = 1, **kwargs) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt, **kwargs)
    deltas = [detok.step(output[i : i + chunk]) for i in range(0, len(output), chunk)]
    assert detok.text == "".join(deltas)
    return deltas


def test_chat_template(smollm2):
    _, tok = smollm2
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                    "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    assert ids == tok.encode(text, add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") == 1
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 2


def test_gguf_eos_ids(smollm2):
    """<|im_end|> (2) ends an assistant turn in the chat template and is the file's eos (transformers
    stops on it alone); llama.cpp also stops on <|endoftext|> (0), the pretraining document end."""
    source, tok = smollm2
    assert tok.convert_ids_to_tokens([0, 2]) == ["<|endoftext|>", "<|im_end|>"]
    assert tok.eos_token_id == source.hf_config.eos_token_id == 2
    assert eos_token_ids(source, tok) == [0, 2]


def test_folder_tokenizer_and_eos_ids(smollm2, tmp_path):
    _, gguf_tok = smollm2
    gguf_tok.save_pretrained(tmp_path)
    source = ModelSource(tmp_path, "safetensors", LlamaConfig(eos_token_id=[7, 2]))
    tok = load_tokenizer(source)
    assert tok.is_fast
    text = TEXTS[1] + TEXTS[2]
    assert tok.encode(text) == gguf_tok.encode(text)
    assert eos_token_ids(source, tok) == [2, 7]  # no generation_config.json: config.json's
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 9]}))
    assert eos_token_ids(source, tok) == [2, 5, 9]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 4}))
    assert eos_token_ids(source, tok) == [2, 4]
    (tmp_path / "generation_config.json").write_text("{")
    with pytest.raises(ValueError, match=re.escape("generation_config.json is not valid JSON")):
        eos_token_ids(source, tok)


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("text", TEXTS, ids=["ascii", "emoji", "cjk", "accents"])
def test_deltas_add_up_to_decode(smollm2, text, chunk):
    _, tok = smollm2
    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    output = tok.encode(text, add_special_tokens=False)
    deltas = detokenize(tok, prompt, output, chunk)
    assert "".join(deltas) == tok.decode(output) == text
    assert not any("\ufffd" in d for d in deltas)
    if chunk == 1 and not text.isascii():
        assert "" in deltas  # some characters did span several byte-level tokens


def test_special_tokens_kept_or_skipped(smollm2):
    _, tok = smollm2
    output = tok.encode("Four.<|im_end|>\n<|im_start|>user", add_special_tokens=False)
    for skip in (True, False):
        deltas = detokenize(tok, [1, 2], output, skip_special_tokens=skip)
        assert "".join(deltas) == tok.decode(output, skip_special_tokens=skip)
    assert "<|im_end|>" in "".join(deltas)


def test_random_token_sequences(smollm2):
    _, tok = smollm2
    rng = random.Random(0)
    for _ in range(300):
        prompt = [rng.randrange(len(tok)) for _ in range(rng.randrange(0, 6))]
        output = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        text = "".join(detokenize(tok, prompt, output))
        full = tok.decode(output, skip_special_tokens=True)
        if full.endswith("\ufffd"):  # a character left incomplete at the end is held back, never emitted
            assert full.startswith(text)
        else:
            assert text == full
        if "\ufffd" not in full:
            assert "\ufffd" not in text


def test_window_stays_small(smollm2, monkeypatch):
    """Each step decodes a few recent tokens, not the whole output: O(1) per token."""
    _, tok = smollm2
    output = tok.encode(" ".join(TEXTS) * 20, add_special_tokens=False)
    lengths = []
    decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids, **kw: lengths.append(len(ids)) or decode(ids, **kw))
    assert "".join(detokenize(tok, list(range(100)), output)) == decode(output)
    assert len(output) > 1000 and max(lengths) <= 8


def test_prompt_does_not_change_spacing(sentencepiece_like):
    """After the prompt "Hello", "▁world" reads " world"; decode(output ids) alone gives "world"."""
    tok = sentencepiece_like
    prompt = tok.encode("Hello", add_special_tokens=False)
    output = tok.encode("Hello world peace 日本 👋 café", add_special_tokens=False)[len(prompt):]
    assert tok.decode(prompt + output) == "Hello world peace 日本 👋 café"
    assert tok.convert_ids_to_tokens(output[0]) == "▁world"
    for chunk in (1, 2):
        deltas = detokenize(tok, prompt, output, chunk)
        assert "".join(deltas) == tok.decode(output) == "world peace 日本 👋 café"
        assert not any("\ufffd" in d for d in deltas)
    assert "" in detokenize(tok, prompt, output)  # byte-fallback pieces of 日, 👋, é are held back
