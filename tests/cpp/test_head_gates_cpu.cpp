// Standalone tests of the torch-free head_gates CPU kernels: closed forms for the routed,
// shared and stage gates, binary gates, and the backward against central finite differences.
#include <cmath>
#include <cstdint>
#include <vector>

#include "check.h"
#include "head_gates.h"

using mhr_ops::HeadGatesParams;

namespace {

struct Problem {
  std::vector<double> routed, shared, stage;  // [N, Hr], [N, Hs], [N, 2]
  int64_t N, Hr, Hs, top_k;
};

HeadGatesParams params(const Problem& pr, bool binary) {
  HeadGatesParams p;
  p.routed = pr.routed.data();
  p.routed_stride_n = pr.Hr;
  p.routed_stride_h = 1;
  p.shared = pr.shared.empty() ? nullptr : pr.shared.data();
  p.shared_stride_n = pr.Hs;
  p.shared_stride_h = 1;
  p.stage = pr.stage.empty() ? nullptr : pr.stage.data();
  p.stage_stride_n = 2;
  p.stage_stride_h = 1;
  p.num_rows = pr.N;
  p.num_routed = pr.Hr;
  p.num_shared = pr.Hs;
  p.top_k = pr.top_k;
  p.binary = binary;
  return p;
}

std::vector<double> forward(HeadGatesParams p) {
  std::vector<double> g(p.num_rows * (p.num_shared + p.num_routed));
  p.gates = g.data();
  mhr_ops::head_gates_fwd_cpu<double>(p, 0, p.num_rows);
  return g;
}

void test_closed_form() {
  // one row: routed logits (0, 2, 1, 2), top-2 keeps heads 1 and 3 (tie -> lower index first)
  Problem pr{{0, 2, 1, 2}, {}, {}, 1, 4, 0, 2};
  auto g = forward(params(pr, false));
  EXPECT_NEAR(g[0], 0.0, 0.0);
  EXPECT_NEAR(g[1], 1.0, 1e-15);  // softmax over the two kept equal logits, times top_k = 2
  EXPECT_NEAR(g[2], 0.0, 0.0);
  EXPECT_NEAR(g[3], 1.0, 1e-15);
  // with 2 shared heads (no shared logits: ones) and stage logits (ln 3, 0): a1 = 1.5, a2 = 0.5
  Problem ps{{0, 2, 1, 2}, {}, {std::log(3.0), 0.0}, 1, 4, 2, 2};
  g = forward(params(ps, false));
  EXPECT_NEAR(g[0], 1.5, 1e-14);
  EXPECT_NEAR(g[1], 1.5, 1e-14);
  EXPECT_NEAR(g[3], 0.5, 1e-14);
  EXPECT_NEAR(g[5], 0.5, 1e-14);
  g = forward(params(ps, true));  // binary: ones for shared and kept, zeros elsewhere
  const double expected[] = {1, 1, 0, 1, 0, 1};
  for (int i = 0; i < 6; ++i) EXPECT_NEAR(g[i], expected[i], 0.0);
}

void test_backward_finite_differences() {
  Problem pr{{}, {}, {}, 3, 5, 3, 2};
  for (int i = 0; i < 15; ++i) pr.routed.push_back(std::sin(1.3 * i));
  for (int i = 0; i < 9; ++i) pr.shared.push_back(std::cos(0.7 * i));
  for (int i = 0; i < 6; ++i) pr.stage.push_back(std::sin(2.1 * i + 0.5));
  std::vector<double> gy(3 * 8), gr(15), gs(9), gst(6);
  for (size_t i = 0; i < gy.size(); ++i) gy[i] = std::cos(0.37 * i + 0.2);
  HeadGatesParams p = params(pr, false);
  p.grad_gates = gy.data();
  p.grad_stride_n = 8;
  p.grad_stride_h = 1;
  p.grad_routed = gr.data();
  p.grad_shared = gs.data();
  p.grad_stage = gst.data();
  mhr_ops::head_gates_bwd_cpu<double>(p, 0, 3);
  const double step = 1e-6;
  auto check = [&](std::vector<double>& logits, const std::vector<double>& grad) {
    for (size_t i = 0; i < logits.size(); ++i) {
      const double keep = logits[i];
      logits[i] = keep + step;
      const auto up = forward(params(pr, false));
      logits[i] = keep - step;
      const auto down = forward(params(pr, false));
      logits[i] = keep;
      double fd = 0;
      for (size_t j = 0; j < up.size(); ++j) fd += gy[j] * (up[j] - down[j]) / (2 * step);
      EXPECT_NEAR(grad[i], fd, 1e-6);
    }
  };
  check(pr.routed, gr);
  check(pr.shared, gs);
  check(pr.stage, gst);
}

}  // namespace

int main() {
  test_closed_form();
  test_backward_finite_differences();
  return finish("test_head_gates_cpu");
}
