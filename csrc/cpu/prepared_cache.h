// A small LRU cache of what the CPU ops derive from the tensors of a sparse weight: the validated
// structure, its regrouped layouts (K-blocked CSR, bf16 pairs, BSR entry rows), the
// transpose-consistency check, and the values prepared for the kernels (converted, regrouped or packed).
// Included by ops_cpu.cpp only (it needs torch; the kernel files must not).
//
// Why: validating and regrouping a structure is O(nnz) with scattered accesses (range scans, a
// counting sort, a permutation check): 30-70 us for an adapter projection at sparsity 0.8-0.9, several
// times the whole product for a few tokens. The structure of a pruned adapter never changes, and in
// inference neither do its values.
//
// When an entry is served: only while the tensors it was built from hold, byte for byte, what they
// held when it was built. Every lookup compares them with a snapshot kept in the entry (memcmp: a few
// microseconds for an adapter projection). Nothing trusts a version counter or a data pointer: fused
// optimizers, writes through `.data`, `param.data = ...`, numpy views and raw pointers all bypass
// PyTorch's version counter, and a freed tensor's address can be reused. After an optimizer step the
// values differ, so the next call prepares them again, whatever wrote them. SAK_CPU_CACHE=0 turns the
// cache off (knobs.h).
#pragma once

#include <ATen/ATen.h>

#include <cstring>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <vector>

namespace sak_cpu {

// The contents of some tensors plus integer parameters (what was derived from them, and how).
// Lookups find candidates by data pointer and size, then compare the bytes.
struct CacheKey {
  struct Item {
    const void* data = nullptr;  // where the tensor was (a lookup hint only, never trusted)
    at::ScalarType dtype = at::kInt;
    std::vector<int64_t> sizes;
    std::vector<uint8_t> bytes;  // the snapshot; empty for an undefined tensor
    bool defined = false;
  };
  std::vector<Item> items;
  std::vector<int64_t> params;

  // Tensors must be contiguous (the callers check it before any lookup).
  static CacheKey of(const std::vector<at::Tensor>& tensors, std::vector<int64_t> params, bool snapshot) {
    CacheKey k;
    k.params = std::move(params);
    k.items.reserve(tensors.size());
    for (const at::Tensor& t : tensors) {
      Item it;
      it.defined = t.defined();
      if (it.defined) {
        TORCH_CHECK(t.is_contiguous(), "sparseadapter_kernels: internal: a cached index tensor must be contiguous");
        it.data = t.data_ptr();
        it.dtype = t.scalar_type();
        it.sizes = t.sizes().vec();
        if (snapshot) {
          const auto* p = static_cast<const uint8_t*>(t.data_ptr());
          it.bytes.assign(p, p + t.nbytes());
        }
      }
      k.items.push_back(std::move(it));
    }
    return k;
  }
  // same tensors by address and shape (a candidate), and same parameters
  bool same_place(const CacheKey& o) const {
    if (params != o.params || items.size() != o.items.size()) return false;
    for (size_t i = 0; i < items.size(); i++) {
      const Item &a = items[i], &b = o.items[i];
      if (a.defined != b.defined || a.data != b.data || a.dtype != b.dtype || a.sizes != b.sizes) return false;
    }
    return true;
  }
  // the snapshot equals the current contents of `tensors` (which are at the same place)
  bool holds(const std::vector<at::Tensor>& tensors) const {
    for (size_t i = 0; i < items.size(); i++) {
      if (!items[i].defined) continue;
      if (std::memcmp(items[i].bytes.data(), tensors[i].data_ptr(), items[i].bytes.size()) != 0) return false;
    }
    return true;
  }
};

// Entries are immutable once built and handed out as shared_ptr<const Value>: a caller keeps its
// entry alive while an eviction or another thread replaces it.
template <class Value>
class PreparedCache {
 public:
  explicit PreparedCache(size_t capacity) : capacity_(capacity) {}

  // The value derived from `tensors` + `params`, built by `build()` when no entry holds their current
  // contents. Builds run outside the lock (two threads may build the same entry once each; both
  // results are correct). `build()` may throw (a validation error): nothing is cached then.
  // `enabled` is the SAK_CPU_CACHE knob (knobs.h): off, every call builds.
  std::shared_ptr<const Value> get(bool enabled, const std::vector<at::Tensor>& tensors, std::vector<int64_t> params,
                                   const std::function<std::shared_ptr<const Value>()>& build) {
    if (!enabled) return build();
    const CacheKey probe = CacheKey::of(tensors, params, /*snapshot=*/false);
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = items_.begin(); it != items_.end(); ++it) {
        if (it->first.same_place(probe) && it->first.holds(tensors)) {
          items_.splice(items_.begin(), items_, it);  // most recently used first
          return items_.front().second;
        }
      }
    }
    std::shared_ptr<const Value> v = build();
    CacheKey key = CacheKey::of(tensors, std::move(params), /*snapshot=*/true);
    std::lock_guard<std::mutex> lock(mu_);
    // an entry at the same place with other contents can only match again if the old contents come back
    items_.remove_if([&key](const std::pair<CacheKey, std::shared_ptr<const Value>>& e) {
      return e.first.same_place(key);
    });
    items_.emplace_front(std::move(key), v);
    while (items_.size() > capacity_) items_.pop_back();
    return v;
  }

  size_t size() {
    std::lock_guard<std::mutex> lock(mu_);
    return items_.size();
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    items_.clear();
  }

 private:
  size_t capacity_;
  std::mutex mu_;
  std::list<std::pair<CacheKey, std::shared_ptr<const Value>>> items_;
};

}  // namespace sak_cpu
