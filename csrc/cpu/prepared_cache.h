// A small LRU cache of what the CPU ops derive from a sparse weight's tensors: the validated index
// structure, its regrouped layouts (K-blocked CSR, bf16 pairs, transposes) and the values prepared
// for the kernels. Included by ops_cpu.cpp only (it needs torch; the kernel files must not).
//
// Why: that preparation is O(nnz) per call (validation scans, a counting sort, gathers): 30-70 us
// for an adapter projection at sparsity 0.8-0.9, which is 5-10% of a [4096, 768] product and
// several times the whole product for a few tokens. The structure of a pruned adapter never changes
// and its values change once per optimizer step, so both are computed once and reused.
//
// An entry is valid for a tensor while the tensor is the same storage (held weakly: a freed tensor's
// entry can never match a new tensor at the same address), at the same data pointer and size, and
// its version counter has not moved (every in-place op bumps it, so an in-place update of values or
// of the indices is always seen). Inference tensors have no version counter: they are never cached.
// Writes that bypass PyTorch (a raw data pointer, numpy on .numpy()) are not seen; SAK_CPU_CACHE=0
// turns the cache off.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

namespace sak_cpu {

// The identity of a tensor's contents at one moment (see above). An undefined tensor is a valid key.
struct TensorKey {
  std::optional<c10::weak_intrusive_ptr<c10::StorageImpl>> storage;
  const void* data = nullptr;
  int64_t numel = 0;
  uint32_t version = 0;
  at::ScalarType dtype = at::kFloat;

  // nullopt: the tensor cannot be keyed (an inference tensor, or one without storage)
  static std::optional<TensorKey> of(const at::Tensor& t) {
    TensorKey k;
    if (!t.defined()) return k;
    if (t.is_inference() || !t.has_storage()) return std::nullopt;
    k.storage = t.storage().getWeakStorageImpl();
    k.data = t.data_ptr();
    k.numel = t.numel();
    k.version = t._version();
    k.dtype = t.scalar_type();
    return k;
  }
  bool expired() const { return storage.has_value() && storage->expired(); }
  // the same tensor, whatever its version
  bool same_tensor(const TensorKey& o) const {
    const bool both_undefined = !storage.has_value() && !o.storage.has_value();
    if (both_undefined) return true;
    if (storage.has_value() != o.storage.has_value()) return false;
    return storage->_unsafe_get_target() == o.storage->_unsafe_get_target() && !storage->expired() &&
           data == o.data && numel == o.numel && dtype == o.dtype;
  }
  bool operator==(const TensorKey& o) const { return same_tensor(o) && version == o.version; }
};

// A cache key: the keys of some tensors plus integer parameters (what was derived, and how).
struct CacheKey {
  std::vector<TensorKey> tensors;
  std::vector<int64_t> params;
  bool operator==(const CacheKey& o) const { return params == o.params && tensors == o.tensors; }
  bool expired() const {
    for (const TensorKey& t : tensors)
      if (t.expired()) return true;
    return false;
  }
  // an entry for the same tensors and parameters at older versions (e.g. the values before an
  // optimizer step): it can never match again
  bool superseded_by(const CacheKey& o) const {
    if (params != o.params || tensors.size() != o.tensors.size()) return false;
    for (size_t i = 0; i < tensors.size(); i++)
      if (!tensors[i].same_tensor(o.tensors[i])) return false;
    return true;
  }
};

// Entries are immutable once built and handed out as shared_ptr<const Value>: a caller keeps its
// entry alive while an eviction or another thread replaces it.
template <class Value>
class PreparedCache {
 public:
  explicit PreparedCache(size_t capacity) : capacity_(capacity) {}

  // The cached value for the key of `tensors` + `params`, built by `build()` on a miss. Builds run
  // outside the lock (two threads may build the same entry once each; both results are correct).
  std::shared_ptr<const Value> get(const std::vector<at::Tensor>& tensors, std::vector<int64_t> params,
                                   const std::function<std::shared_ptr<const Value>()>& build) {
    if (!enabled()) return build();
    CacheKey key;
    key.params = std::move(params);
    for (const at::Tensor& t : tensors) {
      std::optional<TensorKey> k = TensorKey::of(t);
      if (!k) return build();
      key.tensors.push_back(std::move(*k));
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = items_.begin(); it != items_.end(); ++it) {
        if (it->first == key) {
          items_.splice(items_.begin(), items_, it);  // most recently used first
          return items_.front().second;
        }
      }
    }
    std::shared_ptr<const Value> v = build();
    std::lock_guard<std::mutex> lock(mu_);
    items_.remove_if([&key](const std::pair<CacheKey, std::shared_ptr<const Value>>& e) {
      return e.first.expired() || e.first.superseded_by(key);
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

  // SAK_CPU_CACHE=0 turns every cache off (read per call, so tests can compare).
  static bool enabled() {
    const char* env = std::getenv("SAK_CPU_CACHE");
    if (!env || !*env || std::strcmp(env, "1") == 0) return true;
    TORCH_CHECK(std::strcmp(env, "0") == 0, "SAK_CPU_CACHE: expected 0 or 1, got '", env, "'");
    return false;
  }

 private:
  size_t capacity_;
  std::mutex mu_;
  std::list<std::pair<CacheKey, std::shared_ptr<const Value>>> items_;
};

}  // namespace sak_cpu
