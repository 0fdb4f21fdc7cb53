// The decoder stack of a decode-only step in one call. When every row of a step attends its own
// pages through the paged kernel (no prefill chunk, shared-prefix group or key segment this step),
// each layer is: norm, q/k/v, rotary, cache write, attention, o, norm, gate/up, down. The Python
// layers make ~10 calls a layer for that (30 layers: ~1.3 ms of a 7 ms one-stream step on Zen 3);
// here the same kernels run in the same order on the same inputs, so the results are the same
// bits, and the GIL is released for the whole pass.
#include "ops.h"

namespace {

// How a layer's weight is multiplied (models/llama.py `DecodeStack.add` picks it): the GGUF block
// kernel, the packed GEMM, the GEMV in slices of 8 rows (what `gemv_rows` does), or the packed
// GEMM with silu(gate) * up fused (gate/up only; n is then the intermediate size).
enum Kind : int64_t { QUANT = 0, PACKED = 1, GEMV = 2, PACKED_SILU = 3 };
constexpr int64_t GEMV_ROWS = 8;  // models/llama.py SMALL_BATCH_ROWS

struct Linears {
  const std::vector<torch::Tensor>& w;
  const std::vector<torch::Tensor>& bias;  // numel 0: no bias
  const std::vector<int64_t>& kind;
  const std::vector<int64_t>& qtype;
  const std::vector<int64_t>& n;

  c10::optional<torch::Tensor> b(size_t i) const {
    return bias[i].numel() ? c10::optional<torch::Tensor>(bias[i]) : c10::nullopt;
  }

  torch::Tensor apply(size_t i, const torch::Tensor& x) const {
    switch (kind[i]) {
      case QUANT:
        return quant_linear(x, w[i], qtype[i], n[i], b(i), false);
      case PACKED:
        return packed_linear(x, w[i], n[i], b(i), false);
      case GEMV: {
        const int64_t t = x.size(0);
        if (t <= GEMV_ROWS) return small_linear(x, w[i], b(i));
        std::vector<torch::Tensor> parts;
        for (int64_t r = 0; r < t; r += GEMV_ROWS)
          parts.push_back(small_linear(x.narrow(0, r, std::min(GEMV_ROWS, t - r)), w[i], b(i)));
        return torch::cat(parts);
      }
      default:
        TORCH_CHECK(false, "decode_stack: linear ", i, " has kind ", kind[i]);
    }
  }

  torch::Tensor silu(size_t i, const torch::Tensor& x) const {
    if (kind[i] == PACKED_SILU) return packed_silu_linear(x, w[i], n[i]);
    return silu_mul(apply(i, x));
  }
};

}  // namespace

// x [T, H]: the rows' embeddings (the residual stream, updated in place). Per layer l: norms
// [2l, 2l+1] and the linears [4l .. 4l+3] = qkv, o, gate/up, down; norms.back() is the final norm.
// caches[l] [2, Hkv, slots, D]. Returns the final-normed hidden states of the first num_layers.
torch::Tensor decode_stack(torch::Tensor x, std::vector<torch::Tensor> norms, std::vector<torch::Tensor> weights,
                           std::vector<torch::Tensor> biases, std::vector<int64_t> kinds,
                           std::vector<int64_t> qtypes, std::vector<int64_t> ns, std::vector<torch::Tensor> caches,
                           torch::Tensor positions, torch::Tensor cos, torch::Tensor sin, torch::Tensor slots,
                           torch::Tensor tables, c10::optional<torch::Tensor> starts, torch::Tensor ctx_lens,
                           int64_t num_layers, int64_t hq, int64_t hkv, int64_t d, int64_t block_size, double scale,
                           double eps) {
  const size_t L = static_cast<size_t>(num_layers);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "decode_stack: contiguous x [T, H] expected");
  TORCH_CHECK(norms.size() >= 2 * L + 1 && caches.size() >= L, "decode_stack: ", num_layers, " layers, ",
              norms.size(), " norms, ", caches.size(), " caches");
  TORCH_CHECK(weights.size() >= 4 * L && biases.size() == weights.size() && kinds.size() == weights.size() &&
                  qtypes.size() == weights.size() && ns.size() == weights.size(),
              "decode_stack: one weight, bias, kind, qtype and size per linear");
  const Linears lin{weights, biases, kinds, qtypes, ns};
  const int64_t t = x.size(0), qs = hq * d, kvs = hkv * d;
  c10::optional<torch::Tensor> delta;
  for (size_t l = 0; l < L; ++l) {
    torch::Tensor h = add_rms_norm_(x, delta, norms[2 * l], eps);
    const torch::Tensor qkv = lin.apply(4 * l, h);
    const torch::Tensor qk = qkv.narrow(1, 0, qs + kvs).view({t, hq + hkv, d});  // q and k rotate together
    rope_(qk, positions, cos, sin);
    const torch::Tensor& cache = caches[l];
    kv_write_(cache, slots, qk.narrow(1, hq, hkv), qkv.narrow(1, qs + kvs, kvs).view({t, hkv, d}));
    const torch::Tensor o = paged_decode(qk.narrow(1, 0, hq).contiguous(), cache[0], cache[1], tables, starts,
                                         ctx_lens, block_size, scale, false)[0];
    h = add_rms_norm_(x, lin.apply(4 * l + 1, o.view({t, qs})), norms[2 * l + 1], eps);
    delta = lin.apply(4 * l + 3, lin.silu(4 * l + 2, h));
  }
  return add_rms_norm_(x, delta, norms.back(), eps);
}
