// Fused sampling (any temperature > 0 row; unfiltered rows draw in vocabulary order):
// temperature softmax, filters and the inverse-CDF draw, without materialising a [rows, vocab]
// probability matrix or sorting the vocabulary. Per row: the max logit, then the softmax mass
// (vectorised passes); then only tokens within a logit window of the max are collected, the
// window widening until they hold top_p of the mass (and top_k tokens); the top-p set is the
// highest-probability tokens, so it lies inside the window. A weighted quickselect (expected
// linear time; a flat row can have thousands of candidates, where a sort dominated) finds the
// top-p set in rank order (probability desc, token id asc), and then the token one uniform number
// picks in that order. Same semantics as the PyTorch path in engine/sampler.py.
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

#if defined(__AVX512F__)
// acc + the 16 floats of v, widened to double (sums over a whole vocabulary stay exact enough to
// place the top-p boundary where float64 arithmetic would).
inline __m512d add_pd16(__m512d acc, __m512 v) {
  acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
  return _mm512_add_pd(acc, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}
#endif

// A top-k / top-p candidate: logit, token id, unnormalised probability exp((x - m) / T).
struct Cand {
  float x;
  int32_t id;
  float w;
};
// Rank order: higher logit first, lower token id first among equal logits (a total order).
inline bool ranks_before(const Cand& a, const Cand& b) { return a.x > b.x || (a.x == b.x && a.id < b.id); }

struct Crossing {
  int64_t count;  // how many candidates in rank order it takes to reach the target
  int64_t index;  // where the last of them (the crossing candidate) now sits in the array
  double mass;    // their summed weight
};

// Weighted quickselect: reorders c[0, n) so that c[0, count) are the first `count` candidates in
// rank order, where count is the smallest number whose weight reaches `need` (>= need, or > need
// when strict). Expected O(n) instead of sorting. If rounding leaves need unreached, count = n and
// index = the last candidate in rank order.
Crossing cross_mass(Cand* c, int64_t n, double need, bool strict) {
  auto reached = [&](double v) { return strict ? v > need : v >= need; };
  int64_t lo = 0, hi = n;
  double acc = 0.0;
  while (hi - lo > 16) {
    // median of three as the pivot, moved to hi - 1
    const int64_t mid = lo + (hi - lo) / 2;
    if (ranks_before(c[mid], c[lo])) std::swap(c[mid], c[lo]);
    if (ranks_before(c[hi - 1], c[lo])) std::swap(c[hi - 1], c[lo]);
    if (ranks_before(c[mid], c[hi - 1])) std::swap(c[mid], c[hi - 1]);
    const Cand pivot = c[hi - 1];
    int64_t p = lo;
    double ahead = 0.0;  // weight of the candidates ranked before the pivot
    for (int64_t i = lo; i < hi - 1; ++i)
      if (ranks_before(c[i], pivot)) {
        ahead += c[i].w;
        std::swap(c[i], c[p++]);
      }
    std::swap(c[p], c[hi - 1]);
    if (reached(acc + ahead)) {
      hi = p;
    } else if (reached(acc + ahead + pivot.w)) {
      return {p + 1, p, acc + ahead + pivot.w};
    } else {
      acc += ahead + pivot.w;
      lo = p + 1;
    }
  }
  std::sort(c + lo, c + hi, ranks_before);
  for (int64_t i = lo; i < hi; ++i) {
    acc += c[i].w;
    if (reached(acc)) return {i + 1, i, acc};
  }
  // Not reached (rounding): everything counts; the crossing is the last candidate in rank order.
  int64_t last = 0;
  for (int64_t i = 1; i < n; ++i)
    if (ranks_before(c[last], c[i])) last = i;
  return {n, last, acc};
}

int64_t sample_row(const float* x, int64_t V, float temp, int64_t top_k, float top_p, float min_p, double u,
                   std::vector<Cand>& cand) {
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
  const __m512 mm = _mm512_set1_ps(m), it = _mm512_set1_ps(inv_t);
  {
    __m512d acc = _mm512_setzero_pd();  // double: the top-p boundary is compared against this sum
    const __m512 fl = _mm512_set1_ps(floor_logit);
    for (; j + 16 <= V; j += 16) {
      const __m512 v = _mm512_loadu_ps(x + j);
      const __mmask16 keep = _mm512_cmp_ps_mask(v, fl, _CMP_GE_OQ);
      acc = add_pd16(acc, _mm512_maskz_mov_ps(keep, exp512(_mm512_mul_ps(_mm512_sub_ps(v, mm), it))));
    }
    mass = _mm512_reduce_add_pd(acc);
  }
#endif
  for (; j < V; ++j)
    if (x[j] >= floor_logit) mass += std::exp((x[j] - m) * inv_t);
  const bool use_k = top_k > 0;
  // Collect candidates within a logit window of the max, widening it until they hold top_p of
  // the mass (and top_k tokens): the top-p set is the most probable tokens, so it lies inside.
  const int64_t k = use_k ? std::min<int64_t>(top_k, V) : V;
  cand.resize(V);
  Cand* c = cand.data();
  int64_t nc = 0;
  float window = 8.f * temp;
  for (;;) {
    const float lo = std::max(m - window, floor_logit);
    nc = 0;
    double cmass = 0.0;
    int64_t i = 0;
#if defined(__AVX512F__)
    // 16 compares per instruction; only vectors holding a candidate are walked.
    const __m512 lov = _mm512_set1_ps(lo);
    __m512d cacc = _mm512_setzero_pd();
    for (; i + 16 <= V; i += 16) {
      const __m512 v = _mm512_loadu_ps(x + i);
      unsigned hit = _mm512_cmp_ps_mask(v, lov, _CMP_GE_OQ);
      if (!hit) continue;
      alignas(64) float w[16];
      const __m512 e = _mm512_maskz_mov_ps((__mmask16)hit, exp512(_mm512_mul_ps(_mm512_sub_ps(v, mm), it)));
      cacc = add_pd16(cacc, e);
      _mm512_store_ps(w, e);
      while (hit) {
        const int t = __builtin_ctz(hit);
        hit &= hit - 1;
        c[nc++] = Cand{x[i + t], (int32_t)(i + t), w[t]};
      }
    }
    cmass = _mm512_reduce_add_pd(cacc);
#endif
    for (; i < V; ++i)
      if (x[i] >= lo) {
        const float w = std::exp((x[i] - m) * inv_t);
        c[nc++] = Cand{x[i], (int32_t)i, w};
        cmass += w;
      }
    const bool all = lo <= floor_logit || window > 1e30f;
    const bool enough_k = !use_k || nc >= k;
    const bool enough_p = use_k || cmass >= (double)top_p * mass * (1.0 - 1e-6);
    if (all || (enough_k && enough_p)) break;
    window *= 2.f;
    if (window > 4096.f * temp) window = 1e31f;
  }
  if (nc == 0) return 0;
  // top-k: the k best in rank order; top-p is then relative to their mass.
  int64_t nk = std::min<int64_t>(k, nc);
  if (nk < nc) std::nth_element(c, c + nk, c + nc, ranks_before);
  double kmass = 0.0;
  for (int64_t i = 0; i < nk; ++i) kmass += c[i].w;
  // top-p: the fewest candidates in rank order whose mass reaches top_p of the total...
  const Crossing kept = cross_mass(c, nk, (double)top_p * (use_k ? kmass : mass), false);
  // ...then the draw, in rank order among them.
  return c[cross_mass(c, kept.count, u * kept.mass, true).index].id;
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
    std::vector<Cand> cand;
    for (int64_t r = b; r < e; ++r) op[r] = sample_row(lp + r * V, V, tp[r], kp[r], pp[r], mp[r], up[r], cand);
  });
  return out;
}
