// One LoRA layer's delta in one call: mtft's compiled fused path.
//
// y[row, :width] += scale * (x[row] @ A_s^T) @ B_s for every row whose slot s >= 0, where A_s and
// B_s are slot s's rows of the kernel's layout (serve/vllm_plugin/fused.py `Stacked`, SIDE_BY_SIDE
// or PAIRS): A stacks the layer's slices' A matrices (block = slices * rank rows), B^T holds the
// slices side by side (rank rows of `width` columns), so a slot's weights are two contiguous runs
// and no zero is stored or read. The torch path spends most of a decode step's LoRA time in the
// fixed cost of ~10 small torch calls per layer (gather, pad, two batched matmuls, scatter); here a
// layer is one call. Rows with slot -1 are not touched: exactly zero delta, as the torch path.
// Sums are fp32 whatever the activations' dtype (fp32, bf16 or fp16), as the torch path's; the
// weights are fp32 or the activations' dtype. With bf16 weights on a CPU with AVX-512-bf16 (PAIRS)
// the rank-r product is rounded to bf16 before the expand, as vLLM's own expand rounds it.
//
// In a decode step every layer's adapter weights come from memory: between two calls for one layer
// the whole base model streams through the caches. So a call first asks for all of a slot's
// weights at once (software prefetch; the loops alone wait for one cache line after another:
// measured, about twice the time of a call when the weights are out of cache).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define MTFT_AVX512 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

// A run of `count` values into the cache (a hint: it never faults).
template <typename W>
inline void prefetch(const W* p, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < count * static_cast<int64_t>(sizeof(W)); i += 64) __builtin_prefetch(bytes + i, 0, 3);
}

// One call's layer: its weights and shapes, its slices' column offsets, and where each slot's
// weights start.
template <typename W>
struct Layer {
  const W* a;   // (slots * block, in)
  const W* bt;  // (slots * rank, width), or paired: (slots * pairs, width * 2)
  int64_t in, rank, block, width;
  bool paired;  // B^T's rows interleaved two by two (see PAIRS below)
  std::vector<int64_t> sizes, offsets;

  int64_t pairs() const { return (rank + 1) / 2; }
  int64_t b_size() const { return paired ? pairs() * 2 * width : rank * width; }  // values per slot
  const W* a_of(int64_t slot) const { return a + slot * block * in; }
  const W* b_of(int64_t slot) const { return bt + slot * b_size(); }
  void prefetch_slot(int64_t slot) const {
    prefetch(a_of(slot), block * in);
    prefetch(b_of(slot), b_size());
  }
};

#if MTFT_AVX512
// AVX-512: rows in tiles of up to four that share a slot, so each load of the slot's weights
// serves four rows (a row at a time is bound by loads, not by the multiplies), and the delta is
// added into y in the same pass, 16 columns at a time, in y's own dtype (bf16 rounded to nearest
// even by the CPU's instruction where it has AVX-512-bf16; it flushes values below bf16's normal
// range, ~1e-38, to zero, where c10's conversion keeps them).
constexpr int kTile = 4;

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const c10::Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }

inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) {
#if defined(__AVX512BF16__)
  const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#else  // round to nearest even, NaN kept quiet: what c10::BFloat16's conversion does per value
  const __m512i u = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                        _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  const __m256i h = _mm512_cvtepi32_epi16(r);
#endif
  _mm256_mask_storeu_epi16(p, m, h);
}
inline void store16(c10::Half* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

inline __mmask16 tail(int64_t left) { return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1); }

// low[r * block + k] = scale * a[k] . x[r] for R rows of x (float, `in` apart) and k < block.
template <typename W, int R>
void shrink_tile(const W* a, const float* x, int64_t in, int64_t block, float scale, float* low) {
  for (int64_t k = 0; k < block; k += 4) {
    const int ks = block - k < 4 ? static_cast<int>(block - k) : 4;
    __m512 acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_setzero_ps();
    for (int64_t i = 0; i < in; i += 16) {
      const __mmask16 m = tail(in - i);
      __m512 xv[R];
      for (int r = 0; r < R; ++r) xv[r] = load16(x + r * in + i, m);
      for (int q = 0; q < ks; ++q) {
        const __m512 av = load16(a + (k + q) * in + i, m);
        for (int r = 0; r < R; ++r) acc[r][q] = _mm512_fmadd_ps(av, xv[r], acc[r][q]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < ks; ++q) low[r * block + k + q] = scale * _mm512_reduce_add_ps(acc[r][q]);
  }
}

// y[r][offset + j] += sum_q low[r * block + first + q] * b[q * width + offset + j] for j < size,
// q < rank: one slice of R rows, 16 columns at a time.
template <typename T, typename W, int R>
void expand_tile(const W* b, const float* low, int64_t block, int64_t first, int64_t rank, int64_t width,
                 int64_t offset, int64_t size, T* const* y) {
  for (int64_t j = 0; j < size; j += 16) {
    const __mmask16 m = tail(size - j);
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t q = 0; q < rank; ++q) {
      const __m512 bv = load16(b + q * width + offset + j, m);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(low[r * block + first + q]), bv, acc[r]);
    }
    for (int r = 0; r < R; ++r) {
      T* out = y[r] + offset + j;
      store16(out, _mm512_add_ps(load16(out, m), acc[r]), m);
    }
  }
}

template <typename T, typename W, int R>
void lora_tile(const T* x_data, int64_t x_stride, T* y_data, int64_t y_stride, const int64_t* rows,
               const Layer<W>& layer, int64_t slot, float scale, float* xf, float* low) {
  const int64_t in = layer.in;
  T* y[R];
  for (int r = 0; r < R; ++r) {
    const T* xr = x_data + rows[r] * x_stride;
    for (int64_t i = 0; i < in; i += 16) store16(xf + r * in + i, load16(xr + i, tail(in - i)), tail(in - i));
    y[r] = y_data + rows[r] * y_stride;
  }
  shrink_tile<W, R>(layer.a_of(slot), xf, in, layer.block, scale, low);
  for (size_t s = 0; s < layer.sizes.size(); ++s)
    expand_tile<T, W, R>(layer.b_of(slot), low, layer.block, static_cast<int64_t>(s) * layer.rank, layer.rank,
                         layer.width, layer.offsets[s], layer.sizes[s], y);
}

#if defined(__AVX512BF16__)
// bf16 activations and weights on a CPU with AVX-512-bf16: vdpbf16ps multiplies 32 bf16 pairs and
// adds them into 16 fp32 sums in one instruction, with no conversion of the weights. The shrink
// pairs neighbouring input columns; the expand pairs neighbouring ranks, so it reads B^T with its
// rows interleaved two by two (PAIRS: value (q, j) at ((q / 2) * width + j) * 2 + q % 2, an odd
// rank padded with a zero row) and multiplies the rank-r product rounded to bf16, as vLLM's own
// expand does. Sums stay fp32 and the delta is added into y in fp32 and rounded once.
//
// Rows go in panels of up to kPanel that share a slot, in the order of a GEMM: at rank 8 a row
// does only a few products per weight it reads, so a loop that reads the slot's weights once per
// few rows is bound by the L2 cache's bandwidth. Within a panel the shrink reads A once per
// eight rows, and the expand takes B a run of columns at a time for all the panel's rows, while
// that run is in L1.
#define MTFT_PAIRS 1
using BF16 = c10::BFloat16;
constexpr int64_t kPanel = 8;
constexpr int kRuns = 4;  // runs of 16 columns the expand sums at once (see expand_pairs)

inline __mmask32 tail32(int64_t left) { return left >= 32 ? ~__mmask32(0) : __mmask32((1u << left) - 1); }
inline __m512bh load32(const BF16* p, __mmask32 m) {
  return reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(m, p));
}

// low[r * block + k] = scale * a[k] . x[r] for R rows and k < block, two input columns per lane; K
// of A's rows per pass over the rows' inputs (R x K sums in registers).
template <int R, int K>
void shrink_pairs(const BF16* a, const BF16* const* x, int64_t in, int64_t block, float scale, float* low) {
  for (int64_t k = 0; k < block; k += K) {
    const int ks = block - k < K ? static_cast<int>(block - k) : K;
    __m512 acc[R][K];
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < K; ++q) acc[r][q] = _mm512_setzero_ps();
    for (int64_t i = 0; i < in; i += 32) {
      const __mmask32 m = tail32(in - i);
      __m512bh xv[R];
      for (int r = 0; r < R; ++r) xv[r] = load32(x[r] + i, m);
      for (int q = 0; q < ks; ++q) {
        const __m512bh av = load32(a + (k + q) * in + i, m);
        for (int r = 0; r < R; ++r) acc[r][q] = _mm512_dpbf16_ps(acc[r][q], av, xv[r]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < ks; ++q) low[r * block + k + q] = scale * _mm512_reduce_add_ps(acc[r][q]);
  }
}

// y[r][column + c * 16 + j] += sum_p pair[r * stride + p] . b[p][column + c * 16 + j] for R rows
// and kRuns runs of 16 columns (`m`/`m2`: each run's columns, as 16 and as 32 bf16 lanes), two
// ranks per instruction. Each sum is a chain of dependent vdpbf16ps (one per pair of ranks), so the
// R x kRuns independent chains keep the unit busy where R alone would wait on each one's latency.
template <int R>
void expand_pairs(const BF16* b, const uint32_t* pair, int64_t stride, int64_t pairs, int64_t width, int64_t column,
                  const __mmask16* m, const __mmask32* m2, BF16* const* y) {
  __m512 acc[R][kRuns];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kRuns; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh bv[kRuns];
    for (int c = 0; c < kRuns; ++c) bv[c] = load32(b + (p * width + column + 16 * c) * 2, m2[c]);
    for (int r = 0; r < R; ++r) {
      const __m512bh lv = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair[r * stride + p]));
      for (int c = 0; c < kRuns; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], bv[c], lv);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kRuns; ++c) {
      BF16* out = y[r] + column + 16 * c;
      store16(out, _mm512_add_ps(load16(out, m[c]), acc[r][c]), m[c]);
    }
}

// One panel: n <= kPanel rows of one slot (`x`, `y`: the rows' pointers). `low` holds n * block
// floats, `pair` n * slices * pairs.
void panel_pairs(const Layer<BF16>& layer, int64_t slot, int64_t n, const BF16* const* x, BF16* const* y, float scale,
                 float* low, uint32_t* pair) {
  const int64_t block = layer.block, rank = layer.rank, pairs = layer.pairs();
  const int64_t slices = static_cast<int64_t>(layer.sizes.size()), stride = slices * pairs;
  for (int64_t g = 0; g < n; g += 8) {
    switch (std::min<int64_t>(n - g, 8)) {
#define MTFT_SHRINK(R, K) \
  case R: shrink_pairs<R, K>(layer.a_of(slot), x + g, layer.in, block, scale, low + g * block); break;
      MTFT_SHRINK(1, 4) MTFT_SHRINK(2, 4) MTFT_SHRINK(3, 4) MTFT_SHRINK(4, 4)
      MTFT_SHRINK(5, 2) MTFT_SHRINK(6, 2) MTFT_SHRINK(7, 2) MTFT_SHRINK(8, 2)
#undef MTFT_SHRINK
    }
  }
  for (int64_t r = 0; r < n; ++r)  // the rank-r products rounded to bf16, two ranks to a 32-bit lane
    for (int64_t s = 0; s < slices; ++s) {
      const float* l = low + r * block + s * rank;
      for (int64_t p = 0; p < pairs; ++p) {
        const uint32_t lo = BF16(l[2 * p]).x, hi = 2 * p + 1 < rank ? BF16(l[2 * p + 1]).x : 0;
        pair[r * stride + s * pairs + p] = lo | hi << 16;
      }
    }
  const BF16* b = layer.b_of(slot);
  for (int64_t s = 0; s < slices; ++s) {
    const int64_t offset = layer.offsets[s], size = layer.sizes[s];
    for (int64_t j = 0; j < size; j += 16 * kRuns) {
      __mmask16 m[kRuns];   // the columns each run has (none past the slice)
      __mmask32 m2[kRuns];  // the same, two bf16 per column
      for (int c = 0; c < kRuns; ++c) {
        const int64_t left = std::max<int64_t>(size - j - 16 * c, 0);
        m[c] = tail(left), m2[c] = tail32(2 * left);
      }
      for (int64_t g = 0; g < n; g += 4) {
        const uint32_t* pg = pair + g * stride + s * pairs;
        switch (std::min<int64_t>(n - g, 4)) {
#define MTFT_EXPAND(R) \
  case R: expand_pairs<R>(b, pg, stride, pairs, layer.width, offset + j, m, m2, y + g); break;
          MTFT_EXPAND(1) MTFT_EXPAND(2) MTFT_EXPAND(3) MTFT_EXPAND(4)
#undef MTFT_EXPAND
        }
      }
    }
  }
}

// The rows (in slot order) in panels of one slot each, split over torch's threads. A slot's rows are
// cut into near-equal panels, enough of them that every thread has work where the batch allows.
void lora_rows_pairs(at::Tensor& y, const at::Tensor& x, const Layer<BF16>& layer, const std::vector<int64_t>& order,
                     const std::vector<int64_t>& slot_of, float scale) {
  const int64_t x_stride = x.stride(0), y_stride = y.stride(0), total = static_cast<int64_t>(order.size());
  const BF16* x_data = x.const_data_ptr<BF16>();
  BF16* y_data = y.mutable_data_ptr<BF16>();
  const int64_t threads = at::get_num_threads();
  const int64_t most = std::clamp<int64_t>((total + threads - 1) / threads, 1, kPanel);
  std::vector<int64_t> starts;
  for (int64_t n = 0; n < total;) {
    int64_t end = n;
    while (end < total && slot_of[end] == slot_of[n]) ++end;
    const int64_t panels = (end - n + most - 1) / most;
    for (int64_t k = 0; k < panels; ++k) starts.push_back(n + (end - n) * k / panels);
    n = end;
  }
  starts.push_back(total);
  at::parallel_for(0, static_cast<int64_t>(starts.size()) - 1, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> low(kPanel * layer.block);
    std::vector<uint32_t> pair(kPanel * layer.sizes.size() * layer.pairs());
    const BF16* xs[kPanel];
    BF16* ys[kPanel];
    for (int64_t t = begin, last = -1; t < end; ++t) {
      const int64_t first = starts[t], n = starts[t + 1] - first, slot = slot_of[first];
      if (slot != last) layer.prefetch_slot(last = slot);
      for (int64_t r = 0; r < n; ++r) {
        xs[r] = x_data + order[first + r] * x_stride;
        ys[r] = y_data + order[first + r] * y_stride;
      }
      panel_pairs(layer, slot, n, xs, ys, scale, low.data(), pair.data());
    }
  });
}
#endif

template <typename T, typename W>
void lora_rows(at::Tensor& y, const at::Tensor& x, const Layer<W>& layer, const std::vector<int64_t>& order,
               const std::vector<int64_t>& slot_of, float scale) {
  const int64_t x_stride = x.stride(0), y_stride = y.stride(0);
  const T* x_data = x.const_data_ptr<T>();
  T* y_data = y.mutable_data_ptr<T>();
  // Tiles: runs of up to kTile consecutive rows (in slot order) that share a slot.
  std::vector<int64_t> starts;
  for (int64_t n = 0; n < static_cast<int64_t>(order.size());) {
    starts.push_back(n);
    const int64_t end = std::min<int64_t>(n + kTile, order.size());
    const int64_t slot = slot_of[n];
    while (++n < end && slot_of[n] == slot) {
    }
  }
  starts.push_back(static_cast<int64_t>(order.size()));
  at::parallel_for(0, static_cast<int64_t>(starts.size()) - 1, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(kTile * layer.in), low(kTile * layer.block);
    for (int64_t t = begin, last = -1; t < end; ++t) {
      const int64_t n = starts[t], slot = slot_of[n];
      if (slot != last) layer.prefetch_slot(last = slot);
      const int64_t* rows = order.data() + n;
      switch (starts[t + 1] - n) {
#define MTFT_TILE(R)                                                                                              \
  case R:                                                                                                         \
    lora_tile<T, W, R>(x_data, x_stride, y_data, y_stride, rows, layer, slot, scale, xf.data(), low.data()); \
    break;
        MTFT_TILE(1)
        MTFT_TILE(2)
        MTFT_TILE(3)
        MTFT_TILE(4)
#undef MTFT_TILE
      }
    }
  });
}
#else
// Without AVX-512 (the AVX2 machines): one row at a time, the compiler vectorising the loops.

// low[k] = scale * a[k] . x for k < block: four of A's rows per pass over x, so each load of x
// serves four products (block is a multiple of the rank; a tail of 1-3 rows is done singly).
template <typename W>
inline void shrink(const W* a, const float* x, int64_t in, int64_t block, float scale, float* low) {
  int64_t k = 0;
  for (; k + 4 <= block; k += 4) {
    const W *a0 = a + k * in, *a1 = a0 + in, *a2 = a1 + in, *a3 = a2 + in;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t i = 0; i < in; ++i) {
      const float xi = x[i];
      s0 += static_cast<float>(a0[i]) * xi;
      s1 += static_cast<float>(a1[i]) * xi;
      s2 += static_cast<float>(a2[i]) * xi;
      s3 += static_cast<float>(a3[i]) * xi;
    }
    low[k] = scale * s0, low[k + 1] = scale * s1, low[k + 2] = scale * s2, low[k + 3] = scale * s3;
  }
  for (; k < block; ++k) {
    const W* ak = a + k * in;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < in; ++i) s += static_cast<float>(ak[i]) * x[i];
    low[k] = scale * s;
  }
}

// out[j] += sum_q c[q] * b[q * width + j] for j < size: four ranks per pass over out.
template <typename W>
inline void expand(const W* b, const float* c, int64_t rank, int64_t width, int64_t size, float* out) {
  int64_t q = 0;
  for (; q + 4 <= rank; q += 4) {
    const W *b0 = b + q * width, *b1 = b0 + width, *b2 = b1 + width, *b3 = b2 + width;
    const float c0 = c[q], c1 = c[q + 1], c2 = c[q + 2], c3 = c[q + 3];
#pragma omp simd
    for (int64_t j = 0; j < size; ++j)
      out[j] += c0 * static_cast<float>(b0[j]) + c1 * static_cast<float>(b1[j]) + c2 * static_cast<float>(b2[j]) +
                c3 * static_cast<float>(b3[j]);
  }
  for (; q < rank; ++q) {
    const W* bq = b + q * width;
    const float cq = c[q];
#pragma omp simd
    for (int64_t j = 0; j < size; ++j) out[j] += cq * static_cast<float>(bq[j]);
  }
}

template <typename T, typename W>
void lora_rows(at::Tensor& y, const at::Tensor& x, const Layer<W>& layer, const std::vector<int64_t>& order,
               const std::vector<int64_t>& slot_of, float scale) {
  const int64_t in = layer.in, width = layer.width;
  const int64_t x_stride = x.stride(0), y_stride = y.stride(0);
  const T* x_data = x.const_data_ptr<T>();
  T* y_data = y.mutable_data_ptr<T>();
  // A few rows per task: the work per row is small, and consecutive rows share a slot's weights.
  at::parallel_for(0, static_cast<int64_t>(order.size()), 4, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(in), low(layer.block), acc(width);
    for (int64_t n = begin, last = -1; n < end; ++n) {
      const int64_t row = order[n], slot = slot_of[n];
      if (slot != last) layer.prefetch_slot(last = slot);
      const T* xr = x_data + row * x_stride;
      const float* xv = nullptr;
      if constexpr (std::is_same_v<T, float>) {
        xv = xr;
      } else {
        for (int64_t i = 0; i < in; ++i) xf[i] = static_cast<float>(xr[i]);
        xv = xf.data();
      }
      shrink(layer.a_of(slot), xv, in, layer.block, scale, low.data());
      std::fill(acc.begin(), acc.end(), 0.f);
      for (size_t s = 0; s < layer.sizes.size(); ++s) {
        const int64_t first = static_cast<int64_t>(s) * layer.rank;
        expand(layer.b_of(slot) + layer.offsets[s], low.data() + first, layer.rank, width, layer.sizes[s],
               acc.data() + layer.offsets[s]);
      }
      T* yr = y_data + row * y_stride;
      for (int64_t j = 0; j < width; ++j) yr[j] = static_cast<T>(static_cast<float>(yr[j]) + acc[j]);
    }
  });
}
#endif

template <typename W>
Layer<W> layer_of(const at::Tensor& a, const at::Tensor& bt, int64_t rank, const std::vector<int64_t>& sizes,
                  int64_t width, bool paired) {
  Layer<W> layer{a.const_data_ptr<W>(), bt.const_data_ptr<W>(), a.size(1), rank,
                 rank * static_cast<int64_t>(sizes.size()), width, paired, sizes,
                 std::vector<int64_t>(sizes.size(), 0)};
  for (size_t i = 1; i < sizes.size(); ++i) layer.offsets[i] = layer.offsets[i - 1] + sizes[i - 1];
  return layer;
}

// The weights in float32 or in the activations' own dtype T (vLLM keeps adapters in the model's
// dtype: bf16 weights are exact and half the bytes to read from memory per step).
template <typename T>
void lora_any(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& bt, int64_t rank,
              const std::vector<int64_t>& sizes, int64_t width, bool paired, const std::vector<int64_t>& order,
              const std::vector<int64_t>& slot_of, float scale) {
  if (a.scalar_type() == at::kFloat) {
    lora_rows<T, float>(y, x, layer_of<float>(a, bt, rank, sizes, width, false), order, slot_of, scale);
  } else if constexpr (!std::is_same_v<T, float>) {
#if MTFT_PAIRS
    if constexpr (std::is_same_v<T, BF16>) {
      if (paired) return lora_rows_pairs(y, x, layer_of<BF16>(a, bt, rank, sizes, width, true), order, slot_of, scale);
    }
#endif
    lora_rows<T, T>(y, x, layer_of<T>(a, bt, rank, sizes, width, false), order, slot_of, scale);
  }
}

// Whether this build multiplies bf16 by bf16 with AVX-512-bf16, reading B^T in the PAIRS layout.
bool bf16_pairs() {
#if MTFT_PAIRS
  return true;
#else
  return false;
#endif
}

// y (rows_y >= rows, >= width columns) and x (rows, in): same dtype, unit column stride.
// a (slots * block, in) and bt (slots * rank, width), or with `paired` (bf16 only, where
// bf16_pairs()) bt (slots * ceil(rank / 2), width * 2) in the PAIRS layout: contiguous, float32
// or x's dtype. slots: one per row of x (int64, -1 = no adapter). sizes: the layer's output
// slices (q, k, v or gate, up or one).
void lora_linear(at::Tensor y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& bt,
                 const at::Tensor& slots, int64_t rank, c10::IntArrayRef sizes, double scale, bool paired) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.stride(1) == 1 && y.stride(1) == 1,
              "mtft lora_linear: x and y must be 2-D with unit column stride");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "mtft lora_linear: x is ", x.scalar_type(), ", y is ",
              y.scalar_type());
  TORCH_CHECK(a.scalar_type() == bt.scalar_type() &&
                  (a.scalar_type() == at::kFloat || a.scalar_type() == x.scalar_type()) && a.is_contiguous() &&
                  bt.is_contiguous(),
              "mtft lora_linear: stacked weights must be contiguous, both float32 or both x's dtype (",
              x.scalar_type(), "); they are ", a.scalar_type(), " and ", bt.scalar_type());
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) >= x.size(0),
              "mtft lora_linear: slots must be int64 with one entry per row of x");
  const int64_t block = rank * static_cast<int64_t>(sizes.size());
  int64_t width = 0;
  for (int64_t size : sizes) width += size;
  TORCH_CHECK(!paired || (bf16_pairs() && a.scalar_type() == at::kBFloat16),
              "mtft lora_linear: the paired layout is for bf16 weights on a build with AVX-512-bf16 (bf16_pairs())");
  const int64_t b_rows = paired ? (rank + 1) / 2 : rank, b_width = paired ? 2 * width : width;
  TORCH_CHECK(rank > 0 && a.size(1) == x.size(1) && bt.size(1) == b_width && a.size(0) % block == 0 &&
                  a.size(0) / block * b_rows == bt.size(0),
              "mtft lora_linear: weight shapes do not match x, rank, slices and layout");
  TORCH_CHECK(y.size(0) >= x.size(0) && y.size(1) >= width, "mtft lora_linear: y is smaller than the delta");
  const int64_t rows = x.size(0), slot_count = a.size(0) / block;
  const auto slot_data = slots.contiguous();
  const int64_t* slot_ptr = slot_data.const_data_ptr<int64_t>();
  // Counting sort of the rows by slot: each slot's rows in order, rows without an adapter left out.
  std::vector<int64_t> count(slot_count + 1, 0);
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t slot = slot_ptr[row];
    TORCH_CHECK(slot >= -1 && slot < slot_count, "mtft lora_linear: row ", row, " has slot ", slot, " of ",
                slot_count);
    if (slot >= 0) ++count[slot + 1];
  }
  for (int64_t s = 0; s < slot_count; ++s) count[s + 1] += count[s];
  std::vector<int64_t> order(count[slot_count]), slot_of(count[slot_count]);
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t slot = slot_ptr[row];
    if (slot >= 0) {
      order[count[slot]] = row;
      slot_of[count[slot]++] = slot;
    }
  }
  if (order.empty()) return;
  const std::vector<int64_t> slice_sizes(sizes.begin(), sizes.end());
  const float s = static_cast<float>(scale);
  switch (x.scalar_type()) {
    case at::kFloat: lora_any<float>(y, x, a, bt, rank, slice_sizes, width, paired, order, slot_of, s); break;
    case at::kBFloat16: lora_any<c10::BFloat16>(y, x, a, bt, rank, slice_sizes, width, paired, order, slot_of, s); break;
    case at::kHalf: lora_any<c10::Half>(y, x, a, bt, rank, slice_sizes, width, paired, order, slot_of, s); break;
    default: TORCH_CHECK(false, "mtft lora_linear: unsupported dtype ", x.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY(mtft, m) {
  m.def("lora_linear(Tensor(a!) y, Tensor x, Tensor a, Tensor bt, Tensor slots, int rank, int[] sizes, float scale, "
        "bool paired) -> ()");
  m.def("bf16_pairs() -> bool", &bf16_pairs);
}

TORCH_LIBRARY_IMPL(mtft, CPU, m) { m.impl("lora_linear", &lora_linear); }
