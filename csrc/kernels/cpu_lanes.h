// Explicit SIMD values for the CPU kernels (GCC / Clang vector extensions). Torch-free.
#pragma once

// The helpers below are always inlined, so no vector crosses a call: GCC's note that the ABI of a
// 256-bit vector return differs without AVX does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace mhr_ops {

// L lanes of T as one value: an AVX2 register or a part of one (in a function built for AVX2), or
// SSE registers in the portable build. Alignment of T: loads and stores need no aligned address.
// Left to itself, GCC often vectorizes the row kernels' loops over the wrong index, or keeps a
// sum in memory; these keep the sums in registers, in a fixed order.
template <typename T, int L>
struct Lanes {
  typedef T type __attribute__((vector_size(L * sizeof(T)), aligned(sizeof(T))));
};

template <typename T, int L>
inline __attribute__((always_inline)) typename Lanes<T, L>::type load_lanes(const T* p) {
  return *reinterpret_cast<const typename Lanes<T, L>::type*>(p);
}

template <typename T, int L>
inline __attribute__((always_inline)) void store_lanes(T* p, typename Lanes<T, L>::type v) {
  *reinterpret_cast<typename Lanes<T, L>::type*>(p) = v;
}

// The lanes summed in lane order (the same bits on every build).
template <typename T, int L>
inline __attribute__((always_inline)) T sum_lanes(typename Lanes<T, L>::type v) {
  T acc = v[0];
  for (int l = 1; l < L; ++l) acc += v[l];
  return acc;
}

}  // namespace mhr_ops

#pragma GCC diagnostic pop

// Calls BODY<T, R>(args...) with the rank R at compile time for the common ranks (the kernels'
// accumulators then stay in registers), BODY<T, 0> (rank at run time) otherwise.
#define MHR_CPU_RANK_DISPATCH(BODY, T, RANK, ...) \
  switch (RANK) {                                 \
    case 1:                                       \
      return BODY<T, 1>(__VA_ARGS__);             \
    case 2:                                       \
      return BODY<T, 2>(__VA_ARGS__);             \
    case 4:                                       \
      return BODY<T, 4>(__VA_ARGS__);             \
    case 8:                                       \
      return BODY<T, 8>(__VA_ARGS__);             \
    case 16:                                      \
      return BODY<T, 16>(__VA_ARGS__);            \
    case 32:                                      \
      return BODY<T, 32>(__VA_ARGS__);            \
    default:                                      \
      return BODY<T, 0>(__VA_ARGS__);             \
  }
