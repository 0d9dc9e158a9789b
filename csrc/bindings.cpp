// The one translation unit of lwz._C that includes torch headers: checks, op registration
// (TORCH_LIBRARY(lwz)) and the Python module init (no pybind11: the ops are reached through
// torch.ops.lwz.*; the module only carries the BUILT_WITH_CUDA flag).
//
// Ops (schemas below; Python API and fake/autograd registrations in lwz/packing.py):
//   pack(x[B, L, *f], starts[B] int, cu_seqlens[B+1] int32, total) -> packed[total, *f]
//     x may also be one row [1, L, *f] that every sequence reads (a flat source: starts are offsets
//     into it), which gathers any subset of a flat stream without a [B, L] copy of it
//   unpack(packed[N, *f], starts[B] int, cu_seqlens[B+1] int32, L, fill) -> out[B, L, *f]
//   position_ids(cu_seqlens[B+1] int32, total) -> int64[total], restarting at 0 per sequence
//   plan_microbatches(lengths[n] int64 (CPU), max_tokens, num_ranks, attn_coeff) -> int64 encoding
//   built_with_cuda() -> bool
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <cstring>

#include "lwz_kernels.h"

#ifdef LWZ_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define LWZ_BUILT_WITH_CUDA true
#else
#define LWZ_BUILT_WITH_CUDA false
#endif

namespace lwz {
namespace {

struct Layout {
  int64_t B, L, row_bytes;
  at::Tensor starts, cu;  // int64 [B], int32 [B+1], contiguous, on the data's device
};

int64_t feature_bytes(const at::Tensor& t, int64_t first_feature_dim) {
  int64_t n = t.element_size();
  for (int64_t d = first_feature_dim; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

Layout check_layout(const char* op, const at::Tensor& data, const at::Tensor& starts,
                    const at::Tensor& cu, int64_t B, int64_t L) {
  TORCH_CHECK(cu.dim() == 1 && cu.numel() == B + 1, "lwz::", op, ": cu_seqlens must be [B+1] = [",
              B + 1, "], got ", cu.sizes());
  TORCH_CHECK(cu.scalar_type() == at::kInt, "lwz::", op, ": cu_seqlens must be int32, got ",
              cu.scalar_type());
  TORCH_CHECK(starts.dim() == 1 && starts.numel() == B, "lwz::", op, ": starts must be [B] = [", B,
              "], got ", starts.sizes());
  TORCH_CHECK(!at::isFloatingType(starts.scalar_type()) && !at::isComplexType(starts.scalar_type()),
              "lwz::", op, ": starts must be an integer tensor, got ", starts.scalar_type());
  TORCH_CHECK(cu.device() == data.device() && starts.device() == data.device(), "lwz::", op,
              ": data, starts and cu_seqlens must be on one device, got ", data.device(), ", ",
              starts.device(), ", ", cu.device());
  TORCH_CHECK(L >= 0, "lwz::", op, ": L must be >= 0, got ", L);
  Layout lay{B, L, 0, starts.to(at::kLong).contiguous(), cu.contiguous()};
  return lay;
}

// On CPU the layout is checked fully (cheap); on CUDA that would cost a sync, so lwz/packing.py
// checks it on the host copies it already has.
void check_layout_values_cpu(const char* op, const Layout& lay, int64_t total) {
  const int32_t* cu = lay.cu.data_ptr<int32_t>();
  TORCH_CHECK(cu[0] == 0 && int64_t(cu[lay.B]) == total, "lwz::", op,
              ": cu_seqlens must start at 0 and end at the packed length ", total, ", got ", cu[0],
              " .. ", cu[lay.B]);
  const int64_t bad = check_layout_cpu(lay.starts.data_ptr<int64_t>(), cu, lay.B, lay.L);
  TORCH_CHECK(bad < 0, "lwz::", op, ": row ", bad, " does not fit: start ",
              bad < 0 ? 0 : lay.starts.data_ptr<int64_t>()[bad], ", length ",
              bad < 0 ? 0 : cu[bad + 1] - cu[bad], ", L ", lay.L);
}

// pack's number of sequences: x's rows, or starts' length when x is one row read by all of them.
int64_t pack_rows(const at::Tensor& x, const at::Tensor& starts) {
  return x.size(0) == 1 ? starts.numel() : x.size(0);
}

// Tokens between the starts of consecutive rows of pack's source: 0 when every sequence reads x's
// one row (starts are then offsets into that row), else L. The kernels read x[b * stride + starts[b]].
int64_t row_stride(const at::Tensor& x, const Layout& lay) { return x.size(0) == 1 ? 0 : lay.L; }

std::vector<int64_t> packed_sizes(const at::Tensor& x, int64_t total) {
  std::vector<int64_t> sizes{total};
  for (int64_t d = 2; d < x.dim(); ++d) sizes.push_back(x.size(d));
  return sizes;
}

std::vector<int64_t> unpacked_sizes(const at::Tensor& packed, int64_t B, int64_t L) {
  std::vector<int64_t> sizes{B, L};
  for (int64_t d = 1; d < packed.dim(); ++d) sizes.push_back(packed.size(d));
  return sizes;
}

// The fill value's bytes in the data's dtype, repeated to 16 bytes.
void fill_pattern(const at::Scalar& fill, at::ScalarType dtype, unsigned char* out16) {
  at::Tensor f = at::scalar_tensor(fill, at::TensorOptions().dtype(dtype));
  const int es = static_cast<int>(f.element_size());
  TORCH_CHECK(16 % es == 0, "lwz::unpack: unsupported element size ", es);
  for (int i = 0; i < 16; i += es) std::memcpy(out16 + i, f.data_ptr(), es);
}

int64_t grain_rows(int64_t row_bytes, int64_t avg_tokens) {
  const int64_t per_row = std::max<int64_t>(1, row_bytes * std::max<int64_t>(1, avg_tokens));
  return std::max<int64_t>(1, (int64_t(1) << 16) / per_row);
}

// ---- CPU ---------------------------------------------------------------------------------------------
at::Tensor pack_cpu(const at::Tensor& x, const at::Tensor& starts, const at::Tensor& cu_seqlens,
                    int64_t total) {
  TORCH_CHECK(x.dim() >= 2, "lwz::pack: x must be [B, L, *feature], got ", x.sizes());
  Layout lay = check_layout("pack", x, starts, cu_seqlens, pack_rows(x, starts), x.size(1));
  check_layout_values_cpu("pack", lay, total);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(packed_sizes(x, total), x.options());
  const int64_t rb = feature_bytes(x, 2);
  const char* src = static_cast<const char*>(xc.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* st = lay.starts.data_ptr<int64_t>();
  const int32_t* cu = lay.cu.data_ptr<int32_t>();
  at::parallel_for(0, lay.B, grain_rows(rb, lay.B ? total / lay.B : 0), [&](int64_t b0, int64_t b1) {
    pack_rows_cpu(src, dst, st, cu, row_stride(x, lay), rb, b0, b1);
  });
  return out;
}

at::Tensor unpack_cpu(const at::Tensor& packed, const at::Tensor& starts,
                      const at::Tensor& cu_seqlens, int64_t L, const at::Scalar& fill) {
  TORCH_CHECK(packed.dim() >= 1, "lwz::unpack: packed must be [N, *feature], got ", packed.sizes());
  Layout lay = check_layout("unpack", packed, starts, cu_seqlens, starts.numel(), L);
  check_layout_values_cpu("unpack", lay, packed.size(0));
  const at::Tensor pc = packed.contiguous();
  at::Tensor out = at::empty(unpacked_sizes(packed, lay.B, L), packed.options());
  const int64_t rb = feature_bytes(packed, 1);
  unsigned char f16[16];
  fill_pattern(fill, packed.scalar_type(), f16);
  const int es = static_cast<int>(packed.element_size());
  const char* src = static_cast<const char*>(pc.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* st = lay.starts.data_ptr<int64_t>();
  const int32_t* cu = lay.cu.data_ptr<int32_t>();
  at::parallel_for(0, lay.B, grain_rows(rb, L), [&](int64_t b0, int64_t b1) {
    unpack_rows_cpu(src, dst, st, cu, L, rb, f16, es, b0, b1);
  });
  return out;
}

at::Tensor position_ids_cpu(const at::Tensor& cu_seqlens, int64_t total) {
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1 && cu_seqlens.scalar_type() == at::kInt,
              "lwz::position_ids: cu_seqlens must be int32 [B+1], got ", cu_seqlens.scalar_type(), " ",
              cu_seqlens.sizes());
  const at::Tensor cu = cu_seqlens.contiguous();
  const int64_t B = cu.numel() - 1;
  const int32_t* c = cu.data_ptr<int32_t>();
  TORCH_CHECK(c[0] == 0 && int64_t(c[B]) == total, "lwz::position_ids: cu_seqlens must run from 0 to ",
              total, ", got ", c[0], " .. ", c[B]);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(c[b + 1] >= c[b], "lwz::position_ids: cu_seqlens decreases at ", b);
  at::Tensor pos = at::empty({total}, cu.options().dtype(at::kLong));
  int64_t* p = pos.data_ptr<int64_t>();
  at::parallel_for(0, B, grain_rows(8, B ? total / B : 0),
                   [&](int64_t b0, int64_t b1) { position_ids_rows_cpu(c, p, b0, b1); });
  return pos;
}

at::Tensor plan_microbatches_op(const at::Tensor& lengths, int64_t max_tokens, int64_t num_ranks,
                                int64_t attn_coeff) {
  TORCH_CHECK(lengths.dim() == 1 && lengths.device().is_cpu(),
              "lwz::plan_microbatches: lengths must be a 1-D CPU tensor, got ", lengths.sizes(), " on ",
              lengths.device());
  const at::Tensor l = lengths.to(at::kLong).contiguous();
  std::vector<int64_t> out;
  std::string err;
  const bool ok = plan_microbatches(l.data_ptr<int64_t>(), l.numel(), max_tokens, num_ranks,
                                    attn_coeff, out, err);
  TORCH_CHECK_VALUE(ok, err);
  at::Tensor t = at::empty({static_cast<int64_t>(out.size())}, at::TensorOptions().dtype(at::kLong));
  std::memcpy(t.data_ptr<int64_t>(), out.data(), out.size() * sizeof(int64_t));
  return t;
}

bool built_with_cuda() { return LWZ_BUILT_WITH_CUDA; }

// ---- CUDA --------------------------------------------------------------------------------------------
#ifdef LWZ_WITH_CUDA
void check_cuda(const char* op, int err) {
  TORCH_CHECK(err == 0, "lwz::", op, ": CUDA launch failed: ", cuda_error_string(err));
}

at::Tensor pack_cuda_op(const at::Tensor& x, const at::Tensor& starts, const at::Tensor& cu_seqlens,
                        int64_t total) {
  TORCH_CHECK(x.dim() >= 2, "lwz::pack: x must be [B, L, *feature], got ", x.sizes());
  Layout lay = check_layout("pack", x, starts, cu_seqlens, pack_rows(x, starts), x.size(1));
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(packed_sizes(x, total), x.options());
  const int64_t rb = feature_bytes(x, 2);
  if (total == 0) return out;
  check_cuda("pack", pack_cuda(xc.data_ptr(), out.data_ptr(), lay.starts.data_ptr<int64_t>(),
                               lay.cu.data_ptr<int32_t>(), lay.B, row_stride(x, lay), rb,
                               total / std::max<int64_t>(1, lay.B),
                               c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

at::Tensor unpack_cuda_op(const at::Tensor& packed, const at::Tensor& starts,
                          const at::Tensor& cu_seqlens, int64_t L, const at::Scalar& fill) {
  TORCH_CHECK(packed.dim() >= 1, "lwz::unpack: packed must be [N, *feature], got ", packed.sizes());
  Layout lay = check_layout("unpack", packed, starts, cu_seqlens, starts.numel(), L);
  const c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor pc = packed.contiguous();
  at::Tensor out = at::empty(unpacked_sizes(packed, lay.B, L), packed.options());
  unsigned char f16[16];
  fill_pattern(fill, packed.scalar_type(), f16);
  check_cuda("unpack", unpack_cuda(pc.data_ptr(), out.data_ptr(), lay.starts.data_ptr<int64_t>(),
                                   lay.cu.data_ptr<int32_t>(), lay.B, L, feature_bytes(packed, 1), f16,
                                   packed.size(0) / std::max<int64_t>(1, lay.B),
                                   c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

at::Tensor position_ids_cuda_op(const at::Tensor& cu_seqlens, int64_t total) {
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1 && cu_seqlens.scalar_type() == at::kInt,
              "lwz::position_ids: cu_seqlens must be int32 [B+1]");
  const c10::cuda::CUDAGuard guard(cu_seqlens.device());
  const at::Tensor cu = cu_seqlens.contiguous();
  const int64_t B = cu.numel() - 1;
  at::Tensor pos = at::empty({total}, cu.options().dtype(at::kLong));
  if (total == 0) return pos;
  check_cuda("position_ids", position_ids_cuda(cu.data_ptr<int32_t>(), pos.data_ptr<int64_t>(), B,
                                               total / std::max<int64_t>(1, B),
                                               c10::cuda::getCurrentCUDAStream().stream()));
  return pos;
}
#endif

}  // namespace
}  // namespace lwz

TORCH_LIBRARY(lwz, m) {
  m.def("pack(Tensor x, Tensor starts, Tensor cu_seqlens, SymInt total) -> Tensor");
  m.def("unpack(Tensor packed, Tensor starts, Tensor cu_seqlens, SymInt L, Scalar fill=0) -> Tensor");
  m.def("position_ids(Tensor cu_seqlens, SymInt total) -> Tensor");
  m.def("plan_microbatches(Tensor lengths, int max_tokens, int num_ranks, int attn_coeff) -> Tensor");
  m.def("built_with_cuda() -> bool", &lwz::built_with_cuda);
}

TORCH_LIBRARY_IMPL(lwz, CPU, m) {
  m.impl("pack", &lwz::pack_cpu);
  m.impl("unpack", &lwz::unpack_cpu);
  m.impl("position_ids", &lwz::position_ids_cpu);
  m.impl("plan_microbatches", &lwz::plan_microbatches_op);
}

#ifdef LWZ_WITH_CUDA
TORCH_LIBRARY_IMPL(lwz, CUDA, m) {
  m.impl("pack", &lwz::pack_cuda_op);
  m.impl("unpack", &lwz::unpack_cuda_op);
  m.impl("position_ids", &lwz::position_ids_cuda_op);
}
#endif

// ---- Python module ------------------------------------------------------------------------------------
static PyModuleDef lwz_module = {PyModuleDef_HEAD_INIT, "_C",
                                 "lwz C++/CUDA extension: ops live in torch.ops.lwz", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&lwz_module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddIntConstant(m, "BUILT_WITH_CUDA", LWZ_BUILT_WITH_CUDA ? 1 : 0) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
