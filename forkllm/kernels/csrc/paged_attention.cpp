// Paged attention for single-query (decode) rows, reading K/V straight from the cache pages.
// One pass per (sequence, kv-head) with an online softmax; the query heads of a GQA group share
// every K/V load. Pairs are spread over threads with at::parallel_for.
#include "common.h"
#include <algorithm>
#include <type_traits>
#include <vector>


template <typename T, int D, int G>
static void decode_pair(const T* __restrict q, const T* __restrict kc, const T* __restrict vc,
                        const int64_t* __restrict table, int64_t start, int64_t ctx, int64_t block_size,
                        int64_t slot_stride, float scale, T* __restrict out, int64_t q_head_stride,
                        float* __restrict lse) {
  float qf[G][D];
  for (int g = 0; g < G; ++g)
    for (int d = 0; d < D; ++d) qf[g][d] = to_f(q[g * q_head_stride + d]) * scale;
  float m[G], l[G], acc[G][D];
  for (int g = 0; g < G; ++g) { m[g] = -INFINITY; l[g] = 0.f; for (int d = 0; d < D; ++d) acc[g][d] = 0.f; }
  for (int64_t t = start; t < ctx; ++t) {
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
    if (lse) lse[g] = l[g] > 0.f ? m[g] + std::log(l[g]) : -INFINITY;
    for (int d = 0; d < D; ++d) out[g * q_head_stride + d] = static_cast<T>(acc[g][d] * inv);
  }
}

#if defined(__AVX512F__)
#include <immintrin.h>

static inline __m512 load_row16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load_row16(const c10::BFloat16* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
static inline __m512 load_row16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}


// AVX-512 version: 16 keys per chunk, one vector exp and one rescale per chunk and head.
template <typename T, int D, int G>
static void decode_pair_avx512(const T* __restrict q, const T* __restrict kc, const T* __restrict vc,
                               const int64_t* __restrict table, int64_t start, int64_t ctx, int64_t block_size,
                               float scale, T* __restrict out, float* __restrict lse) {
  constexpr int DV = D / 16;
  __m512 qv[G][DV], acc[G][DV];
  float m[G], l[G];
  for (int g = 0; g < G; ++g) {
    for (int j = 0; j < DV; ++j) {
      qv[g][j] = _mm512_mul_ps(load_row16(q + g * D + j * 16), _mm512_set1_ps(scale));
      acc[g][j] = _mm512_setzero_ps();
    }
    m[g] = -INFINITY;
    l[g] = 0.f;
  }
  alignas(64) float s[G][16];
  alignas(64) float p[G][16];
  const T* vrow[16];
  for (int64_t c = start; c < ctx; c += 16) {
    const int nv = (int)std::min<int64_t>(16, ctx - c);
    for (int t = 0; t < nv; ++t) {
      const int64_t pos = c + t;
      const int64_t slot = table[pos / block_size] * block_size + pos % block_size;
      const T* k = kc + slot * D;
      vrow[t] = vc + slot * D;
      __m512 kv[DV];
      for (int j = 0; j < DV; ++j) kv[j] = load_row16(k + j * 16);
      for (int g = 0; g < G; ++g) {
        __m512 d = _mm512_mul_ps(qv[g][0], kv[0]);
        for (int j = 1; j < DV; ++j) d = _mm512_fmadd_ps(qv[g][j], kv[j], d);
        s[g][t] = _mm512_reduce_add_ps(d);
      }
    }
    const __mmask16 live = (__mmask16)((1u << nv) - 1u);
    for (int g = 0; g < G; ++g) {
      const __m512 sv = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), live, s[g]);
      const float cm = _mm512_reduce_max_ps(sv);
      const float nm = std::max(m[g], cm);
      const float corr = std::exp(m[g] - nm);  // exp(-inf) = 0 on the first chunk
      l[g] *= corr;
      const __m512 cv = _mm512_set1_ps(corr);
      for (int j = 0; j < DV; ++j) acc[g][j] = _mm512_mul_ps(acc[g][j], cv);
      const __m512 pv = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(sv, _mm512_set1_ps(nm))));
      l[g] += _mm512_reduce_add_ps(pv);
      _mm512_store_ps(p[g], pv);
      m[g] = nm;
    }
    for (int t = 0; t < nv; ++t) {
      __m512 vv[DV];
      for (int j = 0; j < DV; ++j) vv[j] = load_row16(vrow[t] + j * 16);
      for (int g = 0; g < G; ++g) {
        const __m512 pt = _mm512_set1_ps(p[g][t]);
        for (int j = 0; j < DV; ++j) acc[g][j] = _mm512_fmadd_ps(pt, vv[j], acc[g][j]);
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
    if (lse) lse[g] = l[g] > 0.f ? m[g] + std::log(l[g]) : -INFINITY;
    alignas(64) float o[D];
    for (int j = 0; j < DV; ++j) _mm512_store_ps(o + j * 16, _mm512_mul_ps(acc[g][j], _mm512_set1_ps(inv)));
    for (int d = 0; d < D; ++d) out[g * D + d] = static_cast<T>(o[d]);
  }
}
#endif

#if defined(FORKLLM_AVX2)
// AVX2 version of decode_pair_avx512, 8 keys per chunk. A GQA group's G x D query and output
// accumulators are 2 x G x D / 8 vectors (48 for G = 3, D = 64) against 16 registers: kept in
// registers as the AVX-512 code does, they were stored and reloaded around every key (0.42 ms per
// row and 30 layers at 330 keys). Here scores are 4 keys x one head at a time (q in 8 registers,
// one 4-way horizontal-add tree instead of 4 reductions), and p.v runs over 32-wide slices of D,
// G x 4 accumulators loaded and stored once per chunk.
template <typename T, int D, int G>
static void decode_pair_avx2(const T* __restrict q, const T* __restrict kc, const T* __restrict vc,
                             const int64_t* __restrict table, int64_t start, int64_t ctx, int64_t block_size,
                             float scale, T* __restrict out, float* __restrict lse) {
  static_assert(D % 32 == 0, "p.v slices of 32");
  constexpr int DV = D / 8;
  alignas(32) float qs[G][D];
  alignas(32) float acc[G][D];
  float m[G], l[G];
  for (int g = 0; g < G; ++g) {
    for (int j = 0; j < DV; ++j) {
      _mm256_store_ps(qs[g] + j * 8, _mm256_mul_ps(load8(q + g * D + j * 8), _mm256_set1_ps(scale)));
      _mm256_store_ps(acc[g] + j * 8, _mm256_setzero_ps());
    }
    m[g] = -INFINITY;
    l[g] = 0.f;
  }
  alignas(32) float s[G][8];
  alignas(32) float p[G][8];
  const T* krow[8];
  const T* vrow[8];
  for (int64_t c = start; c < ctx; c += 8) {
    const int nv = (int)std::min<int64_t>(8, ctx - c);
    // One division per chunk: a 64-bit divide per key (its page and offset) cost more than the
    // key's dot products on Zen 3.
    int64_t blk = c / block_size, off = c % block_size;
    for (int t = 0; t < 8; ++t) {  // past the chunk's keys: its last key again, scores masked below
      const int64_t slot = table[blk] * block_size + off;
      krow[t] = kc + slot * D;
      vrow[t] = vc + slot * D;
      if (t + 1 < nv && ++off == block_size) {
        off = 0;
        ++blk;
      }
    }
    for (int g = 0; g < G; ++g) {
      __m256 qv[DV];
      for (int j = 0; j < DV; ++j) qv[j] = _mm256_load_ps(qs[g] + j * 8);
      for (int t0 = 0; t0 < 8; t0 += 4) {
        __m256 d[4];
        for (int u = 0; u < 4; ++u) {
          const T* k = krow[t0 + u];
          d[u] = _mm256_mul_ps(qv[0], load8(k));
          for (int j = 1; j < DV; ++j) d[u] = _mm256_fmadd_ps(qv[j], load8(k + j * 8), d[u]);
        }
        // [d0 d1 d2 d3] -> their four sums: hadd twice, then the two 128-bit halves
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(d[0], d[1]), _mm256_hadd_ps(d[2], d[3]));
        _mm_store_ps(s[g] + t0, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
      }
    }
    const __m256 live = _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_set1_epi32(nv), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    // exp(old max - new max) for every head in one vector exp (a libm exp per head and chunk cost
    // ~20 cycles a key); -inf on the first chunk, which exp256 clamps to ~1e-38, times l = 0.
    alignas(32) float corr[(G + 7) / 8 * 8] = {};
    float psum[G];
    for (int g = 0; g < G; ++g) {
      const __m256 sv = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_load_ps(s[g]), live);
      const float nm = std::max(m[g], hmax8(sv));
      corr[g] = m[g] - nm;
      const __m256 pv = _mm256_and_ps(live, exp256(_mm256_sub_ps(sv, _mm256_set1_ps(nm))));
      _mm256_store_ps(p[g], pv);
      psum[g] = hsum8(pv);
      m[g] = nm;
    }
    for (int g0 = 0; g0 < G; g0 += 8) _mm256_store_ps(corr + g0, exp256(_mm256_load_ps(corr + g0)));
    for (int g = 0; g < G; ++g) l[g] = l[g] * corr[g] + psum[g];
    for (int h = 0; h < D; h += 32) {
      __m256 a[G][4];
      for (int g = 0; g < G; ++g) {
        const __m256 cv = _mm256_set1_ps(corr[g]);
        for (int j = 0; j < 4; ++j) a[g][j] = _mm256_mul_ps(_mm256_load_ps(acc[g] + h + j * 8), cv);
      }
      for (int t = 0; t < nv; ++t) {
        __m256 vv[4];
        for (int j = 0; j < 4; ++j) vv[j] = load8(vrow[t] + h + j * 8);
        for (int g = 0; g < G; ++g) {
          const __m256 pt = _mm256_broadcast_ss(p[g] + t);
          for (int j = 0; j < 4; ++j) a[g][j] = _mm256_fmadd_ps(pt, vv[j], a[g][j]);
        }
      }
      for (int g = 0; g < G; ++g)
        for (int j = 0; j < 4; ++j) _mm256_store_ps(acc[g] + h + j * 8, a[g][j]);
    }
  }
  for (int g = 0; g < G; ++g) {
    const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
    if (lse) lse[g] = l[g] > 0.f ? m[g] + std::log(l[g]) : -INFINITY;
    for (int d = 0; d < D; ++d) out[g * D + d] = static_cast<T>(acc[g][d] * inv);
  }
}
#endif

#if defined(__AVX512BF16__)
// bf16 cache on AVX512-BF16 CPUs: q.k and p.v with vdpbf16ps (no bf16 -> fp32 conversions of
// K/V), 16 scores per head from one transpose-add tree. Probabilities are rounded to bf16 for
// p.v, as a bf16 GEMM would; scores, softmax and accumulators stay fp32.
template <int D, int G>
static void decode_pair_bf16(const c10::BFloat16* __restrict q, const c10::BFloat16* __restrict kc,
                             const c10::BFloat16* __restrict vc, const int64_t* __restrict table, int64_t start,
                             int64_t ctx, int64_t block_size, float scale, c10::BFloat16* __restrict out,
                             float* __restrict lse) {
  constexpr int DZ = D / 32;  // zmm of bf16 per head vector
  constexpr int DV = D / 16;  // zmm of fp32 per head vector
  __m512i qv[G][DZ];
  __m512 acc[G][DV];
  float m[G], l[G];
  for (int g = 0; g < G; ++g) {
    for (int j = 0; j < DZ; ++j) qv[g][j] = _mm512_loadu_si512(q + g * D + j * 32);
    for (int j = 0; j < DV; ++j) acc[g][j] = _mm512_setzero_ps();
    m[g] = -INFINITY;
    l[g] = 0.f;
  }
  alignas(64) static const uint16_t zeros[D] = {};
  const __m512 sc = _mm512_set1_ps(scale);
  __m512 part[G][16];
  alignas(64) uint32_t pp[G][8];  // (p[t], p[t+1]) bf16 pairs per head
  const uint16_t* vrow[16];
  for (int64_t c = start; c < ctx; c += 16) {
    const int nv = (int)std::min<int64_t>(16, ctx - c);
    for (int t = 0; t < 16; ++t) {
      if (t >= nv) {
        for (int g = 0; g < G; ++g) part[g][t] = _mm512_setzero_ps();
        vrow[t] = zeros;
        continue;
      }
      const int64_t pos = c + t;
      const int64_t slot = table[pos / block_size] * block_size + pos % block_size;
      const c10::BFloat16* k = kc + slot * D;
      vrow[t] = reinterpret_cast<const uint16_t*>(vc + slot * D);
      __m512i kv[DZ];
      for (int j = 0; j < DZ; ++j) kv[j] = _mm512_loadu_si512(k + j * 32);
      for (int g = 0; g < G; ++g) {
        __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), as_bh(qv[g][0]), as_bh(kv[0]));
        for (int j = 1; j < DZ; ++j) d = _mm512_dpbf16_ps(d, as_bh(qv[g][j]), as_bh(kv[j]));
        part[g][t] = d;
      }
    }
    const __mmask16 live = (__mmask16)((1u << nv) - 1u);
    for (int g = 0; g < G; ++g) {
      const __m512 sv = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), live, _mm512_mul_ps(hsum16(part[g]), sc));
      const float nm = std::max(m[g], _mm512_reduce_max_ps(sv));
      const float corr = std::exp(m[g] - nm);  // exp(-inf) = 0 on the first chunk
      const __m512 cv = _mm512_set1_ps(corr);
      for (int j = 0; j < DV; ++j) acc[g][j] = _mm512_mul_ps(acc[g][j], cv);
      const __m512 pv = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(sv, _mm512_set1_ps(nm))));
      l[g] = l[g] * corr + _mm512_reduce_add_ps(pv);
      m[g] = nm;
      const __m256bh pb = _mm512_cvtneps_pbh(pv);
      _mm256_store_si256(reinterpret_cast<__m256i*>(pp[g]), reinterpret_cast<const __m256i&>(pb));
    }
    for (int tp = 0; tp < (nv + 1) / 2; ++tp) {
      __m512i vv[DV];  // (v[t][d], v[t+1][d]) pairs, 16 dimensions per zmm
      for (int j = 0; j < DZ; ++j) {
        const __m512i a = _mm512_loadu_si512(vrow[2 * tp] + j * 32);
        const __m512i b = _mm512_loadu_si512(vrow[2 * tp + 1] + j * 32);
        vv[2 * j] = pair_lo(a, b);
        vv[2 * j + 1] = pair_hi(a, b);
      }
      for (int g = 0; g < G; ++g) {
        const __m512bh pt = as_bh(_mm512_set1_epi32((int)pp[g][tp]));
        for (int j = 0; j < DV; ++j) acc[g][j] = _mm512_dpbf16_ps(acc[g][j], pt, as_bh(vv[j]));
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
    if (lse) lse[g] = l[g] > 0.f ? m[g] + std::log(l[g]) : -INFINITY;
    alignas(64) float o[D];
    for (int j = 0; j < DV; ++j) _mm512_store_ps(o + j * 16, _mm512_mul_ps(acc[g][j], _mm512_set1_ps(inv)));
    for (int d = 0; d < D; ++d) out[g * D + d] = static_cast<c10::BFloat16>(o[d]);
  }
}
#endif

struct DecodeArgs {
  const torch::Tensor& q;
  const torch::Tensor& kc;
  const torch::Tensor& vc;
  const torch::Tensor& tables;
  const int64_t* starts;  // may be null: attend from position 0
  const torch::Tensor& ctx_lens;
  int64_t block_size;
  double scale;
  torch::Tensor& out;
  float* lse;  // may be null: [n, hq] log-sum-exp of the scores, for combining partial attentions
};

template <typename T, int D, int G>
static void run(const DecodeArgs& a) {
  const int64_t n = a.q.size(0), hq = a.q.size(1), hkv = a.kc.size(0);
  const int64_t slots = a.kc.size(1);
  const T* qp = a.q.data_ptr<T>();
  const T* kp = a.kc.data_ptr<T>();
  const T* vp = a.vc.data_ptr<T>();
  T* op = a.out.data_ptr<T>();
  const int64_t* tp = a.tables.data_ptr<int64_t>();
  const int64_t* cp = a.ctx_lens.data_ptr<int64_t>();
  const int64_t tstride = a.tables.size(1);
  at::parallel_for(0, n * hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / hkv, h = i % hkv;
      const int64_t start = a.starts ? a.starts[b] : 0;
      float* lse = a.lse ? a.lse + b * hq + h * G : nullptr;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, c10::BFloat16> && D % 32 == 0) {
        decode_pair_bf16<D, G>(qp + (b * hq + h * G) * D, kp + h * slots * D, vp + h * slots * D,
                               tp + b * tstride, start, cp[b], a.block_size, (float)a.scale,
                               op + (b * hq + h * G) * D, lse);
        continue;
      }
#endif
#if defined(__AVX512F__)
      if constexpr (D % 16 == 0) {
        decode_pair_avx512<T, D, G>(qp + (b * hq + h * G) * D, kp + h * slots * D, vp + h * slots * D,
                                    tp + b * tstride, start, cp[b], a.block_size, (float)a.scale,
                                    op + (b * hq + h * G) * D, lse);
        continue;
      }
#endif
#if defined(FORKLLM_AVX2)
      if constexpr (D % 32 == 0) {
        decode_pair_avx2<T, D, G>(qp + (b * hq + h * G) * D, kp + h * slots * D, vp + h * slots * D,
                                  tp + b * tstride, start, cp[b], a.block_size, (float)a.scale,
                                  op + (b * hq + h * G) * D, lse);
        continue;
      }
#endif
      decode_pair<T, D, G>(qp + (b * hq + h * G) * D, kp + h * slots * D, vp + h * slots * D,
                           tp + b * tstride, start, cp[b], a.block_size, D, (float)a.scale,
                           op + (b * hq + h * G) * D, D, lse);
    }
  });
}

template <typename T>
static void dispatch(const DecodeArgs& a) {
  const int64_t d = a.q.size(2), g = a.q.size(1) / a.kc.size(0);
#define FORKLLM_CASE(DD, GG) if (d == DD && g == GG) return run<T, DD, GG>(a);
  FORKLLM_CASE(64, 1) FORKLLM_CASE(64, 2) FORKLLM_CASE(64, 3) FORKLLM_CASE(64, 4) FORKLLM_CASE(64, 5)
  FORKLLM_CASE(64, 6) FORKLLM_CASE(64, 7) FORKLLM_CASE(64, 8)
  FORKLLM_CASE(128, 1) FORKLLM_CASE(128, 2) FORKLLM_CASE(128, 4) FORKLLM_CASE(128, 5) FORKLLM_CASE(128, 6)
  FORKLLM_CASE(128, 7) FORKLLM_CASE(128, 8)
  FORKLLM_CASE(16, 1) FORKLLM_CASE(16, 2) FORKLLM_CASE(16, 4) FORKLLM_CASE(8, 1) FORKLLM_CASE(8, 2)
  FORKLLM_CASE(32, 1) FORKLLM_CASE(32, 2) FORKLLM_CASE(32, 4)
#undef FORKLLM_CASE
  TORCH_CHECK(false, "paged_decode: unsupported head_dim/group ", d, "/", g);
}

// q [n, hq, d]; kc/vc [hkv, slots, d]; tables [n, max_blocks] int64; starts/ctx_lens [n] int64.
// Row b attends to positions [starts[b], ctx_lens[b]). Returns (out [n, hq, d], lse [n, hq] float32).
std::vector<torch::Tensor> paged_decode(torch::Tensor q, torch::Tensor kc, torch::Tensor vc, torch::Tensor tables,
                                        c10::optional<torch::Tensor> starts, torch::Tensor ctx_lens,
                                        int64_t block_size, double scale, bool want_lse) {
  TORCH_CHECK(q.is_contiguous() && kc.is_contiguous() && vc.is_contiguous(), "contiguous inputs expected");
  TORCH_CHECK(tables.scalar_type() == torch::kLong && ctx_lens.scalar_type() == torch::kLong, "int64 tables/lens");
  auto out = torch::empty_like(q);
  torch::Tensor lse;
  if (want_lse) lse = torch::empty({q.size(0), q.size(1)}, q.options().dtype(torch::kFloat));
  const bool has_starts = starts.has_value() && starts->defined();
  if (has_starts) TORCH_CHECK(starts->scalar_type() == torch::kLong, "int64 starts");
  DecodeArgs a{q, kc, vc, tables, has_starts ? starts->data_ptr<int64_t>() : nullptr, ctx_lens, block_size,
               scale, out, want_lse ? lse.data_ptr<float>() : nullptr};
  if (q.scalar_type() == torch::kFloat) dispatch<float>(a);
  else if (q.scalar_type() == torch::kBFloat16) dispatch<c10::BFloat16>(a);
  else if (q.scalar_type() == torch::kHalf) dispatch<c10::Half>(a);
  else TORCH_CHECK(false, "paged_decode: unsupported dtype");
  if (want_lse) return {out, lse};
  return {out};
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
