// y[M, N] = x[M, K] @ w[N, K]^T (+ bias) in float32 for any M, on CPUs with AVX2 + FMA and no
// AVX-512 (Zen 2/3, most client CPUs), on weights repacked once at load into P[N/16][K][16]:
// one 64-byte line holds 16 outputs at one k and each x row contributes x[m, k] by a broadcast.
// A register tile of 6 rows x 16 outputs is 12 accumulators fed by 2 weight loads and 6
// broadcasts per 12 FMAs, with no horizontal sums. Measured on a 2-core Zen 3 (peak 201 GFLOP/s,
// 38-43 GB/s), against the row-major GEMV (one weight row x input rows) and oneDNN's sgemm on the
// 49152 x 576 logits: 1 row 3.2-3.6 -> 2.3-3.6 ms, 6 rows 6.0-6.5 -> 3.4-3.8 ms, 64 rows
// (oneDNN) 29.8 -> 21-22 ms (0.83 of peak; streams from memory vary +-20% run to run on this VM).
// Verifying drafts (2-9 rows per sequence) now costs little more than a decode step, where the
// GEMV's cost grew with every row.
// Each output is one lane's FMA chain over k in order whatever M or the tile is: results do not
// depend on how many rows run together (batch-invariant, as deterministic mode needs).
#include "common.h"

namespace {

#if defined(FORKLLM_AVX2)
#define FORKLLM_PACKED_F32 1

constexpr int kTile = 6;    // x rows per register tile (12 accumulators + broadcast + 2 weights)
constexpr int kAhead = 16;  // k steps (one line each) a block's first tile prefetches ahead

// Named accumulators: GCC 12 kept a __m256 acc[6][2] array on the stack and stored all of it on
// every k step (2.5x slower, seen in the assembly).
#define FORKLLM_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)

// MB rows of x against one 16-output block. `stream`: this tile is the first to read the block,
// from memory: prefetch ahead (the next block follows in memory, so the prefetch runs into it).
template <int MB, bool stream>
inline void tile(const float* __restrict x, int64_t K, const float* __restrict P, const float* __restrict bias,
                 int64_t N, int64_t n0, float* __restrict y) {
  const __m256 z = _mm256_setzero_ps();
#define FORKLLM_DECL(i) __m256 a##i##0 = z, a##i##1 = z; const float* x##i = x + (i < MB ? i : 0) * K;
  FORKLLM_ROWS(FORKLLM_DECL)
#undef FORKLLM_DECL
  for (int64_t k = 0; k < K; ++k) {
    if constexpr (stream) _mm_prefetch(reinterpret_cast<const char*>(P + (k + kAhead) * 16), _MM_HINT_T0);
    const __m256 w0 = _mm256_loadu_ps(P + k * 16), w1 = _mm256_loadu_ps(P + k * 16 + 8);
#define FORKLLM_FMA(i)                                       \
  if constexpr (i < MB) {                                    \
    const __m256 b = _mm256_broadcast_ss(x##i + k);          \
    a##i##0 = _mm256_fmadd_ps(b, w0, a##i##0);               \
    a##i##1 = _mm256_fmadd_ps(b, w1, a##i##1);               \
  }
    FORKLLM_ROWS(FORKLLM_FMA)
#undef FORKLLM_FMA
  }
  const int64_t valid = N - n0 < 16 ? N - n0 : 16;
  alignas(32) float bv[16] = {};
  if (bias)
    for (int64_t j = 0; j < valid; ++j) bv[j] = bias[n0 + j];
  const __m256 b0 = _mm256_load_ps(bv), b1 = _mm256_load_ps(bv + 8);
#define FORKLLM_STORE(i)                                                              \
  if constexpr (i < MB) {                                                             \
    float* out = y + i * N + n0;                                                      \
    const __m256 r0 = _mm256_add_ps(a##i##0, b0), r1 = _mm256_add_ps(a##i##1, b1);    \
    if (valid == 16) {                                                                \
      _mm256_storeu_ps(out, r0);                                                      \
      _mm256_storeu_ps(out + 8, r1);                                                  \
    } else {                                                                          \
      alignas(32) float t[16];                                                        \
      _mm256_store_ps(t, r0);                                                         \
      _mm256_store_ps(t + 8, r1);                                                     \
      for (int64_t j = 0; j < valid; ++j) out[j] = t[j];                              \
    }                                                                                 \
  }
  FORKLLM_ROWS(FORKLLM_STORE)
#undef FORKLLM_STORE
}

// One to three rows against NB consecutive blocks: a decode step of one sequence is memory-bound,
// and one block's stream of loads a k step apart left the weights at ~28 GB/s; NB streams at once
// reach 34-38 (4 blocks, one row, measured). No prefetch: it cost 3-5% here.
template <int MB, int NB>
inline void wide_tile(const float* __restrict x, int64_t K, const float* __restrict P, const float* __restrict bias,
                      int64_t N, int64_t n0, float* __restrict y) {
  static_assert(MB <= 3 && NB <= 4 && MB * NB <= 6, "12 accumulators at most");
  const __m256 z = _mm256_setzero_ps();
  // named accumulators a<row><block><half>, as in tile
#define FORKLLM_BLOCKS(X, m) X(m, 0) X(m, 1) X(m, 2) X(m, 3)
#define FORKLLM_DECL(m, j) __m256 a##m##j##0 = z, a##m##j##1 = z;
  FORKLLM_BLOCKS(FORKLLM_DECL, 0) FORKLLM_BLOCKS(FORKLLM_DECL, 1) FORKLLM_BLOCKS(FORKLLM_DECL, 2)
#undef FORKLLM_DECL
  const int64_t stride = K * 16;
  const float* x1 = x + (MB > 1 ? K : 0);
  const float* x2 = x + (MB > 2 ? 2 * K : 0);
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_broadcast_ss(x + k), b1 = _mm256_broadcast_ss(x1 + k), b2 = _mm256_broadcast_ss(x2 + k);
#define FORKLLM_FMA(m, j)                                                                     \
  if constexpr (m < MB && j < NB) {                                                           \
    a##m##j##0 = _mm256_fmadd_ps(b##m, _mm256_loadu_ps(P + j * stride + k * 16), a##m##j##0);     \
    a##m##j##1 = _mm256_fmadd_ps(b##m, _mm256_loadu_ps(P + j * stride + k * 16 + 8), a##m##j##1); \
  }
    FORKLLM_BLOCKS(FORKLLM_FMA, 0) FORKLLM_BLOCKS(FORKLLM_FMA, 1) FORKLLM_BLOCKS(FORKLLM_FMA, 2)
#undef FORKLLM_FMA
  }
#define FORKLLM_STORE(m, j)                                                                           \
  if constexpr (m < MB && j < NB) {                                                                   \
    const __m256 c0 = bias ? _mm256_loadu_ps(bias + n0 + 16 * j) : z;                                 \
    const __m256 c1 = bias ? _mm256_loadu_ps(bias + n0 + 16 * j + 8) : z;                             \
    _mm256_storeu_ps(y + m * N + n0 + 16 * j, _mm256_add_ps(a##m##j##0, c0));                         \
    _mm256_storeu_ps(y + m * N + n0 + 16 * j + 8, _mm256_add_ps(a##m##j##1, c1));                     \
  }
  FORKLLM_BLOCKS(FORKLLM_STORE, 0) FORKLLM_BLOCKS(FORKLLM_STORE, 1) FORKLLM_BLOCKS(FORKLLM_STORE, 2)
#undef FORKLLM_STORE
#undef FORKLLM_BLOCKS
}

// Runs tile<rows, first>(m) over M rows: full tiles of T, then the remainder; the first tile
// streams the weights (prefetching), the others find them in L1/L2.
template <int T, typename Tile>
inline void row_tiles(int64_t M, Tile&& tile_at) {
  int64_t m = 0;
  for (; m + T <= M; m += T) {
    if (m == 0) tile_at(std::integral_constant<int, T>{}, std::true_type{}, m);
    else tile_at(std::integral_constant<int, T>{}, std::false_type{}, m);
  }
  auto rest = [&](auto rows) {
    if (m == 0) tile_at(rows, std::true_type{}, m);
    else tile_at(rows, std::false_type{}, m);
  };
  switch (M - m) {
    case 1: rest(std::integral_constant<int, 1>{}); break;
    case 2: rest(std::integral_constant<int, 2>{}); break;
    case 3: rest(std::integral_constant<int, 3>{}); break;
    case 4: if constexpr (T > 4) rest(std::integral_constant<int, 4>{}); break;
    case 5: if constexpr (T > 5) rest(std::integral_constant<int, 5>{}); break;
  }
}

// sigmoid(g) without overflow: exp256 takes arguments <= 0, so from e = exp(-|g|).
inline __m256 sigmoid256(__m256 g) {
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_andnot_ps(_mm256_set1_ps(-0.f), g)));
  const __m256 r = _mm256_div_ps(one, _mm256_add_ps(one, e));  // sigmoid(|g|)
  return _mm256_blendv_ps(r, _mm256_sub_ps(one, r), g);        // sign bit set: 1 - sigmoid(|g|)
}

// SwiGLU input from pack_gate_up's layout (gate block i, then up block i): MB rows x NP
// consecutive (gate, up) pairs x 16 outputs, MB * NP * 4 <= 12 accumulators, silu(gate) * up
// written straight from them. One row takes three pairs at once: six weight streams (one pair's
// two streams left it at ~32 GB/s).
template <int MB, int NP, bool stream>
inline void silu_tile(const float* __restrict x, int64_t K, const float* __restrict P, int64_t I, int64_t n0,
                      float* __restrict y) {
  static_assert(MB * NP <= 3, "12 accumulators at most");
  const int64_t stride = K * 16;  // one 16-output block
  const __m256 z = _mm256_setzero_ps();
#define FORKLLM_PAIRS(X, m) X(m, 0) X(m, 1) X(m, 2)
#define FORKLLM_ALL(X) FORKLLM_PAIRS(X, 0) FORKLLM_PAIRS(X, 1) FORKLLM_PAIRS(X, 2)
#define FORKLLM_DECL(m, j) __m256 g##m##j##0 = z, g##m##j##1 = z, u##m##j##0 = z, u##m##j##1 = z;
  FORKLLM_ALL(FORKLLM_DECL)
#undef FORKLLM_DECL
  const float* x0 = x;
  const float* x1 = x + (MB > 1 ? K : 0);
  const float* x2 = x + (MB > 2 ? 2 * K : 0);
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_broadcast_ss(x0 + k), b1 = _mm256_broadcast_ss(x1 + k), b2 = _mm256_broadcast_ss(x2 + k);
#define FORKLLM_FMA(m, j)                                                                \
  if constexpr (m < MB && j < NP) {                                                      \
    const float* pg = P + 2 * j * stride + k * 16;                                       \
    if constexpr (stream && m == 0) {                                                    \
      _mm_prefetch(reinterpret_cast<const char*>(pg + kAhead * 16), _MM_HINT_T0);        \
      _mm_prefetch(reinterpret_cast<const char*>(pg + stride + kAhead * 16), _MM_HINT_T0); \
    }                                                                                    \
    g##m##j##0 = _mm256_fmadd_ps(b##m, _mm256_loadu_ps(pg), g##m##j##0);                 \
    g##m##j##1 = _mm256_fmadd_ps(b##m, _mm256_loadu_ps(pg + 8), g##m##j##1);             \
    u##m##j##0 = _mm256_fmadd_ps(b##m, _mm256_loadu_ps(pg + stride), u##m##j##0);        \
    u##m##j##1 = _mm256_fmadd_ps(b##m, _mm256_loadu_ps(pg + stride + 8), u##m##j##1);    \
  }
    FORKLLM_ALL(FORKLLM_FMA)
#undef FORKLLM_FMA
  }
#define FORKLLM_STORE(m, j)                                                                             \
  if constexpr (m < MB && j < NP) {                                                                     \
    float* out = y + m * I + n0 + 16 * j;                                                               \
    _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_mul_ps(g##m##j##0, sigmoid256(g##m##j##0)), u##m##j##0));     \
    _mm256_storeu_ps(out + 8, _mm256_mul_ps(_mm256_mul_ps(g##m##j##1, sigmoid256(g##m##j##1)), u##m##j##1)); \
  }
  FORKLLM_ALL(FORKLLM_STORE)
#undef FORKLLM_STORE
#undef FORKLLM_ALL
#undef FORKLLM_PAIRS
}

// Blocks [b, e) in groups of G (then 2, then 1) given to run(integral_constant<G>, first block):
// a thread's share is split this way, so no thread gets a whole group more than the other.
template <int G, typename Run>
inline void in_groups(int64_t b, int64_t e, Run&& run) {
  for (; b + G <= e; b += G) run(std::integral_constant<int, G>{}, b);
  if constexpr (G > 2) in_groups<2>(b, e, run);
  else if constexpr (G == 2) in_groups<1>(b, e, run);
}
#undef FORKLLM_ROWS
#endif

}  // namespace

bool packed_f32_supported() {
#ifdef FORKLLM_PACKED_F32
  return true;
#else
  return false;
#endif
}

// x [M, K] float32 contiguous; P [ceil(N/16), K, 16] float32 from forkllm.kernels.pack_weight.
torch::Tensor packed_linear_f32(const torch::Tensor& x, const torch::Tensor& P, int64_t N,
                                const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(packed_f32_supported(), "packed_linear: float32 needs AVX2 + FMA (and is not used with AVX-512)");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "packed_linear: expected contiguous float32 x [M, K]");
  TORCH_CHECK(P.dim() == 3 && P.is_contiguous() && P.scalar_type() == torch::kFloat && P.size(2) == 16 &&
                  P.size(1) == x.size(1) && (N + 15) / 16 == P.size(0),
              "packed_linear: P must be the packed [ceil(N/16), K, 16] weight for x's K and N");
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->numel() == N && bias->is_contiguous() && bias->scalar_type() == torch::kFloat),
              "packed_linear: bias must be a contiguous float32 [N]");
  const int64_t M = x.size(0);
  auto y = torch::empty({M, N}, x.options());
#ifdef FORKLLM_PACKED_F32
  if (M == 0) return y;
  const int64_t K = x.size(1), NB = P.size(0);
  const float* xp = x.data_ptr<float>();
  const float* pp = P.data_ptr<float>();
  const float* bp = has_bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t full = N / 16;  // blocks with 16 real outputs
  auto wide = [&](auto rows, auto blocks) {
    constexpr int R = decltype(rows)::value;
    at::parallel_for(0, full, 1, [&](int64_t b, int64_t e) {
      in_groups<decltype(blocks)::value>(b, e, [&](auto g, int64_t blk) {
        wide_tile<R, decltype(g)::value>(xp, K, pp + blk * K * 16, bp, N, blk * 16, yp);
      });
    });
    if (full < NB) tile<R, false>(xp, K, pp + full * K * 16, bp, N, full * 16, yp);  // N % 16 outputs
  };
  if (M == 1) return wide(std::integral_constant<int, 1>{}, std::integral_constant<int, 4>{}), y;
  if (M == 2) return wide(std::integral_constant<int, 2>{}, std::integral_constant<int, 3>{}), y;
  if (M == 3) return wide(std::integral_constant<int, 3>{}, std::integral_constant<int, 2>{}), y;
  if (M <= 8) {  // pairs of rows over 3 blocks each; the pairs after the first find them in L1/L2
    at::parallel_for(0, full, 1, [&](int64_t b, int64_t e) {
      in_groups<3>(b, e, [&](auto g, int64_t blk) {
        constexpr int G = decltype(g)::value;
        int64_t m = 0;
        for (; m + 2 <= M; m += 2) wide_tile<2, G>(xp + m * K, K, pp + blk * K * 16, bp, N, blk * 16, yp + m * N);
        if (m < M) wide_tile<1, G>(xp + m * K, K, pp + blk * K * 16, bp, N, blk * 16, yp + m * N);
      });
    });
    if (full < NB)
      row_tiles<kTile>(M, [&](auto rows, auto first, int64_t m) {
        tile<decltype(rows)::value, false>(xp + m * K, K, pp + full * K * 16, bp, N, full * 16, yp + m * N);
      });
    return y;
  }
  at::parallel_for(0, NB, 1, [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk)
      row_tiles<kTile>(M, [&](auto rows, auto first, int64_t m) {
        tile<decltype(rows)::value, decltype(first)::value>(xp + m * K, K, pp + blk * K * 16, bp, N, blk * 16,
                                                             yp + m * N);
      });
  });
#endif
  return y;
}

// silu(x @ Wg^T) * (x @ Wu^T) [M, I] in float32 from P = pack_gate_up(Wg, Wu) [2I/16, K, 16].
torch::Tensor packed_silu_linear_f32(const torch::Tensor& x, const torch::Tensor& P, int64_t I) {
  TORCH_CHECK(packed_f32_supported(), "packed_silu_linear: float32 needs AVX2 + FMA (and is not used with AVX-512)");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "packed_silu_linear: expected contiguous float32 x [M, K]");
  TORCH_CHECK(I % 16 == 0 && P.dim() == 3 && P.is_contiguous() && P.scalar_type() == torch::kFloat &&
                  P.size(0) == 2 * I / 16 && P.size(2) == 16 && P.size(1) == x.size(1),
              "packed_silu_linear: P must be pack_gate_up's [2I/16, K, 16] for x's K");
  const int64_t M = x.size(0);
  auto y = torch::empty({M, I}, x.options());
#ifdef FORKLLM_PACKED_F32
  if (M == 0) return y;
  const int64_t K = x.size(1);
  const float* xp = x.data_ptr<float>();
  const float* pp = P.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, I / 16, 1, [&](int64_t b, int64_t e) {
    if (M == 1) {
      in_groups<3>(b, e, [&](auto np, int64_t i) {
        silu_tile<1, decltype(np)::value, false>(xp, K, pp + i * 2 * K * 16, I, i * 16, yp);
      });
      return;
    }
    for (int64_t i = b; i < e; ++i)
      row_tiles<3>(M, [&](auto rows, auto first, int64_t m) {
        silu_tile<decltype(rows)::value, 1, decltype(first)::value>(xp + m * K, K, pp + i * 2 * K * 16, I, i * 16,
                                                                     yp + m * I);
      });
  });
#endif
  return y;
}
