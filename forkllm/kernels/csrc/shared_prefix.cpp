// Attention of many query rows over one shared run of KV pages (cascade / Hydragen style).
// A group = decode rows whose block tables start with the same pages (forked samples, or
// requests sharing a system prompt). Each (group, kv-head) task streams the shared keys once,
// 16 at a time, for all of the group's query rows: the 16-key chunk is transposed to [d][16]
// so one FMA per head-dimension element yields 16 scores for a row (no horizontal sums), and
// each V chunk is reused by every row. Outputs each row's partial result and log-sum-exp so the
// caller can merge it with the row's own (unshared) keys.
#include "common.h"
#include <algorithm>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>

namespace {


template <typename T, int D>
void group_task(const T* __restrict qbase, int64_t hq, int64_t group, const int64_t* rows, int64_t nrows,
                const T* __restrict kc, const T* __restrict vc, const int64_t* __restrict pages, int64_t ntok,
                int64_t block_size, float scale, T* __restrict obase, float* __restrict lbase, int64_t h) {
  constexpr int DV = D / 16;
  const int64_t R = nrows * group;  // query rows: every member's heads of this kv head
  std::vector<float> qf(R * D), acc(R * D, 0.f), m(R, -INFINITY), l(R, 0.f);
  for (int64_t i = 0; i < nrows; ++i)
    for (int64_t g = 0; g < group; ++g) {
      const T* q = qbase + (rows[i] * hq + h * group + g) * D;
      for (int d = 0; d < D; ++d) qf[(i * group + g) * D + d] = to_f(q[d]) * scale;
    }
  alignas(64) float kt[D][16];
  alignas(64) float vf[16][D];
  for (int64_t c = 0; c < ntok; c += 16) {
    const int nv = (int)std::min<int64_t>(16, ntok - c);
    for (int t = 0; t < 16; ++t) {
      if (t < nv) {
        const int64_t pos = c + t;
        const int64_t slot = pages[pos / block_size] * block_size + pos % block_size;
        const T* k = kc + slot * D;
        const T* v = vc + slot * D;
        for (int d = 0; d < D; ++d) kt[d][t] = to_f(k[d]);
        for (int d = 0; d < D; ++d) vf[t][d] = to_f(v[d]);
      } else {
        for (int d = 0; d < D; ++d) kt[d][t] = 0.f;
        for (int d = 0; d < D; ++d) vf[t][d] = 0.f;
      }
    }
    const __mmask16 live = (__mmask16)((1u << nv) - 1u);
    // Four query rows at a time: each K column / V row loaded once feeds four independent chains.
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      const int nr = (int)std::min<int64_t>(4, R - r0);
      __m512 s[4];
      for (int i = 0; i < 4; ++i) s[i] = _mm512_setzero_ps();
      const float* q0 = qf.data() + r0 * D;
      for (int d = 0; d < D; ++d) {
        const __m512 kv = _mm512_load_ps(kt[d]);
        for (int i = 0; i < 4; ++i)
          if (i < nr) s[i] = _mm512_fmadd_ps(_mm512_set1_ps(q0[i * D + d]), kv, s[i]);
      }
      alignas(64) float pr[4][16];
      float corr[4];
      for (int i = 0; i < nr; ++i) {
        const int64_t r = r0 + i;
        const __m512 si = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), live, s[i]);
        const float nm = std::max(m[r], _mm512_reduce_max_ps(si));
        corr[i] = std::exp(m[r] - nm);
        m[r] = nm;
        const __m512 pv = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(si, _mm512_set1_ps(nm))));
        l[r] = l[r] * corr[i] + _mm512_reduce_add_ps(pv);
        _mm512_store_ps(pr[i], pv);
      }
      __m512 a[4][DV];
      for (int i = 0; i < nr; ++i) {
        const __m512 cv = _mm512_set1_ps(corr[i]);
        for (int j = 0; j < DV; ++j) a[i][j] = _mm512_mul_ps(_mm512_loadu_ps(acc.data() + (r0 + i) * D + j * 16), cv);
      }
      for (int t = 0; t < nv; ++t) {
        for (int j = 0; j < DV; ++j) {
          const __m512 vv = _mm512_load_ps(vf[t] + j * 16);
          for (int i = 0; i < 4; ++i)
            if (i < nr) a[i][j] = _mm512_fmadd_ps(_mm512_set1_ps(pr[i][t]), vv, a[i][j]);
        }
      }
      for (int i = 0; i < nr; ++i)
        for (int j = 0; j < DV; ++j) _mm512_storeu_ps(acc.data() + (r0 + i) * D + j * 16, a[i][j]);
    }
  }
  for (int64_t i = 0; i < nrows; ++i)
    for (int64_t g = 0; g < group; ++g) {
      const int64_t r = i * group + g;
      const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
      T* o = obase + (i * hq + h * group + g) * D;  // outputs are in member order
      for (int d = 0; d < D; ++d) o[d] = static_cast<T>(acc[r * D + d] * inv);
      lbase[i * hq + h * group + g] = l[r] > 0.f ? m[r] + std::log(l[r]) : -INFINITY;
    }
}

template <typename T, int D>
void run(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc, const torch::Tensor& pages,
         const torch::Tensor& lens, const torch::Tensor& rows, const torch::Tensor& offsets, int64_t block_size,
         double scale, torch::Tensor& out, torch::Tensor& lse) {
  const int64_t hq = q.size(1), hkv = kc.size(0), group = hq / hkv, slots = kc.size(1);
  const int64_t ng = pages.size(0);
  const T* qp = q.data_ptr<T>();
  const T* kp = kc.data_ptr<T>();
  const T* vp = vc.data_ptr<T>();
  const int64_t* pg = pages.data_ptr<int64_t>();
  const int64_t* ln = lens.data_ptr<int64_t>();
  const int64_t* rw = rows.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  at::parallel_for(0, ng * hkv, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t g = i / hkv, h = i % hkv;
      const int64_t first = off[g], count = off[g + 1] - off[g];
      group_task<T, D>(qp, hq, group, rw + first, count, kp + h * slots * D, vp + h * slots * D,
                       pg + g * pages.size(1), ln[g], block_size, (float)scale, op + first * hq * D,
                       lp + first * hq, h);
    }
  });
}

}  // namespace
#endif

// q [n, hq, d] decode queries; kc/vc [hkv, slots, d]; pages [groups, max_pages] shared pages;
// lens [groups] shared tokens; rows [members] decode rows, grouped; offsets [groups + 1] into rows.
// Returns (out [members, hq, d], lse [members, hq] float32), members in `rows` order.
std::vector<torch::Tensor> shared_prefix_attention(torch::Tensor q, torch::Tensor kc, torch::Tensor vc,
                                                   torch::Tensor pages, torch::Tensor lens, torch::Tensor rows,
                                                   torch::Tensor offsets, int64_t block_size, double scale) {
  TORCH_CHECK(q.is_contiguous() && kc.is_contiguous() && vc.is_contiguous(), "contiguous inputs expected");
  auto out = torch::empty({rows.size(0), q.size(1), q.size(2)}, q.options());
  auto lse = torch::empty({rows.size(0), q.size(1)}, q.options().dtype(torch::kFloat));
#if defined(__AVX512F__)
  const int64_t d = q.size(2);
#define FORKLLM_RUN(T)                                                                               \
  if (d == 64) run<T, 64>(q, kc, vc, pages, lens, rows, offsets, block_size, scale, out, lse);        \
  else if (d == 128) run<T, 128>(q, kc, vc, pages, lens, rows, offsets, block_size, scale, out, lse); \
  else if (d == 32) run<T, 32>(q, kc, vc, pages, lens, rows, offsets, block_size, scale, out, lse);   \
  else if (d == 16) run<T, 16>(q, kc, vc, pages, lens, rows, offsets, block_size, scale, out, lse);   \
  else TORCH_CHECK(false, "shared_prefix_attention: unsupported head_dim ", d);
  if (q.scalar_type() == torch::kFloat) { FORKLLM_RUN(float) }
  else if (q.scalar_type() == torch::kBFloat16) { FORKLLM_RUN(c10::BFloat16) }
  else if (q.scalar_type() == torch::kHalf) { FORKLLM_RUN(c10::Half) }
  else TORCH_CHECK(false, "shared_prefix_attention: unsupported dtype");
#undef FORKLLM_RUN
#else
  TORCH_CHECK(false, "shared_prefix_attention needs AVX-512");
#endif
  return {out, lse};
}

bool shared_prefix_supported(int64_t d) {
#if defined(__AVX512F__)
  return d == 16 || d == 32 || d == 64 || d == 128;
#else
  return false;
#endif
}

// Softmax in place over scores [B, R, S] (any float dtype), keys at or past valid[b] masked to 0;
// returns lse [B, R] = log(sum(exp(s))) in float32 so partial attentions can be merged. One
// kernel instead of max / sub / exp / sum / div / log passes over a large score tensor.
#if defined(__AVX512F__)
namespace {
inline __m512 ld(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline void st(float* p, __m512 v, __mmask16 k) { _mm512_mask_storeu_ps(p, k, v); }
inline __m512 ld(const c10::BFloat16* p, __mmask16 k) {
  const __m256i v = _mm256_maskz_loadu_epi16(k, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline void st(c10::BFloat16* p, __m512 v, __mmask16 k) {
  // round to nearest even, as c10::BFloat16 does
  __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  b = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16)));
}
inline __m512 ld(const c10::Half* p, __mmask16 k) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p)); }
inline void st(c10::Half* p, __m512 v, __mmask16 k) {
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline __mmask16 tail(int64_t rem) { return rem >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << rem) - 1u); }

template <typename T>
void softmax_row(T* row, int64_t n, int64_t S, float* lse) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail(n - j);
    mx = _mm512_mask_max_ps(mx, k, mx, ld(row + j, k));
  }
  const float m = _mm512_reduce_max_ps(mx);
  if (n == 0 || m == -INFINITY) {
    for (int64_t j = 0; j < S; j += 16) st(row + j, _mm512_setzero_ps(), tail(S - j));
    *lse = -INFINITY;
    return;
  }
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail(n - j);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(ld(row + j, k), mv))));
  }
  const float total = _mm512_reduce_add_ps(sum);
  const __m512 inv = _mm512_set1_ps(1.f / total);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail(n - j);
    st(row + j, _mm512_mul_ps(exp512(_mm512_sub_ps(ld(row + j, k), mv)), inv), k);
  }
  for (int64_t j = n; j < S; j += 16) {
    const int64_t start = j;
    st(row + start, _mm512_setzero_ps(), tail(S - start));
  }
  *lse = m + std::log(total);
}
}  // namespace
#endif

torch::Tensor softmax_lse_(torch::Tensor scores, torch::Tensor valid) {
  TORCH_CHECK(scores.is_contiguous() && scores.dim() == 3, "softmax_lse_: contiguous [B, R, S] expected");
  const int64_t B = scores.size(0), R = scores.size(1), S = scores.size(2);
  auto lse = torch::empty({B, R}, scores.options().dtype(torch::kFloat));
  const int64_t* vp = valid.data_ptr<int64_t>();
  float* lp = lse.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, scores.scalar_type(), "softmax_lse_", [&] {
    scalar_t* sp = scores.data_ptr<scalar_t>();
    at::parallel_for(0, B * R, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) {
        scalar_t* row = sp + i * S;
        const int64_t n = std::min<int64_t>(vp[i / R], S);
#if defined(__AVX512F__)
        if constexpr (!std::is_same_v<scalar_t, double>) {
          softmax_row(row, n, S, lp + i);
          continue;
        }
#endif
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) mx = std::max(mx, static_cast<float>(row[j]));
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) sum += std::exp(static_cast<float>(row[j]) - mx);
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        for (int64_t j = 0; j < n; ++j) row[j] = static_cast<scalar_t>(std::exp(static_cast<float>(row[j]) - mx) * inv);
        for (int64_t j = n; j < S; ++j) row[j] = static_cast<scalar_t>(0.f);
        lp[i] = sum > 0.f ? mx + std::log(sum) : -INFINITY;
      }
    });
  });
  return lse;
}

// out[rows[i]] = softmax-weighted merge of (p_out[i], p_lse[i]) and (out[rows[i]], s_lse[rows[i]]):
// attention over a union of key sets from attention over each part and its log-sum-exp.
void merge_attention_(torch::Tensor out, torch::Tensor s_lse, torch::Tensor rows, torch::Tensor p_out,
                      torch::Tensor p_lse) {
  TORCH_CHECK(out.is_contiguous() && p_out.is_contiguous(), "merge_attention_: contiguous inputs expected");
  const int64_t m = rows.size(0), hq = out.size(1), d = out.size(2);
  const int64_t* rp = rows.data_ptr<int64_t>();
  const float* sl = s_lse.data_ptr<float>();
  const float* pl = p_lse.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "merge_attention_", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* pp = p_out.data_ptr<scalar_t>();
    at::parallel_for(0, m * hq, 64, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t row = rp[i / hq], h = i % hq;
        const float a = pl[i], c = sl[row * hq + h];
        const float mx = std::max(a, c);
        const float wa = std::exp(a - mx), wc = std::exp(c - mx);
        const float inv = 1.f / (wa + wc);
        scalar_t* o = op + (row * hq + h) * d;
        const scalar_t* p = pp + i * d;
        for (int64_t k = 0; k < d; ++k)
          o[k] = static_cast<scalar_t>((wa * static_cast<float>(p[k]) + wc * static_cast<float>(o[k])) * inv);
      }
    });
  });
}
