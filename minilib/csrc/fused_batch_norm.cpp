// Fused batch norm for CPU float32 (minilib.kernels.fused_batch_norm; beyond lesson 07).
//
// Lesson 07's BatchNorm takes x.mean, x.var, then subtracts, divides, multiplies and adds: six sweeps
// over the activations, each reading (and most writing) the whole tensor from memory. Per channel,
// only two numbers matter (the mean and the variance), and one channel's values (N x H x W floats,
// under a MiB at the lesson's shapes) fit in the L2 cache. So each thread takes a whole channel:
// one sweep from memory computes its mean and M2 (the sum of squared deviations), and a second
// sweep, over the same values now in cache, writes the output. The backward likewise: one sweep for
// the channel's sum(dy) and sum(dy * xhat), one (in cache) for dx. Memory traffic is that of a copy.
//
// Accuracy. E[x^2] - E[x]^2 in float32 loses every digit when the mean is large next to the
// spread (at a mean of 1e4 and a std of 1, x^2 ~ 1e8 has an ulp of 8). Instead each block of up to
// kBlock consecutive values of a channel (in L1) is summed for its mean m, then swept again for
// sum(x - m) and sum((x - m)^2): x - m is exact there (Sterbenz: x and m within a factor of two),
// and the small residual sum(x - m) corrects m's rounding. Blocks are merged in double by Chan's
// pairwise formula. The output uses (x - mean_hi) - mean_lo, where mean_hi + mean_lo is the double
// mean split into two floats, so even at a mean of 1e4 x - mean keeps float32's relative precision.
//
// Layouts. The kernels take a float32 tensor whose memory is [R, C, S] (R rows, C channels, S
// values per channel per row): NCHW contiguous is R = N, S = H x W; channels-last NHWC is
// R = N x H x W, S = 1; [N, C] is R = N, S = 1. With S >= kMinRun the channel path above runs;
// with shorter runs (S = 1: channels-last, BatchNorm1d) a channel's values are scattered one per
// row, so threads take contiguous ranges of channels and sweep the rows, keeping per-column
// shifted sums in double (the shift, the column's first value, keeps them free of cancellation);
// there the second sweep reads memory again.
//
// Threads: OpenMP with torch's thread count (torch.set_num_threads applies), channels handed out
// one at a time as threads come free, so a thread the OS pauses on a busy machine holds up less.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

// Values per block: 4096 floats = 16 KiB, so a block is still in L1 when it is swept again.
constexpr int64_t kBlock = 4096;
// Shorter runs per (row, channel) than this take the column path.
constexpr int64_t kMinRun = 64;
// Independent accumulators per reduction: several vector registers, so the adds do not wait on
// one another's latency.
constexpr int kLanes = 32;

// A channel's running count, mean and M2, merged block by block (Chan et al.'s pairwise update).
struct Moments {
  double n = 0, mean = 0, m2 = 0;
  void merge(double nb, double mean_b, double m2_b) {
    const double total = n + nb;
    const double delta = mean_b - mean;
    mean += delta * (nb / total);
    m2 += m2_b + delta * delta * (n * nb / total);
    n = total;
  }
};

float sum(const float* x, int64_t L) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= L; i += kLanes) {
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) acc[k] += x[i + k];
  }
  float s = 0;
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  for (; i < L; ++i) s += x[i];
  return s;
}

// The mean and M2 of one block x[0..L), in L1: a sum for the mean m, then sum(x - m) and
// sum((x - m)^2), the first correcting m's rounding.
void block_moments(const float* x, int64_t L, double& mean, double& m2) {
  const float m = sum(x, L) / static_cast<float>(L);
  float r_acc[kLanes] = {}, q_acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= L; i += kLanes) {
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) {
      const float d = x[i + k] - m;
      r_acc[k] += d;
      q_acc[k] += d * d;
    }
  }
  float r = 0, q = 0;
  for (int k = 0; k < kLanes; ++k) {
    r += r_acc[k];
    q += q_acc[k];
  }
  for (; i < L; ++i) {
    const float d = x[i] - m;
    r += d;
    q += d * d;
  }
  mean = static_cast<double>(m) + static_cast<double>(r) / L;
  m2 = std::max(0.0, static_cast<double>(q) - static_cast<double>(r) * r / L);
}

// sum(dy) and sum(dy * d) over one block, d = (x - hi) - lo: the backward's two sums.
void block_grad_sums(const float* dy, const float* x, int64_t L, float hi, float lo, double& s_dy,
                     double& s_dyd) {
  float a_acc[kLanes] = {}, b_acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= L; i += kLanes) {
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) {
      const float g = dy[i + k];
      a_acc[k] += g;
      b_acc[k] += g * ((x[i + k] - hi) - lo);
    }
  }
  float a = 0, b = 0;
  for (int k = 0; k < kLanes; ++k) {
    a += a_acc[k];
    b += b_acc[k];
  }
  for (; i < L; ++i) {
    a += dy[i];
    b += dy[i] * ((x[i] - hi) - lo);
  }
  s_dy += a;
  s_dyd += b;
}

// The float pair hi + lo nearest the double v: x - hi is exact for x near v, lo carries the rest.
inline void split(double v, float& hi, float& lo) {
  hi = static_cast<float>(v);
  lo = static_cast<float>(v - static_cast<double>(hi));
}

// Ask Linux for 2 MiB pages for a large new output: one page fault per 2 MiB instead of per 4 KiB.
// A hint only; nothing changes if the kernel says no.
void advise_huge_pages(const torch::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t bytes = static_cast<size_t>(t.numel()) * sizeof(float);
  const uintptr_t page = 4096;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t a = (p + page - 1) & ~(page - 1);
  const uintptr_t e = (p + bytes) & ~(page - 1);
  if (bytes >= (size_t{4} << 20) && e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// A new tensor with x's shape and strides (channels-last stays channels-last), advised huge pages.
torch::Tensor empty_like_advised(const torch::Tensor& x) {
  auto t = torch::empty_like(x, at::MemoryFormat::Preserve);
  advise_huge_pages(t);
  return t;
}

int thread_count(int64_t tasks) {
  if (at::in_parallel_region()) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks)));
}

// fn(c) for every channel, dynamically scheduled.
template <typename F>
void for_each_channel(int64_t C, const F& fn) {
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(thread_count(C))
  for (int64_t c = 0; c < C; ++c) fn(c);
#else
  for (int64_t c = 0; c < C; ++c) fn(c);
#endif
}

// fn(c0, c1) over ranges of channels whose columns (c1 - c0) x S span at least a few cache lines
// (threads never write the same line), statically split: each range sweeps every row.
template <typename F>
void for_channel_ranges(int64_t C, int64_t S, const F& fn) {
  const int64_t per = std::max<int64_t>(1, 64 / std::max<int64_t>(S, 1));
  const int64_t ranges = std::max<int64_t>(1, std::min<int64_t>(thread_count(C), C / per));
  const int64_t size = (C + ranges - 1) / ranges;
#ifdef _OPENMP
#pragma omp parallel for schedule(static, 1) num_threads(static_cast<int>(ranges))
#endif
  for (int64_t k = 0; k < ranges; ++k) {
    const int64_t c0 = k * size, c1 = std::min(C, c0 + size);
    if (c0 < c1) fn(c0, c1);
  }
}

struct Layout {
  int64_t R, C, S;
};

Layout check(const torch::Tensor& x, int64_t C, int64_t S, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32, "fused_batch_norm: ", name,
              " must be a CPU float32 tensor");
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "fused_batch_norm: ", name, " must be dense");
  TORCH_CHECK(C > 0 && S > 0 && x.numel() % (C * S) == 0, "fused_batch_norm: bad layout");
  return {x.numel() / (C * S), C, S};
}

// Per-channel float parameters for the sweeps; a missing weight is 1, a missing bias 0.
std::vector<float> per_channel(const c10::optional<torch::Tensor>& p, int64_t C, float fill) {
  std::vector<float> v(C, fill);
  if (p.has_value() && p->defined()) {
    auto q = p->to(torch::kFloat32).contiguous();
    std::copy(q.data_ptr<float>(), q.data_ptr<float>() + C, v.begin());
  }
  return v;
}

}  // namespace

// Training: y (x's layout), the batch mean and the biased variance (double [C]).
// Eval (mean and var given, double [C]): y from them.
std::vector<torch::Tensor> forward(const torch::Tensor& x, int64_t C, int64_t S,
                                   const c10::optional<torch::Tensor>& weight,
                                   const c10::optional<torch::Tensor>& bias,
                                   const c10::optional<torch::Tensor>& mean_in,
                                   const c10::optional<torch::Tensor>& var_in, double eps, bool training) {
  const Layout L = check(x, C, S, "input");
  const int64_t M = L.R * L.S;  // values per channel
  auto opts = torch::TensorOptions().dtype(torch::kFloat64);
  torch::Tensor mean, var;
  if (training) {
    mean = torch::empty({C}, opts);
    var = torch::empty({C}, opts);
  } else {
    TORCH_CHECK(mean_in.has_value() && var_in.has_value(), "fused_batch_norm: eval needs mean and var");
    mean = mean_in->to(torch::kFloat64).contiguous();
    var = var_in->to(torch::kFloat64).contiguous();
  }
  const std::vector<float> w = per_channel(weight, C, 1.0f), b = per_channel(bias, C, 0.0f);
  torch::Tensor y = empty_like_advised(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  double* mp = mean.data_ptr<double>();
  double* vp = var.data_ptr<double>();
  const int64_t row = C * S;

  if (S >= kMinRun) {
    for_each_channel(C, [&](int64_t c) {
      if (training) {
        Moments mom;
        for (int64_t r = 0; r < L.R; ++r) {
          const float* p = xp + r * row + c * S;
          for (int64_t s = 0; s < S; s += kBlock) {
            const int64_t n = std::min(kBlock, S - s);
            double mb, qb;
            block_moments(p + s, n, mb, qb);
            mom.merge(static_cast<double>(n), mb, qb);
          }
        }
        mp[c] = mom.mean;
        vp[c] = mom.m2 / static_cast<double>(M);
      }
      float hi, lo;
      split(mp[c], hi, lo);
      const float a = static_cast<float>(w[c] / std::sqrt(vp[c] + eps)), sh = b[c];
      for (int64_t r = 0; r < L.R; ++r) {  // the channel again, now from cache
        const float* p = xp + r * row + c * S;
        float* q = yp + r * row + c * S;
#pragma omp simd
        for (int64_t s = 0; s < S; ++s) q[s] = ((p[s] - hi) - lo) * a + sh;
      }
    });
    return {y, mean, var};
  }

  for_channel_ranges(C, S, [&](int64_t c0, int64_t c1) {
    const int64_t j0 = c0 * S, W = (c1 - c0) * S;  // this range's columns
    std::vector<float> hi(W), lo(W), a(W), sh(W);
    if (training) {
      // Per column: the shift (its first value) and the shifted sums, in double.
      std::vector<double> k(W), s1(W, 0.0), s2(W, 0.0);
      for (int64_t j = 0; j < W; ++j) k[j] = xp[j0 + j];
      for (int64_t r = 0; r < L.R; ++r) {
        const float* p = xp + r * row + j0;
#pragma omp simd
        for (int64_t j = 0; j < W; ++j) {
          const double d = static_cast<double>(p[j]) - k[j];
          s1[j] += d;
          s2[j] += d * d;
        }
      }
      const double n = static_cast<double>(L.R);
      for (int64_t c = c0; c < c1; ++c) {
        Moments mom;
        for (int64_t s = 0; s < S; ++s) {
          const int64_t j = (c - c0) * S + s;
          mom.merge(n, k[j] + s1[j] / n, std::max(0.0, s2[j] - s1[j] * s1[j] / n));
        }
        mp[c] = mom.mean;
        vp[c] = mom.m2 / static_cast<double>(M);
      }
    }
    for (int64_t c = c0; c < c1; ++c) {
      float h, l;
      split(mp[c], h, l);
      const float ac = static_cast<float>(w[c] / std::sqrt(vp[c] + eps));
      for (int64_t s = 0; s < S; ++s) {
        const int64_t j = (c - c0) * S + s;
        hi[j] = h, lo[j] = l, a[j] = ac, sh[j] = b[c];
      }
    }
    for (int64_t r = 0; r < L.R; ++r) {
      const float* p = xp + r * row + j0;
      float* q = yp + r * row + j0;
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) q[j] = ((p[j] - hi[j]) - lo[j]) * a[j] + sh[j];
    }
  });
  return {y, mean, var};
}

// The gradients of y = (x - mean) / sqrt(var + eps) * w + b: in training mean and var are the batch's
// own (so dx has the terms through them), in eval they are constants. dy must have x's layout.
// Returns {dx (undefined unless need_dx), dweight = sum(dy * xhat), dbias = sum(dy)} (float32 [C]).
std::vector<torch::Tensor> backward(const torch::Tensor& dy, const torch::Tensor& x, int64_t C, int64_t S,
                                    const c10::optional<torch::Tensor>& weight, const torch::Tensor& mean_in,
                                    const torch::Tensor& var_in, double eps, bool training, bool need_dx) {
  const Layout L = check(x, C, S, "input");
  check(dy, C, S, "grad_output");
  TORCH_CHECK(dy.strides() == x.strides() && dy.sizes() == x.sizes(),
              "fused_batch_norm: grad_output must have input's layout");
  const int64_t M = L.R * L.S;
  const torch::Tensor mean = mean_in.to(torch::kFloat64).contiguous();
  const torch::Tensor var = var_in.to(torch::kFloat64).contiguous();
  const std::vector<float> w = per_channel(weight, C, 1.0f);
  torch::Tensor dx = need_dx ? empty_like_advised(x) : torch::Tensor();
  auto sum_dy = torch::empty({C}, torch::kFloat64), sum_dyd = torch::empty({C}, torch::kFloat64);
  const float* xp = x.data_ptr<float>();
  const float* gp = dy.data_ptr<float>();
  float* dp = need_dx ? dx.data_ptr<float>() : nullptr;
  const double* mp = mean.data_ptr<double>();
  const double* vp = var.data_ptr<double>();
  double* s1p = sum_dy.data_ptr<double>();
  double* s2p = sum_dyd.data_ptr<double>();
  const int64_t row = C * S;

  // dx = g dy + k2 d + k3 with d = (x - hi) - lo: in training g = w inv, k2 = -g inv^2 sum(dy d) / M,
  // k3 = -g sum(dy) / M; in eval k2 = k3 = 0.
  auto coefficients = [&](int64_t c, float& g, float& k2, float& k3) {
    const double inv = 1.0 / std::sqrt(vp[c] + eps);
    g = static_cast<float>(w[c] * inv);
    k2 = training ? static_cast<float>(-w[c] * inv * inv * inv * s2p[c] / M) : 0.0f;
    k3 = training ? static_cast<float>(-w[c] * inv * s1p[c] / M) : 0.0f;
  };

  if (S >= kMinRun) {
    for_each_channel(C, [&](int64_t c) {
      float hi, lo;
      split(mp[c], hi, lo);
      double a = 0, b = 0;
      for (int64_t r = 0; r < L.R; ++r) {
        const int64_t o = r * row + c * S;
        for (int64_t s = 0; s < S; s += kBlock)
          block_grad_sums(gp + o + s, xp + o + s, std::min(kBlock, S - s), hi, lo, a, b);
      }
      s1p[c] = a, s2p[c] = b;
      if (!need_dx) return;
      float g, k2, k3;
      coefficients(c, g, k2, k3);
      for (int64_t r = 0; r < L.R; ++r) {  // the channel again, now from cache
        const int64_t o = r * row + c * S;
        const float *gq = gp + o, *xq = xp + o;
        float* dq = dp + o;
#pragma omp simd
        for (int64_t s = 0; s < S; ++s) dq[s] = g * gq[s] + k2 * ((xq[s] - hi) - lo) + k3;
      }
    });
  } else {
    for_channel_ranges(C, S, [&](int64_t c0, int64_t c1) {
      const int64_t j0 = c0 * S, W = (c1 - c0) * S;
      std::vector<float> hi(W), lo(W), g(W), k2(W), k3(W);
      std::vector<double> a(W, 0.0), b(W, 0.0);
      for (int64_t c = c0; c < c1; ++c) {
        float h, l;
        split(mp[c], h, l);
        for (int64_t s = 0; s < S; ++s) hi[(c - c0) * S + s] = h, lo[(c - c0) * S + s] = l;
      }
      for (int64_t r = 0; r < L.R; ++r) {
        const float *gq = gp + r * row + j0, *xq = xp + r * row + j0;
#pragma omp simd
        for (int64_t j = 0; j < W; ++j) {
          a[j] += gq[j];
          b[j] += static_cast<double>(gq[j]) * ((xq[j] - hi[j]) - lo[j]);
        }
      }
      for (int64_t c = c0; c < c1; ++c) {
        double sa = 0, sb = 0;
        for (int64_t s = 0; s < S; ++s) sa += a[(c - c0) * S + s], sb += b[(c - c0) * S + s];
        s1p[c] = sa, s2p[c] = sb;
        float gc, k2c, k3c;
        coefficients(c, gc, k2c, k3c);
        for (int64_t s = 0; s < S; ++s) g[(c - c0) * S + s] = gc, k2[(c - c0) * S + s] = k2c, k3[(c - c0) * S + s] = k3c;
      }
      if (!need_dx) return;
      for (int64_t r = 0; r < L.R; ++r) {
        const float *gq = gp + r * row + j0, *xq = xp + r * row + j0;
        float* dq = dp + r * row + j0;
#pragma omp simd
        for (int64_t j = 0; j < W; ++j) dq[j] = g[j] * gq[j] + k2[j] * ((xq[j] - hi[j]) - lo[j]) + k3[j];
      }
    });
  }
  // dweight = sum(dy * xhat) = inv * sum(dy * d); dbias = sum(dy).
  auto inv = (var + eps).rsqrt();
  return {dx, (sum_dyd * inv).to(torch::kFloat32), sum_dy.to(torch::kFloat32)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "minilib's fused batch norm for CPU float32 (two sweeps per channel, the second in cache)";
  // The GIL is released while the kernels run: they touch no Python object.
  m.def("forward", &forward, "batch norm forward: y, and in training the batch mean and biased variance",
        py::arg("x"), py::arg("C"), py::arg("S"), py::arg("weight"), py::arg("bias"), py::arg("mean"),
        py::arg("var"), py::arg("eps"), py::arg("training"), py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, "batch norm backward: dx, dweight, dbias", py::arg("grad_output"),
        py::arg("x"), py::arg("C"), py::arg("S"), py::arg("weight"), py::arg("mean"), py::arg("var"),
        py::arg("eps"), py::arg("training"), py::arg("need_dx"), py::call_guard<py::gil_scoped_release>());
}
