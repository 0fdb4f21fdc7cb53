#include "ops.h"

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
