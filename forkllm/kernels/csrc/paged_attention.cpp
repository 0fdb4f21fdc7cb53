// Paged attention for single-query (decode) rows, reading K/V straight from the cache pages.
// One pass per (sequence, kv-head) with an online softmax; the query heads of a GQA group share
// every K/V load. Pairs are spread over threads with at::parallel_for.
#include "common.h"


template <typename T, int D, int G>
static void decode_pair(const T* __restrict q, const T* __restrict kc, const T* __restrict vc,
                        const int64_t* __restrict table, int64_t ctx, int64_t block_size,
                        int64_t slot_stride, float scale, T* __restrict out, int64_t q_head_stride) {
  float qf[G][D];
  for (int g = 0; g < G; ++g)
    for (int d = 0; d < D; ++d) qf[g][d] = to_f(q[g * q_head_stride + d]) * scale;
  float m[G], l[G], acc[G][D];
  for (int g = 0; g < G; ++g) { m[g] = -INFINITY; l[g] = 0.f; for (int d = 0; d < D; ++d) acc[g][d] = 0.f; }
  for (int64_t t = 0; t < ctx; ++t) {
    const int64_t slot = table[t / block_size] * block_size + (t % block_size);
    const T* k = kc + slot * slot_stride;
    const T* v = vc + slot * slot_stride;
    float kf[D], vf[D];
    for (int d = 0; d < D; ++d) kf[d] = to_f(k[d]);
    for (int d = 0; d < D; ++d) vf[d] = to_f(v[d]);
    for (int g = 0; g < G; ++g) {
      float s = 0.f;
      for (int d = 0; d < D; ++d) s += qf[g][d] * kf[d];
      if (s > m[g]) {
        const float c = std::exp(m[g] - s);
        l[g] *= c;
        for (int d = 0; d < D; ++d) acc[g][d] *= c;
        m[g] = s;
      }
      const float p = std::exp(s - m[g]);
      l[g] += p;
      for (int d = 0; d < D; ++d) acc[g][d] += p * vf[d];
    }
  }
  for (int g = 0; g < G; ++g) {
    const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
    for (int d = 0; d < D; ++d) out[g * q_head_stride + d] = static_cast<T>(acc[g][d] * inv);
  }
}

template <typename T, int D, int G>
static void run(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
                const torch::Tensor& tables, const torch::Tensor& ctx_lens, int64_t block_size,
                double scale, torch::Tensor& out) {
  const int64_t n = q.size(0), hq = q.size(1), hkv = kc.size(0);
  const int64_t slots = kc.size(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = kc.data_ptr<T>();
  const T* vp = vc.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* cp = ctx_lens.data_ptr<int64_t>();
  const int64_t tstride = tables.size(1);
  at::parallel_for(0, n * hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / hkv, h = i % hkv;
      decode_pair<T, D, G>(qp + (b * hq + h * G) * D, kp + h * slots * D, vp + h * slots * D,
                           tp + b * tstride, cp[b], block_size, D, (float)scale,
                           op + (b * hq + h * G) * D, D);
    }
  });
}

template <typename T>
static void dispatch(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
                     const torch::Tensor& tables, const torch::Tensor& ctx_lens, int64_t block_size,
                     double scale, torch::Tensor& out) {
  const int64_t d = q.size(2), g = q.size(1) / kc.size(0);
#define FORKLLM_CASE(DD, GG) if (d == DD && g == GG) return run<T, DD, GG>(q, kc, vc, tables, ctx_lens, block_size, scale, out);
  FORKLLM_CASE(64, 1) FORKLLM_CASE(64, 2) FORKLLM_CASE(64, 3) FORKLLM_CASE(64, 4) FORKLLM_CASE(64, 5)
  FORKLLM_CASE(64, 6) FORKLLM_CASE(64, 7) FORKLLM_CASE(64, 8)
  FORKLLM_CASE(128, 1) FORKLLM_CASE(128, 2) FORKLLM_CASE(128, 4) FORKLLM_CASE(128, 5) FORKLLM_CASE(128, 6)
  FORKLLM_CASE(128, 7) FORKLLM_CASE(128, 8)
  FORKLLM_CASE(16, 1) FORKLLM_CASE(16, 2) FORKLLM_CASE(16, 4) FORKLLM_CASE(8, 1) FORKLLM_CASE(8, 2)
  FORKLLM_CASE(32, 1) FORKLLM_CASE(32, 2) FORKLLM_CASE(32, 4)
#undef FORKLLM_CASE
  TORCH_CHECK(false, "paged_decode: unsupported head_dim/group ", d, "/", g);
}

// q [n, hq, d]; kc/vc [hkv, slots, d]; tables [n, max_blocks] int64; ctx_lens [n] int64.
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor kc, torch::Tensor vc, torch::Tensor tables,
                           torch::Tensor ctx_lens, int64_t block_size, double scale) {
  TORCH_CHECK(q.is_contiguous() && kc.is_contiguous() && vc.is_contiguous(), "contiguous inputs expected");
  auto out = torch::empty_like(q);
  if (q.scalar_type() == torch::kFloat) dispatch<float>(q, kc, vc, tables, ctx_lens, block_size, scale, out);
  else if (q.scalar_type() == torch::kBFloat16) dispatch<c10::BFloat16>(q, kc, vc, tables, ctx_lens, block_size, scale, out);
  else if (q.scalar_type() == torch::kHalf) dispatch<c10::Half>(q, kc, vc, tables, ctx_lens, block_size, scale, out);
  else TORCH_CHECK(false, "paged_decode: unsupported dtype");
  return out;
}

// Supported (head_dim, group) pairs, so Python can fall back before calling.
bool paged_decode_supports(int64_t d, int64_t g) {
  if (d == 64) return g >= 1 && g <= 8;
  if (d == 128) return g == 1 || g == 2 || (g >= 4 && g <= 8);
  if (d == 16) return g == 1 || g == 2 || g == 4;
  if (d == 8) return g == 1 || g == 2;
  if (d == 32) return g == 1 || g == 2 || g == 4;
  return false;
}
