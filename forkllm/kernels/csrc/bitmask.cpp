// Grammar masks (structured output): logits[rows[j], t] = -inf wherever bit t of bitmask row j is
// 0, in place. One pass per row over the mask's 32-token words: all-ones words (inside a JSON
// string nearly every word) are skipped, all-zero words filled, mixed words walked bit by bit, so
// only disallowed tokens are written. Columns past the mask are disallowed.
#include "common.h"

#include <algorithm>
#include <limits>
#include <vector>

#define FORKLLM_DISPATCH(TYPE, NAME, ...)                                                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                    \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)             \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace {

template <typename T>
void mask_row(T* row, const uint32_t* words, int64_t W, int64_t V) {
  const T ninf = static_cast<T>(-std::numeric_limits<float>::infinity());
  const int64_t full = std::min(W, V / 32);  // words whose 32 tokens all exist in the row
  for (int64_t w = 0; w < full; ++w) {
    const uint32_t bits = words[w];
    if (bits == 0xFFFFFFFFu) continue;
    T* p = row + w * 32;
    if (bits == 0) {
      std::fill(p, p + 32, ninf);
      continue;
    }
    for (uint32_t off = ~bits; off; off &= off - 1) p[__builtin_ctz(off)] = ninf;
  }
  for (int64_t t = full * 32; t < V; ++t) {  // a partial last word, then columns past the mask
    const int64_t w = t / 32;
    if (w >= W || !((words[w] >> (t % 32)) & 1u)) row[t] = ninf;
  }
}

}  // namespace

void apply_token_bitmask_(torch::Tensor logits, torch::Tensor bitmask, c10::optional<torch::Tensor> rows) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "apply_token_bitmask_: logits must be [n, V], rows contiguous");
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.scalar_type() == torch::kInt32 && bitmask.is_contiguous(),
              "apply_token_bitmask_: bitmask must be a contiguous int32 [m, words]");
  TORCH_CHECK(logits.device().is_cpu() && bitmask.device().is_cpu(), "apply_token_bitmask_: CPU tensors only");
  const int64_t m = bitmask.size(0), W = bitmask.size(1), V = logits.size(1), stride = logits.stride(0);
  std::vector<int64_t> target(m);
  if (rows.has_value()) {
    TORCH_CHECK(rows->dim() == 1 && rows->size(0) == m && rows->scalar_type() == torch::kLong,
                "apply_token_bitmask_: rows must be int64 [m]");
    const auto r = rows->contiguous();
    const int64_t* rp = r.data_ptr<int64_t>();
    for (int64_t j = 0; j < m; ++j) {
      TORCH_CHECK(rp[j] >= 0 && rp[j] < logits.size(0), "apply_token_bitmask_: row out of range");
      target[j] = rp[j];
    }
  } else {
    TORCH_CHECK(m == logits.size(0), "apply_token_bitmask_: one bitmask row per logits row");
    for (int64_t j = 0; j < m; ++j) target[j] = j;
  }
  const uint32_t* words = reinterpret_cast<const uint32_t*>(bitmask.data_ptr<int32_t>());
  FORKLLM_DISPATCH(logits.scalar_type(), "apply_token_bitmask_", [&] {
    scalar_t* base = logits.data_ptr<scalar_t>();
    at::parallel_for(0, m, 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) mask_row(base + target[j] * stride, words + j * W, W, V);
    });
  });
}
