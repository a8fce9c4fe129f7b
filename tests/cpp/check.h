// Minimal assertion helpers for the standalone kernel tests (no framework dependency).
#pragma once

#include <cmath>
#include <cstdio>
#include <cstdlib>

static int g_failures = 0;

#define EXPECT_TRUE(cond)                                                      \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                            \
    }                                                                          \
  } while (0)

#define EXPECT_NEAR(a, b, tol)                                                                                 \
  do {                                                                                                         \
    const double a_ = (a), b_ = (b);                                                                           \
    if (!(std::fabs(a_ - b_) <= (tol))) {                                                                      \
      std::fprintf(stderr, "%s:%d: %s = %.10g, %s = %.10g, |diff| > %g\n", __FILE__, __LINE__, #a, a_, #b, b_, \
                   (double)(tol));                                                                             \
      ++g_failures;                                                                                            \
    }                                                                                                          \
  } while (0)

inline int finish(const char* name) {
  std::printf("%s: %s (%d failures)\n", name, g_failures ? "FAILED" : "passed", g_failures);
  return g_failures ? 1 : 0;
}
