// Fused sampling (any temperature > 0 row; unfiltered rows draw in vocabulary order): temperature softmax, filters and the
// inverse-CDF draw, without materialising a [rows, vocab] probability matrix or sorting the
// vocabulary. Per row: the max logit and the softmax mass in one vectorised pass; then only
// tokens within a logit window of the max are collected, the window widening until they hold
// top_p of the mass (and top_k tokens); the top-p set is the highest-probability tokens, so it
// lies inside the window. Those few are sorted (probability desc, token id asc) and one uniform
// number per row picks the token. Same semantics as the PyTorch path in engine/sampler.py.
#include "common.h"
#include <algorithm>
#include <utility>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {


// No top-k / top-p: the inverse CDF in vocabulary order, as engine/sampler.py's _inverse_cdf
// (first token whose running mass exceeds u * total). Sums of 16 tokens are skipped whole; only
// the block holding the target is walked token by token.
int64_t draw_in_vocab_order(const float* x, int64_t V, float m, float inv_t, float floor_logit, double u) {
  // total mass, blocks of 16 summed in float and accumulated in double
  double mass = 0.0;
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512 mm = _mm512_set1_ps(m), it = _mm512_set1_ps(inv_t), fl = _mm512_set1_ps(floor_logit);
  for (; j + 16 <= V; j += 16) {
    const __m512 v = _mm512_loadu_ps(x + j);
    const __mmask16 keep = _mm512_cmp_ps_mask(v, fl, _CMP_GE_OQ);
    mass += _mm512_reduce_add_ps(_mm512_maskz_mov_ps(keep, exp512(_mm512_mul_ps(_mm512_sub_ps(v, mm), it))));
  }
#endif
  for (; j < V; ++j)
    if (x[j] >= floor_logit) mass += std::exp((x[j] - m) * inv_t);
  const double target = u * mass;
  double c = 0.0;
  j = 0;
  int64_t last = -1;  // last kept token, the answer when rounding leaves target unreached
#if defined(__AVX512F__)
  for (; j + 16 <= V; j += 16) {
    const __m512 v = _mm512_loadu_ps(x + j);
    const __mmask16 keep = _mm512_cmp_ps_mask(v, fl, _CMP_GE_OQ);
    const __m512 e = _mm512_maskz_mov_ps(keep, exp512(_mm512_mul_ps(_mm512_sub_ps(v, mm), it)));
    const double block = _mm512_reduce_add_ps(e);
    if (keep) last = j + 15 - __builtin_clz((unsigned)keep << 16);
    if (c + block > target) {
      alignas(64) float ev[16];
      _mm512_store_ps(ev, e);
      for (int t = 0; t < 16; ++t) {
        c += ev[t];
        if (ev[t] > 0.f && c > target) return j + t;
      }
    } else {
      c += block;
    }
  }
#endif
  for (; j < V; ++j)
    if (x[j] >= floor_logit) {
      last = j;
      c += std::exp((x[j] - m) * inv_t);
      if (c > target) return j;
    }
  return std::max<int64_t>(last, 0);
}

int64_t sample_row(const float* x, int64_t V, float temp, int64_t top_k, float top_p, float min_p, double u,
                   std::vector<std::pair<float, int32_t>>& cand) {
  const float inv_t = 1.f / temp;
  // pass 1: max logit
  float m = -INFINITY;
  int64_t j = 0;
#if defined(__AVX512F__)
  __m512 mv = _mm512_set1_ps(-INFINITY);
  for (; j + 16 <= V; j += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(x + j));
  m = _mm512_reduce_max_ps(mv);
#endif
  for (; j < V; ++j) m = std::max(m, x[j]);
  // min_p keeps p >= min_p * p_max, i.e. logit >= m + T * ln(min_p)
  const float floor_logit = min_p > 0.f ? m + temp * std::log(min_p) : -INFINITY;
  if (top_k <= 0 && top_p >= 1.f) return draw_in_vocab_order(x, V, m, inv_t, floor_logit, u);
  // pass 2: kept softmax mass (unnormalised, relative to exp(0) at the max)
  double mass = 0.0;
  j = 0;
#if defined(__AVX512F__)
  {
    __m512 acc = _mm512_setzero_ps();
    const __m512 mm = _mm512_set1_ps(m), it = _mm512_set1_ps(inv_t), fl = _mm512_set1_ps(floor_logit);
    for (; j + 16 <= V; j += 16) {
      const __m512 v = _mm512_loadu_ps(x + j);
      const __mmask16 keep = _mm512_cmp_ps_mask(v, fl, _CMP_GE_OQ);
      acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(keep, exp512(_mm512_mul_ps(_mm512_sub_ps(v, mm), it))));
    }
    mass = _mm512_reduce_add_ps(acc);
  }
#endif
  for (; j < V; ++j)
    if (x[j] >= floor_logit) mass += std::exp((x[j] - m) * inv_t);
  const bool use_k = top_k > 0;
  // collect candidates within a widening logit window
  const int64_t k = use_k ? std::min<int64_t>(top_k, V) : V;
  float window = 8.f * temp;
  for (;;) {
    const float lo = std::max(m - window, floor_logit);
    cand.clear();
    double cmass = 0.0;
    int64_t i = 0;
#if defined(__AVX512F__)
    // 16 compares per instruction; only vectors holding a candidate are walked.
    const __m512 lov = _mm512_set1_ps(lo);
    for (; i + 16 <= V; i += 16) {
      unsigned hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), lov, _CMP_GE_OQ);
      while (hit) {
        const int t = __builtin_ctz(hit);
        hit &= hit - 1;
        cand.emplace_back(x[i + t], (int32_t)(i + t));
        cmass += std::exp((x[i + t] - m) * inv_t);
      }
    }
#endif
    for (; i < V; ++i)
      if (x[i] >= lo) {
        cand.emplace_back(x[i], (int32_t)i);
        cmass += std::exp((x[i] - m) * inv_t);
      }
    const bool all = lo <= floor_logit || window > 1e30f;
    const bool enough_k = !use_k || (int64_t)cand.size() >= k;
    const bool enough_p = use_k || cmass >= (double)top_p * mass * (1.0 - 1e-6);
    if (all || (enough_k && enough_p)) break;
    window *= 2.f;
    if (window > 4096.f * temp) window = 1e31f;
  }
  std::sort(cand.begin(), cand.end(), [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  const int64_t nk = std::min<int64_t>(k, (int64_t)cand.size());
  std::vector<double> w(nk);
  double kmass = 0.0;
  for (int64_t i = 0; i < nk; ++i) {
    w[i] = std::exp((cand[i].first - m) * inv_t);
    kmass += w[i];
  }
  const double need = (double)top_p * (use_k ? kmass : mass);
  double before = 0.0, kept = 0.0;
  int64_t nkeep = 0;
  for (; nkeep < nk; ++nkeep) {
    if (before >= need) break;
    before += w[nkeep];
  }
  for (int64_t i = 0; i < nkeep; ++i) kept += w[i];
  const double target = u * kept;
  double c = 0.0;
  for (int64_t i = 0; i < nkeep; ++i) {
    c += w[i];
    if (c > target) return cand[i].second;
  }
  return cand[std::max<int64_t>(nkeep - 1, 0)].second;
}

}  // namespace

// logits [R, V] float32; temps/top_p/min_p [R] float32; top_k [R] int64 (0 = off); u [R] float64.
torch::Tensor sample_filtered(torch::Tensor logits, torch::Tensor temps, torch::Tensor top_k, torch::Tensor top_p,
                              torch::Tensor min_p, torch::Tensor u) {
  TORCH_CHECK(logits.is_contiguous() && logits.scalar_type() == torch::kFloat, "float32 contiguous logits");
  const int64_t R = logits.size(0), V = logits.size(1);
  auto out = torch::empty({R}, logits.options().dtype(torch::kLong));
  const float* lp = logits.data_ptr<float>();
  const float* tp = temps.data_ptr<float>();
  const int64_t* kp = top_k.data_ptr<int64_t>();
  const float* pp = top_p.data_ptr<float>();
  const float* mp = min_p.data_ptr<float>();
  const double* up = u.data_ptr<double>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t b, int64_t e) {
    std::vector<std::pair<float, int32_t>> cand;
    cand.reserve(1024);
    for (int64_t r = b; r < e; ++r) op[r] = sample_row(lp + r * V, V, tp[r], kp[r], pp[r], mp[r], up[r], cand);
  });
  return out;
}
