// CUDA pack / unpack / position_ids (layout in lwz_kernels.h). No torch headers here.
//
// pack and unpack are pure copies: grid (B, G), block 256. Row b's valid span is contiguous both in
// x and in the packed stream, so pack is one memcpy per row, split over the G blocks of grid row b.
// Copies use the widest vector type V (16, 8, 4, 2 or 1 bytes) that divides row_bytes and the
// alignment of both base pointers; all offsets are 64-bit.
#include <cuda_runtime.h>

#include <cstdint>

#include "lwz_kernels.h"

namespace lwz {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

struct alignas(16) Fill16 {
  unsigned char b[16];
};

template <int N> struct VecOf;
template <> struct VecOf<16> { using T = uint4; };
template <> struct VecOf<8> { using T = uint2; };
template <> struct VecOf<4> { using T = uint32_t; };
template <> struct VecOf<2> { using T = uint16_t; };
template <> struct VecOf<1> { using T = uint8_t; };

template <int VB>
__global__ void pack_kernel(const char* __restrict__ x, char* __restrict__ packed,
                            const int64_t* __restrict__ starts, const int32_t* __restrict__ cu,
                            int64_t L, int64_t row_bytes) {
  using V = typename VecOf<VB>::T;
  const int64_t b = blockIdx.x;
  const int64_t beg = cu[b];
  const int64_t n = (int64_t(cu[b + 1]) - beg) * (row_bytes / VB);
  const V* __restrict__ src = reinterpret_cast<const V*>(x + (b * L + starts[b]) * row_bytes);
  V* __restrict__ dst = reinterpret_cast<V*>(packed + beg * row_bytes);
  const int64_t stride = int64_t(gridDim.y) * blockDim.x;
  int64_t i = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  for (; i + (kUnroll - 1) * stride < n; i += kUnroll * stride) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = src[i + u * stride];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) dst[i + u * stride] = v[u];
  }
  for (; i < n; i += stride) dst[i] = src[i];
}

template <int VB>
__global__ void unpack_kernel(const char* __restrict__ packed, char* __restrict__ out,
                              const int64_t* __restrict__ starts, const int32_t* __restrict__ cu,
                              int64_t L, int64_t row_bytes, Fill16 fill) {
  using V = typename VecOf<VB>::T;
  const int64_t b = blockIdx.x;
  const int64_t units_per_tok = row_bytes / VB;
  const int64_t beg = cu[b];
  const int64_t lo = starts[b] * units_per_tok;                              // first valid unit
  const int64_t hi = lo + (int64_t(cu[b + 1]) - beg) * units_per_tok;         // one past the last
  const int64_t n = L * units_per_tok;
  const V* __restrict__ src = reinterpret_cast<const V*>(packed + beg * row_bytes) - lo;
  V* __restrict__ dst = reinterpret_cast<V*>(out + b * L * row_bytes);
  // VB divides 16 and the element size divides 16, so the fill bytes of unit i start at
  // (i * VB) % 16 of the 16-byte pattern.
  V fv[16 / VB];
#pragma unroll
  for (int k = 0; k < 16 / VB; ++k) memcpy(&fv[k], fill.b + k * VB, VB);
  const int64_t stride = int64_t(gridDim.y) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; i < n; i += stride) {
    dst[i] = (i >= lo && i < hi) ? src[i] : fv[i & (16 / VB - 1)];
  }
}

__global__ void position_ids_kernel(const int32_t* __restrict__ cu, int64_t* __restrict__ pos) {
  const int64_t b = blockIdx.x;
  const int64_t beg = cu[b], len = int64_t(cu[b + 1]) - beg;
  for (int64_t t = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; t < len;
       t += int64_t(gridDim.y) * blockDim.x)
    pos[beg + t] = t;
}

int vector_bytes(const void* p, const void* q, int64_t row_bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p) | reinterpret_cast<uintptr_t>(q);
  for (int v = 16; v > 1; v >>= 1)
    if (row_bytes % v == 0 && a % v == 0) return v;
  return 1;
}

// Blocks per row: enough that about 4 vector units per thread cover an average row, at most 65535.
unsigned grid_y(int64_t avg_row_units) {
  int64_t g = (avg_row_units + int64_t(kThreads) * kUnroll - 1) / (int64_t(kThreads) * kUnroll);
  if (g < 1) g = 1;
  if (g > 65535) g = 65535;
  return unsigned(g);
}

}  // namespace

int pack_cuda(const void* x, void* packed, const int64_t* starts, const int32_t* cu, int64_t B,
              int64_t L, int64_t row_bytes, int64_t avg_row_tokens, void* stream) {
  if (B == 0 || row_bytes == 0) return 0;
  const int vb = vector_bytes(x, packed, row_bytes);
  const dim3 grid(unsigned(B), grid_y(avg_row_tokens * (row_bytes / vb)));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const char* xs = static_cast<const char*>(x);
  char* ps = static_cast<char*>(packed);
  switch (vb) {
    case 16: pack_kernel<16><<<grid, kThreads, 0, s>>>(xs, ps, starts, cu, L, row_bytes); break;
    case 8: pack_kernel<8><<<grid, kThreads, 0, s>>>(xs, ps, starts, cu, L, row_bytes); break;
    case 4: pack_kernel<4><<<grid, kThreads, 0, s>>>(xs, ps, starts, cu, L, row_bytes); break;
    case 2: pack_kernel<2><<<grid, kThreads, 0, s>>>(xs, ps, starts, cu, L, row_bytes); break;
    default: pack_kernel<1><<<grid, kThreads, 0, s>>>(xs, ps, starts, cu, L, row_bytes); break;
  }
  return int(cudaGetLastError());
}

int unpack_cuda(const void* packed, void* out, const int64_t* starts, const int32_t* cu, int64_t B,
                int64_t L, int64_t row_bytes, const unsigned char* fill16, int64_t avg_row_tokens,
                void* stream) {
  if (B == 0 || row_bytes == 0 || L == 0) return 0;
  const int vb = vector_bytes(packed, out, row_bytes);
  Fill16 f;
  for (int i = 0; i < 16; ++i) f.b[i] = fill16[i];
  // unpack writes whole output rows (L tokens), so size the grid by L.
  (void)avg_row_tokens;
  const dim3 grid(unsigned(B), grid_y(L * (row_bytes / vb)));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const char* ps = static_cast<const char*>(packed);
  char* os = static_cast<char*>(out);
  switch (vb) {
    case 16: unpack_kernel<16><<<grid, kThreads, 0, s>>>(ps, os, starts, cu, L, row_bytes, f); break;
    case 8: unpack_kernel<8><<<grid, kThreads, 0, s>>>(ps, os, starts, cu, L, row_bytes, f); break;
    case 4: unpack_kernel<4><<<grid, kThreads, 0, s>>>(ps, os, starts, cu, L, row_bytes, f); break;
    case 2: unpack_kernel<2><<<grid, kThreads, 0, s>>>(ps, os, starts, cu, L, row_bytes, f); break;
    default: unpack_kernel<1><<<grid, kThreads, 0, s>>>(ps, os, starts, cu, L, row_bytes, f); break;
  }
  return int(cudaGetLastError());
}

int position_ids_cuda(const int32_t* cu, int64_t* pos, int64_t B, int64_t avg_row_tokens,
                      void* stream) {
  if (B == 0) return 0;
  int64_t g = (avg_row_tokens + kThreads - 1) / kThreads;
  g = g < 1 ? 1 : (g > 65535 ? 65535 : g);
  position_ids_kernel<<<dim3(unsigned(B), unsigned(g)), kThreads, 0,
                        static_cast<cudaStream_t>(stream)>>>(cu, pos);
  return int(cudaGetLastError());
}

const char* cuda_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace lwz
