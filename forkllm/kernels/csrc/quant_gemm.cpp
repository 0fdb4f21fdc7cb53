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
// Tiles of R weight rows x up to 4 input rows: a weight block is expanded once per tile and used
// for every input row; each output's blocks are summed in one fixed order whatever M is, so a
// row's result does not depend on the batch (deterministic mode needs that).
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
template <int TT>
inline float block_offset(const uint8_t* blk, float dw) {  // a_w: the per-block additive term's weight
  if constexpr (TT == Q4_1) return h2f(blk + 2);
  else if constexpr (TT == Q4_0) return -8.f * dw;
  else return 0.f;
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
template <int TT>
inline __m256i load_weights(const uint8_t* blk) {
  if constexpr (TT == Q8_0) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
  } else {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (TT == Q4_1 ? 4 : 2)));
    const __m128i m = _mm_set1_epi8(0x0f);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
  }
}

template <int TT, int R, int MB>
inline void tile(const uint8_t* __restrict w, int64_t rowb, int64_t nb, const int8_t* __restrict xq,
                 const float* __restrict xd, const float* __restrict xs, int64_t K, float* __restrict out) {
  __m256 acc[MB][R];
  float corr[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) { acc[m][r] = _mm256_setzero_ps(); corr[m][r] = 0.f; }
  for (int64_t b = 0; b < nb; ++b) {
    __m256i wv[R];
    float dw[R], aw[R];
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = w + r * rowb + b * block_bytes(TT);
      dw[r] = h2f(blk);
      aw[r] = block_offset<TT>(blk, dw[r]);
      wv[r] = load_weights<TT>(blk);
    }
    __m256i wa[R];
    if constexpr (TT == Q8_0)
      for (int r = 0; r < R; ++r) wa[r] = _mm256_sign_epi8(wv[r], wv[r]);  // |w| as the u8 operand
    for (int m = 0; m < MB; ++m) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + b * QK));
      const float dx = xd[m * nb + b];
      for (int r = 0; r < R; ++r) {
        __m256i dot;
        if constexpr (TT == Q8_0)  // w x = |w| * (x with w's sign)
          dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wa[r], _mm256_sign_epi8(xv, wv[r]));
        else
          dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv[r], xv);
        acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw[r] * dx), acc[m][r]);
        if constexpr (TT != Q8_0) corr[m][r] += aw[r] * xs[m * nb + b];
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) {
      const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[m][r]), _mm256_extractf128_ps(acc[m][r], 1));
      const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
      out[m * R + r] = _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2))) + corr[m][r];
    }
}
#else
template <int TT, int R, int MB>
inline void tile(const uint8_t* __restrict w, int64_t rowb, int64_t nb, const int8_t* __restrict xq,
                 const float* __restrict xd, const float* __restrict xs, int64_t K, float* __restrict out) {
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) {
      float acc = 0.f, corr = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = w + r * rowb + b * block_bytes(TT);
        const int8_t* x = xq + m * K + b * QK;
        const float dw = h2f(blk);
        int dot = 0;
        if constexpr (TT == Q8_0) {
          const int8_t* qs = reinterpret_cast<const int8_t*>(blk + 2);
          for (int i = 0; i < QK; ++i) dot += qs[i] * x[i];
        } else {
          const uint8_t* qs = blk + (TT == Q4_1 ? 4 : 2);
          for (int i = 0; i < QK / 2; ++i) dot += (qs[i] & 15) * x[i] + (qs[i] >> 4) * x[i + QK / 2];
          corr += block_offset<TT>(blk, dw) * xs[m * nb + b];
        }
        acc += static_cast<float>(dot) * dw * xd[m * nb + b];
      }
      out[m * R + r] = acc + corr;
    }
}
#endif

template <int TT, int R>
inline void rows_block(const uint8_t* w, int64_t rowb, int64_t nb, const int8_t* xq, const float* xd,
                       const float* xs, int64_t M, int64_t K, float* o /* [M][R] */) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<TT, R, 4>(w, rowb, nb, xq + m * K, xd + m * nb, xs + m * nb, K, o + m * R);
  switch (M - m) {
    case 1: tile<TT, R, 1>(w, rowb, nb, xq + m * K, xd + m * nb, xs + m * nb, K, o + m * R); break;
    case 2: tile<TT, R, 2>(w, rowb, nb, xq + m * K, xd + m * nb, xs + m * nb, K, o + m * R); break;
    case 3: tile<TT, R, 3>(w, rowb, nb, xq + m * K, xd + m * nb, xs + m * nb, K, o + m * R); break;
  }
}

template <int TT, typename T>
void gemm(const int8_t* xq, const float* xd, const float* xs, int64_t M, int64_t K, const uint8_t* w, int64_t N,
          const T* bias, T* y, float* yf) {
  const int64_t nb = K / QK, rowb = nb * block_bytes(TT);
  constexpr int R = 4;
  at::parallel_for(0, (N + R - 1) / R, 8, [&](int64_t b, int64_t e) {
    std::vector<float> o(M * R);
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t * R, rows = std::min<int64_t>(R, N - n);
      if (rows == R) {
        rows_block<TT, R>(w + n * rowb, rowb, nb, xq, xd, xs, M, K, o.data());
      } else {
        for (int64_t r = 0; r < rows; ++r) {
          std::vector<float> one(M);
          rows_block<TT, 1>(w + (n + r) * rowb, rowb, nb, xq, xd, xs, M, K, one.data());
          for (int64_t m = 0; m < M; ++m) o[m * R + r] = one[m];
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
  const int64_t M = x.size(0), K = x.size(1), nb = K / QK;
  std::vector<int8_t> xq(M * K);
  std::vector<float> xd(M * nb), xs(M * nb);
  const T* xp = x.data_ptr<T>();
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) quantize_row(xp + m * K, K, xq.data() + m * K, xd.data() + m * nb, xs.data() + m * nb);
  });
  auto y = torch::empty({M, N}, x.options().dtype(float_out ? torch::kFloat : x.scalar_type()));
  const T* bp = (bias.has_value() && bias->defined()) ? bias->data_ptr<T>() : nullptr;
  T* yp = float_out ? nullptr : y.data_ptr<T>();
  float* yf = float_out ? y.data_ptr<float>() : nullptr;
  const uint8_t* wp = w.data_ptr<uint8_t>();
  if (qtype == Q4_0) gemm<Q4_0, T>(xq.data(), xd.data(), xs.data(), M, K, wp, N, bp, yp, yf);
  else if (qtype == Q4_1) gemm<Q4_1, T>(xq.data(), xd.data(), xs.data(), M, K, wp, N, bp, yp, yf);
  else gemm<Q8_0, T>(xq.data(), xd.data(), xs.data(), M, K, wp, N, bp, yp, yf);
  return y;
}

}  // namespace

// x [M, K] (float32 / bf16 / fp16, contiguous, K a multiple of 32); w uint8 [N, K / 32 * block
// bytes] in the ggml block layout of `qtype` (2 = Q4_0, 3 = Q4_1, 8 = Q8_0); bias [N] in x's dtype.
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
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return true;
#else
  return false;
#endif
}
