"""Tokenizers: loading, stop tokens, and incremental detokenization for streaming."""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .loader import ModelSource
from .loader.safetensors import read_json

# The token texts llama.cpp treats as end of generation (llama_vocab::impl::load, llama-vocab.cpp).
# A GGUF file has no generation_config.json, where Hugging Face lists a chat model's other stop
# tokens (Qwen2.5: <|im_end|>, <|endoftext|>; Llama 3: <|end_of_text|>, <|eom_id|>, <|eot_id|>).
_EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
    "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
)  # fmt: skip


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    """The model's fast tokenizer; a GGUF file's is rebuilt from its metadata by transformers."""
    if source.format == "gguf":
        return AutoTokenizer.from_pretrained(source.path.parent, gguf_file=source.path.name)
    return AutoTokenizer.from_pretrained(source.path)


def eos_token_ids(source: ModelSource, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token ids that end generation, sorted.

    Hugging Face folder: generation_config.json's eos_token_id (int or list; config.json's when
    there is no generation_config.json) and tokenizer.eos_token_id. GGUF: the metadata's eos, eot
    and eom ids, tokenizer.eos_token_id, and the end-of-generation tokens llama.cpp finds by text.
    """
    if source.format == "gguf":
        from .loader.gguf import read_gguf  # the gguf package is imported only for GGUF models

        metadata, _ = read_gguf(source.path)
        ids = {metadata.get(f"tokenizer.ggml.{kind}_token_id") for kind in ("eos", "eot", "eom")}
        vocab = tokenizer.get_vocab()
        ids |= {vocab[text] for text in _EOG_TEXTS if text in vocab}
    else:
        generation_config = source.path / "generation_config.json"
        if generation_config.exists():
            eos = read_json(generation_config).get("eos_token_id")
        else:
            eos = source.hf_config.eos_token_id
        ids = set(eos) if isinstance(eos, list) else {eos}
    ids.add(tokenizer.eos_token_id)
    ids.discard(None)
    return sorted(ids)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas; never emits a partial multi-byte UTF-8
    character.

    A step decodes a window of recent tokens, from the previous-but-one emission (prefix_offset) on,
    and emits what goes beyond the window's text at the previous emission (read_offset), as vLLM
    does: O(1) per token. Text is held back while the window ends in U+FFFD, i.e. inside a
    character split over byte-level tokens; one left incomplete at the end is never emitted.
    The deltas add up to tokenizer.decode(output ids): the window never reaches into the prompt,
    whose last token would otherwise change spacing (SentencePiece decoders strip the leading space
    of the first token decoded; after a prompt it stays).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids = list(prompt_token_ids)
        self.prefix_offset = self.read_offset = len(self.token_ids)
        self._deltas: list[str] = []

    def step(self, new_token_ids: list[int]) -> str:
        """Append tokens; return the text they complete ("" while a character is incomplete)."""
        self.token_ids.extend(new_token_ids)
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset, len(self.token_ids))
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self._deltas.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All output text so far."""
        return "".join(self._deltas)

    def _decode(self, start: int, end: int) -> str:
        ids = self.token_ids[start:end]
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
