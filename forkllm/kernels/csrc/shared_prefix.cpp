// Attention of many query rows over one shared run of KV pages (cascade / Hydragen style), fused,
// for bf16 caches on CPUs with AVX512-BF16 (vdpbf16ps: two bf16 products per fp32 lane).
// A group = decode rows whose block tables start with the same pages (forked samples, or
// requests sharing a system prompt). One task = (group, kv head, up to 64 query rows): it streams
// the shared keys in place, 16 at a time, for all its rows. Scores come out as [key][16 rows], so
// the softmax is vertical (no horizontal reductions); probabilities go from the q.k accumulators
// straight to bf16 pairs along the key axis, and values are repacked the same way, so P.V is
// vdpbf16ps too. No score matrix, no gather.
#include "common.h"
#include <algorithm>
#include <type_traits>
#include <vector>

// Where a task's rows end up. Partial (own == nullptr): attention over the shared keys only, with
// its log-sum-exp, in member order, for merging with each row's own keys later. Complete: each
// row also runs over its own keys (decode row rows[member]'s table from lens[group] to its
// context length) and the final output goes straight to out[rows[member]].
struct OwnKeys {
  const int64_t* tables;  // [decode rows, stride]
  int64_t stride;
  const int64_t* ctx;  // [decode rows]
};

#if defined(__AVX512BF16__)
#include <immintrin.h>

namespace {

constexpr int CT = 16;      // keys per chunk: one q.k pass, then probabilities straight from registers
constexpr int RMAX = 64;    // query rows per task (four vectors of 16)
constexpr float TAU = 8.f;  // probabilities may reach 2^TAU before a row's reference max moves

// 2^x = 2^n p(f) with n = round(x), f in [-0.5, 0.5]: a polynomial for the fraction (coefficients
// highest first), scalef for the integer part. Softmax weights are in the log2 domain (the score
// scale carries log2 e).
template <size_t N>
inline __m512 exp2_poly(__m512 x, const float (&c)[N]) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(c[0]);
  for (size_t i = 1; i < N; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
  return _mm512_scalef_ps(p, n);
}
// Degree 5, relative error 1.6e-7: softmax state (l, rescales) and the own-key pass.
constexpr float kExp2Deg5[] = {1.327647129e-3f, 9.675541893e-3f, 5.550713092e-2f,
                               2.402212024e-1f, 6.931469440e-1f, 1.000000119f};
// Degree 3, relative error 7.5e-5 (27x below bf16's half step): the probabilities fed to P.V,
// which are rounded to bf16 anyway.
constexpr float kExp2Deg3[] = {5.518639278e-02f, 2.426123537e-01f, 6.932582768e-01f, 9.999279215e-01f};
inline __m512 exp2_neg(__m512 x) { return exp2_poly(x, kExp2Deg5); }
inline __m512 exp2_p(__m512 x) { return exp2_poly(x, kExp2Deg3); }

// One task's softmax state. Rows keep a reference max m (log2 units) that moves only when a score
// exceeds it by TAU, so the usual per-chunk rescale of O disappears: probabilities are formed in
// registers right after q.k and buffered as bf16 pairs with their values for GP key pairs, and
// P.V runs once per GP pairs (O is loaded and stored once per 64 keys instead of once per 16).
template <int D>
struct State {
  static constexpr int GP = (D >= 128 ? 32 : 64) / 2;  // key pairs buffered before P.V
  alignas(64) float o[RMAX * D];  // unnormalised output, relative to m
  alignas(64) float m[RMAX], l[RMAX];
  alignas(64) uint32_t p2[(GP + 4) * RMAX];  // (p[t][r], p[t+1][r]) bf16 pairs; a 6-key tile may run 1 pair over
  alignas(64) uint32_t v2[GP * D];           // (v[t][d], v[t+1][d]) bf16 pairs
  int pstart = 0, pend = 0;                  // pairs [pstart, pend) await P.V
  int R = 0;
};

// O[row] += sum_t p[t][row] v[t] for NR rows over np key pairs.
template <int D, int NR>
inline void pv_tile(float* __restrict o, const uint32_t* __restrict p2, const uint32_t* __restrict v2, int np) {
  constexpr int DV = D / 16;
  __m512 acc[NR][DV];
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < DV; ++j) acc[r][j] = _mm512_loadu_ps(o + r * D + j * 16);
  for (int tp = 0; tp < np; ++tp) {
    __m512i vv[DV];
    for (int j = 0; j < DV; ++j) vv[j] = _mm512_loadu_si512(v2 + (tp * DV + j) * 16);
    for (int r = 0; r < NR; ++r) {
      const __m512bh pb = as_bh(_mm512_set1_epi32((int)p2[tp * RMAX + r]));
      for (int j = 0; j < DV; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], pb, as_bh(vv[j]));
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < DV; ++j) _mm512_storeu_ps(o + r * D + j * 16, acc[r][j]);
}

// P.V over the pending pairs, all rows.
template <int D>
void flush(State<D>& a) {
  constexpr int RB = D >= 128 ? 2 : D >= 64 ? 6 : 8;  // RB * D / 16 accumulators
  const int np = a.pend - a.pstart;
  if (np > 0) {
    const uint32_t* p2 = a.p2 + a.pstart * RMAX;
    const uint32_t* v2 = a.v2 + a.pstart * D;
    int r = 0;
    for (; r + RB <= a.R; r += RB) pv_tile<D, RB>(a.o + r * D, p2 + r, v2, np);
    for (; r < a.R; ++r) pv_tile<D, 1>(a.o + r * D, p2 + r, v2, np);
  }
  a.pstart = a.pend;
}

// A score passed its row's reference by more than TAU (always so on the first tile, where m is
// -inf): apply the pending P.V under the old references, then move them up to the tile maxima
// tm (log2 units) and rescale O and l. Rare after the first tile.
template <int D>
__attribute__((noinline)) void rebase(State<D>& a, int upto, const float* tm, int nrows) {
  a.pend = upto;
  flush(a);
  for (int r = 0; r < nrows; ++r) {
    if (!(tm[r] > a.m[r])) continue;
    float* o = a.o + r * D;
    if (a.m[r] == -INFINITY) {
      std::fill(o, o + D, 0.f);
      a.l[r] = 0.f;
    } else {
      const float c = std::exp2(a.m[r] - tm[r]);
      for (int d = 0; d < D; ++d) o[d] *= c;
      a.l[r] *= c;
    }
    a.m[r] = tm[r];
  }
}

// Scores of NK keys for NB vectors of 16 rows (NK * NB accumulators), then their probabilities
// 2^(s - m) straight from the accumulators into p2 at pair `pair0`, summed into l. Keys from
// `valid` on (past the chunk's end) get probability 0.
template <int D, int NB, int NK>
inline void qk_tile(State<D>& a, const uint32_t* __restrict qt2, const uint32_t* const* kp, float scale2, int valid,
                    int pair0) {
  static_assert(NK % 2 == 0, "keys are paired");
  constexpr int NP = D / 2;
  __m512 acc[NK][NB];
  for (int k = 0; k < NK; ++k)
    for (int j = 0; j < NB; ++j) acc[k][j] = _mm512_setzero_ps();
  for (int i = 0; i < NP; ++i) {
    __m512i qv[NB];
    for (int j = 0; j < NB; ++j) qv[j] = _mm512_loadu_si512(qt2 + i * RMAX + j * 16);
    for (int k = 0; k < NK; ++k) {
      const __m512bh b = as_bh(_mm512_set1_epi32((int)kp[k][i]));
      for (int j = 0; j < NB; ++j) acc[k][j] = _mm512_dpbf16_ps(acc[k][j], as_bh(qv[j]), b);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale2);
  __mmask16 up = 0;
  __m512 mx[NB];
  for (int j = 0; j < NB; ++j) {
    mx[j] = acc[0][j];
    for (int k = 1; k < NK; ++k)
      if (k < valid) mx[j] = _mm512_max_ps(mx[j], acc[k][j]);
    mx[j] = _mm512_mul_ps(mx[j], sc);
    up |= _mm512_cmp_ps_mask(mx[j], _mm512_add_ps(_mm512_loadu_ps(a.m + j * 16), _mm512_set1_ps(TAU)), _CMP_GT_OQ);
  }
  if (up) {
    alignas(64) float tm[NB * 16];
    for (int j = 0; j < NB; ++j) _mm512_store_ps(tm + j * 16, mx[j]);
    rebase(a, pair0, tm, NB * 16);
  }
  alignas(64) static const uint16_t pidx[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i pi = _mm512_load_si512(pidx);
  for (int j = 0; j < NB; ++j) {
    const __m512 nm = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_loadu_ps(a.m + j * 16));
    __m512 sum = _mm512_setzero_ps();
    for (int kq = 0; kq < NK / 2; ++kq) {
      __m512 p0 = exp2_p(_mm512_fmadd_ps(acc[2 * kq][j], sc, nm));
      __m512 p1 = exp2_p(_mm512_fmadd_ps(acc[2 * kq + 1][j], sc, nm));
      if (2 * kq >= valid) p0 = _mm512_setzero_ps();
      if (2 * kq + 1 >= valid) p1 = _mm512_setzero_ps();
      sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
      const __m512bh pk = _mm512_cvtne2ps_pbh(p1, p0);
      _mm512_storeu_si512(a.p2 + (pair0 + kq) * RMAX + j * 16,
                          _mm512_permutexvar_epi16(pi, reinterpret_cast<const __m512i&>(pk)));
    }
    _mm512_storeu_ps(a.l + j * 16, _mm512_add_ps(_mm512_loadu_ps(a.l + j * 16), sum));
  }
}

template <int D, int NB, int NK>
inline void qk_chunk(State<D>& a, const uint32_t* qt2, const uint32_t* const* kp, int nv, float scale2, int pair0) {
  for (int t0 = 0; t0 < nv; t0 += NK) qk_tile<D, NB, NK>(a, qt2, kp + t0, scale2, nv - t0, pair0 + t0 / 2);
}

// Own keys after the shared prefix, for the G query heads of one member that share a kv head:
// continues each row's online-softmax state (o [G][D] unnormalised fp32, m and l in log2 units)
// over positions [start, ctx) of the member's block table, 16 keys per step. Each key and value
// is loaded once for the G heads; 16 scores per head come from one transpose-add tree, exp2 runs
// on all 16 at once, p.v is vdpbf16ps on (v[t], v[t+1]) pairs. A few dozen keys per member, so
// no blocking across members.
template <int D, int G>
void own_rows(const c10::BFloat16* __restrict q, const c10::BFloat16* __restrict kc,
              const c10::BFloat16* __restrict vc, const int64_t* __restrict table, int64_t start, int64_t ctx,
              int64_t block_size, float scale2, float* __restrict o, float* m, float* l) {
  if (start >= ctx) return;
  constexpr int DZ = (D + 31) / 32, DV = D / 16;
  constexpr __mmask32 last = D % 32 ? (__mmask32)((1u << (D % 32)) - 1u) : ~(__mmask32)0;
  alignas(64) static const uint16_t zeros[D] = {};
  __m512i qv[G][DZ];
  __m512 acc[G][DV];
  for (int g = 0; g < G; ++g) {
    for (int j = 0; j < DZ; ++j) qv[g][j] = _mm512_maskz_loadu_epi16(j + 1 < DZ ? ~(__mmask32)0 : last, q + g * D + j * 32);
    for (int j = 0; j < DV; ++j) acc[g][j] = _mm512_loadu_ps(o + g * D + j * 16);
  }
  __m512 part[G][16];
  __m512 lv[G];  // per-lane partial sums of this pass's probabilities, added to l at the end
  for (int g = 0; g < G; ++g) lv[g] = _mm512_setzero_ps();
  const uint16_t* vrow[16];
  alignas(64) uint32_t pp[G][8];
  int64_t page = start / block_size, in_page = start % block_size;
  for (int64_t c = start; c < ctx; c += 16) {
    const int nv = (int)std::min<int64_t>(16, ctx - c);
    for (int t = 0; t < 16; ++t) {
      if (t >= nv) {
        for (int g = 0; g < G; ++g) part[g][t] = _mm512_setzero_ps();
        vrow[t] = zeros;
        continue;
      }
      const int64_t slot = table[page] * block_size + in_page;
      if (++in_page == block_size) in_page = 0, ++page;
      const c10::BFloat16* k = kc + slot * D;
      vrow[t] = reinterpret_cast<const uint16_t*>(vc + slot * D);
      __m512i kv[DZ];
      for (int j = 0; j < DZ; ++j) kv[j] = _mm512_maskz_loadu_epi16(j + 1 < DZ ? ~(__mmask32)0 : last, k + j * 32);
      for (int g = 0; g < G; ++g) {
        __m512 d = _mm512_setzero_ps();
        for (int j = 0; j < DZ; ++j) d = _mm512_dpbf16_ps(d, as_bh(qv[g][j]), as_bh(kv[j]));
        part[g][t] = d;
      }
    }
    const __mmask16 live = (__mmask16)((1u << nv) - 1u);
    for (int g = 0; g < G; ++g) {
      const __m512 sv = _mm512_mul_ps(hsum16(part[g]), _mm512_set1_ps(scale2));
      // As in the shared loop, m is a reference that moves only when a score passes it by TAU.
      if (_mm512_mask_cmp_ps_mask(live, sv, _mm512_set1_ps(m[g] + TAU), _CMP_GT_OQ)) {
        const float nm = _mm512_reduce_max_ps(_mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), live, sv));
        const float corr = m[g] == -INFINITY ? 0.f : std::exp2(m[g] - nm);
        for (int j = 0; j < DV; ++j) acc[g][j] = _mm512_mul_ps(acc[g][j], _mm512_set1_ps(corr));
        l[g] = (l[g] + _mm512_reduce_add_ps(lv[g])) * corr;
        lv[g] = _mm512_setzero_ps();
        m[g] = nm;
      }
      const __m512 pv = _mm512_maskz_mov_ps(live, exp2_neg(_mm512_sub_ps(sv, _mm512_set1_ps(m[g]))));
      lv[g] = _mm512_add_ps(lv[g], pv);
      const __m256bh pb = _mm512_cvtneps_pbh(pv);
      _mm256_store_si256(reinterpret_cast<__m256i*>(pp[g]), reinterpret_cast<const __m256i&>(pb));
    }
    for (int tp = 0; tp < (nv + 1) / 2; ++tp) {
      __m512i vv[DV];  // (v[t][d], v[t+1][d]) pairs, 16 dimensions per zmm
      for (int j = 0; j < DZ; ++j) {
        const __mmask32 mk = j + 1 < DZ ? ~(__mmask32)0 : last;
        const __m512i a = _mm512_maskz_loadu_epi16(mk, vrow[2 * tp] + j * 32);
        const __m512i b = _mm512_maskz_loadu_epi16(mk, vrow[2 * tp + 1] + j * 32);
        vv[2 * j] = pair_lo(a, b);
        if (2 * j + 1 < DV) vv[2 * j + 1] = pair_hi(a, b);
      }
      for (int g = 0; g < G; ++g) {
        const __m512bh pt = as_bh(_mm512_set1_epi32((int)pp[g][tp]));
        for (int j = 0; j < DV; ++j) acc[g][j] = _mm512_dpbf16_ps(acc[g][j], pt, as_bh(vv[j]));
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    l[g] += _mm512_reduce_add_ps(lv[g]);
    for (int j = 0; j < DV; ++j) _mm512_storeu_ps(o + g * D + j * 16, acc[g][j]);
  }
}

// own_rows for n consecutive heads of one member: all n at once where compiled (the usual GQA
// group sizes), else one at a time.
template <int D>
void own_heads(int n, const c10::BFloat16* q, const c10::BFloat16* kc, const c10::BFloat16* vc,
               const int64_t* table, int64_t start, int64_t ctx, int64_t block_size, float scale2, float* o,
               float* m, float* l) {
  switch (n) {
#define FORKLLM_OWN(G) \
  case G: return own_rows<D, G>(q, kc, vc, table, start, ctx, block_size, scale2, o, m, l);
    FORKLLM_OWN(2) FORKLLM_OWN(3) FORKLLM_OWN(4) FORKLLM_OWN(6) FORKLLM_OWN(8)
#undef FORKLLM_OWN
    default:
      for (int g = 0; g < n; ++g)
        own_rows<D, 1>(q + g * D, kc, vc, table, start, ctx, block_size, scale2, o + g * D, m + g, l + g);
  }
}

// Prefetches each task member's own keys (scattered private pages, read after the shared loop)
// a few lines per chunk over the last chunks: early enough to hide DRAM latency, late enough that
// the shared stream does not evict them first.
template <int D>
struct OwnPrefetch {
  static constexpr int LINES = D * 2 / 64 > 0 ? D * 2 / 64 : 1;  // cache lines per key vector
  const OwnKeys* own = nullptr;
  const int64_t* rows = nullptr;
  const c10::BFloat16 *kc = nullptr, *vc = nullptr;
  int64_t member = 0, member_end = 0, pos = 0, end = 0, start = 0, block_size = 1;
  int64_t per_chunk = 0;

  void init(const OwnKeys* o, const int64_t* rw, int64_t m0, int64_t m1, int64_t ntok, int64_t bs,
            const c10::BFloat16* k, const c10::BFloat16* v, int64_t chunks_left) {
    own = o, rows = rw, member = m0, member_end = m1, start = ntok, block_size = bs, kc = k, vc = v;
    int64_t keys = 0;
    for (int64_t i = m0; i < m1; ++i) keys += std::max<int64_t>(0, std::min<int64_t>(own->ctx[rows[i]] - ntok, 64));
    per_chunk = (keys + chunks_left - 1) / std::max<int64_t>(1, chunks_left);
    seek();
  }
  void seek() {  // first own position of the current member (at most 64 keys each)
    for (; member < member_end; ++member) {
      pos = start, end = std::min<int64_t>(own->ctx[rows[member]], start + 64);
      if (pos < end) return;
    }
  }
  void step() {
    for (int64_t i = 0; i < per_chunk && member < member_end; ++i) {
      const int64_t slot = own->tables[rows[member] * own->stride + pos / block_size] * block_size + pos % block_size;
      for (int b = 0; b < LINES; ++b) {
        _mm_prefetch(reinterpret_cast<const char*>(kc + slot * D) + b * 64, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(vc + slot * D) + b * 64, _MM_HINT_T0);
      }
      if (++pos == end) ++member, seek();
    }
  }
};

template <int D>
void task(const c10::BFloat16* __restrict qbase, int64_t hq, int64_t group, const int64_t* rows, int64_t r_first,
          int64_t nr_rows, const c10::BFloat16* __restrict kc, const c10::BFloat16* __restrict vc,
          const int64_t* __restrict pages, int64_t ntok, int64_t block_size, float scale,
          c10::BFloat16* __restrict obase, float* __restrict lbase, int64_t h, const OwnKeys* own) {
  constexpr int NP = D / 2;  // bf16 pairs per head vector
  constexpr int DV = D / 16;
  const float scale2 = scale * 1.44269504088896341f;  // scores in log2 units: softmax by exp2
  const int R = (int)nr_rows, RV = (R + 15) / 16;
  State<D> a;
  a.R = R;
  std::fill(a.m, a.m + RMAX, -INFINITY);
  alignas(64) uint32_t qt2[NP * RMAX];
  alignas(64) static const uint16_t zeros[D] = {};
  // Queries transposed to [pair][row]: one load feeds 16 rows of one pair of head dimensions.
  for (int r = 0; r < RMAX; ++r) {
    const int64_t fr = r_first + r;  // row index within the group: member * group + head in group
    const uint32_t* q = r < R ? reinterpret_cast<const uint32_t*>(qbase + (rows[fr / group] * hq + h * group + fr % group) * D)
                              : nullptr;
    for (int i = 0; i < NP; ++i) qt2[i * RMAX + r] = q ? q[i] : 0u;
  }
  const uint32_t* kp[CT + 8];  // padded so the last key tile may run past nv
  const uint16_t* vp[CT];
  for (int t = CT; t < CT + 8; ++t) kp[t] = reinterpret_cast<const uint32_t*>(zeros);
  // Key slots, walked page by page (no divisions): slots[cur] this chunk, slots[cur ^ 1] the next.
  int64_t page = 0, in_page = 0;
  auto next_slot = [&]() {
    const int64_t slot = pages[page] * block_size + in_page;
    if (++in_page == block_size) in_page = 0, ++page;
    return slot;
  };
  alignas(64) int64_t slots[2][CT];
  for (int t = 0; t < std::min<int64_t>(CT, ntok); ++t) slots[0][t] = next_slot();
  const int64_t nchunks = (ntok + CT - 1) / CT;
  constexpr int64_t OWN_PF_CHUNKS = 16;  // own keys are prefetched over the last 16 chunks
  OwnPrefetch<D> opf;
  for (int64_t c = 0, cur = 0, ci = 0; c < ntok; c += CT, cur ^= 1, ++ci) {
    const int nv = (int)std::min<int64_t>(CT, ntok - c);
    for (int t = 0; t < CT; ++t) {
      if (t < nv) {
        const int64_t slot = slots[cur][t];
        kp[t] = reinterpret_cast<const uint32_t*>(kc + slot * D);
        vp[t] = reinterpret_cast<const uint16_t*>(vc + slot * D);
      } else {
        kp[t] = reinterpret_cast<const uint32_t*>(zeros);
        vp[t] = zeros;
      }
    }
    // The next chunk's keys and values are fetched from memory while this one computes.
    const int nn = (int)std::min<int64_t>(CT, ntok - c - CT);
    for (int t = 0; t < nn; ++t) {
      const int64_t slot = slots[cur ^ 1][t] = next_slot();
      for (int b = 0; b < D * 2; b += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(kc + slot * D) + b, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(vc + slot * D) + b, _MM_HINT_T0);
      }
    }
    if (own) {
      if (ci == std::max<int64_t>(0, nchunks - OWN_PF_CHUNKS))
        opf.init(own, rows, r_first / group, (r_first + R + group - 1) / group, ntok, block_size, kc, vc,
                 nchunks - ci);
      if (ci >= nchunks - OWN_PF_CHUNKS) opf.step();
    }
    if (a.pend + CT / 2 > State<D>::GP) {
      flush(a);
      a.pstart = a.pend = 0;
    }
    // Values as (v[t][d], v[t+1][d]) pairs, after the pending ones.
    uint32_t* v2 = a.v2 + a.pend * D;
    for (int tp = 0; tp < CT / 2; ++tp)
      for (int c32 = 0; c32 < D / 32; ++c32) {
        const __m512i x = _mm512_loadu_si512(vp[2 * tp] + 32 * c32);
        const __m512i y = _mm512_loadu_si512(vp[2 * tp + 1] + 32 * c32);
        _mm512_storeu_si512(v2 + (tp * DV + 2 * c32) * 16, pair_lo(x, y));
        _mm512_storeu_si512(v2 + (tp * DV + 2 * c32 + 1) * 16, pair_hi(x, y));
      }
    if constexpr (D % 32 == 16)  // last 16 dimensions: half-width loads, the low interleave only
      for (int tp = 0; tp < CT / 2; ++tp) {
        const __m512i x = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vp[2 * tp] + D - 16)));
        const __m512i y = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vp[2 * tp + 1] + D - 16)));
        _mm512_storeu_si512(v2 + (tp * DV + DV - 1) * 16, pair_lo(x, y));
      }
    const int pair0 = a.pend;  // a rebase inside the chunk moves a.pend back to its tile
    switch (RV) {
      case 1: qk_chunk<D, 1, 8>(a, qt2, kp, nv, scale2, pair0); break;
      case 2: qk_chunk<D, 2, 8>(a, qt2, kp, nv, scale2, pair0); break;
      case 3: qk_chunk<D, 3, 8>(a, qt2, kp, nv, scale2, pair0); break;
      default: qk_chunk<D, 4, 6>(a, qt2, kp, nv, scale2, pair0); break;
    }
    a.pend = pair0 + (nv + 1) / 2;
  }
  flush(a);
  float* o = a.o;
  float* m = a.m;
  float* l = a.l;
  if (own)  // complete: each member's own keys (its heads in this task together), then final outputs
    for (int r = 0; r < R;) {
      const int64_t fr = r_first + r, member = fr / group, head = fr % group;
      const int n = (int)std::min<int64_t>(group - head, R - r);  // this member's heads in the task
      const int64_t row = rows[member];
      own_heads<D>(n, qbase + (row * hq + h * group + head) * D, kc, vc, own->tables + row * own->stride, ntok,
                   own->ctx[row], block_size, scale2, o + r * D, m + r, l + r);
      for (int g = 0; g < n; ++g) {
        const __m512 inv = _mm512_set1_ps(l[r + g] > 0.f ? 1.f / l[r + g] : 0.f);
        c10::BFloat16* out = obase + (row * hq + h * group + head + g) * D;
        for (int d = 0; d < D; d += 16) st(out + d, _mm512_mul_ps(_mm512_loadu_ps(o + (r + g) * D + d), inv), 0xffff);
      }
      r += n;
    }
  for (int r = 0; r < R && !own; ++r) {
    const int64_t fr = r_first + r, member = fr / group, hh = h * group + fr % group;
    const __m512 inv = _mm512_set1_ps(l[r] > 0.f ? 1.f / l[r] : 0.f);
    c10::BFloat16* out = obase + (member * hq + hh) * D;  // outputs are in member order
    for (int d = 0; d < D; d += 16) st(out + d, _mm512_mul_ps(_mm512_loadu_ps(o + r * D + d), inv), 0xffff);
    lbase[member * hq + hh] = l[r] > 0.f ? (m[r] + std::log2(l[r])) * 0.693147180559945309f : -INFINITY;
  }
}

template <int D>
void run(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc, const torch::Tensor& pages,
         const torch::Tensor& lens, const torch::Tensor& rows, const torch::Tensor& offsets, int64_t block_size,
         double scale, torch::Tensor& out, float* lp, const OwnKeys* own) {
  const int64_t hq = q.size(1), hkv = kc.size(0), group = hq / hkv, slots = kc.size(1);
  const int64_t ng = pages.size(0);
  const auto* qp = q.data_ptr<c10::BFloat16>();
  const auto* kp = kc.data_ptr<c10::BFloat16>();
  const auto* vp = vc.data_ptr<c10::BFloat16>();
  const int64_t* pg = pages.data_ptr<int64_t>();
  const int64_t* ln = lens.data_ptr<int64_t>();
  const int64_t* rw = rows.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  auto* op = out.data_ptr<c10::BFloat16>();
  // Tasks: (group, kv head, block of <= RMAX query rows); a group's rows are member * group + head.
  std::vector<int64_t> task_group, task_first;
  for (int64_t g = 0; g < ng; ++g)
    for (int64_t r = 0; r < (off[g + 1] - off[g]) * group; r += RMAX) {
      task_group.push_back(g);
      task_first.push_back(r);
    }
  const int64_t nt = (int64_t)task_group.size();
  at::parallel_for(0, nt * hkv, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t t = i / hkv, h = i % hkv, g = task_group[t];
      const int64_t first = off[g], count = off[g + 1] - off[g];
      const int64_t nrows = std::min<int64_t>(RMAX, count * group - task_first[t]);
      task<D>(qp, hq, group, rw + first, task_first[t], nrows, kp + h * slots * D, vp + h * slots * D,
              pg + g * pages.size(1), ln[g], block_size, (float)scale, own ? op : op + first * hq * D,
              own ? nullptr : lp + first * hq, h, own);
    }
  });
}

}  // namespace
#endif

namespace {
void check(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc) {
  TORCH_CHECK(q.is_contiguous() && kc.is_contiguous() && vc.is_contiguous(), "contiguous inputs expected");
  TORCH_CHECK(q.scalar_type() == torch::kBFloat16 && kc.scalar_type() == torch::kBFloat16 &&
                  vc.scalar_type() == torch::kBFloat16,
              "shared_prefix_attention: bf16 queries and cache expected");
}

void dispatch(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc, const torch::Tensor& pages,
              const torch::Tensor& lens, const torch::Tensor& rows, const torch::Tensor& offsets, int64_t block_size,
              double scale, torch::Tensor& out, float* lse, const void* own) {
#if defined(__AVX512BF16__)
  const auto* ok = static_cast<const OwnKeys*>(own);
  const int64_t d = q.size(2);
  if (d == 64) run<64>(q, kc, vc, pages, lens, rows, offsets, block_size, scale, out, lse, ok);
  else if (d == 128) run<128>(q, kc, vc, pages, lens, rows, offsets, block_size, scale, out, lse, ok);
  else if (d == 32) run<32>(q, kc, vc, pages, lens, rows, offsets, block_size, scale, out, lse, ok);
  else if (d == 16) run<16>(q, kc, vc, pages, lens, rows, offsets, block_size, scale, out, lse, ok);
  else TORCH_CHECK(false, "shared_prefix_attention: unsupported head_dim ", d);
#else
  TORCH_CHECK(false, "shared_prefix_attention needs AVX512-BF16");
#endif
}
}  // namespace

// q [n, hq, d] bf16 decode queries; kc/vc [hkv, slots, d] bf16; pages [groups, max_pages] shared
// pages; lens [groups] shared tokens; rows [members] decode rows, grouped; offsets [groups + 1].
// Returns (out [members, hq, d] bf16, lse [members, hq] float32), members in `rows` order.
std::vector<torch::Tensor> shared_prefix_attention(torch::Tensor q, torch::Tensor kc, torch::Tensor vc,
                                                   torch::Tensor pages, torch::Tensor lens, torch::Tensor rows,
                                                   torch::Tensor offsets, int64_t block_size, double scale) {
  check(q, kc, vc);
  auto out = torch::empty({rows.size(0), q.size(1), q.size(2)}, q.options());
  auto lse = torch::empty({rows.size(0), q.size(1)}, q.options().dtype(torch::kFloat));
  dispatch(q, kc, vc, pages, lens, rows, offsets, block_size, scale, out, lse.data_ptr<float>(), nullptr);
  return {out, lse};
}

// Complete decode attention for every grouped row, in place: the shared pages as above, then the
// row's own keys [lens[group], ctx_lens[row]) from tables[row]; out[row] (out [n, hq, d], the
// step's attention output) gets the final result. No partial outputs, log-sum-exps or merge.
void shared_prefix_decode_(torch::Tensor out, torch::Tensor q, torch::Tensor kc, torch::Tensor vc,
                           torch::Tensor pages, torch::Tensor lens, torch::Tensor rows, torch::Tensor offsets,
                           torch::Tensor tables, torch::Tensor ctx_lens, int64_t block_size, double scale) {
  check(q, kc, vc);
  TORCH_CHECK(out.is_contiguous() && out.sizes() == q.sizes() && out.scalar_type() == torch::kBFloat16,
              "shared_prefix_decode_: out must be a contiguous bf16 tensor shaped like q");
  TORCH_CHECK(tables.is_contiguous() && tables.size(0) == q.size(0) && ctx_lens.size(0) == q.size(0),
              "shared_prefix_decode_: one block table and context length per decode row");
  const OwnKeys own{tables.data_ptr<int64_t>(), tables.size(1), ctx_lens.data_ptr<int64_t>()};
  dispatch(q, kc, vc, pages, lens, rows, offsets, block_size, scale, out, nullptr, &own);
}

// Whether the fused bf16 kernel is compiled in for this head size (AVX512-BF16 CPUs).
bool shared_prefix_supported(int64_t d) {
#if defined(__AVX512BF16__)
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
