// Fused cross-entropy for CPU float32 (minilib.kernels; beyond lesson 03), with F.cross_entropy's
// ignore_index and label_smoothing, and, when a gradient is wanted, the gradient written in the same
// sweep as the loss (so a training step reads the logits once and writes the gradient once).
//
// The lesson computes log_softmax(x), an N x V tensor, and then picks one entry per row (nll).
// Only two numbers per row matter for the loss: logsumexp(x_i) and x_i[target_i]. This kernel
// reads each row once, keeps a running max and a running sum of exponentials (the online
// softmax), and writes no N x V temporary. The gradient, d loss / d x_ij =
// (exp(x_ij - m_i - l_i) - (1 - eps) [j == t_i] - eps / V) * scale_i, is written by the same call
// (row_loss_and_grad): each exp(x - shift) is stored as it is summed, and a second pass over the row,
// still in cache, scales it; the logits are read from memory once.
//
// Where the speed comes from (F.cross_entropy writes log_softmax, N x V, then reads it back):
// - one pass over memory and one exp per logit: each L1-sized block of a row is summed and
//   maxed in the same loop (see row_stats for why the shift need not be the exact max);
// - an exp that vectorises (std::exp is a libm call per element; -ffast-math would vectorise it
//   but also breaks inf/nan handling, so we avoid it): AVX2 intrinsics where the compiler targets
//   AVX2+FMA, plain loops the compiler vectorises elsewhere;
// - rows shared among torch's intra-op threads (torch.set_num_threads applies here exactly as it
//   does to F.cross_entropy), handed out in small batches as threads come free, so a thread that
//   the OS pauses (a busy machine) does not hold up the rest;
// - the gradient is written once, into memory that asked for huge pages and is kept for the next step
//   once PyTorch frees it (pooled_empty), or over the logits themselves (the fused linear
//   cross-entropy's chunk buffer).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

// Columns per block: 2048 floats = 8 KiB, so a block is still in L1 if it must be summed again.
constexpr int64_t kBlock = 2048;

// exp(d) for d <= 88 (we need d <= kHeadroom below). In base 2: t = d * log2(e) =
// n + f with n an integer and |f| <= 1/2; 2^f by a degree-4 polynomial (fitted to relative error
// 2.9e-6: far inside the 1e-3 we promise, and one multiply-add per logit cheaper than degree 5's
// 2.4e-7, which measured 10% slower) and 2^n added straight into the exponent bits. Adding and
// subtracting 1.5 * 2^23 rounds t to an integer (std::floor would be a libm call, which stops
// vectorisation) and leaves n in the low mantissa bits, from where one shift moves it to the
// exponent. Below 2^-125 the result is not exact but is < 1e-37, i.e. 0 next to the row's
// largest term, which is at least 1. NaN stays NaN.
// kP0 = 1 exactly, so exp(0) = 1 and a row whose target takes all the mass has loss 0, not -7e-7.
constexpr float kP0 = 1.0f, kP1 = 0.6931241750717163f, kP2 = 0.24024099111557007f,
                kP3 = 0.055906426161527634f, kP4 = 0.009582852944731712f;

inline float exp_approx(float d) {
  float t = d * 1.44269504088896341f;
  t = t < -125.0f ? -125.0f : t;
  const float magic = 12582912.0f;
  const float tm = t + magic;
  const float f = t - (tm - magic);
  float p = kP4;
  p = p * f + kP3;
  p = p * f + kP2;
  p = p * f + kP1;
  p = p * f + kP0;
  uint32_t pb, nb;
  std::memcpy(&pb, &p, sizeof(pb));
  std::memcpy(&nb, &tm, sizeof(nb));
  pb += nb << 23;
  float y;
  std::memcpy(&y, &pb, sizeof(y));
  return y;
}

// Up to this much above the running shift, exp(x - shift) stays finite even summed over 256k
// columns (e^64 * 2^18 ~ 2e33 < 3e38), and it loses no relative precision, so the shift need not be
// the exact running max: see row_stats.
constexpr float kHeadroom = 64.0f;

#if defined(__AVX2__) && defined(__FMA__)
// The same exp on 8 lanes. The scalar loops below vectorise too, but gcc's versions of the fused
// sum-and-max loop ran about half as fast as these, so on AVX2 machines we spell them out.
inline __m256 exp8(__m256 d) {
  __m256 t = _mm256_mul_ps(d, _mm256_set1_ps(1.44269504088896341f));
  t = _mm256_max_ps(_mm256_set1_ps(-125.0f), t);  // in this operand order a NaN t comes through
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  const __m256 tm = _mm256_add_ps(t, magic);
  const __m256 f = _mm256_sub_ps(t, _mm256_sub_ps(tm, magic));
  __m256 p = _mm256_set1_ps(kP4);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP1));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kP0));
  const __m256i e = _mm256_slli_epi32(_mm256_castps_si256(tm), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}

inline float hsum8(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(a, _mm_movehdup_ps(a)));
}

inline float hmax8(__m256 v) {
  __m128 a = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_max_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_max_ss(a, _mm_movehdup_ps(a)));
}
#endif

// sum(exp(x - shift)) over n values, and their max in the same pass (two accumulators each, so
// consecutive iterations do not wait on one another's adds).
inline float block_sum_exp_max(const float* __restrict x, int64_t n, float shift, float& max_out) {
  float s = 0.0f;
  float m = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 s0 = _mm256_setzero_ps(), s1 = s0;
  __m256 m0 = _mm256_set1_ps(m), m1 = m0;
  for (; j + 16 <= n; j += 16) {
    const __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + 8);
    m0 = _mm256_max_ps(m0, a);
    m1 = _mm256_max_ps(m1, b);
    s0 = _mm256_add_ps(s0, exp8(_mm256_sub_ps(a, sh)));
    s1 = _mm256_add_ps(s1, exp8(_mm256_sub_ps(b, sh)));
  }
  s = hsum8(_mm256_add_ps(s0, s1));
  m = hmax8(_mm256_max_ps(m0, m1));
#endif
  float s_tail = 0.0f;
  float m_tail = m;
#pragma omp simd reduction(+ : s_tail) reduction(max : m_tail)
  for (int64_t k = j; k < n; ++k) {
    s_tail += exp_approx(x[k] - shift);
    m_tail = std::max(m_tail, x[k]);
  }
  max_out = m_tail;
  return s + s_tail;
}

// m and l = log(sum(exp(x - m))) for one row, in one pass over it. The shift m starts at x[0] and
// is raised only when a block's max passes it by more than kHeadroom; then the running sum is
// rescaled by exp(old - new) and that block (still in L1) is summed again. With a shift below the
// true max, x - m can be positive (by up to kHeadroom), but x - m - l never is, since l >= max - m.
// So on ordinary rows there is one exp per logit and no separate max pass; a row whose logits climb
// by more than 64 at a time (extreme logits) costs at most a second pass over those blocks.
// Keeping m and l apart (rather than lse = m + l) keeps x - m exact for huge logits (at 1e4 one
// float32 ulp is 1e-3, too coarse to subtract lse from x).
inline void row_stats(const float* x, int64_t V, float& m_out, float& l_out) {
  const float inf = std::numeric_limits<float>::infinity();
  float m = x[0];
  double s = 0.0;  // across blocks in double: a 256k-column row would lose digits in float
  for (int64_t b = 0; b < V; b += kBlock) {
    const int64_t n = std::min(kBlock, V - b);
    float bm;
    float sb = block_sum_exp_max(x + b, n, m, bm);
    if (!(bm <= m + kHeadroom)) {  // also true for m = -inf and for nan
      if (std::isnan(bm) || bm == inf) {  // PyTorch gives nan here (inf - inf); so do we
        m_out = l_out = std::numeric_limits<float>::quiet_NaN();
        return;
      }
      if (bm == -inf) continue;  // a block of -inf after a row start of -inf adds nothing
      s = (m == -inf) ? 0.0 : s * std::exp(static_cast<double>(m) - bm);
      m = bm;
      float unused;
      sb = block_sum_exp_max(x + b, n, m, unused);
    }
    s += sb;
  }
  m_out = m;
  l_out = static_cast<float>(std::log(s));  // a row of only -inf: l = -inf, loss nan, as in PyTorch
}

// Ask Linux for 2 MiB pages for a large new buffer: writing the gradient then takes 512x fewer
// page faults, which on small VMs cost more than computing it. A hint only; nothing changes if
// the kernel says no.
void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t page = 4096;
  const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + page - 1) & ~(page - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(page - 1);
  if (bytes >= (size_t{4} << 20) && e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// fn(begin, end) over all rows, in batches of about 64k logits, dynamically scheduled.
template <typename F>
void parallel_rows(int64_t N, int64_t V, const F& fn) {
  if (N <= 0) return;
  const int64_t rows = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(V, 1));
  const int64_t batches = (N + rows - 1) / rows;
#ifdef _OPENMP
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), batches)));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t k = 0; k < batches; ++k) fn(k * rows, std::min(N, (k + 1) * rows));
#else
  at::parallel_for(0, N, rows, fn);
#endif
}

void check_input(const torch::Tensor& logits, const torch::Tensor& target) {
  TORCH_CHECK(logits.device().is_cpu() && target.device().is_cpu(), "fused_cross_entropy: CPU tensors only");
  TORCH_CHECK(logits.scalar_type() == torch::kFloat32, "fused_cross_entropy: float32 logits only");
  TORCH_CHECK(target.scalar_type() == torch::kInt64, "fused_cross_entropy: int64 target only");
  TORCH_CHECK(logits.dim() == 2 && (logits.size(1) <= 1 || logits.stride(1) == 1),
              "fused_cross_entropy: 2-D logits with unit column stride");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), "fused_cross_entropy: target must be [N]");
}

// sum(x) over a row, in double across blocks (label smoothing needs the row's mean logit).
inline double row_sum(const float* __restrict x, int64_t V) {
  double total = 0.0;
  for (int64_t b = 0; b < V; b += kBlock) {
    const int64_t n = std::min(kBlock, V - b);
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < n; ++k) s += x[b + k];
    total += s;
  }
  return total;
}

// The block's max (the block is then in L1 for the pass that follows). A NaN is not carried through
// (std::max drops it); the sum of exponentials that follows carries it instead.
inline float block_max(const float* __restrict x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 m0 = _mm256_set1_ps(m), m1 = m0, m2 = m0, m3 = m0;
  for (; j + 32 <= n; j += 32) {
    m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + j));
    m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + j + 8));
    m2 = _mm256_max_ps(m2, _mm256_loadu_ps(x + j + 16));
    m3 = _mm256_max_ps(m3, _mm256_loadu_ps(x + j + 24));
  }
  m = hmax8(_mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
#endif
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// sum(exp(x - shift)) over a block, writing each exp(x - shift) to e (e may be x itself).
inline float block_exp_store(const float* x, float* e, int64_t n, float shift) {
  int64_t j = 0;
  float s = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 s0 = _mm256_setzero_ps(), s1 = s0;
  for (; j + 16 <= n; j += 16) {
    const __m256 a = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), sh));
    const __m256 b = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j + 8), sh));
    _mm256_storeu_ps(e + j, a);
    _mm256_storeu_ps(e + j + 8, b);
    s0 = _mm256_add_ps(s0, a);
    s1 = _mm256_add_ps(s1, b);
  }
  s = hsum8(_mm256_add_ps(s0, s1));
#endif
  float s_tail = 0.0f;
#pragma omp simd reduction(+ : s_tail)
  for (int64_t k = j; k < n; ++k) {
    const float v = exp_approx(x[k] - shift);
    e[k] = v;
    s_tail += v;
  }
  return s + s_tail;
}

// e[k] = e[k] * c - d over a block (the second, in-cache pass that turns exp(x - shift) into the gradient).
inline void block_scale(float* __restrict e, int64_t n, float c, float d) {
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 vc = _mm256_set1_ps(c), vd = _mm256_set1_ps(d);
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(e + j, _mm256_fmsub_ps(_mm256_loadu_ps(e + j), vc, vd));
#endif
  for (; j < n; ++j) e[j] = e[j] * c - d;
}

// One row, loss and gradient together ("forward and backward in one sweep"): the row is read from memory
// once. Pass 1, block by block: the block's max (raising the shift only when it passes the shift by more
// than kHeadroom, as row_stats does), then exp(x - shift) summed AND stored into the gradient row (which
// may be the logits row itself), remembering each block's shift. Pass 2, over the gradient row while it is
// still in cache: exp(x - shift_b) * exp(shift_b - m - l) * scale - eps / V * scale. Returns m and l.
inline void row_loss_and_grad(const float* x, float* g, int64_t V, float scale, float eps_over_v,
                              std::vector<float>& shifts, float& m_out, float& l_out) {
  const float inf = std::numeric_limits<float>::infinity();
  const int64_t blocks = (V + kBlock - 1) / kBlock;
  shifts.resize(blocks);
  float m = x[0];
  double s = 0.0;
  bool bad = false;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t off = b * kBlock, n = std::min(kBlock, V - off);
    const float bm = block_max(x + off, n);
    if (std::isnan(bm) || bm == inf || std::isnan(x[off])) bad = true;
    if (bad) {  // PyTorch gives nan here (inf - inf); so do we, for loss and gradient
      std::fill(g + off, g + n + off, std::numeric_limits<float>::quiet_NaN());
      shifts[b] = 0.0f;
      continue;
    }
    if (!(bm <= m + kHeadroom) && bm != -inf) {  // also true for m = -inf
      s = (m == -inf) ? 0.0 : s * std::exp(static_cast<double>(m) - bm);
      m = bm;
    }
    shifts[b] = m;
    if (m == -inf) {  // nothing but -inf so far: these terms are 0 (and exp(-inf - -inf) would be nan)
      std::fill(g + off, g + n + off, 0.0f);
      continue;
    }
    s += block_exp_store(x + off, g + off, n, m);
  }
  const float l = static_cast<float>(std::log(s));
  m_out = bad ? std::numeric_limits<float>::quiet_NaN() : m;
  l_out = bad ? std::numeric_limits<float>::quiet_NaN() : l;
  if (bad) {
    std::fill(g, g + V, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  const float d = eps_over_v * scale;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t off = b * kBlock, n = std::min(kBlock, V - off);
    const float c = static_cast<float>(std::exp(static_cast<double>(shifts[b]) - m - l)) * scale;
    block_scale(g + off, n, c, d);
  }
}

}  // namespace

// The loss of every row, and (grad_mode 1: into a new [N, V] tensor; 2: in place, over the logits) its
// gradient: grad[i, j] = (softmax(x_i)_j - (1 - eps) [j == t_i] - eps / V) * scale * row_scale[i]
// (row_scale optional), 0 where t_i == ignore_index; grad_mode 1 writes into `out` when it is given. row_loss[i] = (1 - eps) (l - (x_t - m)) +
// eps (l - (mean(x_i) - m)), 0 where ignored. Targets must be in [0, V) or ignore_index (checked by the
// caller). Returns (row_max, row_logsum, row_loss[, grad]).
std::vector<torch::Tensor> forward(torch::Tensor logits, torch::Tensor target, int64_t ignore_index,
                                   double label_smoothing, int64_t grad_mode, double scale,
                                   c10::optional<torch::Tensor> row_scale, c10::optional<torch::Tensor> out) {
  check_input(logits, target);
  TORCH_CHECK(grad_mode >= 0 && grad_mode <= 2, "fused_cross_entropy: grad_mode is 0, 1 or 2");
  auto tgt = target.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  const float* rs = nullptr;
  torch::Tensor rs_t;
  if (row_scale.has_value() && row_scale->defined()) {
    rs_t = row_scale->to(torch::kFloat32).contiguous();
    TORCH_CHECK(rs_t.numel() == N, "fused_cross_entropy: row_scale must be [N]");
    rs = rs_t.data_ptr<float>();
  }
  auto row_max = torch::empty({N}, logits.options());
  auto row_logsum = torch::empty({N}, logits.options());
  auto row_loss = torch::empty({N}, logits.options());
  torch::Tensor grad;
  float* g = nullptr;
  int64_t ldg = V;
  if (grad_mode == 1) {
    if (out.has_value() && out->defined()) {  // a buffer the caller reuses (no fresh pages to fault in)
      grad = *out;
      TORCH_CHECK(grad.scalar_type() == torch::kFloat32 && grad.is_contiguous() && grad.dim() == 2 &&
                      grad.size(0) == N && grad.size(1) == V,
                  "fused_cross_entropy: out must be a contiguous float32 [N, V] tensor");
    } else {
      grad = torch::empty({N, V}, logits.options());
      advise_huge_pages(grad.data_ptr(), static_cast<size_t>(grad.numel()) * sizeof(float));
    }
    g = grad.data_ptr<float>();
  } else if (grad_mode == 2) {
    g = logits.data_ptr<float>();
    ldg = ld;
  }
  const float* x = logits.data_ptr<float>();
  const int64_t* t = tgt.data_ptr<int64_t>();
  float* m_p = row_max.data_ptr<float>();
  float* l_p = row_logsum.data_ptr<float>();
  float* loss_p = row_loss.data_ptr<float>();
  const float eps = static_cast<float>(label_smoothing);
  const float eps_over_v = V > 0 ? eps / static_cast<float>(V) : 0.0f;
  const float s0 = static_cast<float>(scale);
  if (V == 0) {
    row_max.zero_(), row_logsum.zero_(), row_loss.zero_();
    return grad.defined() ? std::vector<torch::Tensor>{row_max, row_logsum, row_loss, grad}
                          : std::vector<torch::Tensor>{row_max, row_logsum, row_loss};
  }
  parallel_rows(N, V, [&](int64_t begin, int64_t end) {
    std::vector<float> shifts;
    for (int64_t i = begin; i < end; ++i) {
      const float* row = x + i * ld;
      float* grow = g ? g + i * ldg : nullptr;
      if (t[i] == ignore_index) {
        m_p[i] = l_p[i] = loss_p[i] = 0.0f;
        if (grow) std::fill(grow, grow + V, 0.0f);
        continue;
      }
      const float x_t = row[t[i]];  // read before the gradient may overwrite the row
      const double mean_x = eps != 0.0f ? row_sum(row, V) / static_cast<double>(V) : 0.0;
      const float s = rs ? s0 * rs[i] : s0;
      if (grow) {
        row_loss_and_grad(row, grow, V, s, eps_over_v, shifts, m_p[i], l_p[i]);
        grow[t[i]] -= (1.0f - eps) * s;
      } else {
        row_stats(row, V, m_p[i], l_p[i]);
      }
      // -log softmax(x)[t] = l - (x_t - m), in this order for the same reason as above
      float loss = l_p[i] - (x_t - m_p[i]);
      if (eps != 0.0f) loss = (1.0f - eps) * loss + eps * (l_p[i] - static_cast<float>(mean_x - m_p[i]));
      loss_p[i] = loss;
    }
  });
  if (grad.defined()) return {row_max, row_logsum, row_loss, grad};
  return {row_max, row_logsum, row_loss};
}

namespace {

// The gradient's memory, kept for the next call. A fresh 1 GiB buffer costs a page fault per page on its
// first write, more than computing the gradient; so, as PyTorch's CUDA caching allocator does, a block
// whose tensor is freed is kept and handed to the next call that asks for that many bytes.
//
// Why this is safe whatever the caller keeps (the tensor, a view, its storage, a numpy array, a copy sent
// to another process): a block goes back to the pool only from its tensor's deleter, and PyTorch runs that
// deleter only when no storage holds the memory any more, that is, when nothing can read it. (Sending a
// tensor to another process moves its storage into shared memory: the old memory's deleter runs then, and
// the shared memory is never ours.) Nothing here counts references.
struct GradientPool {
  std::mutex mutex;
  void* block = nullptr;  // at most one free block, of `bytes` bytes
  size_t bytes = 0;
};

// Never destroyed: a deleter may run during interpreter shutdown, after this library's statics are gone.
GradientPool& gradient_pool() {
  static GradientPool* pool = new GradientPool();
  return *pool;
}

constexpr size_t kHugePage = size_t{2} << 20;

void* new_block(size_t bytes) {
  void* p = nullptr;
  // A large block is 2 MiB aligned and rounded, so that the huge-page hint covers all of it.
  const bool huge = bytes >= 2 * kHugePage;
  const size_t align = huge ? kHugePage : 64;
  const size_t rounded = (std::max<size_t>(bytes, 1) + align - 1) / align * align;
  if (posix_memalign(&p, align, rounded) != 0) throw std::bad_alloc();
  if (huge) advise_huge_pages(p, rounded);
  return p;
}

// The tensor's deleter: the block becomes the pool's free block (the newest is the likeliest to be asked
// for again; an older free block is freed).
void return_block(void* p, size_t bytes) {
  void* old = nullptr;
  {
    std::lock_guard<std::mutex> lock(gradient_pool().mutex);
    old = gradient_pool().block;
    gradient_pool().block = p;
    gradient_pool().bytes = bytes;
  }
  std::free(old);
}

}  // namespace

// A float32 [N, V] tensor on memory that nothing else refers to: the pool's free block if it has the right
// size, else a new one (a free block of another size is freed: the pool holds at most one). Its memory
// returns to the pool when PyTorch frees it.
torch::Tensor pooled_empty(int64_t N, int64_t V) {
  TORCH_CHECK(N >= 0 && V >= 0, "pooled_empty: sizes must be >= 0");
  const size_t bytes = static_cast<size_t>(N) * static_cast<size_t>(V) * sizeof(float);
  void* p = nullptr;
  void* stale = nullptr;
  {
    std::lock_guard<std::mutex> lock(gradient_pool().mutex);
    GradientPool& pool = gradient_pool();
    if (pool.block != nullptr && pool.bytes == bytes) {
      p = pool.block;
    } else {
      stale = pool.block;
    }
    pool.block = nullptr;
  }
  std::free(stale);
  if (p == nullptr) p = new_block(bytes);
  return torch::from_blob(
      p, {N, V}, [bytes](void* q) { return_block(q, bytes); }, torch::TensorOptions().dtype(torch::kFloat32));
}

// Frees the pool's free block (memory a long-lived process wants back after training).
void release_pool() {
  void* old = nullptr;
  {
    std::lock_guard<std::mutex> lock(gradient_pool().mutex);
    old = gradient_pool().block;
    gradient_pool().block = nullptr;
    gradient_pool().bytes = 0;
  }
  std::free(old);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "minilib's fused cross-entropy for CPU float32 (online softmax, one pass per row)";
  // The GIL is released while the kernels run: they touch no Python object, and other Python
  // threads (a data loader, say) can go on meanwhile.
  m.def("forward", &forward, "per-row max, log-sum, loss, and optionally the gradient", py::arg("logits"),
        py::arg("target"), py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("grad_mode"),
        py::arg("scale"), py::arg("row_scale") = py::none(), py::arg("out") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("pooled_empty", &pooled_empty, "a float32 [N, V] tensor whose memory returns to a pool when freed");
  m.def("release_pool", &release_pool, "frees the pool's free block");
}
