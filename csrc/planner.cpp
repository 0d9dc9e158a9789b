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

struct HeapEntry {
  int64_t spread;  // largest minus smallest subset cost of the state
  int64_t id;      // states are numbered in creation order: items 0..n-1, then merges n, n+1, ...
  int64_t slot;    // where the state's subsets live (a merge reuses the slot of its first parent)
};
struct HeapLess {  // the heap pops the "largest": biggest spread, then (tie) smallest id
  bool operator()(const HeapEntry& a, const HeapEntry& b) const {
    return a.spread < b.spread || (a.spread == b.spread && a.id > b.id);
  }
};

// k-way largest differencing. Returns the items of each subset, subset 0 the costliest.
std::vector<std::vector<int64_t>> karmarkar_karp(const std::vector<int64_t>& cost, int64_t k) {
  const int64_t n = static_cast<int64_t>(cost.size());
  std::vector<std::vector<int64_t>> result(k);
  if (n == 0) return result;
  // Per live state (n slots), k subsets kept sorted by cost, descending: sums, and a linked list of
  // items (head, tail, next). Buffers are reused across calls to avoid page faults.
  static thread_local std::vector<int64_t> sums;
  static thread_local std::vector<int32_t> head, tail, next;
  static thread_local std::vector<HeapEntry> heap;
  sums.assign(n * k, 0);
  head.assign(n * k, -1);
  tail.assign(n * k, -1);
  next.assign(n, -1);
  heap.clear();
  for (int64_t i = 0; i < n; ++i) {
    sums[i * k] = cost[i];
    head[i * k] = tail[i * k] = static_cast<int32_t>(i);
    heap.push_back({cost[i], i, i});
  }
  const HeapLess less;
  std::make_heap(heap.begin(), heap.end(), less);
  int64_t next_id = n;
  std::vector<int64_t> s(k), order(k);
  std::vector<int32_t> h(k), t(k);
  while (heap.size() > 1) {
    std::pop_heap(heap.begin(), heap.end(), less);
    const HeapEntry ea = heap.back();
    heap.pop_back();
    std::pop_heap(heap.begin(), heap.end(), less);
    const HeapEntry eb = heap.back();
    heap.pop_back();
    const int64_t a = ea.slot, b = eb.slot;
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
    heap.push_back({sums[a * k] - sums[a * k + k - 1], next_id++, a});
    std::push_heap(heap.begin(), heap.end(), less);
  }
  const int64_t f = heap.front().slot;
  for (int64_t j = 0; j < k; ++j)
    for (int64_t it = head[f * k + j]; it >= 0; it = (it == tail[f * k + j]) ? -1 : next[it])
      result[j].push_back(it);
  return result;
}

// First-fit-decreasing of one rank's items into bins of capacity `cap`. Returns the bins (each
// sorted by index), ordered by tokens, descending (tie: bin creation order).
std::vector<std::vector<int64_t>> first_fit_decreasing(std::vector<int64_t> items,
                                                       const int64_t* lengths, int64_t cap) {
  // tie: equal lengths in increasing index order. Sort one 64-bit key (cap - len, index) when both
  // fit 32 bits, else compare through the lengths.
  if (cap < (int64_t(1) << 32) && (items.empty() || *std::max_element(items.begin(), items.end()) < (int64_t(1) << 32))) {
    for (int64_t& it : items) it = ((cap - lengths[it]) << 32) | it;
    std::sort(items.begin(), items.end());
    for (int64_t& it : items) it &= (int64_t(1) << 32) - 1;
  } else {
    std::sort(items.begin(), items.end(), [&](int64_t x, int64_t y) {
      return lengths[x] > lengths[y] || (lengths[x] == lengths[y] && x < y);
    });
  }
  const int64_t m = static_cast<int64_t>(items.size());
  std::vector<std::vector<int64_t>> bins;
  if (m == 0) return bins;
  // Max segment tree over the remaining capacity of m potential bins (unopened bins are full), so
  // "leftmost bin with room" is exactly first fit, in O(log m) per item.
  int64_t size = 1;
  while (size < m) size <<= 1;
  std::vector<int64_t> tree(2 * size, -1);
  for (int64_t i = 0; i < m; ++i) tree[size + i] = cap;
  for (int64_t i = size - 1; i >= 1; --i) tree[i] = std::max(tree[2 * i], tree[2 * i + 1]);
  std::vector<int64_t> used;
  for (int64_t item : items) {
    const int64_t len = lengths[item];
    int64_t node = 1;
    while (node < size) node = (tree[2 * node] >= len) ? 2 * node : 2 * node + 1;
    const int64_t bin = node - size;
    if (bin >= static_cast<int64_t>(bins.size())) {
      bins.resize(bin + 1);
      used.resize(bin + 1, 0);
    }
    bins[bin].push_back(item);
    used[bin] += len;
    tree[node] -= len;
    for (node >>= 1; node >= 1; node >>= 1) tree[node] = std::max(tree[2 * node], tree[2 * node + 1]);
  }
  std::vector<int64_t> order(bins.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return used[x] > used[y]; });
  std::vector<std::vector<int64_t>> out;
  out.reserve(bins.size());
  for (int64_t o : order) {
    std::sort(bins[o].begin(), bins[o].end());
    out.push_back(std::move(bins[o]));
  }
  return out;
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
  std::vector<std::vector<int64_t>> shares;
  if (num_ranks == 1) {
    shares.emplace_back(n);
    std::iota(shares[0].begin(), shares[0].end(), 0);
  } else {
    std::vector<int64_t> cost(n);
    for (int64_t i = 0; i < n; ++i)
      cost[i] = attn_coeff < 0 ? lengths[i] : attn_coeff * lengths[i] + lengths[i] * lengths[i];
    shares = karmarkar_karp(cost, num_ranks);
  }
  std::vector<std::vector<std::vector<int64_t>>> plan(num_ranks);
  int64_t M = 0;
  for (int64_t r = 0; r < num_ranks; ++r) {
    plan[r] = first_fit_decreasing(std::move(shares[r]), lengths, max_tokens);
    M = std::max<int64_t>(M, static_cast<int64_t>(plan[r].size()));
  }
  out.clear();
  out.reserve(1 + num_ranks * M + n);
  out.push_back(M);
  for (int64_t r = 0; r < num_ranks; ++r)
    for (int64_t m = 0; m < M; ++m)
      out.push_back(m < static_cast<int64_t>(plan[r].size()) ? static_cast<int64_t>(plan[r][m].size()) : 0);
  for (int64_t r = 0; r < num_ranks; ++r)
    for (const auto& mb : plan[r]) out.insert(out.end(), mb.begin(), mb.end());
  return true;
}

}  // namespace lwz
