// y[M, N] = x[M, K] @ w[N, K]^T (+ bias) in bf16 for any M, on weights repacked once at load into
// the layout vdpbf16ps wants: P[N/16][K/2][16][2], so one 64-byte load holds 16 outputs x one
// pair of k, and each x row contributes its (k, k+1) pair by a 32-bit broadcast. A register tile
// of 8 rows x 48 outputs is 24 float32 accumulators fed by 3 weight loads and 8 broadcasts per
// 24 vdpbf16ps, with no horizontal reductions. On a 2-core Zen 4 (AVX512-BF16, no AMX) this runs
// at the weights' streaming rate for decode batches (oneDNN's bf16 GEMM reads them at ~15 GB/s
// below 16 rows) and at 0.85-0.9 of the measured bf16 peak from ~128 rows (oneDNN: 0.7-0.8).
// CPUs with AMX keep oneDNN, which uses the tile unit.
// A block's first row tile streams its weights from memory; meanwhile nothing else would be in
// flight, so each thread prefetches its next block during the current one (0.85 -> 0.95 of peak on
// the decoder's matmuls at 128 rows). float32 outputs (the logits, 25 MB at 128 rows) are written
// with streaming stores: no read-for-ownership of lines that are overwritten whole.
#include "common.h"
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>

namespace {

#if defined(__AVX512BF16__) && !defined(__AMX_BF16__)
#define FORKLLM_PACKED_GEMM 1

constexpr int kRows = 8;    // x rows per register tile
constexpr int kBlocks = 3;  // 16-output weight blocks per register tile

static inline int32_t pair_at(const c10::BFloat16* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// The weight block a thread runs after the current one (`lines` cache lines from `next`), handed
// out to the current block's row tiles in equal slices: each tile prefetches one line per k step.
struct NextBlock {
  const char* next;
  int64_t lines, per, done = 0;
  NextBlock(const char* nx, int64_t nl, int64_t tiles) : next(nx), lines(nx ? nl : 0), per((lines + tiles - 1) / tiles) {}
  std::pair<const char*, int64_t> slice() {
    const int64_t n = std::max<int64_t>(0, std::min<int64_t>(per, lines - done));
    const char* p = next ? next + done * 64 : nullptr;
    done += n;
    return {p, n};
  }
};

// Runs tile(rows, m, first, prefetch lines, count) over the row tiles of M rows: full tiles of T
// rows, then one of the remaining M % T (rows is a std::integral_constant, so each size is its
// own register-tiled instantiation), each with its slice of the next block's prefetch.
template <int T, typename Tile>
static void row_tiles(int64_t M, const char* next, int64_t next_lines, Tile&& tile) {
  NextBlock nb(next, next_lines, (M + T - 1) / T);
  int64_t m = 0;
  for (; m + T <= M; m += T) {
    const auto [p, n] = nb.slice();
    tile(std::integral_constant<int, T>{}, m, m == 0, p, n);
  }
  const bool first = m == 0;
  const auto [p, n] = nb.slice();
  switch (M - m) {
#define FORKLLM_REST(r)                                                                  \
  case r:                                                                                \
    if constexpr (r < T) tile(std::integral_constant<int, r>{}, m, first, p, n);         \
    break;
    FORKLLM_REST(1) FORKLLM_REST(2) FORKLLM_REST(3) FORKLLM_REST(4) FORKLLM_REST(5) FORKLLM_REST(6)
    FORKLLM_REST(7) FORKLLM_REST(8) FORKLLM_REST(9) FORKLLM_REST(10) FORKLLM_REST(11)
#undef FORKLLM_REST
  }
}

// One tile: MB rows of x against NB 16-output blocks of P, over every k pair. `prefetch`: pull
// the weights ahead while streaming them the first time (later tiles find them in L1/L2).
template <int MB, int NB, typename OutT>
static inline void tile(const c10::BFloat16* __restrict x, int64_t K, const c10::BFloat16* __restrict P, int64_t K2,
                        const c10::BFloat16* __restrict bias, int64_t N, int64_t n0, OutT* __restrict y,
                        bool prefetch, const char* pf, int64_t npf) {
  __m512 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
  const int64_t stride = K2 * 32;  // elements per 16-output block
  for (int64_t p = 0; p < K2; ++p) {
    if (p < npf) _mm_prefetch(pf + p * 64, _MM_HINT_T0);
    __m512bh wv[NB];
    for (int j = 0; j < NB; ++j) {
      if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(P + j * stride + (p + 16) * 32), _MM_HINT_T0);
      wv[j] = as_bh(_mm512_loadu_si512(P + j * stride + p * 32));
    }
    for (int m = 0; m < MB; ++m) {
      const __m512bh xb = as_bh(_mm512_set1_epi32(pair_at(x + m * K + 2 * p)));
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xb, wv[j]);
    }
  }
  for (int j = 0; j < NB; ++j) {
    const int64_t n = n0 + 16 * j;
    const __mmask16 k = tail(N - n);
    const __m512 b = bias ? ld(bias + n, k) : _mm512_setzero_ps();
    if constexpr (std::is_same_v<OutT, float>) {
      if (k == (__mmask16)0xffff && (reinterpret_cast<uintptr_t>(y + n) & 63) == 0 && (N & 15) == 0) {
        for (int m = 0; m < MB; ++m) _mm512_stream_ps(y + m * N + n, _mm512_add_ps(acc[m][j], b));
        continue;
      }
    }
    for (int m = 0; m < MB; ++m) st(y + m * N + n, _mm512_add_ps(acc[m][j], b), k);
  }
}

// Every row of x against NB blocks starting at output n0. `next` (npf cache lines) is the weight
// block the thread runs after this one: its lines are prefetched a few per k step across this
// block's row tiles, so the next block's first tile does not wait on memory (the first tile of
// a block streams its weights; the other tiles find them in L2).
template <int NB, typename OutT>
static void column(const c10::BFloat16* x, int64_t M, int64_t K, const c10::BFloat16* P, int64_t K2,
                   const c10::BFloat16* bias, int64_t N, int64_t n0, OutT* y, const char* next, int64_t next_lines) {
  constexpr int T = NB == kBlocks ? kRows : 12;  // a lone block has registers for 12 rows
  row_tiles<T>(M, next, next_lines, [&](auto rows, int64_t m, bool first, const char* p, int64_t n) {
    tile<decltype(rows)::value, NB, OutT>(x + m * K, K, P, K2, bias, N, n0, y + m * N, first, p, n);
  });
}

// SwiGLU MLP input: gate and up packed block-interleaved (gate block i, then up block i; see
// forkllm.kernels.pack_gate_up), so one tile holds both halves of 16 outputs and writes
// silu(gate) * up straight from the float32 accumulators: no [M, 2I] intermediate, no second
// pass, one bf16 rounding. MB rows x (gate, up) = 2 * MB accumulators.
template <int MB>
static inline void silu_tile(const c10::BFloat16* __restrict x, int64_t K, const c10::BFloat16* __restrict P,
                             int64_t K2, int64_t I, int64_t n0, c10::BFloat16* __restrict y, bool prefetch,
                             const char* pf, int64_t npf) {
  __m512 g[MB], u[MB];
  for (int m = 0; m < MB; ++m) g[m] = u[m] = _mm512_setzero_ps();
  const c10::BFloat16* Pu = P + K2 * 32;
  for (int64_t p = 0; p < K2; ++p) {
    if (p < npf) _mm_prefetch(pf + p * 64, _MM_HINT_T0);
    if (prefetch) {
      _mm_prefetch(reinterpret_cast<const char*>(P + (p + 16) * 32), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(Pu + (p + 16) * 32), _MM_HINT_T0);
    }
    const __m512bh wg = as_bh(_mm512_loadu_si512(P + p * 32)), wu = as_bh(_mm512_loadu_si512(Pu + p * 32));
    for (int m = 0; m < MB; ++m) {
      const __m512bh xb = as_bh(_mm512_set1_epi32(pair_at(x + m * K + 2 * p)));
      g[m] = _mm512_dpbf16_ps(g[m], xb, wg);
      u[m] = _mm512_dpbf16_ps(u[m], xb, wu);
    }
  }
  const __m512 one = _mm512_set1_ps(1.f);
  for (int m = 0; m < MB; ++m) {
    const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), g[m]))));
    st(y + m * I + n0, _mm512_mul_ps(_mm512_mul_ps(g[m], sig), u[m]), (__mmask16)0xffff);
  }
}

static void silu_column(const c10::BFloat16* x, int64_t M, int64_t K, const c10::BFloat16* P, int64_t K2, int64_t I,
                        int64_t n0, c10::BFloat16* y, const char* next, int64_t next_lines) {
  row_tiles<12>(M, next, next_lines, [&](auto rows, int64_t m, bool first, const char* p, int64_t n) {
    silu_tile<decltype(rows)::value>(x + m * K, K, P, K2, I, n0, y + m * I, first, p, n);
  });
}
#endif

}  // namespace

torch::Tensor packed_linear_f32(const torch::Tensor& x, const torch::Tensor& P, int64_t N,
                                const c10::optional<torch::Tensor>& bias);
torch::Tensor packed_silu_linear_f32(const torch::Tensor& x, const torch::Tensor& P, int64_t I);

bool packed_linear_supported() {
#ifdef FORKLLM_PACKED_GEMM
  return true;
#else
  return false;
#endif
}

// x [M, K] bf16 contiguous; P [ceil(N/16), K/2, 16, 2] bf16 from forkllm.kernels.pack_weight (float32 x:
// packed_f32.cpp's layout and kernel);
// bias [N] or none. float_out: y in float32 (the logits: no bf16 rounding, no conversion pass).
torch::Tensor packed_linear(torch::Tensor x, torch::Tensor P, int64_t N, c10::optional<torch::Tensor> bias,
                            bool float_out) {
  if (x.scalar_type() == torch::kFloat) return packed_linear_f32(x, P, N, bias);  // csrc/packed_f32.cpp
  TORCH_CHECK(packed_linear_supported(), "packed_linear: needs AVX512-BF16 (and is not used with AMX)");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kBFloat16,
              "packed_linear: expected contiguous bfloat16 x [M, K]");
  TORCH_CHECK(P.dim() == 4 && P.is_contiguous() && P.scalar_type() == torch::kBFloat16 && P.size(2) == 16 &&
                  P.size(3) == 2 && 2 * P.size(1) == x.size(1) && (N + 15) / 16 == P.size(0),
              "packed_linear: P must be the packed [ceil(N/16), K/2, 16, 2] weight for x's K and N");
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->numel() == N && bias->is_contiguous() && bias->scalar_type() == torch::kBFloat16),
              "packed_linear: bias must be a contiguous bfloat16 [N]");
  const int64_t M = x.size(0);
  auto y = torch::empty({M, N}, x.options().dtype(float_out ? torch::kFloat : torch::kBFloat16));
#ifdef FORKLLM_PACKED_GEMM
  if (M == 0) return y;
  const int64_t K = x.size(1), K2 = P.size(1), NB16 = P.size(0);
  const auto* xp = x.data_ptr<c10::BFloat16>();
  const auto* pp = P.data_ptr<c10::BFloat16>();
  const c10::BFloat16* bp = has_bias ? bias->data_ptr<c10::BFloat16>() : nullptr;
  auto run = [&](auto* yp) {
    at::parallel_for(0, (NB16 + kBlocks - 1) / kBlocks, 1, [&](int64_t b, int64_t e) {
      for (int64_t g = b; g < e; ++g) {
        int64_t blk = kBlocks * g;
        if (blk + kBlocks <= NB16) {
          // the thread's next weight group (possibly a shorter last one), prefetched meanwhile
          const int64_t nblk = g + 1 < e ? std::min<int64_t>(kBlocks, NB16 - blk - kBlocks) : 0;
          const char* next = nblk > 0 ? reinterpret_cast<const char*>(pp + (blk + kBlocks) * K2 * 32) : nullptr;
          column<kBlocks>(xp, M, K, pp + blk * K2 * 32, K2, bp, N, blk * 16, yp, next, nblk * K2);
          continue;
        }
        for (; blk < NB16; ++blk) column<1>(xp, M, K, pp + blk * K2 * 32, K2, bp, N, blk * 16, yp, nullptr, 0);
      }
      _mm_sfence();  // streaming (non-temporal) stores of float outputs are visible before the join
    });
  };
  if (float_out) run(y.data_ptr<float>());
  else run(y.data_ptr<c10::BFloat16>());
#endif
  return y;
}

// silu(x @ Wg^T) * (x @ Wu^T) [M, I] in bf16, from P = pack_gate_up(Wg, Wu) [2I/16, K/2, 16, 2]
// (I a multiple of 16).
torch::Tensor packed_silu_linear(torch::Tensor x, torch::Tensor P, int64_t I) {
  if (x.scalar_type() == torch::kFloat) return packed_silu_linear_f32(x, P, I);
  TORCH_CHECK(packed_linear_supported(), "packed_silu_linear: needs AVX512-BF16 (and is not used with AMX)");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kBFloat16,
              "packed_silu_linear: expected contiguous bfloat16 x [M, K]");
  TORCH_CHECK(I % 16 == 0 && P.dim() == 4 && P.is_contiguous() && P.scalar_type() == torch::kBFloat16 &&
                  P.size(0) == 2 * I / 16 && P.size(2) == 16 && P.size(3) == 2 && 2 * P.size(1) == x.size(1),
              "packed_silu_linear: P must be pack_gate_up's [2I/16, K/2, 16, 2] for x's K");
  const int64_t M = x.size(0);
  auto y = torch::empty({M, I}, x.options());
#ifdef FORKLLM_PACKED_GEMM
  if (M == 0) return y;
  const int64_t K = x.size(1), K2 = P.size(1), pairs = I / 16;
  const auto* xp = x.data_ptr<c10::BFloat16>();
  const auto* pp = P.data_ptr<c10::BFloat16>();
  auto* yp = y.data_ptr<c10::BFloat16>();
  at::parallel_for(0, pairs, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const char* next = i + 1 < e ? reinterpret_cast<const char*>(pp + (i + 1) * 2 * K2 * 32) : nullptr;
      silu_column(xp, M, K, pp + i * 2 * K2 * 32, K2, I, i * 16, yp, next, next ? 2 * K2 : 0);
    }
  });
#endif
  return y;
}
