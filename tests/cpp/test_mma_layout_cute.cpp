// The per-lane fragment layouts of mma.cuh (the maps its emulation computes with) against CuTe's
// MMA_Traits for the same SM80 atoms, taken from the nvidia-cutlass headers (never vendored).
// CuTe's ALayout / BLayout / CLayout map (thread, value) to a column-major index in the M x K,
// N x K and M x N tiles; every (lane, register element) must land where mma.cuh says, with the
// same value order (the register / half a value occupies).
#include <cute/atom/mma_traits_sm80.hpp>

#include <cstdio>

#include "check.h"
#include "mma.cuh"

using mhr_ops::FragCoord;

namespace {

// `ours(lane, v)` gives (row, col); `index(c)` turns it into CuTe's column-major tile index.
template <class Layout, class Ours, class Index>
void compare(const char* atom, const char* operand, Layout layout, int values, Ours ours, Index index) {
  EXPECT_TRUE(int(cute::size(layout)) == 32 * values);
  EXPECT_TRUE(int(cute::size<1>(layout)) == values);
  int mismatches = 0;
  for (int lane = 0; lane < 32; ++lane)
    for (int v = 0; v < values; ++v) {
      const FragCoord c = ours(lane, v);
      const int cute_index = int(layout(lane, v));
      if (index(c) != cute_index) {
        if (mismatches++ < 4)
          std::fprintf(stderr, "%s %s: lane %d value %d: mma.cuh (%d, %d) = index %d, CuTe index %d\n", atom, operand,
                       lane, v, c.row, c.col, index(c), cute_index);
        ++g_failures;
      }
    }
  std::printf("  %-36s %s: %d lanes x %d values %s\n", atom, operand, 32, values, mismatches ? "DIFFER" : "agree");
}

// m16n8k16 (bf16 and f16 atoms share one layout; both are checked as named).
template <class Atom>
void check_m16n8k16(const char* atom) {
  using T = cute::MMA_Traits<Atom>;
  static_assert(cute::is_same<typename T::Shape_MNK, cute::Shape<cute::_16, cute::_8, cute::_16>>::value);
  static_assert(cute::size(typename T::ThrID{}) == 32);
  compare(atom, "A (m, k)", typename T::ALayout{}, 8, mhr_ops::mma_m16n8k16_a_coord,
          [](FragCoord c) { return c.row + 16 * c.col; });
  compare(atom, "B (k, n)", typename T::BLayout{}, 4, mhr_ops::mma_m16n8k16_b_coord,
          [](FragCoord c) { return c.col + 8 * c.row; });  // CuTe's B tile is N x K
  compare(atom, "C (m, n)", typename T::CLayout{}, 4, mhr_ops::mma_m16n8_c_coord,
          [](FragCoord c) { return c.row + 16 * c.col; });
}

void check_m16n8k8_tf32() {
  using Atom = cute::SM80_16x8x8_F32TF32TF32F32_TN;
  using T = cute::MMA_Traits<Atom>;
  const char* atom = "SM80_16x8x8_F32TF32TF32F32_TN";
  static_assert(cute::is_same<typename T::Shape_MNK, cute::Shape<cute::_16, cute::_8, cute::_8>>::value);
  static_assert(cute::size(typename T::ThrID{}) == 32);
  compare(atom, "A (m, k)", typename T::ALayout{}, 4, mhr_ops::mma_m16n8k8_tf32_a_coord,
          [](FragCoord c) { return c.row + 16 * c.col; });
  compare(atom, "B (k, n)", typename T::BLayout{}, 2, mhr_ops::mma_m16n8k8_tf32_b_coord,
          [](FragCoord c) { return c.col + 8 * c.row; });
  compare(atom, "C (m, n)", typename T::CLayout{}, 4, mhr_ops::mma_m16n8_c_coord,
          [](FragCoord c) { return c.row + 16 * c.col; });
}

}  // namespace

int main() {
  check_m16n8k16<cute::SM80_16x8x16_F32BF16BF16F32_TN>("SM80_16x8x16_F32BF16BF16F32_TN");
  check_m16n8k16<cute::SM80_16x8x16_F32F16F16F32_TN>("SM80_16x8x16_F32F16F16F32_TN");
  check_m16n8k8_tf32();
  return finish("test_mma_layout_cute");
}
