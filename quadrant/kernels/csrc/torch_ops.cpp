// The native CPU kernels (tiled_gemm.c, paged_decode.c) as C++ kernels of the quadrant:: torch ops, so a
// compiled decode step (torch.compile with Inductor's C++ wrapper) calls them through the dispatcher
// alone: a kernel registered from Python costs ~4.5 us more per call (GIL, argument boxing, ctypes),
// and a decode step makes ~150 such calls. The C library is built and loaded apart (ctypes); its
// functions' addresses come in through quadrant_set_kernels before any op runs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

extern "C" {
typedef int (*q4_gemm_fn)(const float *, int64_t, int64_t, const uint8_t *, const uint16_t *, int64_t, const float *,
                          float *);
typedef int (*q8_gemm_fn)(const float *, int64_t, int64_t, const uint8_t *, const float *, int64_t, const float *,
                          float *);
typedef int (*paged_decode_fn)(const float *, const float *, const float *, const int32_t *, int64_t,
                               const int32_t *, const int32_t *, const int64_t *, int64_t, int64_t, int64_t, int64_t,
                               int64_t, float, float *);

static q4_gemm_fn q4_gemm = nullptr;
static q8_gemm_fn q8_gemm = nullptr;
static paged_decode_fn paged_decode_f32 = nullptr;
static int64_t tile_rows = 0;  // rows per tile of the GEMMs' weight layouts

void quadrant_set_kernels(void *q4, void *q8, void *paged, int tile) {
    tile_rows = tile;
    q4_gemm = reinterpret_cast<q4_gemm_fn>(q4);
    q8_gemm = reinterpret_cast<q8_gemm_fn>(q8);
    paged_decode_f32 = reinterpret_cast<paged_decode_fn>(paged);
}
}

namespace {

// x [..., K] -> x2 [M, K] fp32 contiguous, the output's shape [..., N]
std::pair<at::Tensor, std::vector<int64_t>> rows_of(const at::Tensor &x, int64_t k, int64_t n) {
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = n;
    return {x.reshape({-1, k}).to(at::kFloat).contiguous(), shape};
}

const float *bias_ptr(const std::optional<at::Tensor> &bias) {
    return bias.has_value() ? bias->data_ptr<float>() : nullptr;
}

// Both weight layouts hold 4 bytes a row per chunk: codes [..., 4 * tile].
void check_tile(const at::Tensor &codes) {
    const int64_t tile = codes.size(-1) / 4;
    TORCH_CHECK(tile == tile_rows, "weights packed in tiles of ", tile, " rows; this machine's kernel takes ", tile_rows);
}

at::Tensor q4_mm(const at::Tensor &x, const at::Tensor &codes, const at::Tensor &scales,
                 const std::optional<at::Tensor> &bias, int64_t in_features, int64_t out_features) {
    TORCH_CHECK(q4_gemm != nullptr, "quadrant's native kernels are not loaded");
    check_tile(codes);
    auto [x2, shape] = rows_of(x, in_features, out_features);
    auto out = at::empty({x2.size(0), out_features}, x2.options());
    int rc = q4_gemm(x2.data_ptr<float>(), x2.size(0), in_features, codes.data_ptr<uint8_t>(),
                     reinterpret_cast<const uint16_t *>(scales.data_ptr()), out_features, bias_ptr(bias),
                     out.data_ptr<float>());
    TORCH_CHECK(rc == 0, "native GEMM: out of memory for its activation scratch");
    return out.view(shape);
}

at::Tensor q8_mm(const at::Tensor &x, const at::Tensor &codes, const at::Tensor &scale,
                 const std::optional<at::Tensor> &bias, int64_t in_features, int64_t out_features) {
    TORCH_CHECK(q8_gemm != nullptr, "quadrant's native kernels are not loaded");
    check_tile(codes);
    auto [x2, shape] = rows_of(x, in_features, out_features);
    auto out = at::empty({x2.size(0), out_features}, x2.options());
    int rc = q8_gemm(x2.data_ptr<float>(), x2.size(0), in_features, codes.data_ptr<uint8_t>(), scale.data_ptr<float>(),
                     out_features, bias_ptr(bias), out.data_ptr<float>());
    TORCH_CHECK(rc == 0, "native GEMM: out of memory for its activation scratch");
    return out.view(shape);
}

at::Tensor paged_decode(const at::Tensor &q, const at::Tensor &k_cache, const at::Tensor &v_cache,
                        const at::Tensor &block_tables, const at::Tensor &seq_lens, double scale,
                        const std::optional<at::Tensor> &tree_start, const std::optional<at::Tensor> &tree_mask) {
    TORCH_CHECK(paged_decode_f32 != nullptr, "quadrant's native kernels are not loaded");
    TORCH_CHECK(tree_start.has_value() == tree_mask.has_value(), "tree_start and tree_mask come together");
    auto qc = q.contiguous();
    auto tables = block_tables.to(at::kInt).contiguous();
    auto lens = seq_lens.to(at::kInt).contiguous();
    at::Tensor starts, bits;
    if (tree_start.has_value()) {
        starts = tree_start->to(at::kInt).contiguous();
        bits = tree_mask->to(at::kLong).contiguous();
    }
    auto out = at::empty_like(qc);
    int rc = paged_decode_f32(qc.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                              tables.data_ptr<int32_t>(), tables.size(1), lens.data_ptr<int32_t>(),
                              starts.defined() ? starts.data_ptr<int32_t>() : nullptr,
                              bits.defined() ? bits.data_ptr<int64_t>() : nullptr, qc.size(0), qc.size(1),
                              k_cache.size(1), k_cache.size(2), qc.size(2), static_cast<float>(scale),
                              out.data_ptr<float>());
    TORCH_CHECK(rc != 1, "native paged decode: out of memory for its score scratch");
    TORCH_CHECK(rc == 0, "native paged decode cannot take q ", qc.sizes(), " over a cache ", k_cache.sizes(),
                " with tables ", tables.sizes());
    return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(quadrant, CPU, m) {
    m.impl("q4_mm", &q4_mm);
    m.impl("q8_mm", &q8_mm);
    m.impl("paged_decode", &paged_decode);
}
