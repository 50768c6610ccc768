// One LoRA layer's delta for a small (decode) batch in one call: mtft's compiled fused path.
//
// y[row, :width] += scale * (x[row] @ A_s^T) @ B_s for every row whose slot s >= 0, where A_s and
// B_s are slot s's rows of the fused layout (serve/vllm_plugin/fused.py `Stacked`): A stacks the
// layer's slices' A matrices, B^T holds each slice's B block-diagonally. The torch path spends most
// of a decode step's LoRA time in the fixed cost of ~10 small torch calls per layer (gather, pad,
// two batched matmuls, scatter); here a layer is one call, rows are visited in slot order so each
// slot's weights stay in cache, and only the slices' own columns are multiplied (the block-diagonal
// zeros are skipped). Rows with slot -1 are not touched: exactly zero delta, as the torch path.
// Sums are fp32 whatever the activations' dtype (fp32, bf16 or fp16), as the torch path's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

namespace {

// low[k] = scale * a[k] . x for k < block: four of A's rows per pass over x, so each load of x
// serves four products (block is a multiple of the rank; a tail of 1-3 rows is done singly).
inline void shrink(const float* a, const float* x, int64_t in, int64_t block, float scale, float* low) {
  int64_t k = 0;
  for (; k + 4 <= block; k += 4) {
    const float *a0 = a + k * in, *a1 = a0 + in, *a2 = a1 + in, *a3 = a2 + in;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t i = 0; i < in; ++i) {
      const float xi = x[i];
      s0 += a0[i] * xi;
      s1 += a1[i] * xi;
      s2 += a2[i] * xi;
      s3 += a3[i] * xi;
    }
    low[k] = scale * s0, low[k + 1] = scale * s1, low[k + 2] = scale * s2, low[k + 3] = scale * s3;
  }
  for (; k < block; ++k) {
    const float* ak = a + k * in;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < in; ++i) s += ak[i] * x[i];
    low[k] = scale * s;
  }
}

// out[j] += sum_q c[q] * b[q * width + j] for j < size: four ranks per pass over out.
inline void expand(const float* b, const float* c, int64_t rank, int64_t width, int64_t size, float* out) {
  int64_t q = 0;
  for (; q + 4 <= rank; q += 4) {
    const float *b0 = b + q * width, *b1 = b0 + width, *b2 = b1 + width, *b3 = b2 + width;
    const float c0 = c[q], c1 = c[q + 1], c2 = c[q + 2], c3 = c[q + 3];
#pragma omp simd
    for (int64_t j = 0; j < size; ++j) out[j] += c0 * b0[j] + c1 * b1[j] + c2 * b2[j] + c3 * b3[j];
  }
  for (; q < rank; ++q) {
    const float* bq = b + q * width;
    const float cq = c[q];
#pragma omp simd
    for (int64_t j = 0; j < size; ++j) out[j] += cq * bq[j];
  }
}

template <typename T>
void lora_rows(at::Tensor& y, const at::Tensor& x, const float* a, const float* bt,
               const std::vector<int64_t>& order, const std::vector<int64_t>& slot_of, int64_t rank,
               const std::vector<int64_t>& sizes, int64_t width, float scale) {
  const int64_t in = x.size(1), block = rank * static_cast<int64_t>(sizes.size());
  const int64_t x_stride = x.stride(0), y_stride = y.stride(0);
  const T* x_data = x.const_data_ptr<T>();
  T* y_data = y.mutable_data_ptr<T>();
  std::vector<int64_t> offsets(sizes.size(), 0);
  for (size_t i = 1; i < sizes.size(); ++i) offsets[i] = offsets[i - 1] + sizes[i - 1];
  // A few rows per task: the work per row is small, and consecutive rows share a slot's weights.
  at::parallel_for(0, static_cast<int64_t>(order.size()), 4, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(in), low(block), acc(width);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t row = order[n], slot = slot_of[n];
      const T* xr = x_data + row * x_stride;
      const float* xv = nullptr;
      if constexpr (std::is_same_v<T, float>) {
        xv = xr;
      } else {
        for (int64_t i = 0; i < in; ++i) xf[i] = static_cast<float>(xr[i]);
        xv = xf.data();
      }
      shrink(a + slot * block * in, xv, in, block, scale, low.data());
      std::fill(acc.begin(), acc.end(), 0.f);
      const float* b_slot = bt + slot * block * width;
      for (size_t s = 0; s < sizes.size(); ++s) {
        const int64_t first = static_cast<int64_t>(s) * rank;
        expand(b_slot + first * width + offsets[s], low.data() + first, rank, width, sizes[s], acc.data() + offsets[s]);
      }
      T* yr = y_data + row * y_stride;
      for (int64_t j = 0; j < width; ++j) yr[j] = static_cast<T>(static_cast<float>(yr[j]) + acc[j]);
    }
  });
}

// y (rows_y >= rows, >= width columns) and x (rows, in): same dtype, unit column stride.
// a (slots * block, in) and bt (slots * block, width): fp32, contiguous. slots: one per row of x
// (int64, -1 = no adapter). sizes: the layer's output slices (q, k, v or gate, up or one).
void lora_linear(at::Tensor y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& bt,
                 const at::Tensor& slots, int64_t rank, c10::IntArrayRef sizes, double scale) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.stride(1) == 1 && y.stride(1) == 1,
              "mtft lora_linear: x and y must be 2-D with unit column stride");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "mtft lora_linear: x is ", x.scalar_type(), ", y is ",
              y.scalar_type());
  TORCH_CHECK(a.scalar_type() == at::kFloat && bt.scalar_type() == at::kFloat && a.is_contiguous() &&
                  bt.is_contiguous(), "mtft lora_linear: stacked weights must be contiguous float32");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) >= x.size(0),
              "mtft lora_linear: slots must be int64 with one entry per row of x");
  const int64_t block = rank * static_cast<int64_t>(sizes.size());
  int64_t width = 0;
  for (int64_t size : sizes) width += size;
  TORCH_CHECK(a.size(1) == x.size(1) && a.size(0) == bt.size(0) && bt.size(1) == width && a.size(0) % block == 0,
              "mtft lora_linear: weight shapes do not match x, rank and slices");
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
  const float* a_ptr = a.const_data_ptr<float>();
  const float* b_ptr = bt.const_data_ptr<float>();
  const float s = static_cast<float>(scale);
  switch (x.scalar_type()) {
    case at::kFloat: return lora_rows<float>(y, x, a_ptr, b_ptr, order, slot_of, rank, slice_sizes, width, s);
    case at::kBFloat16:
      return lora_rows<c10::BFloat16>(y, x, a_ptr, b_ptr, order, slot_of, rank, slice_sizes, width, s);
    case at::kHalf: return lora_rows<c10::Half>(y, x, a_ptr, b_ptr, order, slot_of, rank, slice_sizes, width, s);
    default: TORCH_CHECK(false, "mtft lora_linear: unsupported dtype ", x.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY(mtft, m) {
  m.def("lora_linear(Tensor(a!) y, Tensor x, Tensor a, Tensor bt, Tensor slots, int rank, int[] sizes, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(mtft, CPU, m) { m.impl("lora_linear", &lora_linear); }
