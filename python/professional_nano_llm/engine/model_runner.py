"""Owns the model and its paged KV cache, and turns one scheduled step into logits."""

from __future__ import annotations

import gc
import os

import torch

from professional_nano_llm.config import EngineConfig, ModelConfig
from professional_nano_llm.engine.batch import Batch, StepStaging, fill_placeholders
from professional_nano_llm.engine.cuda_graphs import DecodeGraphs
from professional_nano_llm.layers.attention import AttentionMetadata
from professional_nano_llm.models.decoder import CausalLM

_CPU_DEFAULT_KV_BYTES = 4 << 30


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8


def kv_cache_budget(engine: EngineConfig, cfg: ModelConfig) -> int:
    """Bytes for the KV cache: kv_cache_memory_gb when set; else on CPU a quarter of free RAM up to
    4 GiB, and on GPU what gpu_memory_utilization leaves after the weights and a step's activations
    and the sampler's working memory."""
    if engine.kv_cache_memory_gb is not None:
        return int(engine.kv_cache_memory_gb * (1 << 30))
    if engine.torch_device.type == "cpu":
        return min(_CPU_DEFAULT_KV_BYTES, _available_ram() // 4)
    gc.collect()  # an earlier engine's cache, unreachable now, must not count as used
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(engine.torch_device)
    element = torch.finfo(engine.torch_dtype).bits // 8
    per_token = (4 * cfg.intermediate_size + 4 * cfg.hidden_size + (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim)
    # The sampler holds a few float32/float64 [rows, vocab] tensors at once: about 24 bytes an entry.
    activations = engine.max_num_batched_tokens * per_token * element + engine.max_num_seqs * cfg.vocab_size * 24
    used = total - free  # the weights and anything else already on the device
    return int(total * engine.gpu_memory_utilization) - used - activations


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class ModelRunner:
    """Runs scheduled steps on the model. On CUDA, decode steps replay captured graphs (unless
    enforce_eager) and every other step moves its inputs through a pinned buffer in one copy."""

    def __init__(self, model: CausalLM, engine: EngineConfig, num_blocks: int, max_model_len: int):
        cfg = model.config
        self.model = model
        self.device = engine.torch_device
        # [layers, k/v, num_blocks, block_size, Hkv, D] in one allocation; slots are written before read.
        self.kv_cache = torch.empty(  # never read before written: no need to touch the pages
            cfg.num_layers, 2, num_blocks, engine.block_size, cfg.num_kv_heads, cfg.head_dim,
            dtype=engine.torch_dtype, device=self.device,
        )
        for i, layer in enumerate(model.model.layers):
            layer.bind_kv_cache(self.kv_cache[i, 0], self.kv_cache[i, 1])
        self.staging = StepStaging(self.device) if self.device.type == "cuda" else None
        self.graphs = None
        if self.device.type == "cuda" and not engine.enforce_eager:
            max_blocks = -(-max_model_len // engine.block_size)
            with torch.inference_mode():
                self.graphs = DecodeGraphs(self.decode_forward, engine.max_num_seqs, max_blocks, self.device)

    @torch.inference_mode()
    def run(self, out, previous_tokens: torch.Tensor | None = None) -> torch.Tensor | None:
        """ScheduleOutput -> [num_sampled, vocab] logits in the model's dtype, or None when nothing
        is sampled. previous_tokens [rows] (int64, on the device): the tokens the step before sampled,
        which an overlapped step reads where out.num_placeholders > 0."""
        if out.num_seqs == 0:
            return None
        if self.graphs is not None and self.graphs.covers(out):
            return self.model.compute_logits(self.graphs.run(out, previous_tokens))
        batch = Batch.from_output(out, self.device, self.staging)
        if out.num_placeholders:
            fill_placeholders(batch.input_ids, batch.placeholder_rows, batch.placeholder_sources, previous_tokens)
        hidden = self.model(batch.input_ids, batch.positions, AttentionMetadata.from_batch(batch))
        if out.num_sampled == 0:
            return None
        return self.model.compute_logits(hidden.index_select(0, batch.sample_indices))

    def decode_forward(self, input_ids, positions, slot_mapping, context_lens, block_tables) -> torch.Tensor:
        """The model over B one-token sequences ([B] int32 inputs, block_tables [B, max_blocks]) -> [B, hidden]."""
        no_prefill = context_lens[:0]
        meta = AttentionMetadata(slot_mapping, input_ids.shape[0], context_lens, block_tables,
                                 context_lens[:1] * 0, no_prefill, block_tables[:0])
        return self.model(input_ids, positions, meta)
