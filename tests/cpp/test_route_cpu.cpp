// Standalone tests of the torch-free CPU route kernels: closed forms, top-k ties, strided and
// int32 inputs, out-of-range ids, and the backward against central finite differences.
#include <cmath>
#include <cstdint>
#include <vector>

#include "check.h"
#include "route.h"

using mhr_ops::RouteMode;
using mhr_ops::RouteParams;

namespace {

RouteParams make_params(const std::vector<double>& logits, int64_t T, int64_t h, int64_t S,
                        const std::vector<int64_t>& ids, RouteMode mode, int64_t top_k) {
  RouteParams P;
  P.logits = logits.data();
  P.logits_stride_t = h * S;
  P.logits_stride_c = 1;
  P.task_ids = ids.data();
  P.task_ids_stride = 1;
  P.num_groups = static_cast<int64_t>(ids.size());
  P.num_heads = h;
  P.num_skills = S;
  P.num_tasks = T;
  P.mode = mode;
  P.temperature = 0.8;
  P.top_k = top_k;
  P.eps = 1e-12;
  P.clamp_eps = 2.220446049250313e-16;
  P.clamp_tiny = 2.2250738585072014e-308;
  return P;
}

std::vector<double> forward(RouteParams P) {
  std::vector<double> w(P.num_groups * P.num_heads * P.num_skills);
  P.weights = w.data();
  mhr_ops::route_fwd_cpu<double>(P, 0, P.num_groups * P.num_heads);
  return w;
}

void test_sigmoid_closed_form() {
  const std::vector<double> logits = {0.5, -1.0, 2.0, 0.0};  // T=1, h=2, S=2
  const std::vector<int64_t> ids = {0};
  const auto w = forward(make_params(logits, 1, 2, 2, ids, RouteMode::kSigmoid, 0));
  for (int k = 0; k < 2; ++k) {
    const double a = 1 / (1 + std::exp(-logits[2 * k])), b = 1 / (1 + std::exp(-logits[2 * k + 1]));
    EXPECT_NEAR(w[2 * k], a / (a + b + 1e-12), 1e-14);
    EXPECT_NEAR(w[2 * k + 1], b / (a + b + 1e-12), 1e-14);
  }
}

void test_top_k_ties_and_softmax() {
  const std::vector<double> logits = {1.0, 3.0, 3.0, 3.0, -2.0};
  const std::vector<int64_t> ids = {0};
  const auto w = forward(make_params(logits, 1, 1, 5, ids, RouteMode::kSoftmax, 2));
  // skills 1 and 2 tie with 3; the lower indices win and share the weight equally.
  EXPECT_NEAR(w[0], 0.0, 0.0);
  EXPECT_NEAR(w[1], 0.5, 1e-12);
  EXPECT_NEAR(w[2], 0.5, 1e-12);
  EXPECT_NEAR(w[3], 0.0, 0.0);
  EXPECT_NEAR(w[4], 0.0, 0.0);
}

void test_strided_int32_and_out_of_range() {
  // logits [T=2, h*S=2] stored transposed (column-major): stride_t = 1, stride_c = 2.
  const std::vector<double> storage = {0.3, -0.7, 1.1, 0.2};
  const std::vector<int32_t> ids = {1, 5, 0};  // 5 is out of range
  RouteParams P = make_params(storage, 2, 1, 2, {}, RouteMode::kSigmoid, 0);
  P.logits_stride_t = 1;
  P.logits_stride_c = 2;
  P.task_ids = ids.data();
  P.index_type = mhr_ops::IndexType::kInt32;
  P.num_groups = 3;
  const auto w = forward(P);
  const double a = 1 / (1 + std::exp(0.7)), b = 1 / (1 + std::exp(-0.2));  // task 1: (-0.7, 0.2)
  EXPECT_NEAR(w[0], a / (a + b + 1e-12), 1e-14);
  EXPECT_TRUE(std::isnan(w[2]) && std::isnan(w[3]));
  EXPECT_TRUE(!std::isnan(w[4]));
}

void test_backward_finite_differences(RouteMode mode, int64_t top_k) {
  const int64_t T = 3, h = 2, S = 4;
  std::vector<double> logits(T * h * S), noise(4 * h * S), grad_w(4 * h * S);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = std::sin(1.7 * i + 0.3) * 2.0;
  for (size_t i = 0; i < noise.size(); ++i) noise[i] = 0.05 + 0.9 * std::fabs(std::cos(2.3 * i));
  for (size_t i = 0; i < grad_w.size(); ++i) grad_w[i] = std::cos(0.9 * i);
  const std::vector<int64_t> ids = {2, 0, 2, 1};
  RouteParams P = make_params(logits, T, h, S, ids, mode, top_k);
  if (mode == RouteMode::kRelaxedBernoulli) {
    P.noise = noise.data();
    P.noise_stride_g = h * S;
    P.noise_stride_h = S;
    P.noise_stride_s = 1;
  }
  std::vector<double> grad_l(T * h * S, 0.0);
  P.grad_weights = grad_w.data();
  P.grad_stride_g = h * S;
  P.grad_stride_h = S;
  P.grad_stride_s = 1;
  P.grad_logits = grad_l.data();
  mhr_ops::route_bwd_cpu<double>(P, 0, P.num_tasks);
  const double step = 1e-6;
  for (size_t i = 0; i < logits.size(); ++i) {
    std::vector<double> lp = logits, lm = logits;
    lp[i] += step;
    lm[i] -= step;
    RouteParams Pp = P, Pm = P;
    Pp.logits = lp.data();
    Pm.logits = lm.data();
    const auto wp = forward(Pp), wm = forward(Pm);
    double fd = 0;
    for (size_t j = 0; j < wp.size(); ++j) fd += grad_w[j] * (wp[j] - wm[j]) / (2 * step);
    EXPECT_NEAR(grad_l[i], fd, 1e-6);
  }
}

}  // namespace

int main() {
  test_sigmoid_closed_form();
  test_top_k_ties_and_softmax();
  test_strided_int32_and_out_of_range();
  for (RouteMode mode : {RouteMode::kSigmoid, RouteMode::kRelaxedBernoulli, RouteMode::kSoftmax})
    for (int64_t top_k : {0, 2}) test_backward_finite_differences(mode, top_k);
  return finish("test_route_cpu");
}
