// CPU twin of csrc/pack_cuda.cu: same layout, same results (see lwz_kernels.h).
#include <cstring>

#include "lwz_kernels.h"

namespace lwz {

void pack_rows_cpu(const void* x, void* packed, const int64_t* starts, const int32_t* cu, int64_t L,
                   int64_t row_bytes, int64_t b_begin, int64_t b_end) {
  const char* src = static_cast<const char*>(x);
  char* dst = static_cast<char*>(packed);
  for (int64_t b = b_begin; b < b_end; ++b) {
    const int64_t len = int64_t(cu[b + 1]) - int64_t(cu[b]);
    if (len <= 0) continue;
    std::memcpy(dst + int64_t(cu[b]) * row_bytes, src + (b * L + starts[b]) * row_bytes,
                size_t(len * row_bytes));
  }
}

// Fill `nbytes` bytes at dst (which starts at an element boundary) with the repeated pattern.
static void fill_bytes(char* dst, int64_t nbytes, const unsigned char* fill16, int elem_size) {
  if (nbytes <= 0) return;
  bool uniform = true;
  for (int i = 1; i < elem_size; ++i) uniform = uniform && fill16[i] == fill16[0];
  if (uniform) {
    std::memset(dst, fill16[0], size_t(nbytes));
    return;
  }
  // Seed one 16-byte block, then double the filled prefix.
  int64_t done = nbytes < 16 ? nbytes : 16;
  std::memcpy(dst, fill16, size_t(done));
  while (done < nbytes) {
    const int64_t n = done < nbytes - done ? done : nbytes - done;
    std::memcpy(dst + done, dst, size_t(n));
    done += n;
  }
}

void unpack_rows_cpu(const void* packed, void* out, const int64_t* starts, const int32_t* cu,
                     int64_t L, int64_t row_bytes, const unsigned char* fill16, int elem_size,
                     int64_t b_begin, int64_t b_end) {
  const char* src = static_cast<const char*>(packed);
  char* dst = static_cast<char*>(out);
  for (int64_t b = b_begin; b < b_end; ++b) {
    const int64_t len = int64_t(cu[b + 1]) - int64_t(cu[b]);
    const int64_t s = starts[b];
    char* row = dst + b * L * row_bytes;
    fill_bytes(row, s * row_bytes, fill16, elem_size);
    if (len > 0) std::memcpy(row + s * row_bytes, src + int64_t(cu[b]) * row_bytes, size_t(len * row_bytes));
    fill_bytes(row + (s + len) * row_bytes, (L - s - len) * row_bytes, fill16, elem_size);
  }
}

void position_ids_rows_cpu(const int32_t* cu, int64_t* pos, int64_t b_begin, int64_t b_end) {
  for (int64_t b = b_begin; b < b_end; ++b) {
    const int64_t beg = cu[b], len = int64_t(cu[b + 1]) - beg;
    for (int64_t t = 0; t < len; ++t) pos[beg + t] = t;
  }
}

int64_t check_layout_cpu(const int64_t* starts, const int32_t* cu, int64_t B, int64_t L) {
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = int64_t(cu[b + 1]) - int64_t(cu[b]);
    if (starts[b] < 0 || len < 0 || starts[b] + len > L) return b;
  }
  return -1;
}

}  // namespace lwz
