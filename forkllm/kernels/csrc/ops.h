// Every kernel entry point, for the Python bindings (bindings.cpp) and for C++ callers that chain
// kernels (decode_stack.cpp).
#pragma once
#include "common.h"

#include <vector>

std::vector<torch::Tensor> paged_decode(torch::Tensor q, torch::Tensor kc, torch::Tensor vc, torch::Tensor tables,
                                        c10::optional<torch::Tensor> starts, torch::Tensor ctx_lens,
                                        int64_t block_size, double scale, bool want_lse);
bool paged_decode_supports(int64_t d, int64_t g);
std::vector<torch::Tensor> shared_prefix_attention(torch::Tensor q, torch::Tensor kc, torch::Tensor vc,
                                                   torch::Tensor pages, torch::Tensor lens, torch::Tensor rows,
                                                   torch::Tensor offsets, int64_t block_size, double scale);
void shared_prefix_decode_(torch::Tensor out, torch::Tensor q, torch::Tensor kc, torch::Tensor vc,
                           torch::Tensor pages, torch::Tensor lens, torch::Tensor rows, torch::Tensor offsets,
                           torch::Tensor tables, torch::Tensor ctx_lens, int64_t block_size, double scale);
bool shared_prefix_supported(int64_t d);
torch::Tensor softmax_lse_(torch::Tensor scores, torch::Tensor valid);
void merge_attention_(torch::Tensor out, torch::Tensor s_lse, torch::Tensor rows, torch::Tensor p_out,
                      torch::Tensor p_lse);
torch::Tensor sample_filtered(torch::Tensor logits, torch::Tensor temps, torch::Tensor top_k, torch::Tensor top_p,
                              torch::Tensor min_p, torch::Tensor u);
torch::Tensor add_rms_norm_(torch::Tensor x, c10::optional<torch::Tensor> delta, torch::Tensor w, double eps);
torch::Tensor silu_mul(torch::Tensor gate_up);
void rope_(torch::Tensor x, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin);
void kv_write_(torch::Tensor cache, torch::Tensor slots, torch::Tensor k, torch::Tensor v);
torch::Tensor small_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);
bool packed_linear_supported();
bool packed_f32_supported();
torch::Tensor quant_linear(torch::Tensor x, torch::Tensor w, int64_t qtype, int64_t N,
                           c10::optional<torch::Tensor> bias, bool float_out);
bool quant_linear_vnni();
torch::Tensor packed_silu_linear(torch::Tensor x, torch::Tensor P, int64_t I);
torch::Tensor packed_linear(torch::Tensor x, torch::Tensor P, int64_t N, c10::optional<torch::Tensor> bias,
                            bool float_out);

torch::Tensor decode_stack(torch::Tensor x, std::vector<torch::Tensor> norms, std::vector<torch::Tensor> weights,
                           std::vector<torch::Tensor> biases, std::vector<int64_t> kinds,
                           std::vector<int64_t> qtypes, std::vector<int64_t> ns, std::vector<torch::Tensor> caches,
                           torch::Tensor positions, torch::Tensor cos, torch::Tensor sin, torch::Tensor slots,
                           torch::Tensor tables, c10::optional<torch::Tensor> starts, torch::Tensor ctx_lens,
                           int64_t num_layers, int64_t hq, int64_t hkv, int64_t d, int64_t block_size, double scale,
                           double eps);

void apply_token_bitmask_(torch::Tensor logits, torch::Tensor bitmask, c10::optional<torch::Tensor> rows);
