// The one file that sees PyTorch: checks tensors, fills the params structs of
// include/fused_resnet/params.h, launches on the current stream and turns launch errors into Python
// exceptions. Python-side launchers (fused_resnet/cuda.py) allocate outputs and merge per-tile partials.
#include <ATen/MemoryOverlap.h>
#ifndef FUSED_RESNET_EMULATED
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif
#include <torch/extension.h>

#include <algorithm>
#include <limits>
#include <optional>

#include "fused_resnet/params.h"

namespace fr = fused_resnet;

namespace {

// Where the kernels run: CUDA tensors on the current stream, or -- in the emulated build (csrc/emu,
// fused_resnet/_emulated.py) -- CPU tensors, each launch run to completion on host threads.
#ifdef FUSED_RESNET_EMULATED
constexpr const char* kKernelTensor = "a CPU tensor (emulated build)";
bool on_kernel_device(const at::Tensor& t) { return t.device().is_cpu(); }
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
cudaStream_t current_stream() { return nullptr; }
#else
constexpr const char* kKernelTensor = "a CUDA tensor";
bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
using DeviceGuard = c10::cuda::CUDAGuard;
cudaStream_t current_stream() { return current_stream(); }
#endif

fr::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return fr::DType::kF16;
    case at::kBFloat16: return fr::DType::kBF16;
    case at::kFloat: return fr::DType::kF32;
    case at::kDouble: return fr::DType::kF64;
    default: TORCH_CHECK(false, "fused_resnet._C: unsupported dtype ", t.scalar_type());
  }
  return fr::DType::kF32;
}

at::ScalarType acc_of(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Order of the checks in every entry point: shapes and their agreement first, then outputs (dense, not
// overlapping any input), then devices -- so every malformed call is refused with its shapes before
// anything is read, and the shape checks can be exercised without a GPU (tests/test_binding_checks.py).
void check_4d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "fused_resnet._C: ", name, " must be 4-D, got ", t.dim(), "-D of shape ", t.sizes());
}

void check_on(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(on_kernel_device(t), "fused_resnet._C: ", name, " must be ", kKernelTensor);
  TORCH_CHECK(t.device() == like.device(), "fused_resnet._C: ", name, " is on ", t.device(), ", expected ",
              like.device());
}

// Byte range [first, last] a tensor's elements span (nonnegative strides: the binding takes no flips).
std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * std::abs(t.stride(d));
  const auto first = reinterpret_cast<uintptr_t>(t.data_ptr());
  return {first, first + static_cast<uintptr_t>((last + 1) * t.element_size()) - 1};
}

// Whether out and in may touch the same bytes. get_overlap_status answers "too hard" for any strided
// view (a non-contiguous x), so that case falls back to comparing the spans within one storage.
bool may_overlap(const at::Tensor& out, const at::Tensor& in) {
  if (!out.storage().is_alias_of(in.storage())) return false;
  const at::MemOverlapStatus s = at::get_overlap_status(out, in);
  if (s != at::MemOverlapStatus::TooHard) return s != at::MemOverlapStatus::No;
  const auto a = byte_span(out), b = byte_span(in);
  return a.first <= b.second && b.first <= a.second;
}

// An output the kernels write: dense (every element once, no gaps) and sharing no memory with an input.
void check_output(const at::Tensor& out, const char* name, std::initializer_list<const at::Tensor*> inputs) {
  TORCH_CHECK(out.is_non_overlapping_and_dense(), "fused_resnet._C: ", name, " must be dense and non-overlapping, "
              "got shape ", out.sizes(), " strides ", out.strides());
  for (const at::Tensor* in : inputs) {
    if (in == nullptr || !in->defined() || in->numel() == 0 || out.numel() == 0) continue;
    TORCH_CHECK(!may_overlap(out, *in), "fused_resnet._C: ", name, " shares memory with an input of shape ",
                in->sizes());
  }
}

void check_filter(int64_t kh, int64_t kw) {
  TORCH_CHECK(kh >= 1 && kw >= 1, "fused_resnet._C: the filter must be at least 1x1, got ", kh, "x", kw);
}

void check_grad_y(const at::Tensor& gy, const at::Tensor& x, int64_t k) {
  TORCH_CHECK(gy.size(0) == x.size(0) && gy.size(1) == k, "fused_resnet._C: grad_y of shape ", gy.sizes(),
              " must be [N=", x.size(0), ", K=", k, ", OH, OW] for x of shape ", x.sizes());
}

void check_vec(const at::Tensor& t, int64_t n, at::ScalarType dtype, const at::Tensor& like, const char* name) {
  TORCH_CHECK(on_kernel_device(t) && t.device() == like.device(), "fused_resnet._C: ", name, " must be on ", like.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.is_contiguous(), "fused_resnet._C: ", name,
              " must be a contiguous vector of ", n, " elements");
  TORCH_CHECK(t.scalar_type() == dtype, "fused_resnet._C: ", name, " must be ", dtype, ", got ", t.scalar_type());
}

void check_index_range(int64_t pixels, const char* what) {
  TORCH_CHECK(pixels <= std::numeric_limits<int>::max(), "fused_resnet._C: ", what, " (", pixels,
              ") exceeds the kernels' 32-bit pixel index; split the batch");
}

void strides_of(const at::Tensor& t, int64_t* s) {
  for (int i = 0; i < 4; ++i) s[i] = t.stride(i);
}

void check_launch(cudaError_t err, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess, "fused_resnet._C: launching ", kernel, " failed: ", cudaGetErrorString(err));
}

void check_geometry(const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                    const std::vector<int64_t>& dilation) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "fused_resnet._C: stride, padding and dilation must have two entries each");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && padding[0] >= 0 &&
              padding[1] >= 0, "fused_resnet._C: stride and dilation must be >= 1 and padding >= 0, got stride ",
              stride, ", dilation ", dilation, ", padding ", padding);
}

fr::ConvGeom geom(const at::Tensor& x, int64_t k, int64_t kh, int64_t kw, int64_t oh, int64_t ow,
                  const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                  const std::vector<int64_t>& dilation) {
  check_geometry(stride, padding, dilation);
  check_filter(kh, kw);
  check_index_range(x.size(0) * x.size(2) * x.size(3), "N*H*W");
  check_index_range(x.size(0) * oh * ow, "N*OH*OW");
  return fr::ConvGeom{static_cast<int>(x.size(0)), static_cast<int>(x.size(1)), static_cast<int>(x.size(2)),
                      static_cast<int>(x.size(3)), static_cast<int>(k), static_cast<int>(oh),
                      static_cast<int>(ow), static_cast<int>(kh), static_cast<int>(kw),
                      static_cast<int>(stride[0]), static_cast<int>(stride[1]), static_cast<int>(padding[0]),
                      static_cast<int>(padding[1]), static_cast<int>(dilation[0]), static_cast<int>(dilation[1])};
}

void check_same_dtype(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fused_resnet._C: ", name, " must be ", x.scalar_type(),
              " like x, got ", t.scalar_type());
}

}  // namespace

// Per-tile (mean relative to the pivot x[0, c, 0, 0], M2): [2, tiles, C].
at::Tensor batch_stats(const at::Tensor& x) {
  check_4d(x, "x");
  check_on(x, x, "x");
  const DeviceGuard guard(x.device());
  const int64_t c = x.size(1);
  check_index_range(x.size(0) * x.size(2) * x.size(3), "N*H*W");
  const int tiles = fr::ceil_div(x.size(0) * x.size(2) * x.size(3), fr::kStatsRows);
  at::Tensor part = at::empty({2, tiles, c}, x.options().dtype(acc_of(x)));
  fr::BatchStatsParams p{};
  p.dtype = dtype_of(x);
  p.N = static_cast<int>(x.size(0)); p.C = static_cast<int>(c);
  p.H = static_cast<int>(x.size(2)); p.W = static_cast<int>(x.size(3));
  p.x = x.data_ptr(); strides_of(x, p.sx);
  p.part = part.data_ptr();
  if (tiles > 0 && c > 0) check_launch(fr::batch_stats(p, current_stream()), "batch_stats");
  return part;
}

// The checked params of one forward conv (no partials yet); `keep` holds the bias converted to acc.
struct ForwardSetup {
  fr::ConvForwardParams p{};
  at::Tensor keep;
};

static ForwardSetup forward_setup(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& beta,
                                  const std::optional<at::Tensor>& residual, at::Tensor& y,
                                  const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                                  const std::vector<int64_t>& dilation, bool tf32, bool relu) {
  check_4d(x, "x"); check_4d(w, "weight"); check_4d(y, "y");
  check_same_dtype(w, x, "weight"); check_same_dtype(y, x, "y");
  const auto acc = acc_of(x);
  const int64_t c = x.size(1), k = w.size(0);
  TORCH_CHECK(w.size(1) == c, "fused_resnet._C: weight of shape ", w.sizes(), " has ", w.size(1),
              " input channels, x of shape ", x.sizes(), " has ", c);
  check_filter(w.size(2), w.size(3));
  check_geometry(stride, padding, dilation);
  TORCH_CHECK(y.size(0) == x.size(0) && y.size(1) == k, "fused_resnet._C: y of shape ", y.sizes(),
              " must be [N=", x.size(0), ", K=", k, ", OH, OW]");
  if (residual.has_value()) {
    check_4d(*residual, "residual");
    TORCH_CHECK(residual->sizes() == y.sizes(), "fused_resnet._C: residual of shape ", residual->sizes(),
                " must have y's shape ", y.sizes());
  }
  check_output(y, "y", {&x, &w, residual.has_value() ? &*residual : nullptr, &mean, &scale, &beta,
                        bias.has_value() ? &*bias : nullptr});
  check_on(x, x, "x"); check_on(w, x, "weight"); check_on(y, x, "y");
  const DeviceGuard guard(x.device());
  check_vec(mean, c, acc, x, "mean"); check_vec(scale, c, acc, x, "scale"); check_vec(beta, c, acc, x, "beta");
  ForwardSetup out;
  fr::ConvForwardParams& p = out.p;
  p.dtype = dtype_of(x);
  p.tf32 = tf32;
  p.act_floor = relu ? 0.0f : -std::numeric_limits<float>::infinity();
  p.g = geom(x, k, w.size(2), w.size(3), y.size(2), y.size(3), stride, padding, dilation);
  p.x = x.data_ptr(); strides_of(x, p.sx);
  p.w = w.data_ptr(); strides_of(w, p.sw);
  p.y = y.data_ptr(); strides_of(y, p.sy);
  p.mean = mean.data_ptr(); p.scale = scale.data_ptr(); p.beta = beta.data_ptr();
  if (bias.has_value()) {
    out.keep = bias->to(acc).contiguous();
    check_vec(out.keep, k, acc, x, "bias");
    p.bias = out.keep.data_ptr();
  }
  if (residual.has_value()) {
    check_on(*residual, x, "residual"); check_same_dtype(*residual, x, "residual");
    p.residual = residual->data_ptr(); strides_of(*residual, p.sr);
  }
  return out;
}

// Writes y; returns the per-tile (mean, M2) of y, [2, tiles_m, K] (or an empty tensor), and the rows per
// tile (the kernel path taken decides).
std::tuple<at::Tensor, int64_t> conv_forward(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                        const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& beta,
                        const std::optional<at::Tensor>& residual,
                        at::Tensor& y, std::vector<int64_t> stride, std::vector<int64_t> padding,
                        std::vector<int64_t> dilation, bool out_stats, bool tf32, bool relu) {
  const int64_t k = w.size(0);
  ForwardSetup setup = forward_setup(x, w, bias, mean, scale, beta, residual, y, stride, padding, dilation, tf32, relu);
  fr::ConvForwardParams& p = setup.p;
  const DeviceGuard guard(x.device());
  const int rows = fr::conv_forward_tile_rows(p);
  const int tiles = fr::ceil_div(x.size(0) * y.size(2) * y.size(3), rows);
  at::Tensor part = at::empty({out_stats ? 2 : 0, tiles, k}, scale.options());
  if (out_stats) p.part = part.data_ptr();
  if (y.numel() > 0) check_launch(fr::conv_forward(p, current_stream()), "conv_forward");
  return std::make_tuple(part, rows);
}

// Issue 30: a projection pair's two convs of one x in ONE launch (same output grid, no residual): writes y
// and y2; returns y's per-tile (mean, M2) [2, tiles_m, K] (or an empty tensor) and the rows per tile -- or,
// where the pair kernel does not apply (conv_forward_pair_applies: fp64), nothing launched and rows 0: the
// caller runs the two convs' own launches.
std::tuple<at::Tensor, int64_t> conv_forward_pair(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& w2, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bias2, const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& beta,
    at::Tensor& y, at::Tensor& y2, std::vector<int64_t> stride, std::vector<int64_t> padding,
    std::vector<int64_t> dilation, std::vector<int64_t> stride2, std::vector<int64_t> padding2,
    std::vector<int64_t> dilation2, bool out_stats, bool tf32, bool relu) {
  const std::optional<at::Tensor> none;
  ForwardSetup a = forward_setup(x, w, bias, mean, scale, beta, none, y, stride, padding, dilation, tf32, relu);
  ForwardSetup b = forward_setup(x, w2, bias2, mean, scale, beta, none, y2, stride2, padding2, dilation2, tf32, relu);
  TORCH_CHECK(y.size(2) == y2.size(2) && y.size(3) == y2.size(3), "fused_resnet._C: conv_forward_pair needs one "
              "output grid, got y ", y.sizes(), " and y2 ", y2.sizes());
  check_output(y2, "y2", {&y});
  fr::ConvForwardPairParams pp{a.p, b.p};
  if (!fr::conv_forward_pair_applies(pp)) return std::make_tuple(at::empty({0}, scale.options()), int64_t(0));
  const DeviceGuard guard(x.device());
  const int rows = fr::conv_forward_pair_tile_rows(pp);
  const int tiles = fr::ceil_div(x.size(0) * y.size(2) * y.size(3), rows);
  at::Tensor part = at::empty({out_stats ? 2 : 0, tiles, w.size(0)}, scale.options());
  if (out_stats) pp.a.part = part.data_ptr();
  if (y.numel() > 0 || y2.numel() > 0) check_launch(fr::conv_forward_pair(pp, current_stream()), "conv_forward_pair");
  return std::make_tuple(part, rows);
}

// Writes out (dx, or gm when batch_stats, or ga when raw; x's dtype every time; addend: another consumer's
// ga, added first); returns per-tile
// (S1, S2), [tiles_m, 2, C], or an empty tensor when neither is needed.
at::Tensor conv_dgrad(const at::Tensor& gy, const at::Tensor& w, const at::Tensor& x, const at::Tensor& mean,
                      const at::Tensor& scale, const at::Tensor& beta, const at::Tensor& invstd, at::Tensor& out,
                      bool batch_stats, bool need_sums, std::vector<int64_t> stride, std::vector<int64_t> padding,
                      std::vector<int64_t> dilation, bool tf32, const std::optional<at::Tensor>& addend, bool raw) {
  check_4d(gy, "grad_y"); check_4d(w, "weight"); check_4d(x, "x"); check_4d(out, "out");
  check_same_dtype(gy, x, "grad_y"); check_same_dtype(w, x, "weight");
  const auto acc = acc_of(x);
  const int64_t c = x.size(1), k = w.size(0);
  TORCH_CHECK(w.size(1) == c, "fused_resnet._C: weight of shape ", w.sizes(), " has ", w.size(1),
              " input channels, x of shape ", x.sizes(), " has ", c);
  check_filter(w.size(2), w.size(3));
  check_geometry(stride, padding, dilation);
  check_grad_y(gy, x, k);
  TORCH_CHECK(out.sizes() == x.sizes(), "fused_resnet._C: out of shape ", out.sizes(), " must have x's shape ",
              x.sizes());
  check_output(out, "out", {&gy, &w, &x, &mean, &scale, &beta, &invstd});
  if (addend.has_value()) {
    check_4d(*addend, "addend");
    TORCH_CHECK(addend->scalar_type() == x.scalar_type() && addend->sizes() == out.sizes() &&
                    addend->strides() == out.strides(),
                "fused_resnet._C: addend ", addend->sizes(), " (", addend->scalar_type(), ", strides ",
                addend->strides(), ") must have out's shape, strides and dtype: ", out.sizes(), " ",
                out.strides(), " ", out.scalar_type());
    // addend may be out itself (each element is read, then written, by one thread), not a part of it
    TORCH_CHECK(addend->is_same(out) || !may_overlap(out, *addend), "fused_resnet._C: addend overlaps out "
                "without being it");
  }
  TORCH_CHECK(!raw || !(batch_stats || need_sums), "fused_resnet._C: raw dgrad has no BN backward (batch_stats "
              "and need_sums must be false)");
  check_on(gy, x, "grad_y"); check_on(w, x, "weight"); check_on(x, x, "x"); check_on(out, x, "out");
  if (addend.has_value()) check_on(*addend, x, "addend");
  const DeviceGuard guard(x.device());
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "fused_resnet._C: out has dtype ", out.scalar_type(),
              ", x ", x.scalar_type());
  check_vec(mean, c, acc, x, "mean"); check_vec(scale, c, acc, x, "scale"); check_vec(beta, c, acc, x, "beta");
  check_vec(invstd, c, acc, x, "invstd");
  fr::ConvDgradParams p{};
  p.dtype = dtype_of(x);
  p.tf32 = tf32;
  p.g = geom(x, k, w.size(2), w.size(3), gy.size(2), gy.size(3), stride, padding, dilation);
  p.gy = gy.data_ptr(); strides_of(gy, p.sg);
  p.w = w.data_ptr(); strides_of(w, p.sw);
  p.x = x.data_ptr(); strides_of(x, p.sx);
  p.out = out.data_ptr(); strides_of(out, p.so);
  p.mean = mean.data_ptr(); p.scale = scale.data_ptr(); p.beta = beta.data_ptr(); p.invstd = invstd.data_ptr();
  if (addend.has_value()) p.addend = addend->data_ptr();
  p.raw = raw;
  p.batch_stats = batch_stats;
  const bool sums = need_sums || batch_stats;
  const int tiles = fr::conv_dgrad_tiles(p);
  at::Tensor part = at::empty({sums ? tiles : 0, 2, c}, scale.options());
  if (sums) p.part = part.data_ptr();
  if (x.numel() > 0) check_launch(fr::conv_dgrad(p, current_stream()), "conv_dgrad");
  return part;
}

void bn_backward_finish(const at::Tensor& gm, const at::Tensor& x, at::Tensor& dx, const at::Tensor& mean,
                        const at::Tensor& invstd, const std::optional<at::Tensor>& gamma, const at::Tensor& s1,
                        const at::Tensor& s2, int64_t count) {
  check_4d(gm, "gm"); check_4d(x, "x"); check_4d(dx, "dx"); check_same_dtype(dx, x, "dx");
  const auto acc = acc_of(x);
  const int64_t c = x.size(1);
  TORCH_CHECK(gm.scalar_type() == x.scalar_type() && gm.sizes() == x.sizes() && dx.sizes() == x.sizes(),
              "fused_resnet._C: gm ", gm.sizes(), " (", gm.scalar_type(), ") and dx ", dx.sizes(),
              " must have x's shape ", x.sizes(), ", gm in ", x.scalar_type());
  check_output(dx, "dx", {&gm, &x, &mean, &invstd, &s1, &s2});
  check_on(gm, x, "gm"); check_on(x, x, "x"); check_on(dx, x, "dx");
  const DeviceGuard guard(x.device());
  check_vec(mean, c, acc, x, "mean"); check_vec(invstd, c, acc, x, "invstd");
  check_vec(s1, c, acc, x, "s1"); check_vec(s2, c, acc, x, "s2");
  fr::BnBackwardFinishParams p{};
  p.dtype = dtype_of(x);
  p.N = static_cast<int>(x.size(0)); p.C = static_cast<int>(c);
  p.H = static_cast<int>(x.size(2)); p.W = static_cast<int>(x.size(3));
  p.gm = gm.data_ptr(); strides_of(gm, p.sgm);
  p.x = x.data_ptr(); strides_of(x, p.sx);
  p.dx = dx.data_ptr(); strides_of(dx, p.sdx);
  p.mean = mean.data_ptr(); p.invstd = invstd.data_ptr(); p.s1 = s1.data_ptr(); p.s2 = s2.data_ptr();
  at::Tensor gamma_acc;
  if (gamma.has_value()) {
    gamma_acc = gamma->to(acc).contiguous();
    check_vec(gamma_acc, c, acc, x, "gamma");
    p.gamma = gamma_acc.data_ptr();
  }
  // count: elements per channel behind S1/S2 -- this tensor's N*H*W, or the whole process group's when
  // the statistics are synchronized across ranks.
  TORCH_CHECK(count >= 0, "fused_resnet._C: negative count");
  p.inv_count = count > 0 ? 1.0 / static_cast<double>(count) : 0.0;
  if (x.numel() > 0) check_launch(fr::bn_backward_finish(p, current_stream()), "bn_backward_finish");
}

// Split-K slabs [split, K*C*KH*KW] in the accumulation dtype, each in dw's layout (dw: dense, the
// weight's shape; only its strides are read here); column_sums adds them up into dw.
at::Tensor conv_wgrad(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& dw, const at::Tensor& mean,
                      const at::Tensor& scale, const at::Tensor& beta, std::vector<int64_t> stride, std::vector<int64_t> padding,
                      std::vector<int64_t> dilation, int64_t chunk, int64_t split, bool tf32, bool relu) {
  check_4d(gy, "grad_y"); check_4d(x, "x"); check_4d(dw, "dw"); check_same_dtype(gy, x, "grad_y");
  const int64_t k = dw.size(0), kh = dw.size(2), kw = dw.size(3);
  check_filter(kh, kw);  // before anything divides by kh*kw
  TORCH_CHECK(dw.size(1) == x.size(1), "fused_resnet._C: dw of shape ", dw.sizes(), " must be [K, C=", x.size(1),
              ", KH, KW]");
  TORCH_CHECK(dw.is_non_overlapping_and_dense(), "fused_resnet._C: dw must be dense and non-overlapping, got "
              "strides ", dw.strides());
  check_geometry(stride, padding, dilation);
  check_grad_y(gy, x, k);
  const int64_t pixels = gy.size(0) * gy.size(2) * gy.size(3);
  TORCH_CHECK(split >= 1 && chunk >= 1 && split <= 65535 / (kh * kw) && chunk * split >= pixels,
              "fused_resnet._C: split-K of ", split, " chunks of ", chunk, " pixels must cover the ", pixels,
              " output pixels within ", 65535 / (kh * kw), " chunks");
  check_on(gy, x, "grad_y"); check_on(x, x, "x");
  const DeviceGuard guard(x.device());
  const auto acc = acc_of(x);
  const int64_t c = x.size(1);
  check_vec(mean, c, acc, x, "mean"); check_vec(scale, c, acc, x, "scale"); check_vec(beta, c, acc, x, "beta");
  fr::ConvWgradParams p{};
  p.dtype = dtype_of(x);
  p.tf32 = tf32;
  p.act_floor = relu ? 0.0f : -std::numeric_limits<float>::infinity();
  p.g = geom(x, k, kh, kw, gy.size(2), gy.size(3), stride, padding, dilation);
  p.gy = gy.data_ptr(); strides_of(gy, p.sg);
  p.x = x.data_ptr(); strides_of(x, p.sx);
  p.mean = mean.data_ptr(); p.scale = scale.data_ptr(); p.beta = beta.data_ptr();
  p.chunk = static_cast<int>(chunk); p.split = static_cast<int>(split);
  // Every slab element is written (the splits cover every pixel, the grid every (k, c, tap)): no memset.
  at::Tensor part = at::empty({split, dw.numel()}, scale.options());
  p.part = part.data_ptr(); strides_of(dw, p.sd);
  if (part.numel() > 0 && gy.numel() > 0)
    check_launch(fr::conv_wgrad(p, current_stream()), "conv_wgrad");
  return part;
}

// The [5, C] (mean, var, invstd, scale, beta) of a BN, from per-tile partials ([2, tiles, C] of
// tile_rows rows each, total rows; x supplies the pivot when given) or from (mean_in, var_in); the merged
// moments also into (mean_out, var_out) when given; running buffers updated in place when given.
at::Tensor bn_finalize(const std::optional<at::Tensor>& part, int64_t tile_rows, int64_t total,
                       const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& mean_in,
                       const std::optional<at::Tensor>& var_in, const std::optional<at::Tensor>& mean_out,
                       const std::optional<at::Tensor>& var_out, const std::optional<at::Tensor>& gamma,
                       const std::optional<at::Tensor>& beta, const std::optional<at::Tensor>& running_mean,
                       const std::optional<at::Tensor>& running_var, double momentum, double eps, double unbiased,
                       int64_t channels, at::ScalarType x_dtype,
                       const std::optional<at::Tensor>& num_batches_tracked) {
  const at::Tensor& like = part.has_value() ? *part : *mean_in;
  TORCH_CHECK(part.has_value() || (mean_in.has_value() && var_in.has_value()),
              "fused_resnet._C: bn_finalize needs the partials or (mean, var)");
  TORCH_CHECK(mean_out.has_value() == var_out.has_value() && running_mean.has_value() == running_var.has_value(),
              "fused_resnet._C: bn_finalize takes mean_out with var_out and running_mean with running_var");
  // before any device check: the argument checks run without a GPU (tests/test_binding_checks.py, CI's real build)
  TORCH_CHECK(!num_batches_tracked.has_value() ||
                  (num_batches_tracked->scalar_type() == at::kLong && num_batches_tracked->numel() == 1),
              "fused_resnet._C: num_batches_tracked must be an int64 tensor of one element, got ",
              num_batches_tracked.has_value() ? num_batches_tracked->scalar_type() : at::kLong, " of shape ",
              num_batches_tracked.has_value() ? num_batches_tracked->sizes() : at::IntArrayRef());
  const at::ScalarType acc = x_dtype == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t c = channels;
  if (part.has_value()) {
    TORCH_CHECK(part->dim() == 3 && part->size(0) == 2 && part->size(2) == c && part->is_contiguous() &&
                part->scalar_type() == acc && tile_rows >= 1 && part->size(1) >= 1 &&
                total > (part->size(1) - 1) * tile_rows && total <= part->size(1) * tile_rows,
                "fused_resnet._C: partials of shape ", part->sizes(), " do not hold ", total, " rows of ", c,
                " channels in tiles of ", tile_rows);
  }
  if (x.has_value()) {
    check_4d(*x, "x");
    TORCH_CHECK(x->size(1) == c && x->numel() > 0 && x->scalar_type() == x_dtype, "fused_resnet._C: x of shape ",
                x->sizes(), " must have ", c, " channels and data");
    check_on(*x, like, "x");
  }
  const auto vec = [&](const std::optional<at::Tensor>& t, const char* name) {
    if (t.has_value()) check_vec(*t, c, acc, like, name);
  };
  vec(mean_out, "mean_out"); vec(var_out, "var_out");
  if (mean_in.has_value()) {  // the running buffers in eval: any float dtype (a .half() model's are half)
    check_vec(*mean_in, c, mean_in->scalar_type(), like, "mean");
    check_vec(*var_in, c, mean_in->scalar_type(), like, "var");
  }
  check_on(like, like, "partials");
  const DeviceGuard guard(like.device());
  at::Tensor out = at::empty({5, c}, like.options().dtype(acc));
  fr::BnFinalizeParams p{};
  p.dtype = x_dtype == at::kDouble ? fr::DType::kF64 : fr::DType::kF32;
  p.C = static_cast<int>(c);
  if (part.has_value()) {
    p.part = part->data_ptr(); p.tiles = static_cast<int>(part->size(1)); p.tile_rows = tile_rows; p.total = total;
  }
  if (x.has_value()) { p.x = x->data_ptr(); p.sxc = x->stride(1); p.dtype = dtype_of(*x); }
  if (mean_in.has_value()) {
    p.mean_in = mean_in->data_ptr(); p.var_in = var_in->data_ptr(); p.in_dtype = dtype_of(*mean_in);
  }
  if (mean_out.has_value()) { p.mean_out = mean_out->data_ptr(); p.var_out = var_out->data_ptr(); }
  p.out = out.data_ptr();
  for (const auto* t : {&gamma, &beta}) {
    if (!t->has_value()) continue;
    TORCH_CHECK((*t)->dim() == 1 && (*t)->size(0) == c && (*t)->is_contiguous(),
                "fused_resnet._C: BN weight/bias must be contiguous vectors of ", c);
    check_on(**t, like, "BN weight/bias");
  }
  TORCH_CHECK(!(gamma.has_value() && beta.has_value()) || gamma->scalar_type() == beta->scalar_type(),
              "fused_resnet._C: BN weight and bias dtypes differ");
  if (gamma.has_value()) { p.gamma = gamma->data_ptr(); p.param_dtype = dtype_of(*gamma); }
  if (beta.has_value()) { p.beta = beta->data_ptr(); p.param_dtype = dtype_of(*beta); }
  if (running_mean.has_value()) {
    for (const auto* t : {&running_mean, &running_var}) {
      TORCH_CHECK((*t)->dim() == 1 && (*t)->size(0) == c && (*t)->is_contiguous() &&
                  (*t)->scalar_type() == running_mean->scalar_type(),
                  "fused_resnet._C: running buffers must be contiguous vectors of ", c, " of one dtype");
      check_on(**t, like, "running buffer");
    }
    p.running_mean = running_mean->data_ptr(); p.running_var = running_var->data_ptr();
    p.running_dtype = dtype_of(*running_mean);
  }
  p.momentum = momentum; p.eps = eps; p.unbiased = unbiased;
  if (num_batches_tracked.has_value()) {
    check_on(*num_batches_tracked, like, "num_batches_tracked");
    p.num_batches_tracked = static_cast<long long*>(num_batches_tracked->data_ptr());
  }
  if (c > 0) check_launch(fr::bn_finalize(p, current_stream()), "bn_finalize");
  else if (num_batches_tracked.has_value()) num_batches_tracked->add_(1);  // no launch to count it
  return out;
}

// Row sums in a fixed order, one launch: a [rows, 2C] -> (a_out0, a_out1) [C] each; b [rows, L] -> b_out
// (L elements, dense, any layout; the sums are written in its storage order and cast to its dtype).
void column_sums(const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& a_out0,
                 const std::optional<at::Tensor>& a_out1, const std::optional<at::Tensor>& b,
                 const std::optional<at::Tensor>& b_out) {
  TORCH_CHECK(a.has_value() == (a_out0.has_value() && a_out1.has_value()) && b.has_value() == b_out.has_value(),
              "fused_resnet._C: column_sums takes a with both outputs and b with its output");
  if (!a.has_value() && !b.has_value()) return;
  const at::Tensor& like = a.has_value() ? *a : *b;
  const at::ScalarType acc = like.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, "fused_resnet._C: column_sums sums float32/float64");
  fr::ColumnSumsParams p{};
  p.f64 = acc == at::kDouble;
  if (a.has_value()) {
    TORCH_CHECK(a->dim() == 2 && a->is_contiguous() && a->size(1) % 2 == 0 && a->scalar_type() == acc,
                "fused_resnet._C: a must be a contiguous [rows, 2C] array, got ", a->sizes());
    const int64_t c = a->size(1) / 2;
    check_vec(*a_out0, c, acc, like, "a_out0"); check_vec(*a_out1, c, acc, like, "a_out1");
    check_output(*a_out0, "a_out0", {&*a}); check_output(*a_out1, "a_out1", {&*a});
    check_index_range(a->size(0), "rows of a");
    p.a = a->data_ptr(); p.a_rows = static_cast<int>(a->size(0)); p.a_len = a->size(1); p.a_split = c;
    p.a_out0 = a_out0->data_ptr(); p.a_out1 = a_out1->data_ptr();
  }
  if (b.has_value()) {
    TORCH_CHECK(b->dim() == 2 && b->is_contiguous() && b->scalar_type() == acc && b->size(1) == b_out->numel(),
                "fused_resnet._C: b must be a contiguous [rows, ", b_out->numel(), "] array, got ", b->sizes());
    check_output(*b_out, "b_out", {&*b});
    check_on(*b, like, "b"); check_on(*b_out, like, "b_out");
    check_index_range(b->size(0), "rows of b");
    p.b = b->data_ptr(); p.b_rows = static_cast<int>(b->size(0)); p.b_len = b->size(1);
    p.b_out = b_out->data_ptr(); p.b_dtype = dtype_of(*b_out);
  }
  check_on(like, like, "a/b");
  const DeviceGuard guard(like.device());
  check_launch(fr::column_sums(p, current_stream()), "column_sums");
}

at::MemoryFormat memory_format_of(const at::Tensor& t) {
  // fused_resnet/_layout.py's rule: channels_last when laid out so and not also plain contiguous
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast) ? at::MemoryFormat::ChannelsLast
                                                                             : at::MemoryFormat::Contiguous;
}

// Split-K slabs of one conv's dW through conv_wgrad: enough splits to give every SM two blocks, within the grid's
// z limit (as cuda.py's _wgrad_slabs). num_sms: the SMs split-K fills.
at::Tensor wgrad_slabs(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& dw, const at::Tensor& mean,
                       const at::Tensor& scale, const at::Tensor& beta, const std::vector<int64_t>& stride,
                       const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation, bool tf32, bool relu,
                       int64_t num_sms) {
  check_filter(dw.size(2), dw.size(3));
  const int64_t taps = dw.size(2) * dw.size(3);
  const int64_t pixels = gy.size(0) * gy.size(2) * gy.size(3);
  const auto cdiv = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  const int64_t blocks = cdiv(dw.size(0), fr::kTileM) * cdiv(x.size(1), fr::kTileN) * taps;
  const int64_t p_tiles = std::max<int64_t>(1, cdiv(pixels, fr::kWgradChunk));
  int64_t split = std::max<int64_t>(1, std::min<int64_t>({p_tiles, cdiv(2 * num_sms, blocks), 65535 / taps}));
  const int64_t chunk = cdiv(p_tiles, split) * fr::kWgradChunk;
  split = std::max<int64_t>(1, cdiv(pixels, chunk));
  return conv_wgrad(gy, x, dw, mean, scale, beta, stride, padding, dilation, chunk, split, tf32, relu);
}

// The backward of a layer's convs of one activation, in one call (issue 30: from Python, the launcher calls and
// their allocations cost ~30 us of host time a layer): dgrad (+ per-tile BN-backward sums), the wgrad slabs, one
// column_sums for both, and with batch statistics the dx finish -- fused_resnet/cuda.py's conv_backward without a
// process group. A second consumer (gy2 given: a projection block's shortcut, w2 with its own geometry) adds its
// raw dgrad into the buffer the first conv's dgrad then finishes in place (ga summed before the ReLU mask, so the
// BN backward runs once), and its dW costs a wgrad and a column_sums (need_dw2). need_sums: dgamma or dbeta wanted,
// or batch statistics. Returns (dx, dW, S1, S2, dW2), each undefined (None) where not asked for; dW and dW2 in
// their weight's dtype and layout, the sums in the accumulation dtype. num_sms: the SMs split-K fills.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_backward(
    const at::Tensor& gy, const at::Tensor& w, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
    const at::Tensor& beta, const at::Tensor& invstd, const std::optional<at::Tensor>& gamma, bool batch_stats,
    bool need_dx, bool need_dw, bool need_sums, std::vector<int64_t> stride, std::vector<int64_t> padding,
    std::vector<int64_t> dilation, bool tf32, bool relu, int64_t num_sms, const std::optional<at::Tensor>& gy2,
    const std::optional<at::Tensor>& w2, std::vector<int64_t> stride2, std::vector<int64_t> padding2,
    std::vector<int64_t> dilation2, bool need_dw2) {
  check_4d(gy, "grad_y"); check_4d(w, "weight"); check_4d(x, "x");
  TORCH_CHECK(gy2.has_value() == w2.has_value(), "fused_resnet._C: conv_backward takes grad_y2 with weight2");
  if (gy2.has_value()) { check_4d(*gy2, "grad_y2"); check_4d(*w2, "weight2"); }
  batch_stats = batch_stats && need_dx;
  need_sums = need_sums || batch_stats;
  const int64_t c = x.size(1);
  const at::Tensor mean_c = mean.contiguous(), invstd_c = invstd.contiguous();
  at::Tensor dx, out, part, dw, slabs, s1, s2, dw2;
  if (need_dx || need_sums) {
    dx = at::empty_like(x, memory_format_of(x));
    // gm (batch statistics) in x's dtype: eager's ReLU-backward output, half a float32 buffer's bytes
    out = batch_stats ? at::empty_like(x, memory_format_of(x)) : dx;
    std::optional<at::Tensor> addend;
    if (gy2.has_value()) {
      conv_dgrad(*gy2, *w2, x, mean_c, scale, beta, invstd_c, out, false, false, stride2, padding2, dilation2, tf32,
                 std::nullopt, true);
      addend = out;
    }
    // the dgrad reads beta for the ReLU mask only: +inf passes every element (the identity activation)
    const at::Tensor mask_beta = relu ? beta : at::full_like(beta, std::numeric_limits<double>::infinity());
    part = conv_dgrad(gy, w, x, mean_c, scale, mask_beta, invstd_c, out, batch_stats, need_sums, stride, padding,
                      dilation, tf32, addend, false);
  }
  if (need_dw) {
    dw = at::empty_like(w, memory_format_of(w));
    slabs = wgrad_slabs(gy, x, dw, mean_c, scale, beta, stride, padding, dilation, tf32, relu, num_sms);
  }
  if (need_sums) {
    s1 = at::empty({c}, scale.options());
    s2 = at::empty_like(s1);
  }
  column_sums(need_sums ? std::optional<at::Tensor>(part.view({part.size(0), 2 * c})) : std::nullopt,
              need_sums ? std::optional<at::Tensor>(s1) : std::nullopt,
              need_sums ? std::optional<at::Tensor>(s2) : std::nullopt,
              need_dw ? std::optional<at::Tensor>(slabs) : std::nullopt,
              need_dw ? std::optional<at::Tensor>(dw) : std::nullopt);
  if (gy2.has_value() && need_dw2) {
    dw2 = at::empty_like(*w2, memory_format_of(*w2));
    column_sums(std::nullopt, std::nullopt, std::nullopt,
                wgrad_slabs(*gy2, x, dw2, mean_c, scale, beta, stride2, padding2, dilation2, tf32, relu, num_sms),
                dw2);
  }
  if (batch_stats) {
    bn_backward_finish(out, x, dx, mean_c, invstd_c, gamma, s1, s2, x.numel() / c);
  } else if (!need_dx) {
    dx = at::Tensor();
  }
  return std::make_tuple(dx, dw, s1, s2, dw2);
}

// The post-activation block's end (kernels/bn_add_relu.cu). z, s and the output share one shape and dtype,
// any strides; the affine vectors are acc [C]; s_mean/s_scale/s_beta absent: the identity shortcut.
void check_block_end(const at::Tensor& t, const at::Tensor& z, const char* name) {
  check_4d(t, name);
  TORCH_CHECK(t.sizes() == z.sizes() && t.scalar_type() == z.scalar_type(), "fused_resnet._C: ", name, " ",
              t.sizes(), " (", t.scalar_type(), ") must have z's shape ", z.sizes(), " and dtype ", z.scalar_type());
}

void fill_block_end(const at::Tensor& z, int* n, int* c, int* h, int* w, fr::DType* dtype) {
  // 32-bit pixel indices, with room for one block's rows past the last (the kernels' loop bounds).
  const int64_t pixels = z.size(0) * z.size(2) * z.size(3);
  TORCH_CHECK(pixels <= std::numeric_limits<int>::max() - 4096, "fused_resnet._C: N*H*W (", pixels,
              ") exceeds the kernels' 32-bit pixel index; split the batch");
  TORCH_CHECK(z.size(1) <= 65535, "fused_resnet._C: bn_add_relu takes at most 65535 channels, got ", z.size(1));
  *dtype = dtype_of(z);
  *n = static_cast<int>(z.size(0)); *c = static_cast<int>(z.size(1));
  *h = static_cast<int>(z.size(2)); *w = static_cast<int>(z.size(3));
}

void bn_add_relu_forward(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& beta,
                         const at::Tensor& s, const std::optional<at::Tensor>& s_mean,
                         const std::optional<at::Tensor>& s_scale, const std::optional<at::Tensor>& s_beta,
                         at::Tensor& y, bool relu) {
  check_4d(z, "z"); check_block_end(s, z, "s"); check_block_end(y, z, "y");
  TORCH_CHECK(s_mean.has_value() == s_scale.has_value() && s_mean.has_value() == s_beta.has_value(),
              "fused_resnet._C: s_mean, s_scale and s_beta come together");
  check_output(y, "y", {&z, &s, &mean, &scale, &beta});
  check_on(z, z, "z"); check_on(s, z, "s"); check_on(y, z, "y");
  const DeviceGuard guard(z.device());
  const auto acc = acc_of(z);
  const int64_t c = z.size(1);
  check_vec(mean, c, acc, z, "mean"); check_vec(scale, c, acc, z, "scale"); check_vec(beta, c, acc, z, "beta");
  fr::BnAddReluForwardParams p{};
  fill_block_end(z, &p.N, &p.C, &p.H, &p.W, &p.dtype);
  p.z = z.data_ptr(); strides_of(z, p.sz);
  p.s = s.data_ptr(); strides_of(s, p.ss);
  p.y = y.data_ptr(); strides_of(y, p.sy);
  p.mean = mean.data_ptr(); p.scale = scale.data_ptr(); p.beta = beta.data_ptr();
  if (s_mean.has_value()) {
    check_vec(*s_mean, c, acc, z, "s_mean"); check_vec(*s_scale, c, acc, z, "s_scale");
    check_vec(*s_beta, c, acc, z, "s_beta");
    p.s_mean = s_mean->data_ptr(); p.s_scale = s_scale->data_ptr(); p.s_beta = s_beta->data_ptr();
  }
  p.relu = relu;
  if (z.numel() > 0) check_launch(fr::bn_add_relu_forward(p, current_stream()), "bn_add_relu_forward");
}

// Two launches at most: the reduction into per-row-group partials (when `reduce`: sums wanted, or dz/ds
// with batch statistics), then the elementwise pass, which finishes the sums (into `sums` when given) and
// writes dz / ds when given. count: the elements per channel behind the sums (N*H*W).
void bn_add_relu_backward(const at::Tensor& g, const at::Tensor& z, const at::Tensor& mean, const at::Tensor& scale,
                          const at::Tensor& beta, const at::Tensor& invstd, const std::optional<at::Tensor>& gamma,
                          const at::Tensor& s, const std::optional<at::Tensor>& s_mean,
                          const std::optional<at::Tensor>& s_scale, const std::optional<at::Tensor>& s_beta,
                          const std::optional<at::Tensor>& s_invstd, const std::optional<at::Tensor>& s_gamma,
                          const std::optional<at::Tensor>& dz, bool dz_batch, const std::optional<at::Tensor>& ds,
                          bool ds_batch, const std::optional<at::Tensor>& sums, bool reduce, bool relu) {
  check_4d(z, "z"); check_block_end(g, z, "g"); check_block_end(s, z, "s");
  if (dz.has_value()) check_block_end(*dz, z, "dz");
  if (ds.has_value()) check_block_end(*ds, z, "ds");
  const bool bn_s = s_mean.has_value();
  TORCH_CHECK(bn_s == s_scale.has_value() && bn_s == s_beta.has_value() && bn_s == s_invstd.has_value() &&
              (bn_s || !s_gamma.has_value()),
              "fused_resnet._C: s_mean, s_scale, s_beta and s_invstd come together (s_gamma with them)");
  TORCH_CHECK(reduce || (!(dz.has_value() && dz_batch) && !(ds.has_value() && bn_s && ds_batch) && !sums.has_value()),
              "fused_resnet._C: batch-statistics gradients and sums need the reduction");
  const auto acc = acc_of(z);
  const int64_t c = z.size(1);
  if (dz.has_value()) check_output(*dz, "dz", {&g, &z, &s, &mean, &scale, &beta, &invstd});
  if (ds.has_value()) check_output(*ds, "ds", {&g, &z, &s, &mean, &scale, &beta, &invstd});
  if (dz.has_value() && ds.has_value()) check_output(*ds, "ds", {&*dz});
  if (sums.has_value()) {
    TORCH_CHECK(sums->dim() == 2 && sums->size(0) == 3 && sums->size(1) == c && sums->is_contiguous() &&
                sums->scalar_type() == acc, "fused_resnet._C: sums must be a contiguous [3, ", c, "] ", acc,
                " array, got ", sums->sizes(), " ", sums->scalar_type());
    check_output(*sums, "sums", {&g, &z, &s, &mean, &scale, &beta, &invstd});
  }
  check_on(g, z, "g"); check_on(z, z, "z"); check_on(s, z, "s");
  if (dz.has_value()) check_on(*dz, z, "dz");
  if (ds.has_value()) check_on(*ds, z, "ds");
  if (sums.has_value()) check_on(*sums, z, "sums");
  const DeviceGuard guard(z.device());
  check_vec(mean, c, acc, z, "mean"); check_vec(scale, c, acc, z, "scale"); check_vec(beta, c, acc, z, "beta");
  check_vec(invstd, c, acc, z, "invstd");
  fr::BnAddReluBackwardParams p{};
  fill_block_end(z, &p.N, &p.C, &p.H, &p.W, &p.dtype);
  p.g = g.data_ptr(); strides_of(g, p.sg);
  p.z = z.data_ptr(); strides_of(z, p.sz);
  p.s = s.data_ptr(); strides_of(s, p.ss);
  p.mean = mean.data_ptr(); p.scale = scale.data_ptr(); p.beta = beta.data_ptr(); p.invstd = invstd.data_ptr();
  at::Tensor gamma_acc, s_gamma_acc;
  if (gamma.has_value()) {
    gamma_acc = gamma->to(acc).contiguous();  // no copy for the acc-typed contiguous vector the launcher passes
    check_vec(gamma_acc, c, acc, z, "gamma");
    p.gamma = gamma_acc.data_ptr();
  }
  if (bn_s) {
    check_vec(*s_mean, c, acc, z, "s_mean"); check_vec(*s_scale, c, acc, z, "s_scale");
    check_vec(*s_beta, c, acc, z, "s_beta"); check_vec(*s_invstd, c, acc, z, "s_invstd");
    p.s_mean = s_mean->data_ptr(); p.s_scale = s_scale->data_ptr(); p.s_beta = s_beta->data_ptr();
    p.s_invstd = s_invstd->data_ptr();
    if (s_gamma.has_value()) {
      s_gamma_acc = s_gamma->to(acc).contiguous();
      check_vec(s_gamma_acc, c, acc, z, "s_gamma");
      p.s_gamma = s_gamma_acc.data_ptr();
    }
  }
  p.relu = relu;
  if (dz.has_value()) { p.dz = dz->data_ptr(); strides_of(*dz, p.sdz); p.dz_batch = dz_batch; }
  if (ds.has_value()) { p.ds = ds->data_ptr(); strides_of(*ds, p.sds); p.ds_batch = ds_batch; }
  if (sums.has_value()) p.sums = sums->data_ptr();
  const int64_t count = z.size(0) * z.size(2) * z.size(3);
  p.inv_count = count > 0 ? 1.0 / static_cast<double>(count) : 0.0;
  // The partials: at::empty is an allocation (the caching allocator's), no device work.
  at::Tensor part;
  if (reduce) {
    part = at::empty({fr::bn_add_relu_groups(p), 3, c}, mean.options());
    p.part = part.data_ptr();
  }
  if (z.numel() > 0) check_launch(fr::bn_add_relu_backward(p, current_stream()), "bn_add_relu_backward");
}

#ifdef FUSED_RESNET_EMULATED
void register_emulation_checks(pybind11::module_& m);  // csrc/emu/checks.cpp
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_resnet CUDA kernels (hand-written); called through fused_resnet/cuda.py";
#ifdef FUSED_RESNET_EMULATED
  m.attr("EMULATED") = true;
  register_emulation_checks(m);
#else
  m.attr("EMULATED") = false;
#endif
  m.attr("TILE_M") = fr::kTileM;
  m.attr("TILE_N") = fr::kTileN;
  m.attr("TILE_K") = fr::kTileK;
  m.attr("WGRAD_CHUNK") = fr::kWgradChunk;
  m.attr("STATS_ROWS") = fr::kStatsRows;
  m.def("batch_stats", &batch_stats);
  m.def("conv_forward", &conv_forward);
  m.def("conv_forward_pair", &conv_forward_pair);
  m.def("conv_dgrad", &conv_dgrad);
  m.def("bn_backward_finish", &bn_backward_finish);
  m.def("conv_wgrad", &conv_wgrad);
  m.def("bn_finalize", &bn_finalize);
  m.def("column_sums", &column_sums);
  m.def("conv_backward", &conv_backward);
  m.def("bn_add_relu_forward", &bn_add_relu_forward);
  m.def("bn_add_relu_backward", &bn_add_relu_backward);
}
