#include "common.h"

#include <vector>

std::vector<torch::Tensor> paged_decode(torch::Tensor q, torch::Tensor kc, torch::Tensor vc, torch::Tensor tables,
                                        c10::optional<torch::Tensor> starts, torch::Tensor ctx_lens,
                                        int64_t block_size, double scale, bool want_lse);
bool paged_decode_supports(int64_t d, int64_t g);
torch::Tensor small_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged attention for single-query rows over [start, ctx)");
  m.def("paged_decode_supports", &paged_decode_supports, "whether (head_dim, group) is compiled in");
  m.def("small_linear", &small_linear, "x @ w.T (+ bias) for 1..8 rows, multi-threaded");
}
