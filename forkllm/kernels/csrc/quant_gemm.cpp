// y[M, N] = x[M, K] @ W[N, K]^T on weights kept in their GGUF block types: Q8_0 (34 bytes per
// 32 weights), Q4_0 (18 bytes), Q4_1 (20 bytes). A Q4_1 row reads 5 bits per weight where bf16
// reads 16: single-stream decode streams every weight once per token, so bytes are time.
//
// As llama.cpp does, each input row is first quantized per 32-block to int8 with one float scale
// (amax / 127) and its block sums; a weight block times an input block is then one exact int32
// dot product (vpdpbusd: u8 x s8) scaled by d_w * d_x, plus, for Q4_1 (w = d q + m) and Q4_0
// (w = d (q - 8)), a per-block correction a_w * d_x * sum(q_x). The result is exactly
// dequant(x_q) @ dequant(W)^T up to float32 rounding (tests compare against that in float64).
//
// Tiles of 4 weight rows x up to 2 input rows: two weight blocks are expanded once per tile and
// used for every input row; each output's blocks are summed in one fixed order whatever M is, so
// a row's result does not depend on the batch (deterministic mode needs that).
#include "common.h"
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int QK = 32;
constexpr int Q4_0 = 2, Q4_1 = 3, Q8_0 = 8;  // ggml type ids

inline int64_t block_bytes(int64_t t) { return t == Q4_0 ? 18 : t == Q4_1 ? 20 : 34; }

inline float h2f(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

// x row -> int8 blocks q, scales d (amax / 127) and s = d * sum(q) per block.
template <typename T>
void quantize_row(const T* __restrict x, int64_t K, int8_t* __restrict q, float* __restrict d, float* __restrict s) {
  for (int64_t b = 0; b < K / QK; ++b) {
    const T* xb = x + b * QK;
    float amax = 0.f;
#if defined(__AVX512F__)
    const __m512 v0 = ld(xb, (__mmask16)0xffff), v1 = ld(xb + 16, (__mmask16)0xffff);
    amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float dd = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
    const __m512 vid = _mm512_set1_ps(id);
    const __m512i i0 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v0, vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i i1 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v1, vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * QK), _mm512_cvtsepi32_epi8(i0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * QK + 16), _mm512_cvtsepi32_epi8(i1));
    d[b] = dd;
    s[b] = dd * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1)));
#elif defined(FORKLLM_AVX2)
    __m256 v[4];
    for (int i = 0; i < 4; ++i) v[i] = load8(xb + 8 * i);
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                              _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    amax = _mm_cvtss_f32(m4);
    const float dd = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
    const __m256 vid = _mm256_set1_ps(id);
    __m256i iv[4];  // round to nearest even, as nearbyint in the default rounding mode
    for (int i = 0; i < 4; ++i) iv[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], vid));
    // packs interleave 128-bit lanes: 0..3 8..11 | 4..7 12..15 per pair, then bytes; one permute restores order
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * QK),
                        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    const __m256i t = _mm256_add_epi32(_mm256_add_epi32(iv[0], iv[1]), _mm256_add_epi32(iv[2], iv[3]));
    __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4e));
    t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xb1));
    d[b] = dd;
    s[b] = dd * static_cast<float>(_mm_cvtsi128_si32(t4));
#else
    for (int i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(to_f(xb[i])));
    const float dd = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
    int sum = 0;
    for (int i = 0; i < QK; ++i) {
      const int v = static_cast<int>(std::nearbyint(to_f(xb[i]) * id));
      q[b * QK + i] = static_cast<int8_t>(v);
      sum += v;
    }
    d[b] = dd;
    s[b] = dd * static_cast<float>(sum);
#endif
  }
}

// Weight block layouts (ggml): Q4_0 {half d; u8 qs[16]}, Q4_1 {half d; half m; u8 qs[16]},
// Q8_0 {half d; i8 qs[32]}. A Q4 byte j holds weight j (low nibble) and weight j + 16 (high).
//
// At load the blocks are repacked (models/quant.py: repack), same bytes per row: every block's quants first
// (Q8_0's as unsigned: q + 128), then the blocks' scales d (fp16), then Q4_1's mins m (fp16).
// One row then reads as two pairs of streams, which 512-bit code wants: 64 quants of two blocks
// per dot product (one vpdpbusd for two blocks), and 16 scales converted by one vcvtph2ps. Every
// type becomes w = d * u + a with u unsigned (a = m for Q4_1, -8 d for Q4_0, -128 d for Q8_0),
// so y = sum_b d_b dx_b dot(u_b, x_b) + sum_b a_b (dx_b sum(x_b)).
template <int TT> constexpr int quant_bytes() { return TT == Q8_0 ? 32 : 16; }

template <int TT>
inline float offset_weight(const uint8_t* row, int64_t nb, int64_t b) {  // a_b
  constexpr int QB = quant_bytes<TT>();
  const float d = h2f(row + nb * QB + b * 2);
  if constexpr (TT == Q4_1) return h2f(row + nb * QB + nb * 2 + b * 2);
  else if constexpr (TT == Q4_0) return -8.f * d;
  else return -128.f * d;
}

// x row quantized (q, per-block scale xd, xs = xd * sum q), laid out for the type's pair dots:
// pair p holds blocks 2p and 2p + 1 in 64 bytes (Q4: the low halves of both blocks, then the
// high halves, matching the nibble order; Q8: the two blocks in order); zero past the last block.
template <int TT>
void arrange_x(const int8_t* q, int64_t nb, int8_t* out) {
  const int64_t np = (nb + 1) / 2;
  std::memset(out, 0, np * 64);
  for (int64_t b = 0; b < nb; ++b) {
    int8_t* o = out + (b / 2) * 64;
    const int h = static_cast<int>(b % 2);
    if constexpr (TT == Q8_0) {
      std::memcpy(o + h * 32, q + b * QK, 32);
    } else {
      std::memcpy(o + h * 16, q + b * QK, 16);
      std::memcpy(o + 32 + h * 16, q + b * QK + 16, 16);
    }
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
template <int TT>
inline __m512i load_pair(const uint8_t* qs, bool both) {
  if constexpr (TT == Q8_0) {
    return _mm512_maskz_loadu_epi8(both ? ~0ULL : 0xffffffffULL, qs);
  } else {
    // the 32 bytes in both halves; the upper half shifted down a nibble; both masked to 4 bits
    const __m512i v = _mm512_broadcast_i64x4(_mm256_maskz_loadu_epi8(both ? 0xffffffffu : 0xffffu, qs));
    return _mm512_and_si512(_mm512_mask_srli_epi16(v, 0xffff0000u, v, 4), _mm512_set1_epi8(0x0f));
  }
}

// Which block of a 16-block group each int32 lane of pair pp's dot belongs to.
template <int TT>
inline __m512i lane_blocks(int pp) {
  const int a = 2 * pp, b = 2 * pp + 1;
  if constexpr (TT == Q8_0) return _mm512_setr_epi32(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b);
  else return _mm512_setr_epi32(a, a, a, a, b, b, b, b, a, a, a, a, b, b, b, b);
}

// R weight rows x MB input rows: out[m * R + r]. Each (r, m) is summed in one fixed order
// whatever MB is, so a row's result does not depend on the batch.
template <int TT, int R, int MB>
inline void tile(const uint8_t* __restrict w, int64_t rowb, int64_t nb, const int8_t* __restrict xa,
                 const float* __restrict xd, const float* __restrict xs, int64_t xstride, int64_t nbp,
                 float* __restrict out) {
  constexpr int QB = quant_bytes<TT>();
  __m512 acc[R][MB], corr[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = corr[r][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < nb; g += 16) {
    const __mmask16 k = tail(nb - g);
    __m512 dwx[R][MB];
    for (int r = 0; r < R; ++r) {
      const uint8_t* row = w + r * rowb;
      const __m512 d = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, row + nb * QB + g * 2));
      __m512 a;
      if constexpr (TT == Q4_1) a = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, row + nb * QB + nb * 2 + g * 2));
      else a = _mm512_mul_ps(d, _mm512_set1_ps(TT == Q4_0 ? -8.f : -128.f));
      for (int m = 0; m < MB; ++m) {
        dwx[r][m] = _mm512_mul_ps(d, _mm512_loadu_ps(xd + m * nbp + g));
        corr[r][m] = _mm512_fmadd_ps(a, _mm512_loadu_ps(xs + m * nbp + g), corr[r][m]);
      }
    }
    const int64_t nbg = std::min<int64_t>(16, nb - g);
    for (int pp = 0; 2 * pp < nbg; ++pp) {
      const int64_t b = g + 2 * pp;
      const bool both = 2 * pp + 1 < nbg;
      const __m512i idx = lane_blocks<TT>(pp);
      __m512i xv[MB];
      for (int m = 0; m < MB; ++m) xv[m] = _mm512_loadu_si512(xa + m * xstride + (b / 2) * 64);
      for (int r = 0; r < R; ++r) {
        const __m512i wv = load_pair<TT>(w + r * rowb + b * QB, both);
        for (int m = 0; m < MB; ++m) {
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv[m]);
          acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(idx, dwx[r][m]), acc[r][m]);
        }
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) out[m * R + r] = _mm512_reduce_add_ps(acc[r][m]) + _mm512_reduce_add_ps(corr[r][m]);
}
#elif defined(FORKLLM_AVX2)
// AVX2 without VNNI (Zen 2/3, most client CPUs): vpmaddubsw (u8 x s8 -> s16 pairs), then vpmaddwd
// by ones -> int32 sums of 4 products, as llama.cpp's AVX2 path does. Q4 quants (0..15) are the
// unsigned operand as they are (a pair sums to at most 3810: no s16 saturation). Q8_0's stored
// u = q + 128 would saturate, so it goes back to signed q = u ^ 0x80 and the sign trick makes the
// unsigned operand |q| and the signed one x * sign(q): the exact dot(q, x), with no offset term.
inline __m256i dot_u8s8(__m256i u, __m256i s) { return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)); }

// 8 fp16 values from p as float32; only the first n are read (the rest are 0). A row's last
// group of blocks (K = 576: 18 blocks, a group of 2) takes a masked load: copying the halves
// through a stack array stalls store forwarding, which cost ~45% of a 576-wide decode matmul.
inline __m256 load_h8(const uint8_t* p, int64_t n) {
  if (n >= 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m128i pairs = _mm_cmplt_epi32(_mm_setr_epi32(0, 1, 2, 3), _mm_set1_epi32(static_cast<int>(n / 2)));
  __m128i h = _mm_maskload_epi32(reinterpret_cast<const int*>(p), pairs);
  if (n & 1) {  // the odd last half alone: nothing past p + 2n is touched
    uint16_t last;
    std::memcpy(&last, p + (n - 1) * 2, 2);
    const __m128i lane = _mm_cmpeq_epi16(_mm_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7), _mm_set1_epi16(static_cast<short>(n - 1)));
    h = _mm_blendv_epi8(h, _mm_set1_epi16(static_cast<short>(last)), lane);
  }
  return _mm256_cvtph_ps(h);
}

// R weight rows x MB input rows: out[m * R + r]; each (r, m) is summed in one fixed order
// whatever MB is (per 8-block group: the offset term, then the blocks in order). Not inlined:
// inside gemm's lambda GCC kept the accumulators on the stack (a store and a reload on every
// block pair's FMA chain: W4's decode matmuls 1.45x slower); in a function of its own they stay
// in registers.
template <int TT, int R, int MB>
__attribute__((noinline)) void tile(const uint8_t* __restrict w, int64_t rowb, int64_t nb, const int8_t* __restrict xa,
                 const float* __restrict xd, const float* __restrict xs, int64_t xstride, int64_t nbp,
                 float* __restrict out) {
  constexpr int QB = quant_bytes<TT>();
  __m256 acc[R][MB];
  alignas(32) float sc[R][MB][8];  // d_w * d_x per block of the group
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < nb; g += 8) {
    const int64_t nbg = std::min<int64_t>(8, nb - g);
    for (int r = 0; r < R; ++r) {
      const uint8_t* row = w + r * rowb;
      const __m256 d = load_h8(row + nb * QB + g * 2, nbg);
      for (int m = 0; m < MB; ++m) _mm256_store_ps(sc[r][m], _mm256_mul_ps(d, _mm256_loadu_ps(xd + m * nbp + g)));
      if constexpr (TT != Q8_0) {
        const __m256 a = TT == Q4_1 ? load_h8(row + nb * QB + nb * 2 + g * 2, nbg) : _mm256_mul_ps(d, _mm256_set1_ps(-8.f));
        for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_fmadd_ps(a, _mm256_loadu_ps(xs + m * nbp + g), acc[r][m]);
      }
    }
    if constexpr (TT == Q8_0) {
      for (int64_t j = 0; j < nbg; ++j) {
        const int64_t b = g + j;
        __m256i xv[MB];
        for (int m = 0; m < MB; ++m)
          xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa + m * xstride + (b / 2) * 64 + (b % 2) * 32));
        for (int r = 0; r < R; ++r) {
          const __m256i q = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * rowb + b * QB)),
                                             _mm256_set1_epi8(static_cast<char>(0x80)));
          const __m256i aq = _mm256_abs_epi8(q);
          for (int m = 0; m < MB; ++m) {
            const __m256i dot = dot_u8s8(aq, _mm256_sign_epi8(xv[m], q));
            acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(&sc[r][m][j]), acc[r][m]);
          }
        }
      }
    } else {
      // a pair of blocks: 32 quant bytes; low nibbles are weights 0..15 of both blocks, high 16..31,
      // matching arrange_x's halves; int32 lanes 0..3 belong to the first block, 4..7 to the second.
      // An odd last block reads its own 16 bytes only (the x pair's other half is zero).
      const __m256i lo4 = _mm256_set1_epi8(0x0f);
      for (int64_t pp = 0; 2 * pp < nbg; ++pp) {
        const int64_t b = g + 2 * pp;
        const __m256i idx = _mm256_setr_epi32(2 * pp, 2 * pp, 2 * pp, 2 * pp, 2 * pp + 1, 2 * pp + 1, 2 * pp + 1, 2 * pp + 1);
        __m256i xl[MB], xh[MB];
        for (int m = 0; m < MB; ++m) {
          const int8_t* xp = xa + m * xstride + (b / 2) * 64;
          xl[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp));
          xh[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 32));
        }
        for (int r = 0; r < R; ++r) {
          const uint8_t* qp = w + r * rowb + b * QB;
          const __m256i qs = 2 * pp + 1 < nbg
                                 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp))
                                 : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qp)));
          const __m256i wl = _mm256_and_si256(qs, lo4), wh = _mm256_and_si256(_mm256_srli_epi16(qs, 4), lo4);
          for (int m = 0; m < MB; ++m) {
            const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(wl, xl[m]), _mm256_maddubs_epi16(wh, xh[m]));
            const __m256i dot = _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
            const __m256 scale = _mm256_permutevar8x32_ps(_mm256_load_ps(sc[r][m]), idx);
            acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[r][m]);
          }
        }
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) out[m * R + r] = hsum8(acc[r][m]);
}
#else
template <int TT, int R, int MB>
inline void tile(const uint8_t* __restrict w, int64_t rowb, int64_t nb, const int8_t* __restrict xa,
                 const float* __restrict xd, const float* __restrict xs, int64_t xstride, int64_t nbp,
                 float* __restrict out) {
  constexpr int QB = quant_bytes<TT>();
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) {
      const uint8_t* row = w + r * rowb;
      float acc = 0.f, corr = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const int8_t* x = xa + m * xstride + (b / 2) * 64;
        const int h = static_cast<int>(b % 2);
        const uint8_t* qs = row + b * QB;
        int dot = 0;
        if constexpr (TT == Q8_0) {
          for (int i = 0; i < QK; ++i) dot += qs[i] * x[h * 32 + i];
        } else {
          for (int i = 0; i < QK / 2; ++i) dot += (qs[i] & 15) * x[h * 16 + i] + (qs[i] >> 4) * x[32 + h * 16 + i];
        }
        acc += static_cast<float>(dot) * h2f(row + nb * QB + b * 2) * xd[m * nbp + b];
        corr += offset_weight<TT>(row, nb, b) * xs[m * nbp + b];
      }
      out[m * R + r] = acc + corr;
    }
}
#endif

template <int TT, int R>
inline void rows_block(const uint8_t* w, int64_t rowb, int64_t nb, const int8_t* xa, const float* xd,
                       const float* xs, int64_t M, int64_t xstride, int64_t nbp, float* o /* [M][R] */) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) tile<TT, R, 2>(w, rowb, nb, xa + m * xstride, xd + m * nbp, xs + m * nbp, xstride, nbp, o + m * R);
  if (m < M) tile<TT, R, 1>(w, rowb, nb, xa + m * xstride, xd + m * nbp, xs + m * nbp, xstride, nbp, o + m * R);
}

template <int TT, typename T>
void gemm(const int8_t* xa, const float* xd, const float* xs, int64_t M, int64_t K, const uint8_t* w, int64_t N,
          const T* bias, T* y, float* yf) {
  const int64_t nb = K / QK, rowb = nb * block_bytes(TT), nbp = (nb + 15) / 16 * 16, xstride = (nb + 1) / 2 * 64;
  constexpr int R = 4;
  at::parallel_for(0, (N + R - 1) / R, 8, [&](int64_t b, int64_t e) {
    float ostack[64 * R];
    std::vector<float> oheap;
    float* o = ostack;
    if (M > 64) {
      oheap.resize(M * R);
      o = oheap.data();
    }
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t * R, rows = std::min<int64_t>(R, N - n);
#if defined(__AVX512F__) || defined(FORKLLM_AVX2)
      if (M <= 4 && t + 1 < e) {  // decode streams the weights from memory: ask for the next tile now
        const char* next = reinterpret_cast<const char*>(w + (n + R) * rowb);
        const int64_t bytes = std::min<int64_t>(R, N - n - R) * rowb;
        for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
      }
#endif
      if (rows == R) {
        rows_block<TT, R>(w + n * rowb, rowb, nb, xa, xd, xs, M, xstride, nbp, o);
      } else {
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t m = 0; m < M; ++m)
            tile<TT, 1, 1>(w + (n + r) * rowb, rowb, nb, xa + m * xstride, xd + m * nbp, xs + m * nbp, xstride, nbp,
                           o + m * R + r);
        }
      }
      for (int64_t m = 0; m < M; ++m)
        for (int64_t r = 0; r < rows; ++r) {
          float v = o[m * R + r];
          if (bias) v += to_f(bias[n + r]);
          if (yf) yf[m * N + n + r] = v;
          else y[m * N + n + r] = static_cast<T>(v);
        }
    }
  });
}

template <typename T>
torch::Tensor run(const torch::Tensor& x, const torch::Tensor& w, int64_t qtype, int64_t N,
                  const c10::optional<torch::Tensor>& bias, bool float_out) {
  const int64_t M = x.size(0), K = x.size(1), nb = K / QK, nbp = (nb + 15) / 16 * 16, xstride = (nb + 1) / 2 * 64;
  std::vector<int8_t> xq(M * K), xa(M * xstride);
  std::vector<float> xd(M * nbp, 0.f), xs(M * nbp, 0.f);
  const T* xp = x.data_ptr<T>();
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      quantize_row(xp + m * K, K, xq.data() + m * K, xd.data() + m * nbp, xs.data() + m * nbp);
      if (qtype == Q8_0) arrange_x<Q8_0>(xq.data() + m * K, nb, xa.data() + m * xstride);
      else arrange_x<Q4_1>(xq.data() + m * K, nb, xa.data() + m * xstride);
    }
  });
  auto y = torch::empty({M, N}, x.options().dtype(float_out ? torch::kFloat : x.scalar_type()));
  const T* bp = (bias.has_value() && bias->defined()) ? bias->data_ptr<T>() : nullptr;
  T* yp = float_out ? nullptr : y.data_ptr<T>();
  float* yf = float_out ? y.data_ptr<float>() : nullptr;
  const uint8_t* wp = w.data_ptr<uint8_t>();
  if (qtype == Q4_0) gemm<Q4_0, T>(xa.data(), xd.data(), xs.data(), M, K, wp, N, bp, yp, yf);
  else if (qtype == Q4_1) gemm<Q4_1, T>(xa.data(), xd.data(), xs.data(), M, K, wp, N, bp, yp, yf);
  else gemm<Q8_0, T>(xa.data(), xd.data(), xs.data(), M, K, wp, N, bp, yp, yf);
  return y;
}

}  // namespace

// x [M, K] (float32 / bf16 / fp16, contiguous, K a multiple of 32); w uint8 [N, K / 32 * block
// bytes] of `qtype` (2 = Q4_0, 3 = Q4_1, 8 = Q8_0) as models/quant.py repacks it; bias [N] in x's dtype.
torch::Tensor quant_linear(torch::Tensor x, torch::Tensor w, int64_t qtype, int64_t N,
                           c10::optional<torch::Tensor> bias, bool float_out) {
  TORCH_CHECK(qtype == Q4_0 || qtype == Q4_1 || qtype == Q8_0, "quant_linear: qtype must be 2 (Q4_0), 3 (Q4_1) or 8 (Q8_0)");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % QK == 0, "quant_linear: x must be contiguous [M, K], K % 32 == 0");
  TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.is_contiguous() && w.dim() == 2 && w.size(0) == N &&
                  w.size(1) == x.size(1) / QK * block_bytes(qtype),
              "quant_linear: w must be uint8 [N, K / 32 * block bytes]");
  if (x.scalar_type() == torch::kFloat) return run<float>(x, w, qtype, N, bias, float_out);
  if (x.scalar_type() == torch::kBFloat16) return run<c10::BFloat16>(x, w, qtype, N, bias, float_out);
  if (x.scalar_type() == torch::kHalf) return run<c10::Half>(x, w, qtype, N, bias, float_out);
  TORCH_CHECK(false, "quant_linear: x must be float32, bfloat16 or float16");
}

bool quant_linear_vnni() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  return true;
#else
  return false;
#endif
}
