// CPU kernels for the convolutions of a 1w1a binary layer, called from JAX through
// the XLA FFI (irnet_jax/kernels/build.py compiles this file on first use;
// irnet_jax/kernels/avx512.py wraps the handlers).
//
// Why hand-written: XLA:CPU has no convolution that knows its operands are +-1, and
// its float convolutions for the thin layers of CIFAR networks (16-64 channels) run
// at well under half of the machine's GEMM throughput; the weight-gradient one also
// makes XLA insert layout transposes. Two kernels and a marker:
//
//   irnet_binary_conv_fwd: y = conv(sign(x), w) for w in {0, +-s_o} (one magnitude
//     s_o per output channel, as Libra-PB produces). Computed exactly with
//     XNOR/popcount on bit-packed operands: y = s_o * (#agree - #disagree), an
//     integer times a power of two, so it equals the float convolution bit for bit.
//     Taking x rather than sign(x) makes XLA materialize x once (its elementwise
//     producers would otherwise be re-fused, i.e. recomputed, into every consumer).
//   irnet_binary_conv_bwd: both gradients of conv(sign(x), w) in one pass.
//   irnet_materialize: an identity XLA cannot fuse through (see avx512.materialize).
//
// Layouts: activations NHWC, kernels HWIO, all float32, symmetric zero padding.
// Every handler checks its operands (rank 4, C and K multiples of 16, matching
// channels and output size, stride >= 1, padding >= 0) and returns an
// INVALID_ARGUMENT error instead of reading out of bounds. NaN behaves as in XLA's
// float convolution of sign(x) with sign(NaN) = NaN: a NaN input makes every output
// whose window covers it NaN, a NaN weight its whole output channel, and the kernel
// gradient keeps the NaN of the input. The CPU needs AVX-512 F/DQ/BW/VL and
// VPOPCNTDQ (build.py checks before loading; irnet_kernels_available() says whether
// the compiler built the handlers). Work is split over images (rows for the
// forward) and run on XLA's intra-op thread pool.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512BW__) && \
    defined(__AVX512VL__) && defined(__AVX512VPOPCNTDQ__)
#define IRNET_HAVE_KERNELS 1
#include <immintrin.h>
#else
#define IRNET_HAVE_KERNELS 0
#endif

extern "C" int irnet_kernels_available() { return IRNET_HAVE_KERNELS; }

#if IRNET_HAVE_KERNELS

namespace {

struct Geometry {
  int64_t n, h, w, c;      // input NHWC
  int64_t kh, kw, k;       // kernel HWIO (I == c)
  int64_t ho, wo;          // output spatial size
  int64_t stride, pad;
};

// Runs body(worker, item) for every item in [0, count) on the caller and up to
// pool.num_threads() - 1 pool threads. Items are claimed from a shared counter, so
// the call completes even if no pool thread ever picks up its task; late tasks find
// no items left and return without touching the caller's (then gone) stack.
template <typename F>
int64_t ParallelFor(ffi::ThreadPool& pool, int64_t count, int64_t max_workers, F&& body) {
  struct State {
    std::atomic<int64_t> next{0}, done{0}, workers{0};
  };
  auto state = std::make_shared<State>();
  F* fn = &body;
  auto work = [state, fn, count]() {
    int64_t worker = state->workers.fetch_add(1);
    for (int64_t i; (i = state->next.fetch_add(1)) < count;) {
      (*fn)(worker, i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>({pool.num_threads(), count, max_workers}) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  while (state->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
  return helpers + 1;
}

int64_t MaxWorkers(ffi::ThreadPool& pool) {
  return std::max<int64_t>(1, pool.num_threads());
}

// The geometry of a conv of x (N, H, W, C) with w (KH, KW, C, K) into y (N, HO, WO, K),
// or an INVALID_ARGUMENT error naming the first operand that does not fit: the loops
// below trust these sizes (16-channel blocks, the output size implied by the input).
ffi::Error CheckConv(const char* handler, ffi::Span<const int64_t> xd,
                     ffi::Span<const int64_t> wd, ffi::Span<const int64_t> yd,
                     int64_t stride, int64_t pad, Geometry* g) {
  auto fail = [handler](const std::string& what) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, std::string(handler) + ": " + what);
  };
  auto str = [](ffi::Span<const int64_t> d) {
    std::string out = "(";
    for (size_t i = 0; i < d.size(); ++i) out += (i ? ", " : "") + std::to_string(d[i]);
    return out + ")";
  };
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4)
    return fail("expected rank-4 operands (x NHWC, kernel HWIO, output NHWC), got x " +
                str(xd) + ", kernel " + str(wd) + ", output " + str(yd));
  if (stride < 1 || pad < 0)
    return fail("stride must be >= 1 and padding >= 0, got stride " +
                std::to_string(stride) + ", padding " + std::to_string(pad));
  if (wd[2] != xd[3])
    return fail("kernel " + str(wd) + " expects " + std::to_string(wd[2]) +
                " input channels, x " + str(xd) + " has " + std::to_string(xd[3]));
  if (xd[3] % 16 != 0 || wd[3] % 16 != 0)
    return fail("input and output channels must be multiples of 16, got " +
                std::to_string(xd[3]) + " and " + std::to_string(wd[3]));
  if (wd[0] < 1 || wd[1] < 1 || xd[1] + 2 * pad < wd[0] || xd[2] + 2 * pad < wd[1])
    return fail("kernel " + str(wd) + " does not fit x " + str(xd) + " with padding " +
                std::to_string(pad));
  const int64_t ho = (xd[1] + 2 * pad - wd[0]) / stride + 1;
  const int64_t wo = (xd[2] + 2 * pad - wd[1]) / stride + 1;
  if (yd[0] != xd[0] || yd[1] != ho || yd[2] != wo || yd[3] != wd[3])
    return fail("output " + str(yd) + " should be (" + std::to_string(xd[0]) + ", " +
                std::to_string(ho) + ", " + std::to_string(wo) + ", " +
                std::to_string(wd[3]) + ")");
  *g = Geometry{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3], ho, wo, stride, pad};
  return ffi::Error::Success();
}

bool SameDims(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

// Whether one pixel's C channels hold a NaN.
bool PixelHasNan(const float* px, int64_t c) {
  __mmask16 nan = 0;
  for (int64_t q = 0; q < c; q += 16) {
    __m512 v = _mm512_loadu_ps(px + q);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  return nan != 0;
}

// ------------------------------------------------------------------ forward

// A private, per-call packing (irnet_jax/bits.py documents the library's layout and why
// this one differs). One bit per channel, in 16-bit chunks: chunk q of a pixel holds channels
// 16q..16q+15. Plane "pos" marks +1, plane "neg" marks -1; 0 is in neither. The
// planes are zero-padded by `pad` pixels on every side, like the convolution. NaN
// is in neither plane; the return value says whether the image holds one.
bool PackImage(const Geometry& g, const float* x, int64_t hp, int64_t wp, uint16_t* pos,
               uint16_t* neg) {
  const __m512 zero = _mm512_setzero_ps();
  const int64_t c16 = g.c / 16;
  __mmask16 nan = 0;
  for (int64_t h = 0; h < g.h; ++h)
    for (int64_t w = 0; w < g.w; ++w)
      for (int64_t q = 0; q < c16; ++q) {
        __m512 v = _mm512_loadu_ps(x + (h * g.w + w) * g.c + 16 * q);
        int64_t dst = ((h + g.pad) * wp + w + g.pad) * c16 + q;
        pos[dst] = _mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ);
        neg[dst] = _mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      }
  return nan != 0;
}

// NaN into every output of row oh of image n whose window covers a NaN input pixel
// (XLA's conv of sign(x) with sign(NaN) = NaN). Only run on images that hold a NaN.
void PropagateNanRow(const Geometry& g, const float* x, int64_t n, int64_t oh, float* y) {
  const float qnan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t ow = 0; ow < g.wo; ++ow) {
    bool hit = false;
    for (int64_t i = 0; i < g.kh && !hit; ++i)
      for (int64_t j = 0; j < g.kw && !hit; ++j) {
        int64_t ih = oh * g.stride - g.pad + i, iw = ow * g.stride - g.pad + j;
        if (ih >= 0 && ih < g.h && iw >= 0 && iw < g.w)
          hit = PixelHasNan(x + ((n * g.h + ih) * g.w + iw) * g.c, g.c);
      }
    if (hit) std::fill_n(y + ((n * g.ho + oh) * g.wo + ow) * g.k, g.k, qnan);
  }
}

ffi::Error BinaryConvFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                             int64_t stride, int64_t pad) {
  Geometry g;
  if (ffi::Error e = CheckConv("irnet_binary_conv_fwd", x.dimensions(), w.dimensions(),
                               y->dimensions(), stride, pad, &g);
      !e.success())
    return e;
  const int64_t c16 = g.c / 16;
  // Kernel row i of an output pixel reads KW consecutive (padded) input pixels: one
  // contiguous run of KW * C bits in the packed planes, read as row_words unaligned
  // 64-bit words. Bits past the run belong to the next pixel; the weight bits there
  // are 0, which masks them out.
  const int64_t row_words = (g.kw * c16 + 3) / 4;
  const int64_t words = g.kh * row_words;
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();

  // Weights in the same layout, transposed to [word][o] so that 8 output channels
  // are one vector; s_o = max |w[..., o]| (every nonzero entry has that magnitude),
  // NaN if the channel holds a NaN (then all its outputs are NaN, as in XLA).
  std::vector<uint64_t> wpos(words * g.k, 0), wneg(words * g.k, 0);
  std::vector<float> scale(g.k, 0.f);
  std::vector<uint8_t> nan_channel(g.k, 0);
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j)
      for (int64_t ci = 0; ci < g.c; ++ci) {
        const float* row = wp + ((i * g.kw + j) * g.c + ci) * g.k;
        const int64_t bit = j * g.c + ci, word = i * row_words + bit / 64;
        const __m512i m = _mm512_set1_epi64(int64_t(uint64_t{1} << (bit % 64)));
        for (int64_t o = 0; o < g.k; o += 8) {  // 8 output channels (one bit each) at once
          __m256 v = _mm256_loadu_ps(row + o);
          __mmask8 p = _mm256_cmp_ps_mask(v, _mm256_setzero_ps(), _CMP_GT_OQ);
          __mmask8 n = _mm256_cmp_ps_mask(v, _mm256_setzero_ps(), _CMP_LT_OQ);
          uint64_t* dp = &wpos[word * g.k + o];
          uint64_t* dn = &wneg[word * g.k + o];
          __m512i old_p = _mm512_loadu_si512(dp), old_n = _mm512_loadu_si512(dn);
          _mm512_storeu_si512(dp, _mm512_mask_or_epi64(old_p, p, old_p, m));
          _mm512_storeu_si512(dn, _mm512_mask_or_epi64(old_n, n, old_n, m));
          __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.f), v);  // |v|
          _mm256_storeu_ps(&scale[o], _mm256_max_ps(_mm256_loadu_ps(&scale[o]), a));
          __mmask8 nan = _mm256_cmp_ps_mask(v, v, _CMP_UNORD_Q);
          for (int b = 0; b < 8; ++b) nan_channel[o + b] |= (nan >> b) & 1;
        }
      }
  for (int64_t o = 0; o < g.k; ++o)
    if (nan_channel[o]) scale[o] = std::numeric_limits<float>::quiet_NaN();

  // Pack every image, then convolve output rows: rows, not images, are the unit of
  // work, so that a batch of one still uses every thread.
  const int64_t hp = g.h + 2 * g.pad, wpd = g.w + 2 * g.pad;
  const int64_t plane = hp * wpd * c16;
  std::vector<uint16_t> pos(g.n * plane + 4, 0), neg(g.n * plane + 4, 0);  // + read slack
  std::vector<uint8_t> image_has_nan(g.n, 0);
  ParallelFor(pool, g.n, MaxWorkers(pool), [&](int64_t, int64_t n) {
    image_has_nan[n] =
        PackImage(g, xp + n * g.h * g.w * g.c, hp, wpd, &pos[n * plane], &neg[n * plane]);
  });
  ParallelFor(pool, g.n * g.ho, MaxWorkers(pool), [&](int64_t, int64_t item) {
    const int64_t n = item / g.ho, oh = item % g.ho;
    const uint16_t* ip = &pos[n * plane];
    const uint16_t* in = &neg[n * plane];
    for (int64_t ow = 0; ow < g.wo; ++ow) {
      const int64_t src = (oh * g.stride * wpd + ow * g.stride) * c16;
      float* out = yp + ((n * g.ho + oh) * g.wo + ow) * g.k;
      for (int64_t o = 0; o < g.k; o += 8) {
        __m512i acc = _mm512_setzero_si512();
        for (int64_t i = 0; i < g.kh; ++i)
          for (int64_t r = 0; r < row_words; ++r) {
            int64_t at = src + i * wpd * c16 + 4 * r, q = i * row_words + r;
            uint64_t vp, vn;
            std::memcpy(&vp, ip + at, 8);
            std::memcpy(&vn, in + at, 8);
            __m512i ap = _mm512_set1_epi64(vp), an = _mm512_set1_epi64(vn);
            __m512i bp = _mm512_loadu_si512(&wpos[q * g.k + o]);
            __m512i bn = _mm512_loadu_si512(&wneg[q * g.k + o]);
            __m512i agree = _mm512_or_si512(_mm512_and_si512(ap, bp), _mm512_and_si512(an, bn));
            __m512i differ = _mm512_or_si512(_mm512_and_si512(ap, bn), _mm512_and_si512(an, bp));
            acc = _mm512_add_epi64(acc, _mm512_sub_epi64(_mm512_popcnt_epi64(agree),
                                                         _mm512_popcnt_epi64(differ)));
          }
        __m256 counts = _mm512_cvtepi64_ps(acc);
        _mm256_storeu_ps(out + o, _mm256_mul_ps(counts, _mm256_loadu_ps(&scale[o])));
      }
    }
    if (image_has_nan[n]) PropagateNanRow(g, xp, n, oh, yp);
  });
  return ffi::Error::Success();
}

// --------------------------------------------------------- input gradient

// Output pixels (oh, ow) whose input pixel oh * stride - pad + i (resp. j) lies
// inside the image, for kernel tap (i, j): [lo, hi).
inline int64_t FirstValid(int64_t pad, int64_t tap, int64_t stride) {
  return std::max<int64_t>(0, (pad - tap + stride - 1) / stride);
}
inline int64_t EndValid(int64_t size, int64_t out, int64_t pad, int64_t tap,
                        int64_t stride) {
  if (size - 1 + pad - tap < 0) return 0;
  return std::min<int64_t>(out, (size - 1 + pad - tap) / stride + 1);
}

// dx[n, oh*s-p+i, ow*s-p+j, c] += sum_o dy[n, oh, ow, o] * w[i, j, c, o], tap by tap:
// a block of OB output channels x NV vectors of 16 input channels of the kernel
// stays in registers while the image streams through (it stays in cache across
// taps). wt is the kernel as [i, j, o, c]. Two FMA chains per vector.
template <int NV, int OB>
void DxImage(const Geometry& g, const float* dy, const float* wt, int64_t n, float* dx) {
  for (int64_t i = 0; i < g.kh; ++i) {
    int64_t oh_lo = FirstValid(g.pad, i, g.stride);
    int64_t oh_hi = EndValid(g.h, g.ho, g.pad, i, g.stride);
    for (int64_t j = 0; j < g.kw; ++j) {
      int64_t ow_lo = FirstValid(g.pad, j, g.stride);
      int64_t ow_hi = EndValid(g.w, g.wo, g.pad, j, g.stride);
      for (int64_t c0 = 0; c0 < g.c; c0 += 16 * NV)
        for (int64_t o0 = 0; o0 < g.k; o0 += OB) {
          __m512 wr[OB][NV];
          for (int b = 0; b < OB; ++b)
            for (int v = 0; v < NV; ++v)
              wr[b][v] = _mm512_loadu_ps(wt + ((i * g.kw + j) * g.k + o0 + b) * g.c + c0 + 16 * v);
          for (int64_t oh = oh_lo; oh < oh_hi; ++oh) {
            int64_t ih = oh * g.stride - g.pad + i;
            for (int64_t ow = ow_lo; ow < ow_hi; ++ow) {
              int64_t iw = ow * g.stride - g.pad + j;
              float* out = dx + ((n * g.h + ih) * g.w + iw) * g.c + c0;
              const float* d = dy + ((n * g.ho + oh) * g.wo + ow) * g.k + o0;
              __m512 a0[NV], a1[NV];
              for (int v = 0; v < NV; ++v) {
                a0[v] = _mm512_loadu_ps(out + 16 * v);
                a1[v] = _mm512_setzero_ps();
              }
              for (int b = 0; b < OB; b += 2) {
                __m512 d0 = _mm512_set1_ps(d[b]), d1 = _mm512_set1_ps(d[b + 1]);
                for (int v = 0; v < NV; ++v) {
                  a0[v] = _mm512_fmadd_ps(d0, wr[b][v], a0[v]);
                  a1[v] = _mm512_fmadd_ps(d1, wr[b + 1][v], a1[v]);
                }
              }
              for (int v = 0; v < NV; ++v)
                _mm512_storeu_ps(out + 16 * v, _mm512_add_ps(a0[v], a1[v]));
            }
          }
        }
    }
  }
}

// w[i, j, c, o] -> wt[i, j, o, c]: the dx loop broadcasts dy[o] against c vectors.
std::vector<float> TransposeKernel(const Geometry& g, const float* wp) {
  std::vector<float> wt(g.kh * g.kw * g.k * g.c);
  for (int64_t t = 0; t < g.kh * g.kw; ++t)
    for (int64_t c = 0; c < g.c; ++c)
      for (int64_t o = 0; o < g.k; ++o) wt[(t * g.k + o) * g.c + c] = wp[(t * g.c + c) * g.k + o];
  return wt;
}

// dx of image n (overwritten).
void DxOfImage(const Geometry& g, const float* dy, const float* wt, int64_t n, float* dx) {
  std::fill(dx + n * g.h * g.w * g.c, dx + (n + 1) * g.h * g.w * g.c, 0.f);
  const int64_t c16 = g.c / 16;
  if (c16 % 4 == 0) DxImage<4, 4>(g, dy, wt, n, dx);
  else if (c16 % 3 == 0) DxImage<3, 4>(g, dy, wt, n, dx);
  else if (c16 % 2 == 0) DxImage<2, 8>(g, dy, wt, n, dx);
  else DxImage<1, 16>(g, dy, wt, n, dx);
}

// --------------------------------------------------------- kernel gradient

// Adds image n's contribution to dw (HWIO): for each tap and each block of 8 input
// channels x KV vectors of 16 output channels, the 8*KV partial sums stay in
// registers over all output pixels; the image (x and dy) stays in cache across taps.
template <int KV>
void DwImage(const Geometry& g, const float* x, const float* dy, float* dw) {
  for (int64_t i = 0; i < g.kh; ++i) {
    // Output rows whose input row oh * stride - pad + i lies inside the image.
    int64_t oh_lo = FirstValid(g.pad, i, g.stride);
    int64_t oh_hi = EndValid(g.h, g.ho, g.pad, i, g.stride);
    for (int64_t j = 0; j < g.kw; ++j) {
      int64_t ow_lo = FirstValid(g.pad, j, g.stride);
      int64_t ow_hi = EndValid(g.w, g.wo, g.pad, j, g.stride);
      for (int64_t c0 = 0; c0 < g.c; c0 += 8)
        for (int64_t o0 = 0; o0 < g.k; o0 += 16 * KV) {
          __m512 acc[8][KV];
          for (auto& a : acc)
            for (auto& v : a) v = _mm512_setzero_ps();
          for (int64_t oh = oh_lo; oh < oh_hi; ++oh) {
            int64_t ih = oh * g.stride - g.pad + i;
            for (int64_t ow = ow_lo; ow < ow_hi; ++ow) {
              int64_t iw = ow * g.stride - g.pad + j;
              const float* xr = x + (ih * g.w + iw) * g.c + c0;
              const float* dr = dy + (oh * g.wo + ow) * g.k + o0;
              __m512 d[KV];
              for (int v = 0; v < KV; ++v) d[v] = _mm512_loadu_ps(dr + 16 * v);
              for (int u = 0; u < 8; ++u) {
                __m512 b = _mm512_set1_ps(xr[u]);
                for (int v = 0; v < KV; ++v) acc[u][v] = _mm512_fmadd_ps(b, d[v], acc[u][v]);
              }
            }
          }
          for (int u = 0; u < 8; ++u)
            for (int v = 0; v < KV; ++v) {
              float* out = dw + ((i * g.kw + j) * g.c + c0 + u) * g.k + o0 + 16 * v;
              _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), acc[u][v]));
            }
        }
    }
  }
}

// Adds image n's contribution to the kernel gradient acc (HWIO) of a conv whose
// input is sign(x) (sign(0) = 0, sign(NaN) = NaN); `signs` is scratch of one image.
void DwOfImage(const Geometry& g, const float* x, const float* dy, int64_t n,
               std::vector<float>& signs, float* acc) {
  const int64_t image = g.h * g.w * g.c;
  const float* xi = x + n * image;
  signs.resize(image);  // one pass over the (cached) image
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.f);
  for (int64_t e = 0; e < image; e += 16) {
    __m512 v = _mm512_loadu_ps(xi + e);
    __m512 pos = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ), one);
    __m512 neg = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ), one);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    _mm512_storeu_ps(&signs[e], _mm512_mask_mov_ps(_mm512_sub_ps(pos, neg), nan, v));
  }
  const float* dyi = dy + n * g.ho * g.wo * g.k;
  if (g.k % 32 == 0) DwImage<2>(g, signs.data(), dyi, acc);
  else DwImage<1>(g, signs.data(), dyi, acc);
}

// Images are split into fixed contiguous chunks, one partial kernel gradient each,
// added in chunk order: the result does not depend on which thread ran which chunk.
// per_image(n, signs, partial) runs for every image of a chunk.
template <typename F>
void KernelGradChunks(ffi::ThreadPool& pool, const Geometry& g, float* dw, F&& per_image) {
  const int64_t size = g.kh * g.kw * g.c * g.k;
  const int64_t chunks = std::min<int64_t>(g.n, MaxWorkers(pool));
  if (chunks == 0) {  // an empty batch
    std::fill_n(dw, size, 0.f);
    return;
  }
  std::vector<float> partial(chunks * size, 0.f);
  ParallelFor(pool, chunks, chunks, [&](int64_t, int64_t chunk) {
    std::vector<float> signs;
    for (int64_t n = chunk * g.n / chunks; n < (chunk + 1) * g.n / chunks; ++n)
      per_image(n, signs, &partial[chunk * size]);
  });
  std::copy(partial.begin(), partial.begin() + size, dw);
  for (int64_t r = 1; r < chunks; ++r)
    for (int64_t e = 0; e < size; ++e) dw[e] += partial[r * size + e];
}

// Both gradients of conv(sign(x), w) in one pass over the images: each image's dy
// is read from memory once and used from cache by both.
ffi::Error BinaryConvBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> dy,
                             ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dw,
                             int64_t stride, int64_t pad) {
  Geometry g;
  if (ffi::Error e = CheckConv("irnet_binary_conv_bwd", x.dimensions(), w.dimensions(),
                               dy.dimensions(), stride, pad, &g);
      !e.success())
    return e;
  if (!SameDims(dx->dimensions(), x.dimensions()) || !SameDims(dw->dimensions(), w.dimensions()))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "irnet_binary_conv_bwd: the gradients must have the shapes of x and "
                      "the kernel");
  std::vector<float> wt = TransposeKernel(g, w.typed_data());
  KernelGradChunks(pool, g, dw->typed_data(), [&](int64_t n, std::vector<float>& signs,
                                                  float* acc) {
    DxOfImage(g, dy.typed_data(), wt.data(), n, dx->typed_data());
    DwOfImage(g, x.typed_data(), dy.typed_data(), n, signs, acc);
  });
  return ffi::Error::Success();
}

// The output aliases the input (input_output_aliases in Python), so this does
// nothing but force XLA to materialize its operand as a buffer; see
// avx512.materialize.
ffi::Error IdentityImpl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  if (x.untyped_data() != y->untyped_data())
    std::memcpy(y->untyped_data(), x.untyped_data(), x.size_bytes());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(irnet_materialize, IdentityImpl,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(irnet_binary_conv_fwd, BinaryConvFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(irnet_binary_conv_bwd, BinaryConvBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx (of sign(x))
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding"));

#endif  // IRNET_HAVE_KERNELS
