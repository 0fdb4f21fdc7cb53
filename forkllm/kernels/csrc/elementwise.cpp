// The decoder's small elementwise ops, one pass each: residual add + RMSNorm, SiLU-gated MLP
// activation, rotary embedding in place. At decode batch sizes PyTorch spends more time
// dispatching and re-reading these [rows, hidden] tensors (several ops each) than computing.
// All math in float32, one rounding to the tensor dtype per stored value.
#include "common.h"

#include <algorithm>
#include <cstring>

// float32, bf16 and fp16 tensors (the model dtypes).
#define FORKLLM_DISPATCH(TYPE, NAME, ...)                                                    \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                    \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)             \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace {

#if defined(__AVX512F__)
template <typename T>
void add_rms_row(T* x, const T* delta, const T* w, T* out, int64_t H, float eps) {
  __m512 ss = _mm512_setzero_ps();
  if (delta) {  // x += delta, rounded to T as a PyTorch add would store it
    for (int64_t j = 0; j < H; j += 16) {
      const __mmask16 k = tail(H - j);
      st(x + j, _mm512_add_ps(ld(x + j, k), ld(delta + j, k)), k);
    }
  }
  for (int64_t j = 0; j < H; j += 16) {
    const __m512 v = ld(x + j, tail(H - j));
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / (float)H + eps));
  for (int64_t j = 0; j < H; j += 16) {
    const __mmask16 k = tail(H - j);
    st(out + j, _mm512_mul_ps(_mm512_mul_ps(ld(x + j, k), inv), ld(w + j, k)), k);
  }
}

template <typename T>
void silu_mul_row(const T* g, const T* u, T* out, int64_t I) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t j = 0; j < I; j += 16) {
    const __mmask16 k = tail(I - j);
    const __m512 gv = ld(g + j, k);
    const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
    st(out + j, _mm512_mul_ps(_mm512_mul_ps(gv, sig), ld(u + j, k)), k);
  }
}

template <typename T>
void rope_head(T* x, const float* c, const float* s, int64_t half) {
  for (int64_t j = 0; j < half; j += 16) {
    const __mmask16 k = tail(half - j);
    const __m512 x1 = ld(x + j, k), x2 = ld(x + half + j, k);
    const __m512 cv = _mm512_maskz_loadu_ps(k, c + j), sv = _mm512_maskz_loadu_ps(k, s + j);
    st(x + j, _mm512_sub_ps(_mm512_mul_ps(x1, cv), _mm512_mul_ps(x2, sv)), k);
    st(x + half + j, _mm512_add_ps(_mm512_mul_ps(x2, cv), _mm512_mul_ps(x1, sv)), k);
  }
}
#else
template <typename T>
void add_rms_row(T* x, const T* delta, const T* w, T* out, int64_t H, float eps) {
  float ss = 0.f;
  for (int64_t j = 0; j < H; ++j) {
    if (delta) x[j] = static_cast<T>(static_cast<float>(x[j]) + static_cast<float>(delta[j]));
    const float v = static_cast<float>(x[j]);
    ss += v * v;
  }
  const float inv = 1.f / std::sqrt(ss / (float)H + eps);
  for (int64_t j = 0; j < H; ++j) out[j] = static_cast<T>(static_cast<float>(x[j]) * inv * static_cast<float>(w[j]));
}

template <typename T>
void silu_mul_row(const T* g, const T* u, T* out, int64_t I) {
  for (int64_t j = 0; j < I; ++j) {
    const float gv = static_cast<float>(g[j]);
    out[j] = static_cast<T>(gv / (1.f + std::exp(-gv)) * static_cast<float>(u[j]));
  }
}

template <typename T>
void rope_head(T* x, const float* c, const float* s, int64_t half) {
  for (int64_t j = 0; j < half; ++j) {
    const float x1 = static_cast<float>(x[j]), x2 = static_cast<float>(x[half + j]);
    x[j] = static_cast<T>(x1 * c[j] - x2 * s[j]);
    x[half + j] = static_cast<T>(x2 * c[j] + x1 * s[j]);
  }
}
#endif

}  // namespace

// x [T, H] (rows contiguous) is the residual stream: x += delta in place when delta is given;
// returns rms_norm(x) * w as a new [T, H] tensor.
torch::Tensor add_rms_norm_(torch::Tensor x, c10::optional<torch::Tensor> delta, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && w.is_contiguous(), "add_rms_norm_: [T, H] rows expected");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "add_rms_norm_: weight dtype must match");
  const bool has_delta = delta.has_value() && delta->defined();
  if (has_delta)
    TORCH_CHECK(delta->sizes() == x.sizes() && delta->stride(1) == 1 && delta->scalar_type() == x.scalar_type(),
                "add_rms_norm_: delta must match x");
  const int64_t T = x.size(0), H = x.size(1);
  auto out = torch::empty({T, H}, x.options());
  FORKLLM_DISPATCH(x.scalar_type(), "add_rms_norm_", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dp = has_delta ? delta->data_ptr<scalar_t>() : nullptr;
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t xs = x.stride(0), ds = has_delta ? delta->stride(0) : 0;
    at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t)
        add_rms_row<scalar_t>(xp + t * xs, dp ? dp + t * ds : nullptr, wp, op + t * H, H, (float)eps);
    });
  });
  return out;
}

// gate_up [T, 2I] (rows contiguous) -> silu(gate) * up [T, I].
torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0, "silu_mul: [T, 2I] rows");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = torch::empty({T, I}, gate_up.options());
  FORKLLM_DISPATCH(gate_up.scalar_type(), "silu_mul", [&] {
    const scalar_t* gp = gate_up.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t gs = gate_up.stride(0);
    at::parallel_for(0, T, 8, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) silu_mul_row<scalar_t>(gp + t * gs, gp + t * gs + I, op + t * I, I);
    });
  });
  return out;
}

// x [T, H, D] (any token stride, heads and dims contiguous), rotated in place (NeoX / HF
// rotate_half layout) with rows `positions` of the float32 tables cos/sin [max_pos, D].
void rope_(torch::Tensor x, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), "rope_: [T, H, D] with contiguous heads");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat && sin.scalar_type() == torch::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous(),
              "rope_: float32 contiguous tables");
  const int64_t T = x.size(0), Hh = x.size(1), D = x.size(2), half = D / 2;
  const int64_t* pp = positions.data_ptr<int64_t>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  FORKLLM_DISPATCH(x.scalar_type(), "rope_", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t xs = x.stride(0);
    at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const float* c = cp + pp[t] * D;
        const float* s = sp + pp[t] * D;
        for (int64_t h = 0; h < Hh; ++h) rope_head<scalar_t>(xp + t * xs + h * D, c, s, half);
      }
    });
  });
}

// cache[0][h][slots[i]] = k[i][h], cache[1][h][slots[i]] = v[i][h]: the step's new keys and values
// into their pages. k and v may be strided views (heads of the fused qkv output); each head
// vector is one contiguous copy. index_copy_ does the same in ~45 us per call at 128 rows, mostly
// dispatch and stride handling, twice per layer.
void kv_write_(torch::Tensor cache, torch::Tensor slots, torch::Tensor k, torch::Tensor v) {
  TORCH_CHECK(cache.is_contiguous() && cache.dim() == 4 && cache.size(0) == 2, "kv_write_: cache [2, hkv, slots, d]");
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.stride(2) == 1 && v.stride(2) == 1, "kv_write_: k, v [t, hkv, d]");
  TORCH_CHECK(k.scalar_type() == cache.scalar_type() && v.scalar_type() == cache.scalar_type(), "kv_write_: dtype");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.is_contiguous(), "kv_write_: int64 slots");
  const int64_t t = k.size(0), hkv = cache.size(1), S = cache.size(2), d = cache.size(3);
  TORCH_CHECK(k.size(1) == hkv && k.size(2) == d && v.sizes() == k.sizes() && slots.size(0) == t,
              "kv_write_: shape mismatch");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < t; ++i) TORCH_CHECK(sp[i] >= 0 && sp[i] < S, "kv_write_: slot out of range");
  const int64_t es = cache.element_size(), row = d * es;
  char* cp = static_cast<char*>(cache.data_ptr());
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  const int64_t ks0 = k.stride(0) * es, ks1 = k.stride(1) * es, vs0 = v.stride(0) * es, vs1 = v.stride(1) * es;
  at::parallel_for(0, t, 256, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      for (int64_t h = 0; h < hkv; ++h) {
        std::memcpy(cp + ((0 * hkv + h) * S + sp[i]) * row, kp + i * ks0 + h * ks1, row);
        std::memcpy(cp + ((1 * hkv + h) * S + sp[i]) * row, vp + i * vs0 + h * vs1, row);
      }
  });
}
