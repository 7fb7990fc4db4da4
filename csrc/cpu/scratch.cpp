// Large intermediates of the CPU kernels, kept per calling thread between calls.
//
// glibc hands a freed multi-MB block back to the OS, so the next call's fresh buffer page-faults in
// again and the kernel zeroes every page: about a fifth of dwconv_bn_act's backward at 2x96x64x64
// (perf: exc_page_fault, clear_page).  With the buffers kept, that backward ran 1.8x faster and the
// NCHW forward 2x.  The memory stays with the thread until it ends or calls release_scratch().
#include "common.h"

#include <array>
#include <limits>

namespace dlkunet {
namespace cpu {

namespace {
constexpr int64_t kMaxCachedBytes = int64_t(512) << 20;  // larger buffers are allocated per call

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
  // As at::empty does under torch.use_deterministic_algorithms: the tests' NaN poisoning then
  // reaches reused buffers too, so an element a kernel reads before writing still shows.
  auto& ctx = at::globalContext();
  if (ctx.deterministicAlgorithms() && ctx.deterministicFillUninitializedMemory())
    view.fill_(std::numeric_limits<double>::quiet_NaN());
  return view;
}

int64_t scratch_bytes() {
  int64_t total = 0;
  for (const Tensor& b : slots()) total += b.defined() ? b.numel() : 0;
  return total;
}

void release_scratch() {
  for (Tensor& b : slots()) b = Tensor();
}

}  // namespace cpu
}  // namespace dlkunet
