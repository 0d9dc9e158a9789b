// Kernels of lwz._C with raw pointers and sizes only: no torch headers, so they compile fast and
// can be tested on their own. The torch-facing checks and op registration live in bindings.cpp.
//
// Layout shared by pack/unpack. A rollout batch x is [B, L, *feature] (contiguous); one token row
// is `row_bytes` bytes (prod(feature) * element size). Row b holds its valid tokens at
// x[b, starts[b] : starts[b] + len_b] with len_b = cu[b+1] - cu[b] (cu = int32 cu_seqlens, [B+1]).
// The packed stream is [N, *feature], N = cu[B]; sequence b occupies packed[cu[b] : cu[b+1]].
// All byte offsets are 64-bit.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace lwz {

// ---- CPU (csrc/pack_cpu.cpp) ----------------------------------------------------------------------
// Rows [b_begin, b_end) of pack: packed[cu[b] + t] = x[b, starts[b] + t].
void pack_rows_cpu(const void* x, void* packed, const int64_t* starts, const int32_t* cu, int64_t L,
                   int64_t row_bytes, int64_t b_begin, int64_t b_end);
// Rows [b_begin, b_end) of unpack: out[b, starts[b] + t] = packed[cu[b] + t], every other token row
// of out[b] is the fill value. fill16 holds the element's bytes repeated to 16 bytes
// (elem_size divides 16).
void unpack_rows_cpu(const void* packed, void* out, const int64_t* starts, const int32_t* cu,
                     int64_t L, int64_t row_bytes, const unsigned char* fill16, int elem_size,
                     int64_t b_begin, int64_t b_end);
// position_ids[cu[b] + t] = t for t < len_b, sequences [b_begin, b_end).
void position_ids_rows_cpu(const int32_t* cu, int64_t* pos, int64_t b_begin, int64_t b_end);
// Index of the first row with starts[b] < 0, len_b < 0 or starts[b] + len_b > L; -1 when all fit.
int64_t check_layout_cpu(const int64_t* starts, const int32_t* cu, int64_t B, int64_t L);

// ---- planner (csrc/planner.cpp) -------------------------------------------------------------------
// Balance n sequences over num_ranks ranks (Karmarkar-Karp largest differencing on the cost
// c_i = L_i when attn_coeff < 0, else attn_coeff * L_i + L_i^2), then first-fit-decreasing per rank
// into micro-batches of <= max_tokens tokens; every rank gets the same number M of micro-batches.
// Output encoding: out = [M, count(r=0,m=0), ..., count(r=R-1,m=M-1), indices...] where the indices
// of (r, m) follow in rank-major, micro-batch order. Returns false and sets err on bad input.
bool plan_microbatches(const int64_t* lengths, int64_t n, int64_t max_tokens, int64_t num_ranks,
                       int64_t attn_coeff, std::vector<int64_t>& out, std::string& err);

#ifdef LWZ_WITH_CUDA
// ---- CUDA (csrc/pack_cuda.cu); `stream` is a cudaStream_t; return a cudaError_t (0 = success) ----
// Device pointers; `avg_row_tokens` (N / B) sizes the grid.
int pack_cuda(const void* x, void* packed, const int64_t* starts, const int32_t* cu, int64_t B,
              int64_t L, int64_t row_bytes, int64_t avg_row_tokens, void* stream);
int unpack_cuda(const void* packed, void* out, const int64_t* starts, const int32_t* cu, int64_t B,
                int64_t L, int64_t row_bytes, const unsigned char* fill16, int64_t avg_row_tokens,
                void* stream);
int position_ids_cuda(const int32_t* cu, int64_t* pos, int64_t B, int64_t avg_row_tokens,
                      void* stream);
const char* cuda_error_string(int err);
#endif

}  // namespace lwz
