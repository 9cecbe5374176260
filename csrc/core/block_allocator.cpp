#include "pnl/core/block_allocator.h"

#include <algorithm>
#include <limits>
#include <string>

namespace pnl::core {

BlockAllocator::BlockAllocator(int32_t num_blocks, int32_t block_size, bool enable_prefix_caching,
                               BlockHasher hasher)
    : num_blocks_(num_blocks),
      block_size_(block_size),
      enable_prefix_caching_(enable_prefix_caching),
      hasher_(hasher) {
  if (num_blocks < 1) throw InvalidArgument("num_blocks must be >= 1, got " + std::to_string(num_blocks));
  if (block_size < 8 || block_size > 256 || (block_size & (block_size - 1)) != 0) {
    throw InvalidArgument("block_size must be a power of two from 8 to 256, got " +
                          std::to_string(block_size));
  }
  if (static_cast<int64_t>(num_blocks) * block_size > std::numeric_limits<int32_t>::max()) {
    throw InvalidArgument("num_blocks * block_size must fit in int32 (KV slots are int32)");
  }
  if (hasher == nullptr) throw InvalidArgument("hasher must not be null");
  ref_count_.assign(num_blocks, 0);
  prev_.assign(num_blocks, kNil);
  next_.assign(num_blocks, kNil);
  on_free_list_.assign(num_blocks, 0);
  key_.assign(num_blocks, 0);
  content_id_.assign(num_blocks, 0);
  parent_content_id_.assign(num_blocks, 0);
  tokens_.assign(static_cast<size_t>(num_blocks) * block_size, 0);
  for (BlockId b = 0; b < num_blocks; ++b) push_back(b);
}

void BlockAllocator::check_block(BlockId block) const {
  if (block < 0 || block >= num_blocks_) {
    throw InvalidArgument("block id " + std::to_string(block) + " out of range [0, " +
                          std::to_string(num_blocks_) + ")");
  }
}

int32_t BlockAllocator::ref_count(BlockId block) const {
  check_block(block);
  return ref_count_[block];
}

bool BlockAllocator::is_cached(BlockId block) const {
  check_block(block);
  return content_id_[block] != 0;
}

BlockAllocatorStats BlockAllocator::stats() const {
  return {num_blocks_, num_used_blocks(), static_cast<int64_t>(cached_.size()), prefix_queries_,
          prefix_hits_};
}

void BlockAllocator::unlink(BlockId b) {
  (prev_[b] == kNil ? head_ : next_[prev_[b]]) = next_[b];
  (next_[b] == kNil ? tail_ : prev_[next_[b]]) = prev_[b];
  prev_[b] = next_[b] = kNil;
  on_free_list_[b] = 0;
  --num_free_;
}

void BlockAllocator::push_front(BlockId b) {
  prev_[b] = kNil;
  next_[b] = head_;
  (head_ == kNil ? tail_ : prev_[head_]) = b;
  head_ = b;
  on_free_list_[b] = 1;
  ++num_free_;
}

void BlockAllocator::push_back(BlockId b) {
  next_[b] = kNil;
  prev_[b] = tail_;
  (tail_ == kNil ? head_ : next_[tail_]) = b;
  tail_ = b;
  on_free_list_[b] = 1;
  ++num_free_;
}

void BlockAllocator::evict(BlockId b) {
  auto [first, last] = cached_.equal_range(key_[b]);
  for (auto it = first; it != last; ++it) {
    if (it->second == b) {
      cached_.erase(it);
      break;
    }
  }
  content_id_[b] = 0;
}

BlockId BlockAllocator::find_cached(uint64_t key, uint64_t parent_id, const TokenId* tokens) const {
  auto [first, last] = cached_.equal_range(key);
  for (auto it = first; it != last; ++it) {
    BlockId b = it->second;
    if (parent_content_id_[b] == parent_id &&
        std::equal(tokens, tokens + block_size_, tokens_.begin() + static_cast<size_t>(b) * block_size_)) {
      return b;
    }
  }
  return kNil;
}

void BlockAllocator::match_prefix(const TokenId* tokens, int32_t num_tokens, int32_t max_blocks,
                                  std::vector<BlockId>& out) const {
  if (!enable_prefix_caching_) return;
  int32_t n = std::min(max_blocks, num_tokens / block_size_);
  uint64_t key = 0, parent_id = 0;
  for (int32_t i = 0; i < n; ++i) {
    const TokenId* block_tokens = tokens + static_cast<size_t>(i) * block_size_;
    key = hasher_(key, block_tokens, block_size_);
    BlockId hit = find_cached(key, parent_id, block_tokens);
    if (hit == kNil) return;
    out.push_back(hit);
    parent_id = content_id_[hit];
  }
}

int32_t BlockAllocator::count_free(const std::vector<BlockId>& blocks) const {
  int32_t n = 0;
  for (BlockId b : blocks) n += on_free_list_[b];
  return n;
}

void BlockAllocator::acquire(BlockId block) {
  check_block(block);
  if (ref_count_[block] == 0) {
    if (content_id_[block] == 0) throw ProtocolError("acquire() of a free block that holds no cached prefix");
    unlink(block);
  }
  ++ref_count_[block];
}

BlockId BlockAllocator::allocate() {
  if (head_ == kNil) throw ProtocolError("allocate() with no free KV block");
  BlockId b = head_;
  unlink(b);
  if (content_id_[b] != 0) evict(b);
  ref_count_[b] = 1;
  return b;
}

void BlockAllocator::release(BlockId block) {
  check_block(block);
  if (ref_count_[block] <= 0) {
    throw ProtocolError("release() of block " + std::to_string(block) + " that has no owner");
  }
  if (--ref_count_[block] > 0) return;
  // Blocks without a cached prefix are reclaimed first; cached ones queue up least recently used first.
  if (content_id_[block] == 0) {
    push_front(block);
  } else {
    push_back(block);
  }
}

void BlockAllocator::cache_full_block(BlockId block, BlockId parent, const TokenId* tokens) {
  if (!enable_prefix_caching_) return;
  check_block(block);
  if (ref_count_[block] == 0 || content_id_[block] != 0) {
    throw ProtocolError("cache_full_block() needs an owned block that is not cached yet");
  }
  uint64_t parent_key = 0, parent_id = 0;
  if (parent != kNil) {
    check_block(parent);
    if (content_id_[parent] == 0) throw ProtocolError("cache_full_block(): the parent block is not cached");
    parent_key = key_[parent];
    parent_id = content_id_[parent];
  }
  key_[block] = hasher_(parent_key, tokens, block_size_);
  // Two sequences that computed the same prefix side by side hold equal blocks: they share one
  // content id, so either can be the parent of the next block in a chain.
  BlockId twin = find_cached(key_[block], parent_id, tokens);
  content_id_[block] = twin == kNil ? next_content_id_++ : content_id_[twin];
  parent_content_id_[block] = parent_id;
  std::copy(tokens, tokens + block_size_, tokens_.begin() + static_cast<size_t>(block) * block_size_);
  cached_.emplace(key_[block], block);
}

bool BlockAllocator::reset_prefix_cache() {
  if (num_used_blocks() > 0) return false;
  cached_.clear();
  std::fill(content_id_.begin(), content_id_.end(), 0);
  return true;
}

void BlockAllocator::record_prefix_query(int64_t num_tokens, int64_t num_hit_tokens) {
  if (!enable_prefix_caching_) return;
  prefix_queries_ += num_tokens;
  prefix_hits_ += num_hit_tokens;
}

}  // namespace pnl::core
