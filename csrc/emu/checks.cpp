// Checks of the emulation layer itself, compiled into the emulated build only (tests/test_emulation.py):
// a mistake in an emulated primitive would hide the same mistake in a kernel, so each primitive is
// exercised on its own against an independent answer (torch's conversions, a plain matrix product,
// the runtime's own failure modes).
#include <torch/extension.h>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"
#include "mma.h"
#include "../kernels/device.cuh"

namespace {

// float32 -> the 16-bit pattern of __float2half_rn / __float2bfloat16_rn.
at::Tensor round_to_16(const at::Tensor& f, bool bf16) {
  TORCH_CHECK(f.scalar_type() == at::kFloat && f.is_contiguous(), "float32 contiguous input");
  at::Tensor out = at::empty(f.sizes(), f.options().dtype(at::kShort));
  const float* in = f.data_ptr<float>();
  int16_t* o = out.data_ptr<int16_t>();
  for (int64_t i = 0; i < f.numel(); ++i)
    o[i] = static_cast<int16_t>(bf16 ? __float2bfloat16_rn(in[i]).bits : __float2half_rn(in[i]).bits);
  return out;
}

// 16-bit patterns -> float32 through __half2float / __bfloat162float.
at::Tensor widen_16(const at::Tensor& bits, bool bf16) {
  TORCH_CHECK(bits.scalar_type() == at::kShort && bits.is_contiguous(), "int16 contiguous input");
  at::Tensor out = at::empty(bits.sizes(), bits.options().dtype(at::kFloat));
  const int16_t* in = bits.data_ptr<int16_t>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < bits.numel(); ++i) {
    const uint16_t b = static_cast<uint16_t>(in[i]);
    o[i] = bf16 ? __bfloat162float(__nv_bfloat16{b}) : __half2float(__half{b});
  }
  return out;
}

template <class T>
struct WmmaShared {
  alignas(128) T a[16 * 24];
  alignas(128) T b[16 * 24];
  alignas(128) float c[16 * 20];
};

// 2 A B for one 16x16x16 tile by one warp through the emulated WMMA (two mma_sync into the same
// accumulator, the second in place as the kernels call it). A and B come as float tensors rounded to T,
// staged with the padded leading dimensions the kernels use (24 elements, C 20); a_col stores A
// column-major.
template <class T>
at::Tensor wmma_tile(const at::Tensor& a, const at::Tensor& b, bool a_col, T (*from)(float)) {
  at::Tensor out = at::empty({16, 16}, a.options().dtype(at::kFloat));
  const float *pa = a.data_ptr<float>(), *pb = b.data_ptr<float>();
  float* po = out.data_ptr<float>();
  auto kernel = [&] {
    using namespace nvcuda;
    auto& sh = fused_resnet::detail::block_shared<WmmaShared<T>>();
    for (int i = static_cast<int>(threadIdx.x); i < 256; i += 32) {  // each lane stages a share
      const int r = i / 16, col = i % 16;
      sh.a[a_col ? col * 24 + r : r * 24 + col] = from(pa[i]);
      sh.b[r * 24 + col] = from(pb[i]);
    }
    __syncthreads();
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
    wmma::load_matrix_sync(fb, sh.b, 24);
    if (a_col) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa;
      wmma::load_matrix_sync(fa, sh.a, 24);
      for (int rep = 0; rep < 2; ++rep) wmma::mma_sync(acc, fa, fb, acc);
    } else {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, sh.a, 24);
      for (int rep = 0; rep < 2; ++rep) wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(sh.c, acc, 20, wmma::mem_row_major);
    __syncthreads();
    for (int i = static_cast<int>(threadIdx.x); i < 256; i += 32) po[i] = sh.c[(i / 16) * 20 + i % 16];
  };
  const cudaError_t err = fused_resnet_emu::launch(kernel, dim3(1), dim3(32));
  TORCH_CHECK(err == cudaSuccess, cudaGetErrorString(err));
  return out;
}

at::Tensor wmma_product(const at::Tensor& a, const at::Tensor& b, bool bf16, bool a_col) {
  for (const at::Tensor* t : {&a, &b})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->sizes() == at::IntArrayRef({16, 16}),
                "16x16 float32 contiguous operands");
  return bf16 ? wmma_tile<__nv_bfloat16>(a, b, a_col, __float2bfloat16_rn)
              : wmma_tile<__half>(a, b, a_col, __float2half_rn);
}

template <class T>
struct MmaShared {
  alignas(128) T a[16 * 24];  // A [16][16] row-major, padded rows (ldmatrix rows stay 16-byte aligned)
  alignas(128) T b[16 * 16];  // B [16 k][8 n] row-major, padded
};

// D = A B for A 16x16, B 16x8 through mma_16816, fragments built two ways: via_ldmatrix, the way the
// kernels build them (ldmatrix.x4 of row-major A, ldmatrix.x2.trans of row-major B); otherwise each lane
// picks its elements from the PTX ISA's fragment table directly.
template <class T>
at::Tensor mma_tile(const at::Tensor& a, const at::Tensor& b, bool via_ldmatrix, T (*from)(float)) {
  at::Tensor out = at::empty({16, 8}, a.options().dtype(at::kFloat));
  const float *pa = a.data_ptr<float>(), *pb = b.data_ptr<float>();
  float* po = out.data_ptr<float>();
  auto bits = [](T v) { uint16_t u; std::memcpy(&u, &v, 2); return uint32_t(u); };
  auto kernel = [&] {
    using namespace fused_resnet::detail;
    auto& sh = block_shared<MmaShared<T>>();
    const int lane = static_cast<int>(threadIdx.x), g = lane / 4, t = lane % 4;
    uint32_t fa[4], fb[2];
    if (via_ldmatrix) {
      for (int i = lane; i < 256; i += 32) sh.a[(i / 16) * 24 + i % 16] = from(pa[i]);
      for (int i = lane; i < 128; i += 32) sh.b[(i / 8) * 16 + i % 8] = from(pb[i]);
      __syncthreads();
      ldmatrix_x4(fa, &sh.a[(lane % 16) * 24 + (lane / 16) * 8]);
      ldmatrix_x2_trans(fb, &sh.b[(lane % 16) * 16]);
    } else {
      auto A = [&](int r, int k) { return bits(from(pa[r * 16 + k])); };
      auto B = [&](int k, int n) { return bits(from(pb[k * 8 + n])); };
      fa[0] = A(g, 2 * t) | A(g, 2 * t + 1) << 16;
      fa[1] = A(g + 8, 2 * t) | A(g + 8, 2 * t + 1) << 16;
      fa[2] = A(g, 2 * t + 8) | A(g, 2 * t + 9) << 16;
      fa[3] = A(g + 8, 2 * t + 8) | A(g + 8, 2 * t + 9) << 16;
      fb[0] = B(2 * t, g) | B(2 * t + 1, g) << 16;
      fb[1] = B(2 * t + 8, g) | B(2 * t + 9, g) << 16;
    }
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    mma_16816<T>(d, fa, fb);
    po[g * 8 + 2 * t] = d[0];
    po[g * 8 + 2 * t + 1] = d[1];
    po[(g + 8) * 8 + 2 * t] = d[2];
    po[(g + 8) * 8 + 2 * t + 1] = d[3];
  };
  const cudaError_t err = fused_resnet_emu::launch(kernel, dim3(1), dim3(32));
  TORCH_CHECK(err == cudaSuccess, cudaGetErrorString(err));
  return out;
}

at::Tensor mma_product(const at::Tensor& a, const at::Tensor& b, bool bf16, bool via_ldmatrix) {
  TORCH_CHECK(a.scalar_type() == at::kFloat && a.is_contiguous() && a.sizes() == at::IntArrayRef({16, 16}) &&
              b.scalar_type() == at::kFloat && b.is_contiguous() && b.sizes() == at::IntArrayRef({16, 8}),
              "A 16x16 and B 16x8 float32 contiguous");
  return bf16 ? mma_tile<__nv_bfloat16>(a, b, via_ldmatrix, __float2bfloat16_rn)
              : mma_tile<__half>(a, b, via_ldmatrix, __float2half_rn);
}

// D = A B for A 16x8, B 8x8 (float32) through cvt_tf32 and mma_1688_tf32, A's fragments via ldmatrix.x4 of
// row-major A (the kernels' way: a 32-bit element is two b16 columns of an 8x8 matrix) or picked from the
// PTX table; B's always from the table. Returns [16, 8].
at::Tensor mma_tf32_product(const at::Tensor& a, const at::Tensor& b, bool via_ldmatrix) {
  TORCH_CHECK(a.scalar_type() == at::kFloat && a.is_contiguous() && a.sizes() == at::IntArrayRef({16, 8}) &&
              b.scalar_type() == at::kFloat && b.is_contiguous() && b.sizes() == at::IntArrayRef({8, 8}),
              "A 16x8 and B 8x8 float32 contiguous");
  struct Shared { alignas(128) float a[16 * 12]; };  // rows padded to 48 bytes
  at::Tensor out = at::empty({16, 8}, a.options());
  const float *pa = a.data_ptr<float>(), *pb = b.data_ptr<float>();
  float* po = out.data_ptr<float>();
  auto kernel = [&] {
    using namespace fused_resnet::detail;
    auto& sh = block_shared<Shared>();
    const int lane = static_cast<int>(threadIdx.x), g = lane / 4, t = lane % 4;
    uint32_t fa[4], fb[2];
    if (via_ldmatrix) {
      for (int i = lane; i < 128; i += 32) {
        const uint32_t r = cvt_tf32(pa[i]);
        std::memcpy(&sh.a[(i / 8) * 12 + i % 8], &r, 4);
      }
      __syncthreads();
      ldmatrix_x4(fa, &sh.a[(lane % 16) * 12 + (lane / 16) * 4]);
    } else {
      fa[0] = cvt_tf32(pa[g * 8 + t]);
      fa[1] = cvt_tf32(pa[(g + 8) * 8 + t]);
      fa[2] = cvt_tf32(pa[g * 8 + t + 4]);
      fa[3] = cvt_tf32(pa[(g + 8) * 8 + t + 4]);
    }
    fb[0] = cvt_tf32(pb[t * 8 + g]);
    fb[1] = cvt_tf32(pb[(t + 4) * 8 + g]);
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    mma_1688_tf32(d, fa, fb);
    po[g * 8 + 2 * t] = d[0];
    po[g * 8 + 2 * t + 1] = d[1];
    po[(g + 8) * 8 + 2 * t] = d[2];
    po[(g + 8) * 8 + 2 * t + 1] = d[3];
  };
  const cudaError_t err = fused_resnet_emu::launch(kernel, dim3(1), dim3(32));
  TORCH_CHECK(err == cudaSuccess, cudaGetErrorString(err));
  return out;
}

// cvt_tf32 of each element, as float32.
at::Tensor round_tf32(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "float32 contiguous");
  at::Tensor out = at::empty_like(x);
  const float* px = x.data_ptr<float>();
  float* po = out.data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i) {
    const uint32_t u = fused_resnet::detail::cvt_tf32(px[i]);
    std::memcpy(&po[i], &u, 4);
  }
  return out;
}

// cp.async of 16 floats by 4 threads (one 16-byte copy each, the last zero-filled): what a thread reads
// before its wait (the poison: nothing has landed), and after wait + barrier. Returns [2, 16].
at::Tensor cp_async_stages(const at::Tensor& src) {
  TORCH_CHECK(src.scalar_type() == at::kFloat && src.is_contiguous() && src.numel() == 16, "16 float32");
  struct Buf { alignas(16) float v[16]; };
  at::Tensor out = at::empty({2, 16}, src.options());
  const float* ps = src.data_ptr<float>();
  float* po = out.data_ptr<float>();
  auto kernel = [&] {
    using namespace fused_resnet::detail;
    auto& sh = block_shared<Buf>();
    const int t = static_cast<int>(threadIdx.x);
    cp_async_16(&sh.v[4 * t], ps + 4 * t, t != 3);
    cp_async_commit();
    for (int i = 0; i < 4; ++i) po[4 * t + i] = sh.v[4 * t + i];  // own bytes, before the wait
    cp_async_wait<0>();
    __syncthreads();
    if (t == 0)
      for (int i = 0; i < 16; ++i) po[16 + i] = sh.v[i];
  };
  fused_resnet_emu::launch(kernel, dim3(1), dim3(4));
  return out;
}

// What a thread reads from a shared buffer no thread has written: the poison, per element.
at::Tensor unwritten_shared(int64_t n) {
  struct Buf { float v[64]; };
  TORCH_CHECK(n >= 0 && n <= 64, "at most 64");
  at::Tensor out = at::empty({n}, at::kFloat);
  float* o = out.data_ptr<float>();
  auto kernel = [&] {
    auto& sh = fused_resnet::detail::block_shared<Buf>();
    if (threadIdx.x == 0)
      for (int64_t i = 0; i < n; ++i) o[i] = sh.v[i];
  };
  fused_resnet_emu::launch(kernel, dim3(2), dim3(4));
  return out;
}

// Threads of one block at two different __syncthreads: undefined on a GPU, an abort here.
void divergent_barrier() {
  auto kernel = [] {
    if (threadIdx.x % 2 == 0) {
      __syncthreads();
    } else {
      __syncthreads();
    }
  };
  fused_resnet_emu::launch(kernel, dim3(1), dim3(4));
}

int64_t launch_error(int64_t block_threads, int64_t grid_y) {
  return fused_resnet_emu::launch([] {}, dim3(1, static_cast<unsigned>(grid_y)), dim3(static_cast<unsigned>(block_threads)));
}

}  // namespace

void register_emulation_checks(pybind11::module_& m) {
  m.def("emu_round_to_16", &round_to_16);
  m.def("emu_widen_16", &widen_16);
  m.def("emu_wmma_product", &wmma_product);
  m.def("emu_mma_product", &mma_product);
  m.def("emu_mma_tf32_product", &mma_tf32_product);
  m.def("emu_round_tf32", &round_tf32);
  m.def("emu_cp_async_stages", &cp_async_stages);
  m.def("emu_unwritten_shared", &unwritten_shared);
  m.def("emu_divergent_barrier", &divergent_barrier);
  m.def("emu_launch_error", &launch_error);
  // Host-overhead measurement only (benchmarks/host_overhead.py): launches checked, then not run.
  m.def("emu_skip_launches", [](bool on) { fused_resnet_emu::skip_launches().store(on); });
}
