// Pool of fixed-size KV blocks with reference counts, an LRU free list and a prefix cache.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

#include "pnl/core/hash.h"
#include "pnl/core/types.h"

namespace pnl::core {

struct BlockAllocatorStats {
  int64_t num_blocks = 0;
  int64_t num_used_blocks = 0;    // ref_count > 0
  int64_t num_cached_blocks = 0;  // registered in the prefix cache (used or evictable)
  int64_t prefix_queries = 0;     // tokens looked up in the prefix cache at admission
  int64_t prefix_hits = 0;        // of those, tokens found
};

/// Owns block ids [0, num_blocks). A block is either used (ref_count > 0) or on the free list.
///
/// Prefix caching: once a block is full and its KV computed, cache_full_block() registers it under
/// key = hasher(parent key, tokens). A lookup is confirmed by the block's tokens and by the content
/// id of its parent, so a hash collision can never share a wrong block.
/// Freed cached blocks stay reusable until allocate() reclaims them, least recently freed first;
/// blocks that hold no cached prefix are always reclaimed before them.
///
/// Not thread-safe: the engine loop owns it.
class BlockAllocator {
 public:
  BlockAllocator(int32_t num_blocks, int32_t block_size, bool enable_prefix_caching = true,
                 BlockHasher hasher = hash_block);

  int32_t num_blocks() const { return num_blocks_; }
  int32_t block_size() const { return block_size_; }
  bool prefix_caching() const { return enable_prefix_caching_; }
  int32_t num_free_blocks() const { return num_free_; }
  int32_t num_used_blocks() const { return num_blocks_ - num_free_; }
  int32_t ref_count(BlockId block) const;
  bool is_cached(BlockId block) const;
  BlockAllocatorStats stats() const;

  /// Longest run of cached blocks matching the full blocks at the start of `tokens`, at most
  /// `max_blocks`, appended to `out`. Takes nothing: follow with acquire() for each.
  void match_prefix(const TokenId* tokens, int32_t num_tokens, int32_t max_blocks,
                    std::vector<BlockId>& out) const;
  /// How many of `blocks` are on the free list (acquiring them shrinks it).
  int32_t count_free(const std::vector<BlockId>& blocks) const;

  /// Adds an owner to a block found by match_prefix(); takes it off the free list if needed.
  void acquire(BlockId block);
  /// Takes the front of the free list (evicting its cached prefix) with ref_count 1.
  /// Throws ProtocolError when none is free: callers check num_free_blocks() first.
  BlockId allocate();
  /// Drops one owner; at zero the block goes to the free list.
  void release(BlockId block);

  /// Registers a full block whose KV is now computed. `parent` is the previous block of the same
  /// sequence (or -1 for the first) and must itself be cached. No-op without prefix caching.
  void cache_full_block(BlockId block, BlockId parent, const TokenId* tokens);
  void record_prefix_query(int64_t num_tokens, int64_t num_hit_tokens);
  /// Forgets every cached prefix, as vLLM's reset_prefix_cache() does, but only while no block is
  /// used (a live sequence may still share or register cached blocks). Returns whether it reset;
  /// the query and hit counters keep counting.
  bool reset_prefix_cache();

 private:
  void check_block(BlockId block) const;
  BlockId find_cached(uint64_t key, uint64_t parent_id, const TokenId* tokens) const;
  void unlink(BlockId block);
  void push_front(BlockId block);
  void push_back(BlockId block);
  void evict(BlockId block);

  int32_t num_blocks_;
  int32_t block_size_;
  bool enable_prefix_caching_;
  BlockHasher hasher_;

  std::vector<int32_t> ref_count_;
  // Free list: intrusive doubly linked list over block ids; kNil ends it.
  static constexpr BlockId kNil = -1;
  std::vector<BlockId> prev_, next_;
  std::vector<uint8_t> on_free_list_;
  BlockId head_ = kNil, tail_ = kNil;
  int32_t num_free_ = 0;

  // Prefix cache. A content id names one exact token chain (the block and all its parents); it is
  // never reused for another chain, so (parent content id, tokens) confirms a hit. 0 = not cached.
  std::vector<uint64_t> key_, content_id_, parent_content_id_;
  std::vector<TokenId> tokens_;  // [num_blocks * block_size], valid where content_id_ != 0
  std::unordered_multimap<uint64_t, BlockId> cached_;
  uint64_t next_content_id_ = 1;
  int64_t prefix_queries_ = 0, prefix_hits_ = 0;
};

}  // namespace pnl::core
