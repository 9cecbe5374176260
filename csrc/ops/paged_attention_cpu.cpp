// CPU adapters of paged_attention_prefill and paged_attention_decode: checks, dtype dispatch, and
// the work split. Work items are (sequence, KV head, query tile) for prefill and (sequence,
// context partition) for decode, with all heads, or one KV head's for groups above 8; they are
// handed out costliest first to the threads of at::parallel_for, one at a time, so a long causal
// tile never finishes alone at the end.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "ops/cpu_ops.h"
#include "ops/paged_attention.h"
#include "pnl/kernels/cpu/decode_tile.h"
#include "pnl/kernels/cpu/paged_attention.h"

namespace pnl::ops::PNL_CPU_ISA {
namespace {

/// Keys per decode partition, at most: a longer sequence is split, and the parts merged.
constexpr int64_t kDecodePartition = 256;

struct WorkItem {
  int64_t seq, kv_head, begin, end;  // prefill: query tokens [begin, end); decode: keys [begin, end)
  int64_t cost;                      // query rows x keys, to order the items
};

/// The CPU twin also checks the index contents (they are on the host): every block a context
/// reaches must exist, so a bad table is an error, not a read out of bounds.
void check_tables_cpu(const AttentionShape& shape, const at::Tensor& context_lens, const at::Tensor& block_tables) {
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  for (int64_t s = 0; s < context_lens.size(0); ++s) {
    TORCH_CHECK(lens[s] >= 0 && lens[s] <= shape.max_blocks * shape.block_size, "context_lens[", s, "] = ", lens[s],
                " does not fit block_tables' ", shape.max_blocks, " blocks of ", shape.block_size, " tokens");
    for (int64_t b = 0; b < (lens[s] + shape.block_size - 1) / shape.block_size; ++b) {
      const int32_t block = tables[s * shape.max_blocks + b];
      TORCH_CHECK(block >= 0 && block < shape.num_blocks, "block_tables[", s, "][", b, "] = ", block,
                  " is out of range [0, ", shape.num_blocks, ")");
    }
  }
}

/// Runs fn(state, items[i]) for every item on at::parallel_for's threads, handing the items out in
/// order (costliest first); make_state() builds each thread's scratch once.
template <typename MakeState, typename Fn>
void run_work_items(std::vector<WorkItem>& items, const MakeState& make_state, const Fn& fn) {
  std::stable_sort(items.begin(), items.end(), [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
  const int64_t num_items = static_cast<int64_t>(items.size());
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_items);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto state = make_state();
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < num_items;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      fn(state, items[i]);
    }
  });
}

template <typename T>
kernels::cpu::PagedKv<T> paged_kv(const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const AttentionShape& shape, int64_t seq,
                                  int64_t kv_head) {
  return {k_cache.data_ptr<T>(),
          v_cache.data_ptr<T>(),
          block_tables.data_ptr<int32_t>() + seq * shape.max_blocks,
          shape.block_size,
          shape.num_kv_heads,
          shape.head_dim,
          kv_head};
}

/// Calls run(std::type_identity<Tile>{}) with the decode tile for `group` query heads per KV head:
/// a small group vectorises along head_dim (DecodeTile), a large one fills the lanes with heads.
template <typename Acc, int G = 1, typename Run>
void with_decode_tile(int64_t group, const Run& run) {
  if constexpr (G > kernels::cpu::kMaxDecodeGroup) {
    run(std::type_identity<kernels::cpu::AttentionTile<Acc, kernels::cpu::kWideRows>>{});
  } else if (group == G) {
    run(std::type_identity<kernels::cpu::DecodeTile<Acc, G>>{});
  } else {
    with_decode_tile<Acc, G + 1>(group, run);
  }
}

template <typename Tile>
inline constexpr bool kWholeSequence = false;  // a tile per KV head (AttentionTile)
template <typename Acc, int G>
inline constexpr bool kWholeSequence<kernels::cpu::DecodeTile<Acc, G>> = true;  // a tile per sequence

/// Keys per decode partition: kDecodePartition, halved (down to one key tile) while there are
/// fewer work items than threads, so a lone sequence still spreads over them.
int64_t decode_partition_keys(const int32_t* lens, int64_t num_seqs, int64_t items_per_part) {
  const int64_t wanted = at::get_num_threads();
  int64_t keys = kDecodePartition;
  for (; keys > kernels::cpu::kKeyTile; keys /= 2) {
    int64_t items = 0;
    for (int64_t s = 0; s < num_seqs && items < wanted; ++s) items += (lens[s] + keys - 1) / keys * items_per_part;
    if (items >= wanted) break;
  }
  return keys;
}

/// The decode work items on tiles of type Tile, then the merge of split sequences. An item is a
/// partition of one sequence's keys, for all its heads (DecodeTile) or one KV head's (AttentionTile).
template <typename T, typename Tile>
void decode(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& context_lens, const at::Tensor& block_tables, const AttentionShape& shape,
            double scale) {
  using Acc = kernels::cpu::acc_t<T>;
  constexpr bool kWhole = kWholeSequence<Tile>;
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const T* q = query.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const int64_t num_seqs = context_lens.size(0), num_heads = shape.num_heads, head_dim = shape.head_dim;
  const int64_t group = num_heads / shape.num_kv_heads;
  const int64_t items_per_part = kWhole ? 1 : shape.num_kv_heads;
  const int64_t part_keys = decode_partition_keys(lens, num_seqs, items_per_part);

  // Partial results, kept only for the split sequences (one long context in a batch of short
  // ones must not cost every sequence its partition count): sequence s's [H, parts(s)] maxima and
  // sums start at part_base[s] * H, its [H, parts(s), D] outputs at part_base[s] * H * D.
  const auto num_parts = [&](int64_t s) { return (lens[s] + part_keys - 1) / part_keys; };
  std::vector<int64_t> part_base(num_seqs, -1);
  int64_t split_parts = 0;
  std::vector<WorkItem> items;
  for (int64_t s = 0; s < num_seqs; ++s) {
    if (num_parts(s) > 1) {
      part_base[s] = split_parts;
      split_parts += num_parts(s);
    }
    for (int64_t k0 = 0; k0 < lens[s]; k0 += part_keys) {
      const int64_t k1 = std::min<int64_t>(lens[s], k0 + part_keys);
      for (int64_t h = 0; h < items_per_part; ++h) items.push_back({s, h, k0, k1, k1 - k0});
    }
  }
  std::vector<Acc> part_max(split_parts * num_heads), part_sum(part_max.size()), part_out(part_max.size() * head_dim);
  run_work_items(
      items, [&] { return kWhole ? Tile(shape.num_kv_heads, head_dim) : Tile(group, head_dim); },
      [&](Tile& tile, const WorkItem& item) {
        const int64_t s = item.seq;
        const T* q_seq = q + s * query.stride(0);
        if constexpr (kWhole) {  // token rows [Hkv * D] as one wide head
          const kernels::cpu::PagedKv<T> tokens{k_cache.data_ptr<T>(), v_cache.data_ptr<T>(),
                                                block_tables.data_ptr<int32_t>() + s * shape.max_blocks,
                                                shape.block_size, 1, shape.num_kv_heads * head_dim, 0};
          tile.attend(tokens, q_seq, query.stride(1), static_cast<Acc>(scale), item.begin, item.end);
        } else {
          kernels::cpu::paged_attention_decode_partition(
              tile, q_seq, query.stride(1), paged_kv<T>(k_cache, v_cache, block_tables, shape, s, item.kv_head), group,
              lens[s], item.begin, item.end, static_cast<Acc>(scale));
        }
        const bool whole = part_base[s] < 0;
        const int64_t part = item.begin / part_keys;
        const int64_t first_head = kWhole ? 0 : item.kv_head * group;
        for (int64_t r = 0; r < (kWhole ? num_heads : group); ++r) {
          const int64_t h = first_head + r;
          if (whole) {
            tile.store_row(r, o + s * out.stride(0) + h * out.stride(1));
            continue;
          }
          const int64_t p = part_base[s] * num_heads + h * num_parts(s) + part;
          part_max[p] = tile.row_max(r);
          part_sum[p] = tile.row_sum(r);
          std::copy(tile.row_out(r), tile.row_out(r) + head_dim, part_out.begin() + p * head_dim);
        }
      });
  if (split_parts == 0) return;
  at::parallel_for(0, num_seqs * num_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<Acc> scratch(head_dim);
    for (int64_t sh = begin; sh < end; ++sh) {
      const int64_t s = sh / num_heads, h = sh % num_heads;
      if (part_base[s] < 0) continue;  // written directly
      const int64_t p = part_base[s] * num_heads + h * num_parts(s);
      kernels::cpu::merge_partitions(o + s * out.stride(0) + h * out.stride(1), part_max.data() + p,
                                     part_sum.data() + p, part_out.data() + p * head_dim, scratch.data(),
                                     num_parts(s), head_dim);
    }
  });
}

}  // namespace

// out, query [T, H, D] (rows may be strided); cu_seqlens_q [S + 1]; context_lens [S]; block_tables
// [S, max_blocks]. Sequence s's new tokens are its last q_len = cu_seqlens_q[s+1] - cu_seqlens_q[s].
void paged_attention_prefill_cpu(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& cu_seqlens_q,
                                 const at::Tensor& context_lens, const at::Tensor& block_tables, double scale) {
  const AttentionShape shape = check_prefill(out, query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables);
  check_tables_cpu(shape, context_lens, block_tables);
  const int64_t num_seqs = context_lens.size(0);
  const int32_t* cu = cu_seqlens_q.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  TORCH_CHECK(cu[0] == 0 && cu[num_seqs] == query.size(0), "cu_seqlens_q must run from 0 to num_tokens (",
              query.size(0), "), got ", cu[0], " to ", cu[num_seqs]);

  const int64_t group = shape.num_heads / shape.num_kv_heads;
  const int64_t tile_tokens = kernels::cpu::prefill_tokens_per_tile(group, shape.head_dim);
  std::vector<WorkItem> items;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = cu[s + 1] - cu[s];
    TORCH_CHECK(q_len >= 0 && q_len <= lens[s], "sequence ", s, " has ", q_len, " new tokens (cu_seqlens_q) but ",
                "context_lens[", s, "] = ", lens[s], "; the new tokens must be the last of the context");
    for (int64_t t0 = 0; t0 < q_len; t0 += tile_tokens) {
      const int64_t t1 = std::min(q_len, t0 + tile_tokens);
      const int64_t keys = lens[s] - q_len + t1;
      for (int64_t h = 0; h < shape.num_kv_heads; ++h) items.push_back({s, h, t0, t1, (t1 - t0) * keys});
    }
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_attention_prefill_cpu", [&] {
    using Acc = kernels::cpu::acc_t<scalar_t>;
    using Tile = kernels::cpu::AttentionTile<Acc, kernels::cpu::kWideRows>;
    const scalar_t* q = query.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    run_work_items(
        items, [&] { return Tile(tile_tokens * group, shape.head_dim); },
        [&](Tile& tile, const WorkItem& item) {
          const int64_t start = cu[item.seq];
          kernels::cpu::paged_attention_prefill_tile(
              tile, o + start * out.stride(0), out.stride(0), out.stride(1), q + start * query.stride(0),
              query.stride(0), query.stride(1), paged_kv<scalar_t>(k_cache, v_cache, block_tables, shape, item.seq,
                                                                   item.kv_head),
              group, cu[item.seq + 1] - start, lens[item.seq], item.begin, item.end - item.begin,
              static_cast<Acc>(scale));
        });
  });
}

// out, query [S, H, D] (rows may be strided): one new token per sequence, the last of its
// context_lens[s] >= 1 tokens; context_lens [S]; block_tables [S, max_blocks].
void paged_attention_decode_cpu(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& context_lens,
                                const at::Tensor& block_tables, double scale) {
  const AttentionShape shape = check_decode(out, query, k_cache, v_cache, context_lens, block_tables);
  check_tables_cpu(shape, context_lens, block_tables);
  const int64_t num_seqs = context_lens.size(0);
  const int32_t* lens = context_lens.data_ptr<int32_t>();

  for (int64_t s = 0; s < num_seqs; ++s) {
    TORCH_CHECK(lens[s] >= 1, "context_lens[", s, "] = ", lens[s], ": a decoding sequence has at least one token");
  }
  const int64_t group = shape.num_heads / shape.num_kv_heads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_attention_decode_cpu", [&] {
    with_decode_tile<kernels::cpu::acc_t<scalar_t>>(group, [&](auto tile) {
      decode<scalar_t, typename decltype(tile)::type>(out, query, k_cache, v_cache, context_lens, block_tables, shape,
                                                      scale);
    });
  });
}

}  // namespace pnl::ops::PNL_CPU_ISA
