// Micro-batch planner: Karmarkar-Karp balancing across ranks, then first-fit-decreasing into
// token-budget micro-batches. lwz/packing.py holds a pure-Python twin (_plan_python) that must give
// the same plan: every tie is broken the same way in both (see the comments marked "tie").
#include <algorithm>
#include <numeric>
#include <queue>
#include <string>
#include <vector>

#include "lwz_kernels.h"

namespace lwz {
namespace {

// Priority queues of KK states: pop the biggest spread (largest minus smallest subset cost), ties
// by the smallest id. States are numbered in creation order (items 0..n-1, then merges n, n+1, ...);
// a state's slot is where its subsets live (a merge reuses the slot of its first parent).
struct HeapQueue {
  struct Entry {
    int64_t spread;
    uint64_t idslot;  // (id << 32) | slot
  };
  struct Less {
    bool operator()(const Entry& a, const Entry& b) const {
      return a.spread < b.spread || (a.spread == b.spread && a.idslot > b.idslot);
    }
  };
  std::vector<Entry> heap;
  void init(const std::vector<int64_t>& cost) {
    heap.clear();
    for (size_t i = 0; i < cost.size(); ++i) heap.push_back({cost[i], (uint64_t(i) << 32) | uint64_t(i)});
    std::make_heap(heap.begin(), heap.end(), Less());
  }
  size_t size() const { return heap.size(); }
  int64_t pop() {  // returns the slot
    std::pop_heap(heap.begin(), heap.end(), Less());
    const int64_t slot = int64_t(heap.back().idslot & 0xffffffffu);
    heap.pop_back();
    return slot;
  }
  void push(int64_t spread, int64_t id, int64_t slot) {
    heap.push_back({spread, (uint64_t(id) << 32) | uint64_t(slot)});
    std::push_heap(heap.begin(), heap.end(), Less());
  }
};

// Same order with one FIFO per spread value, for small integer costs (token counts). A merge's
// spread never exceeds the larger spread of its parents (the differences of a's and b's sorted sums
// are taken in opposite order), so the cursor `top` only climbs back up to a level just popped,
// and new states have the largest ids, so appending keeps every FIFO in id order.
struct BucketQueue {
  std::vector<int64_t> head, tail, next, slot_of;
  int64_t top = -1;
  size_t count = 0;
  void init(const std::vector<int64_t>& cost, int64_t max_cost) {
    const int64_t n = static_cast<int64_t>(cost.size());
    head.assign(max_cost + 1, -1);
    tail.assign(max_cost + 1, -1);
    next.assign(2 * n, -1);
    slot_of.assign(2 * n, -1);
    count = 0;
    top = 0;
    for (int64_t i = 0; i < n; ++i) push(cost[i], i, i);
  }
  size_t size() const { return count; }
  void push(int64_t spread, int64_t id, int64_t slot) {
    slot_of[id] = slot;
    next[id] = -1;
    if (spread > top) top = spread;
    if (tail[spread] < 0) head[spread] = id; else next[tail[spread]] = id;
    tail[spread] = id;
    ++count;
  }
  int64_t pop() {
    while (head[top] < 0) --top;
    const int64_t id = head[top];
    head[top] = next[id];
    if (head[top] < 0) tail[top] = -1;
    --count;
    return slot_of[id];
  }
};

// k-way largest differencing. Returns the items of each subset, subset 0 the costliest.
template <class Queue>
std::vector<std::vector<int64_t>> karmarkar_karp(const std::vector<int64_t>& cost, int64_t k, Queue& queue) {
  const int64_t n = static_cast<int64_t>(cost.size());
  std::vector<std::vector<int64_t>> result(k);
  if (n == 0) return result;
  // Per live state (n slots), k subsets kept sorted by cost, descending: sums, and a linked list of
  // items (head, tail, next). Buffers are reused across calls to avoid page faults.
  static thread_local std::vector<int64_t> sums;
  static thread_local std::vector<int32_t> head, tail, next;
  sums.assign(n * k, 0);
  head.assign(n * k, -1);
  tail.assign(n * k, -1);
  next.assign(n, -1);
  for (int64_t i = 0; i < n; ++i) {
    sums[i * k] = cost[i];
    head[i * k] = tail[i * k] = static_cast<int32_t>(i);
  }
  int64_t next_id = n;
  std::vector<int64_t> s(k), order(k);
  std::vector<int32_t> h(k), t(k);
  while (queue.size() > 1) {
    const int64_t a = queue.pop();
    const int64_t b = queue.pop();
    // Largest subset of a with the smallest of b, and so on.
    for (int64_t j = 0; j < k; ++j) {
      const int64_t ia = a * k + j, ib = b * k + (k - 1 - j);
      s[j] = sums[ia] + sums[ib];
      if (head[ia] < 0) {
        h[j] = head[ib];
        t[j] = tail[ib];
      } else if (head[ib] < 0) {
        h[j] = head[ia];
        t[j] = tail[ia];
      } else {  // a's items, then b's
        next[tail[ia]] = head[ib];
        h[j] = head[ia];
        t[j] = tail[ib];
      }
    }
    // tie: stable sort (insertion sort, k is small), equal sums keep their merged position
    for (int64_t j = 0; j < k; ++j) {
      int64_t p = j;
      for (; p > 0 && s[order[p - 1]] < s[j]; --p) order[p] = order[p - 1];
      order[p] = j;
    }
    for (int64_t j = 0; j < k; ++j) {
      sums[a * k + j] = s[order[j]];
      head[a * k + j] = h[order[j]];
      tail[a * k + j] = t[order[j]];
    }
    queue.push(sums[a * k] - sums[a * k + k - 1], next_id++, a);
  }
  const int64_t f = queue.pop();
  for (int64_t j = 0; j < k; ++j)
    for (int64_t it = head[f * k + j]; it >= 0; it = (it == tail[f * k + j]) ? -1 : next[it])
      result[j].push_back(it);
  return result;
}

std::vector<std::vector<int64_t>> balance(const std::vector<int64_t>& cost, int64_t k) {
  const int64_t n = static_cast<int64_t>(cost.size());
  const int64_t max_cost = n ? *std::max_element(cost.begin(), cost.end()) : 0;
  if (max_cost <= std::max<int64_t>(int64_t(1) << 16, 8 * n)) {
    static thread_local BucketQueue q;
    q.init(cost, max_cost);
    return karmarkar_karp(cost, k, q);
  }
  static thread_local HeapQueue q;
  q.init(cost);
  return karmarkar_karp(cost, k, q);
}

}  // namespace

bool plan_microbatches(const int64_t* lengths, int64_t n, int64_t max_tokens, int64_t num_ranks,
                       int64_t attn_coeff, std::vector<int64_t>& out, std::string& err) {
  if (max_tokens <= 0) {
    err = "max_tokens must be positive, got " + std::to_string(max_tokens);
    return false;
  }
  if (num_ranks < 1) {
    err = "num_ranks must be >= 1, got " + std::to_string(num_ranks);
    return false;
  }
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[i] < 0) {
      err = "sequence " + std::to_string(i) + " has negative length " + std::to_string(lengths[i]);
      return false;
    }
    if (lengths[i] > max_tokens) {
      err = "sequence " + std::to_string(i) + " has length " + std::to_string(lengths[i]) +
            " > max_tokens=" + std::to_string(max_tokens) + " (the micro-batch token budget)";
      return false;
    }
  }
  const int64_t R = num_ranks;
  std::vector<int32_t> rank_of(n, 0);
  if (R > 1) {
    std::vector<int64_t> cost(n);
    for (int64_t i = 0; i < n; ++i)
      cost[i] = attn_coeff < 0 ? lengths[i] : attn_coeff * lengths[i] + lengths[i] * lengths[i];
    const auto shares = balance(cost, R);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t i : shares[r]) rank_of[i] = static_cast<int32_t>(r);
  }
  // First-fit-decreasing, all ranks in one pass over the global decreasing order
  // (tie: equal lengths in increasing index order); a rank's items keep that order.
  std::vector<int64_t> order(n);
  if (max_tokens <= std::max<int64_t>(int64_t(1) << 16, 8 * n)) {  // stable counting sort
    std::vector<int64_t> start(max_tokens + 2, 0);
    for (int64_t i = 0; i < n; ++i) ++start[max_tokens - lengths[i] + 1];
    for (int64_t v = 1; v <= max_tokens + 1; ++v) start[v] += start[v - 1];
    for (int64_t i = 0; i < n; ++i) order[start[max_tokens - lengths[i]]++] = i;
  } else {
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
      return lengths[x] > lengths[y] || (lengths[x] == lengths[y] && x < y);
    });
  }
  // Per rank, a max segment tree over the remaining room of the potential bins (unopened bins are
  // empty), so "leftmost bin with room" is exactly first fit, O(log m). First fit leaves at most
  // one bin at most half full, so a rank needs at most min(items, 2 * tokens / cap + 1) bins.
  std::vector<int64_t> cnt(R, 0), tok(R, 0), tsize(R, 1), toff(R + 1, 0), uoff(R + 1, 0), nbins(R, 0);
  for (int64_t i = 0; i < n; ++i) {
    ++cnt[rank_of[i]];
    tok[rank_of[i]] += lengths[i];
  }
  for (int64_t r = 0; r < R; ++r) {
    cnt[r] = std::min(cnt[r], 2 * (tok[r] / max_tokens) + 2);
    while (tsize[r] < cnt[r]) tsize[r] <<= 1;
    toff[r + 1] = toff[r] + 2 * tsize[r];
    uoff[r + 1] = uoff[r] + cnt[r];
  }
  std::vector<int64_t> tree(toff[R], -1), used(uoff[R], 0);
  std::vector<int32_t> bin_of(n);
  for (int64_t r = 0; r < R; ++r) {
    int64_t* t = tree.data() + toff[r];
    for (int64_t j = 0; j < cnt[r]; ++j) t[tsize[r] + j] = max_tokens;
    for (int64_t j = tsize[r] - 1; j >= 1; --j) t[j] = std::max(t[2 * j], t[2 * j + 1]);
  }
  for (int64_t i : order) {
    const int64_t r = rank_of[i], len = lengths[i], size = tsize[r];
    int64_t* t = tree.data() + toff[r];
    int64_t node = 1;
    while (node < size) node = (t[2 * node] >= len) ? 2 * node : 2 * node + 1;
    const int64_t bin = node - size;
    bin_of[i] = static_cast<int32_t>(bin);
    used[uoff[r] + bin] += len;
    nbins[r] = std::max(nbins[r], bin + 1);
    t[node] -= len;
    for (node >>= 1; node >= 1; node >>= 1) t[node] = std::max(t[2 * node], t[2 * node + 1]);
  }
  const int64_t M = n == 0 ? 0 : *std::max_element(nbins.begin(), nbins.end());
  // Micro-batch position of each bin: by tokens, descending (tie: bin creation order).
  std::vector<int64_t> pos_of(uoff[R]), perm;
  for (int64_t r = 0; r < R; ++r) {
    perm.resize(nbins[r]);
    std::iota(perm.begin(), perm.end(), 0);
    const int64_t* u = used.data() + uoff[r];
    std::stable_sort(perm.begin(), perm.end(), [&](int64_t x, int64_t y) { return u[x] > u[y]; });
    for (int64_t p = 0; p < nbins[r]; ++p) pos_of[uoff[r] + perm[p]] = p;
  }
  // out = [M, counts of (r, m) rank-major, indices]; indices ascending inside a micro-batch.
  out.assign(1 + R * M + n, 0);
  out[0] = M;
  int64_t* counts = out.data() + 1;
  for (int64_t i = 0; i < n; ++i) ++counts[rank_of[i] * M + pos_of[uoff[rank_of[i]] + bin_of[i]]];
  std::vector<int64_t> fill(R * M + 1, 0);
  for (int64_t s = 0; s < R * M; ++s) fill[s + 1] = fill[s] + counts[s];
  int64_t* idx = out.data() + 1 + R * M;
  for (int64_t i = 0; i < n; ++i) idx[fill[rank_of[i] * M + pos_of[uoff[rank_of[i]] + bin_of[i]]]++] = i;
  return true;
}

}  // namespace lwz
