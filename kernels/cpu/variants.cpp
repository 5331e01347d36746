// ISA detection and the table of kernel variants (variants.h).
#include "cpu/variants.h"

namespace iosparse {

Isa detect_isa() {
  static const Isa isa = [] {
    Isa best = ISA_GENERIC;
#if IOSPARSE_X86
    const char* force = std::getenv("IOSPARSE_ISA");  // "generic" / "avx2": test the fallbacks
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = ISA_AVX2;
    if (best == ISA_AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
      best = ISA_AVX512;
    if (force && std::strcmp(force, "generic") == 0) best = ISA_GENERIC;
    if (force && std::strcmp(force, "avx2") == 0 && best >= ISA_AVX2) best = ISA_AVX2;
#endif
    return best;
  }();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case ISA_AVX512: return "avx512";
    case ISA_AVX2: return "avx2";
    case ISA_GENERIC: return "generic";
    default: return "unknown";
  }
}

template <typename T>
const VariantTable<T>& variant_table() {
  static const VariantTable<T> table{program_variants<T>(), panel_variants<T>(), block_variants<T>(),
                                     block_backward_variants<T>(), level_variants<T>(), backward_variants<T>()};
  return table;
}
template const VariantTable<float>& variant_table<float>();
template const VariantTable<double>& variant_table<double>();

}  // namespace iosparse
