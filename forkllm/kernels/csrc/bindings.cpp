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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged attention for single-query rows over [start, ctx)");
  m.def("paged_decode_supports", &paged_decode_supports, "whether (head_dim, group) is compiled in");
  m.def("shared_prefix_attention", &shared_prefix_attention, "many query rows over one shared run of pages");
  m.def("shared_prefix_decode_", &shared_prefix_decode_, "complete decode attention of grouped rows, in place");
  m.def("shared_prefix_supported", &shared_prefix_supported, "whether head_dim is compiled in");
  m.def("softmax_lse_", &softmax_lse_, "in-place softmax with masking past valid lengths; returns lse");
  m.def("sample_filtered", &sample_filtered, "temperature + min-p + top-k/top-p + inverse-CDF draw per row");
  m.def("merge_attention_", &merge_attention_, "merge two partial attentions through their lse, in place");
  m.def("add_rms_norm_", &add_rms_norm_, "x += delta (optional, in place); returns rms_norm(x) * w");
  m.def("silu_mul", &silu_mul, "silu(gate) * up from a fused [T, 2I] gate_up");
  m.def("rope_", &rope_, "rotary embedding in place from float32 cos/sin tables");
  m.def("kv_write_", &kv_write_, "the step's keys and values into their cache slots (strided k, v allowed)");
  m.def("small_linear", &small_linear, "x @ w.T (+ bias) for 1..8 rows, multi-threaded");
  m.def("packed_linear", &packed_linear, "bf16 or float32 x @ w.T (+ bias), any rows, w packed by pack_weight", py::arg("x"),
        py::arg("P"), py::arg("N"), py::arg("bias"), py::arg("float_out") = false);
  m.def("packed_silu_linear", &packed_silu_linear, "silu(x @ wg.T) * (x @ wu.T), bf16, weights from pack_gate_up");
  m.def("apply_token_bitmask_", &apply_token_bitmask_,
        "-inf where a grammar's token bitmask row disallows, in place (rows: logits row of each mask row)",
        py::arg("logits"), py::arg("bitmask"), py::arg("rows") = py::none());
  m.def("packed_linear_supported", &packed_linear_supported, "whether packed_linear is compiled in (AVX512-BF16, no AMX)");
  m.def("packed_f32_supported", &packed_f32_supported, "whether packed_linear takes float32 (AVX2 + FMA, no AVX-512)");
  m.def("quant_linear", &quant_linear, "x @ W.T on GGUF Q4_0 / Q4_1 / Q8_0 weight blocks, repacked (int8 activations)");
  m.def("decode_stack", &decode_stack,
        "a decode-only step's decoder layers and final norm in one call (the layers' kernels, GIL released)",
        py::call_guard<py::gil_scoped_release>());
  m.def("quant_linear_vnni", &quant_linear_vnni, "whether quant_linear runs the AVX512-VNNI kernel (else scalar C++)");
}
