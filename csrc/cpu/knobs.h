// The environment knobs of the CPU ops, read and validated in this one place, once per op call (tests
// and benchmarks change them between calls). Included by the torch-side CPU files (glue.h) only.
//
//   SAK_CPU_ISA      auto | avx512bf16 | avx512 | avx2 | generic   kernel instruction set (auto: the best this CPU has)
//   SAK_CPU_TILE     16 | 32 | 64                                   token tile (unset: chosen per shape)
//   SAK_CPU_STREAM   auto | 0 | 1                                   non-temporal stores of the output
//   SAK_CPU_KBLOCK   auto | 0 | 1                                   K-blocked CSR forward
//   SAK_CPU_PREFETCH 0 | 1                                          software prefetch (default 1)
//   SAK_CPU_CACHE    0 | 1                                          prepared-operand cache (default 1)
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace sak_cpu {

struct Knobs {
  enum Tri : int { kAuto = -1, kOff = 0, kOn = 1 };
  std::string isa = "auto";
  int tile = 0;  // 0: chosen per shape
  Tri stream = kAuto, kblock = kAuto;
  bool prefetch = true, cache = true;

  static Knobs read() {
    Knobs k;
    if (const char* s = value("SAK_CPU_ISA")) {
      k.isa = s;
      TORCH_CHECK(k.isa == "auto" || k.isa == "avx512bf16" || k.isa == "avx512" || k.isa == "avx2" ||
                      k.isa == "generic",
                  "SAK_CPU_ISA: expected one of auto, avx512bf16, avx512, avx2, generic, got '", s, "'");
    }
    if (const char* s = value("SAK_CPU_TILE")) {
      const std::string t(s);
      TORCH_CHECK(t == "16" || t == "32" || t == "64", "SAK_CPU_TILE: expected 16, 32 or 64, got '", s, "'");
      k.tile = std::atoi(s);
    }
    k.stream = tri("SAK_CPU_STREAM");
    k.kblock = tri("SAK_CPU_KBLOCK");
    k.prefetch = flag("SAK_CPU_PREFETCH");
    k.cache = flag("SAK_CPU_CACHE");
    return k;
  }

 private:
  // the variable's value, nullptr when unset or empty
  static const char* value(const char* name) {
    const char* s = std::getenv(name);
    return (s && *s) ? s : nullptr;
  }
  static Tri tri(const char* name) {
    const char* s = value(name);
    if (!s) return kAuto;
    const std::string v(s);
    TORCH_CHECK(v == "auto" || v == "0" || v == "1", name, ": expected auto, 0 or 1, got '", s, "'");
    return v == "auto" ? kAuto : (v == "1" ? kOn : kOff);
  }
  static bool flag(const char* name) {
    const char* s = value(name);
    if (!s) return true;
    const std::string v(s);
    TORCH_CHECK(v == "0" || v == "1", name, ": expected 0 or 1, got '", s, "'");
    return v == "1";
  }
};

}  // namespace sak_cpu
