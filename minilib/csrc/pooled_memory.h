// Memory for the C++ kernels' large outputs (the cross-entropy's gradient, the batch norm's y and dx),
// reused once PyTorch has freed it. Shared by every kernel source that includes it; each extension
// module gets its own pool (everything here has internal linkage).
//
// Why reuse: a fresh 50 MiB-1 GiB tensor costs a page fault per page on its first write, about as much as
// the kernel's own sweep over it, so, as PyTorch's CUDA caching allocator does, a freed block is kept and
// handed to the next call that asks for that many bytes.
//
// Why this is safe whatever the caller keeps (the tensor, a view, its storage, a numpy array on it, a copy
// sent to another process): a block goes back to the pool only from its tensor's deleter, and PyTorch runs
// that deleter only when no storage holds the memory any more, that is, when nothing can read it.
// (Sending a tensor to another process moves its storage into shared memory: the old memory's deleter
// runs then, and the shared memory is never ours.) Nothing here counts references.
//
// Before including, a kernel may set MINILIB_POOL_MAX_FREE_BLOCKS: how many freed blocks of different
// sizes are kept (default 1: the cross-entropy's one gradient; the batch norm keeps one per layer shape).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#ifndef MINILIB_POOL_MAX_FREE_BLOCKS
#define MINILIB_POOL_MAX_FREE_BLOCKS 1
#endif

namespace pooled_memory {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;

// Ask Linux for 2 MiB pages: one page fault per 2 MiB instead of per 4 KiB. A hint only.
void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(p, bytes, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

struct Pool {
  std::mutex mutex;
  std::vector<std::pair<void*, size_t>> free_blocks;  // (block, bytes), oldest first
};

// Never destroyed: a deleter may run during interpreter shutdown, after this library's statics are gone.
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

void* new_block(size_t bytes) {
  void* p = nullptr;
  // A large block is 2 MiB aligned and rounded, so that the huge-page hint covers all of it.
  const bool huge = bytes >= 2 * kHugePage;
  const size_t align = huge ? kHugePage : 64;
  const size_t rounded = (std::max<size_t>(bytes, 1) + align - 1) / align * align;
  if (posix_memalign(&p, align, rounded) != 0) throw std::bad_alloc();
  if (huge) advise_huge_pages(p, rounded);
  return p;
}

// The tensor's deleter: the block joins the free blocks (the oldest is freed when there are too many).
void return_block(void* p, size_t bytes) {
  void* evicted = nullptr;
  {
    std::lock_guard<std::mutex> lock(pool().mutex);
    auto& blocks = pool().free_blocks;
    if (blocks.size() >= MINILIB_POOL_MAX_FREE_BLOCKS) {
      evicted = blocks.front().first;
      blocks.erase(blocks.begin());
    }
    blocks.emplace_back(p, bytes);
  }
  std::free(evicted);
}

// A free block of exactly `bytes` (the newest such), or a new one. On a miss with the pool full, the
// oldest free block is freed first: the pool never holds more than its free blocks plus what is in use.
void* take_block(size_t bytes) {
  void* found = nullptr;
  void* evicted = nullptr;
  {
    std::lock_guard<std::mutex> lock(pool().mutex);
    auto& blocks = pool().free_blocks;
    for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) {
      if (it->second == bytes) {
        found = it->first;
        blocks.erase(std::next(it).base());
        break;
      }
    }
    if (found == nullptr && blocks.size() >= MINILIB_POOL_MAX_FREE_BLOCKS) {
      evicted = blocks.front().first;
      blocks.erase(blocks.begin());
    }
  }
  std::free(evicted);
  return found != nullptr ? found : new_block(bytes);
}

}  // namespace

// A float32 tensor of `sizes` and `strides` (a dense layout: contiguous or channels-last) on memory that
// nothing else refers to. Its memory returns to the pool when PyTorch frees it.
inline at::Tensor empty(at::IntArrayRef sizes, at::IntArrayRef strides) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * sizeof(float);
  void* p = take_block(bytes);
  return at::from_blob(
      p, sizes, strides, [bytes](void* q) { return_block(q, bytes); }, at::TensorOptions().dtype(at::kFloat));
}

// Frees every free block (memory a long-lived process wants back after training).
inline void release() {
  std::vector<std::pair<void*, size_t>> blocks;
  {
    std::lock_guard<std::mutex> lock(pool().mutex);
    blocks.swap(pool().free_blocks);
  }
  for (auto& b : blocks) std::free(b.first);
}

}  // namespace pooled_memory
