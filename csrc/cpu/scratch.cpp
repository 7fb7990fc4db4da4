// Large intermediates of the CPU kernels, kept per calling thread between calls.
//
// glibc hands a freed multi-MB block back to the OS, so the next call's fresh buffer page-faults in
// again and the kernel zeroes every page: about a fifth of dwconv_bn_act's backward at 2x96x64x64
// (perf: exc_page_fault, clear_page).  With the buffers kept, that backward ran 1.8x faster and the
// NCHW forward 2x.  The memory stays with the thread until it ends or calls release_scratch().
//
// The kernels' outputs pay the same page faults (a DLKUNet-S forward at 224 x 224 ran about a
// fifth faster with glibc told to keep freed blocks: 283 -> 226 ms, 300 -> 202 ms), so outputs of
// a megabyte or more come from a process-wide cache of freed blocks, as ONNX Runtime's arena does.
// A block goes back to the cache when its tensor is freed; the cache keeps at most
// DLKUNET_CPU_CACHE_MB of free blocks (default: a quarter of physical memory) and release_scratch()
// empties it.  The limit must hold what one forward frees: about 130 MiB per image at 224 x 224
// (1.03-1.14 GiB for DLKUNet-S/M/L at batch 8), and a forward whose blocks do not fit pays the page
// faults again on every call.
#include "common.h"

#include <array>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <unordered_map>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

namespace dlkunet {
namespace cpu {

namespace {
constexpr int64_t kMaxCachedBytes = int64_t(512) << 20;  // larger buffers are allocated per call
constexpr int64_t kMinCachedOutput = int64_t(1) << 20;    // smaller outputs: malloc keeps those itself
constexpr int64_t kFallbackCacheMb = 1024;  // where physical memory cannot be read
constexpr int64_t kPhysicalMemoryShare = 4;  // the default limit: 1/4 of physical memory

// Free output blocks by exact size.  Never destroyed: tensors may be freed during interpreter exit.
class OutputCache {
 public:
  OutputCache() {
    const char* env = std::getenv("DLKUNET_CPU_CACHE_MB");
    limit_ = env ? std::max<int64_t>(0, std::atoll(env)) << 20 : default_limit();
  }
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end()) {
        void* p = it->second;
        free_.erase(it);
        held_ -= static_cast<int64_t>(bytes);
        return p;
      }
    }
    return cache_line_alloc(bytes);
  }
  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (held_ + static_cast<int64_t>(bytes) <= limit_) {
        free_.emplace(bytes, p);
        held_ += static_cast<int64_t>(bytes);
        return;
      }
    }
    std::free(p);
  }
  int64_t held() {
    std::lock_guard<std::mutex> lock(mutex_);
    return held_;
  }
  int64_t limit() const { return limit_; }
  int64_t clear() {  // returns the bytes freed
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& kv : free_) std::free(kv.second);
    free_.clear();
    const int64_t freed = held_;
    held_ = 0;
    return freed;
  }

 private:
  static int64_t default_limit() {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages > 0 && page > 0) return static_cast<int64_t>(pages) * page / kPhysicalMemoryShare;
#endif
    return kFallbackCacheMb << 20;
  }

  std::mutex mutex_;
  std::unordered_multimap<size_t, void*> free_;
  int64_t held_ = 0, limit_ = 0;
};

OutputCache& output_cache() {
  static OutputCache* cache = new OutputCache();
  return *cache;
}

// As at::empty does under torch.use_deterministic_algorithms: the tests' NaN poisoning then
// reaches reused buffers too, so an element a kernel reads before writing still shows.
void poison_if_deterministic(Tensor& t) {
  auto& ctx = at::globalContext();
  if (ctx.deterministicAlgorithms() && ctx.deterministicFillUninitializedMemory())
    t.fill_(std::numeric_limits<double>::quiet_NaN());
}

std::array<Tensor, static_cast<size_t>(Slot::kCount)>& slots() {
  thread_local std::array<Tensor, static_cast<size_t>(Slot::kCount)> buffers;
  return buffers;
}
}  // namespace

Tensor scratch(Slot slot, at::IntArrayRef sizes, at::ScalarType dtype) {
  auto opts = at::TensorOptions().dtype(dtype);
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(c10::elementSize(dtype));
  if (bytes > kMaxCachedBytes) return at::empty(sizes, opts);
  Tensor& buf = slots()[static_cast<size_t>(slot)];
  if (!buf.defined() || buf.numel() < bytes) {
    buf = Tensor();  // free the old block before taking the larger one
    buf = at::empty({std::max<int64_t>(bytes, 1)}, at::TensorOptions().dtype(at::kByte));
  }
  // The view holds the storage, so it stays valid even if the slot is later re-sized.
  c10::Storage storage = buf.storage();
  Tensor view = at::from_blob(buf.data_ptr(), sizes, [storage](void*) {}, opts);
  poison_if_deterministic(view);
  return view;
}

namespace {
Tensor cached_empty(at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& opts, int64_t bytes) {
  const size_t n = static_cast<size_t>(bytes);
  void* p = output_cache().take(n);
  Tensor t = at::from_blob(p, sizes, strides, [n](void* q) { output_cache().give(q, n); }, opts);
  poison_if_deterministic(t);
  return t;
}
}  // namespace

Tensor output_empty(at::IntArrayRef sizes, const at::TensorOptions& opts, at::MemoryFormat fmt) {
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(opts.dtype().itemsize());
  if (bytes < kMinCachedOutput) return at::empty(sizes, opts.memory_format(fmt));
  std::vector<int64_t> strides(sizes.size(), 1);
  if (fmt == at::MemoryFormat::ChannelsLast) {
    strides = c10::get_channels_last_strides_2d(sizes);
  } else {
    for (int64_t d = static_cast<int64_t>(sizes.size()) - 2; d >= 0; --d) strides[d] = strides[d + 1] * sizes[d + 1];
  }
  return cached_empty(sizes, strides, opts, bytes);
}

Tensor output_like(const Tensor& x) {
  const int64_t bytes = x.numel() * static_cast<int64_t>(x.element_size());
  if (bytes < kMinCachedOutput || !x.is_non_overlapping_and_dense()) return at::empty_like(x);
  return cached_empty(x.sizes(), x.strides(), x.options(), bytes);
}

int64_t cached_output_bytes() { return output_cache().held(); }

int64_t output_cache_limit() { return output_cache().limit(); }

int64_t scratch_bytes() {
  int64_t total = 0;
  for (const Tensor& b : slots()) total += b.defined() ? b.numel() : 0;
  return total;
}

int64_t release_scratch() {
  const int64_t freed = scratch_bytes() + output_cache().clear();
  for (Tensor& b : slots()) b = Tensor();
  return freed;
}

}  // namespace cpu
}  // namespace dlkunet
