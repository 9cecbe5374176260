// BlockAllocator: reference counts, the free list, the prefix cache and its eviction order.
#include <gtest/gtest.h>

#include <algorithm>
#include <climits>
#include <numeric>
#include <vector>

#include "pnl/core/block_allocator.h"

using namespace pnl::core;

namespace {

constexpr int32_t kBs = 8;

// Every block lands in the same hash bucket: only the token and parent checks keep chains apart.
uint64_t constant_hash(uint64_t, const TokenId*, int32_t) { return 42; }

std::vector<TokenId> iota_tokens(int32_t n, TokenId first) {
  std::vector<TokenId> t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}

std::vector<TokenId> head(const std::vector<TokenId>& t, int32_t n) { return {t.begin(), t.begin() + n}; }

std::vector<TokenId> concat(std::vector<TokenId> a, const std::vector<TokenId>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

std::vector<BlockId> match(const BlockAllocator& a, const std::vector<TokenId>& tokens, int32_t max_blocks = INT_MAX) {
  std::vector<BlockId> out;
  a.match_prefix(tokens.data(), static_cast<int32_t>(tokens.size()), max_blocks, out);
  return out;
}

// Allocates and registers one block per full block of `tokens`, each the parent of the next, like a
// sequence whose prefill just completed. Continues the chain after `parent` when given.
std::vector<BlockId> cache_chain(BlockAllocator& a, const std::vector<TokenId>& tokens, BlockId parent = -1) {
  std::vector<BlockId> blocks;
  const int32_t bs = a.block_size();
  for (size_t i = 0; i + bs <= tokens.size(); i += bs) {
    BlockId b = a.allocate();
    a.cache_full_block(b, blocks.empty() ? parent : blocks.back(), tokens.data() + i);
    blocks.push_back(b);
  }
  return blocks;
}

}  // namespace

TEST(BlockAllocator, FreshPoolIsAllFree) {
  BlockAllocator a(5, kBs);
  EXPECT_EQ(a.num_blocks(), 5);
  EXPECT_EQ(a.block_size(), kBs);
  EXPECT_TRUE(a.prefix_caching());
  EXPECT_EQ(a.num_free_blocks(), 5);
  EXPECT_EQ(a.num_used_blocks(), 0);
  for (BlockId b = 0; b < 5; ++b) {
    EXPECT_EQ(a.ref_count(b), 0);
    EXPECT_FALSE(a.is_cached(b));
  }
  BlockAllocatorStats s = a.stats();
  EXPECT_EQ(s.num_blocks, 5);
  EXPECT_EQ(s.num_used_blocks, 0);
  EXPECT_EQ(s.num_cached_blocks, 0);
  EXPECT_EQ(s.prefix_queries, 0);
  EXPECT_EQ(s.prefix_hits, 0);
}

TEST(BlockAllocator, AllocateUntilExhaustedThenThrows) {
  BlockAllocator a(3, kBs);
  std::vector<BlockId> got;
  for (int i = 0; i < 3; ++i) {
    got.push_back(a.allocate());
    EXPECT_EQ(a.ref_count(got.back()), 1);
    EXPECT_EQ(a.num_free_blocks(), 2 - i);
    EXPECT_EQ(a.num_used_blocks(), i + 1);
  }
  std::sort(got.begin(), got.end());
  EXPECT_EQ(got, (std::vector<BlockId>{0, 1, 2}));
  EXPECT_THROW(a.allocate(), ProtocolError);
  EXPECT_EQ(a.num_free_blocks(), 0);  // the failed call changed nothing
}

TEST(BlockAllocator, RefCountsAcquireRelease) {
  BlockAllocator a(2, kBs);
  BlockId b = a.allocate();
  a.acquire(b);  // a second owner of a used block, e.g. a shared prefix
  EXPECT_EQ(a.ref_count(b), 2);
  a.release(b);
  EXPECT_EQ(a.ref_count(b), 1);
  EXPECT_EQ(a.num_used_blocks(), 1);  // still owned: not back on the free list
  a.release(b);
  EXPECT_EQ(a.ref_count(b), 0);
  EXPECT_EQ(a.num_free_blocks(), 2);
  EXPECT_THROW(a.release(b), ProtocolError);
  EXPECT_EQ(a.ref_count(b), 0);
  // A free block that holds no cached prefix cannot be acquired: only match_prefix() hits can.
  EXPECT_THROW(a.acquire(b), ProtocolError);
  EXPECT_EQ(a.num_free_blocks(), 2);
}

TEST(BlockAllocator, OutOfRangeIdsThrowInvalidArgument) {
  BlockAllocator a(2, kBs);
  EXPECT_THROW(a.ref_count(-1), InvalidArgument);
  EXPECT_THROW(a.ref_count(2), InvalidArgument);
  EXPECT_THROW(a.is_cached(2), InvalidArgument);
  EXPECT_THROW(a.release(2), InvalidArgument);
  EXPECT_THROW(a.acquire(-1), InvalidArgument);
}

TEST(BlockAllocator, ReleasedBlockIsReusedFirst) {
  BlockAllocator a(4, kBs);
  std::vector<BlockId> all;
  for (int i = 0; i < 4; ++i) all.push_back(a.allocate());
  a.release(all[2]);
  EXPECT_EQ(a.num_free_blocks(), 1);
  EXPECT_EQ(a.allocate(), all[2]);
}

TEST(BlockAllocator, PrefixChainHitsAndMisses) {
  BlockAllocator a(8, kBs);
  const std::vector<TokenId> tokens = iota_tokens(3 * kBs + 5, 100);  // 3 full blocks + a partial one
  const std::vector<BlockId> chain = cache_chain(a, tokens);
  ASSERT_EQ(chain.size(), 3u);  // the partial tail block is never registered
  for (BlockId b : chain) EXPECT_TRUE(a.is_cached(b));

  EXPECT_EQ(match(a, tokens), chain);
  EXPECT_EQ(match(a, tokens, 2), (std::vector<BlockId>{chain[0], chain[1]}));
  EXPECT_TRUE(match(a, tokens, 0).empty());
  // A partial last block never matches, even though its tokens agree with a cached block.
  EXPECT_EQ(match(a, head(tokens, 3 * kBs - 1)), (std::vector<BlockId>{chain[0], chain[1]}));
  EXPECT_TRUE(match(a, head(tokens, kBs - 1)).empty());

  std::vector<TokenId> other_first = tokens;
  other_first[0] = 7;  // blocks 1 and 2 are unchanged, but their parent chain is not
  EXPECT_TRUE(match(a, other_first).empty());
  std::vector<TokenId> other_second = tokens;
  other_second[kBs + 3] = 7;
  EXPECT_EQ(match(a, other_second), (std::vector<BlockId>{chain[0]}));

  // match_prefix() appends and takes nothing.
  std::vector<BlockId> out{99};
  a.match_prefix(tokens.data(), static_cast<int32_t>(tokens.size()), 1, out);
  EXPECT_EQ(out, (std::vector<BlockId>{99, chain[0]}));
  for (BlockId b : chain) EXPECT_EQ(a.ref_count(b), 1);
}

TEST(BlockAllocator, ForcedHashCollisionNeverSharesWrongBlocks) {
  BlockAllocator a(8, kBs, true, constant_hash);
  const std::vector<TokenId> x = iota_tokens(kBs, 0), y = iota_tokens(kBs, 100), z = iota_tokens(kBs, 200);
  const std::vector<BlockId> xy = cache_chain(a, concat(x, y));
  const std::vector<BlockId> zs = cache_chain(a, z);
  EXPECT_EQ(a.stats().num_cached_blocks, 3);

  EXPECT_EQ(match(a, concat(x, y)), xy);
  EXPECT_EQ(match(a, z), zs);
  // Same key 42 as every cached block, different tokens: no hit.
  EXPECT_TRUE(match(a, iota_tokens(kBs, 300)).empty());
  // y's tokens are cached only as the child of x: not as a first block, nor under z.
  EXPECT_TRUE(match(a, y).empty());
  EXPECT_EQ(match(a, concat(z, y)), zs);

  // Registering y under z too gives a separate chain; each prefix finds its own y.
  const std::vector<BlockId> zy = cache_chain(a, y, zs[0]);
  ASSERT_EQ(zy.size(), 1u);
  EXPECT_NE(zy[0], xy[1]);
  EXPECT_EQ(match(a, concat(z, y)), (std::vector<BlockId>{zs[0], zy[0]}));
  EXPECT_EQ(match(a, concat(x, y)), xy);
}

TEST(BlockAllocator, UncachedBlocksAreReclaimedBeforeCachedOnes) {
  BlockAllocator a(4, kBs);
  const std::vector<TokenId> t1 = iota_tokens(kBs, 0), t2 = iota_tokens(kBs, 50);
  const BlockId c1 = cache_chain(a, t1)[0];
  const BlockId c2 = cache_chain(a, t2)[0];
  const BlockId u1 = a.allocate(), u2 = a.allocate();
  // Interleave so that release order alone would reclaim cached blocks first.
  a.release(c1);
  a.release(u1);
  a.release(c2);
  a.release(u2);
  EXPECT_EQ(a.num_free_blocks(), 4);
  // Freed cached blocks stay reusable until reclaimed.
  EXPECT_EQ(match(a, t1), (std::vector<BlockId>{c1}));
  EXPECT_EQ(match(a, t2), (std::vector<BlockId>{c2}));

  std::vector<BlockId> first_two{a.allocate(), a.allocate()};
  std::sort(first_two.begin(), first_two.end());
  std::vector<BlockId> uncached{u1, u2};
  std::sort(uncached.begin(), uncached.end());
  EXPECT_EQ(first_two, uncached);
  EXPECT_EQ(a.stats().num_cached_blocks, 2);

  // Then the least recently released cached block, whose prefix is evicted.
  EXPECT_EQ(a.allocate(), c1);
  EXPECT_FALSE(a.is_cached(c1));
  EXPECT_TRUE(match(a, t1).empty());
  EXPECT_EQ(match(a, t2), (std::vector<BlockId>{c2}));
  EXPECT_EQ(a.stats().num_cached_blocks, 1);
  EXPECT_EQ(a.allocate(), c2);
  EXPECT_TRUE(match(a, t2).empty());
  EXPECT_EQ(a.stats().num_cached_blocks, 0);
}

TEST(BlockAllocator, AcquiringCachedFreeBlockTakesItOffFreeList) {
  BlockAllocator a(2, kBs);
  const std::vector<TokenId> t1 = iota_tokens(kBs, 0), t2 = iota_tokens(kBs, 50);
  const BlockId c1 = cache_chain(a, t1)[0];
  const BlockId c2 = cache_chain(a, t2)[0];
  a.release(c1);
  a.release(c2);
  const std::vector<BlockId> hit = match(a, t1);
  ASSERT_EQ(hit, (std::vector<BlockId>{c1}));
  EXPECT_EQ(a.count_free(hit), 1);
  a.acquire(c1);
  EXPECT_EQ(a.ref_count(c1), 1);
  EXPECT_EQ(a.num_free_blocks(), 1);
  EXPECT_EQ(a.count_free(hit), 0);
  EXPECT_TRUE(a.is_cached(c1));  // acquiring keeps the prefix
  // Released again, c1 is now the most recently released: c2 goes first.
  a.release(c1);
  EXPECT_EQ(a.allocate(), c2);
  EXPECT_EQ(match(a, t1), (std::vector<BlockId>{c1}));
  EXPECT_EQ(a.allocate(), c1);
}

TEST(BlockAllocator, EvictingParentBreaksChain) {
  BlockAllocator a(2, kBs);
  const std::vector<TokenId> tokens = iota_tokens(2 * kBs, 0);
  const std::vector<BlockId> chain = cache_chain(a, tokens);
  a.release(chain[0]);  // the parent is released first, so it is reclaimed first
  a.release(chain[1]);
  EXPECT_EQ(a.allocate(), chain[0]);
  EXPECT_TRUE(a.is_cached(chain[1]));
  EXPECT_TRUE(match(a, tokens).empty());
}

TEST(BlockAllocator, DuplicateRegistrationChainsThroughEither) {
  BlockAllocator a(4, kBs);
  const std::vector<TokenId> x = iota_tokens(kBs, 0), y = iota_tokens(kBs, 100);
  // Two sequences computed the same first block side by side; the chain continued in the second.
  const BlockId x1 = cache_chain(a, x)[0];
  const BlockId x2 = cache_chain(a, x)[0];
  const BlockId yb = cache_chain(a, y, x2)[0];
  EXPECT_NE(x1, x2);
  EXPECT_TRUE(a.is_cached(x1));
  EXPECT_TRUE(a.is_cached(x2));
  EXPECT_EQ(a.stats().num_cached_blocks, 3);

  std::vector<BlockId> hit = match(a, concat(x, y));
  ASSERT_EQ(hit.size(), 2u);
  EXPECT_TRUE(hit[0] == x1 || hit[0] == x2);
  EXPECT_EQ(hit[1], yb);

  // Evict x2, yb's actual parent: the chain still continues through its twin x1.
  a.release(x2);
  const BlockId spare = a.allocate();
  EXPECT_NE(spare, x2);  // the never-used block is reclaimed before the cached x2
  EXPECT_EQ(a.allocate(), x2);
  EXPECT_FALSE(a.is_cached(x2));
  EXPECT_EQ(match(a, concat(x, y)), (std::vector<BlockId>{x1, yb}));
  EXPECT_EQ(a.stats().num_cached_blocks, 2);
}

TEST(BlockAllocator, CacheFullBlockProtocol) {
  BlockAllocator a(3, kBs);
  const std::vector<TokenId> t = iota_tokens(kBs, 0);
  const BlockId owned = a.allocate();
  const BlockId uncached_parent = a.allocate();
  EXPECT_THROW(a.cache_full_block(owned, uncached_parent, t.data()), ProtocolError);
  EXPECT_FALSE(a.is_cached(owned));
  a.cache_full_block(owned, -1, t.data());
  EXPECT_THROW(a.cache_full_block(owned, -1, t.data()), ProtocolError);  // already cached
  EXPECT_THROW(a.cache_full_block(2, -1, t.data()), ProtocolError);      // free block, no owner
  EXPECT_EQ(a.stats().num_cached_blocks, 1);
}

TEST(BlockAllocator, StatsCounters) {
  BlockAllocator a(6, kBs);
  const std::vector<BlockId> chain = cache_chain(a, iota_tokens(2 * kBs, 0));
  a.allocate();
  BlockAllocatorStats s = a.stats();
  EXPECT_EQ(s.num_blocks, 6);
  EXPECT_EQ(s.num_used_blocks, 3);
  EXPECT_EQ(s.num_cached_blocks, 2);
  // Cached blocks count until evicted, used or not.
  a.release(chain[1]);
  a.release(chain[0]);
  s = a.stats();
  EXPECT_EQ(s.num_used_blocks, 1);
  EXPECT_EQ(s.num_cached_blocks, 2);
  a.record_prefix_query(10, 8);
  a.record_prefix_query(6, 0);
  s = a.stats();
  EXPECT_EQ(s.prefix_queries, 16);
  EXPECT_EQ(s.prefix_hits, 8);
}

TEST(BlockAllocator, InvalidConstructionThrows) {
  for (int32_t bs : {0, 4, 7, 12, 24, 100, 512, -16}) {
    EXPECT_THROW(BlockAllocator(4, bs), InvalidArgument) << "block_size " << bs;
  }
  for (int32_t n : {0, -1}) EXPECT_THROW(BlockAllocator(n, kBs), InvalidArgument) << "num_blocks " << n;
  EXPECT_THROW(BlockAllocator(4, kBs, true, nullptr), InvalidArgument);
  EXPECT_THROW(BlockAllocator(1 << 24, 256), InvalidArgument);  // 2^32 slots overflow int32 slot ids
  for (int32_t bs : {8, 16, 32, 64, 128, 256}) EXPECT_NO_THROW(BlockAllocator(1, bs)) << "block_size " << bs;
}

TEST(BlockAllocator, PrefixCachingDisabledNeverMatches) {
  BlockAllocator a(2, kBs, false);
  EXPECT_FALSE(a.prefix_caching());
  const std::vector<TokenId> t = iota_tokens(kBs, 0);
  const BlockId b = a.allocate();
  a.cache_full_block(b, -1, t.data());  // a no-op
  EXPECT_FALSE(a.is_cached(b));
  EXPECT_EQ(a.stats().num_cached_blocks, 0);
  EXPECT_TRUE(match(a, t).empty());
  a.release(b);
  EXPECT_TRUE(match(a, t).empty());
  EXPECT_THROW(a.acquire(b), ProtocolError);
}

TEST(BlockAllocator, ResetPrefixCacheOnlyWhenNoBlockIsUsed) {
  BlockAllocator a(6, kBs);
  const std::vector<TokenId> tokens = iota_tokens(2 * kBs, 0);
  const std::vector<BlockId> chain = cache_chain(a, tokens);
  EXPECT_FALSE(a.reset_prefix_cache());  // the chain is still owned: nothing changes
  EXPECT_EQ(match(a, tokens), chain);
  for (BlockId b : chain) a.release(b);
  EXPECT_EQ(match(a, tokens), chain);  // freed but still cached
  a.record_prefix_query(2 * kBs, kBs);

  EXPECT_TRUE(a.reset_prefix_cache());
  EXPECT_TRUE(match(a, tokens).empty());
  for (BlockId b : chain) {
    EXPECT_FALSE(a.is_cached(b));
    EXPECT_THROW(a.acquire(b), ProtocolError);  // a free block without a prefix cannot be shared
  }
  const BlockAllocatorStats s = a.stats();
  EXPECT_EQ(s.num_cached_blocks, 0);
  EXPECT_EQ(s.num_used_blocks, 0);
  EXPECT_EQ(s.prefix_queries, 2 * kBs);  // counters are not reset
  EXPECT_EQ(a.num_free_blocks(), 6);

  // The pool works as before: the same tokens cache again, and every block can be taken.
  const std::vector<BlockId> again = cache_chain(a, tokens);
  EXPECT_EQ(match(a, tokens), again);
  for (int i = 0; i < 4; ++i) a.allocate();
  EXPECT_EQ(a.num_free_blocks(), 0);
}
