// Linear layers over GGUF block-quantized weights with float32 activations: Q4_0, Q4_1 (and
// Q4_K, packed as Q4_1), Q5_0, Q5_1 (and Q5_K, packed as Q5_1), Q8_0, and int8 codes with a scale
// per 16 weights (Q6_K).
//
// Decode on a CPU is bound by reading weights; keeping Q4_1 weights at 0.75 bytes each instead of
// 4 (float32) is the point. The weights are repacked at load time (ferry/kernels/packing.py) into
// tiles of 16 output rows; each tile's codes are K/32 blocks of 32 k:
//   Q4:          256 bytes  [16 pairs p][16 rows j]: code(k=2p) | code(k=2p+1) << 4 of row 16t+j
//   Q5:          320 bytes  the Q4 block of the low 4 bits, then [32 k] uint16 (little-endian):
//                           bit j = bit 4 of the code of (k, row 16t+j)
//   Q8_0, Q8_16: 512 bytes  [32 k][16 rows j]: the int8 code of (k, row 16t+j)
//   d, m:  float32 [N/16, K/32, 16]  per 32-wide block and row (m: Q4_1/Q5_1 only; Q8_16: K/16)
// so one vector load gives one k for 16 rows (Q5: plus a 16-bit mask of their fifth bits), and
// the kernel accumulates a [rows x 16] tile of the output in registers (no horizontal sums).
// The kernels are written once over Vec, 16 floats: one zmm register with AVX-512, two ymm with
// AVX2 + FMA (fewer rows a register tile: 16 ymm registers against 32 zmm); without either, a
// portable loop does the same arithmetic one weight at a time.
//
// Each weight is dequantized with the same float32 operations gguf-py uses (d * q + m for Q4_1
// and Q5_1, d * (q - 8) for Q4_0, d * (q - 16) for Q5_0, q * d for Q8_0; this file is built with -ffp-contract=off so the compiler
// cannot fuse them), so the weights equal the float32 reference exactly; only the summation order
// of the dot products differs from a float32 GEMM.

#include "kernels.h"
#include "simd_math.h"  // FERRY_VECTOR: the vector kernels below, else the portable one

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace ferry {
namespace {

constexpr int64_t kBlock = 32;  // weights along K walked per step, for every supported type
constexpr int64_t kTile = 16;   // output rows per packed tile

// kQ8_16: int8 codes with one scale per 16 weights (GGUF Q6_K, codes q - 32)
enum QuantType : int64_t { kQ4_0 = 0, kQ4_1 = 1, kQ8_0 = 2, kQ8_16 = 3, kQ5_0 = 4, kQ5_1 = 5 };
constexpr int64_t kLastType = kQ5_1;

constexpr bool byte_codes(int64_t qtype) { return qtype == kQ8_0 || qtype == kQ8_16; }
constexpr bool five_bit(int64_t qtype) { return qtype == kQ5_0 || qtype == kQ5_1; }
constexpr bool has_min(int64_t qtype) { return qtype == kQ4_1 || qtype == kQ5_1; }
constexpr int64_t scale_span(int64_t qtype) { return qtype == kQ8_16 ? 16 : kBlock; }
constexpr int64_t kNibbleBytes = kBlock * kTile / 2;  // a block's 4-bit codes, 16 rows
// bytes of codes per 32-wide block of a tile (see the layout above)
constexpr int64_t block_code_bytes(int64_t qtype) {
  return byte_codes(qtype) ? kBlock * kTile : kNibbleBytes + (five_bit(qtype) ? kBlock * 2 : 0);
}

// f(std::integral_constant<int64_t, QT>{}) for the runtime type id qtype (checked before)
template <typename F>
void dispatch(int64_t qtype, F f) {
  switch (qtype) {
    case kQ4_0: f(std::integral_constant<int64_t, kQ4_0>{}); break;
    case kQ4_1: f(std::integral_constant<int64_t, kQ4_1>{}); break;
    case kQ8_0: f(std::integral_constant<int64_t, kQ8_0>{}); break;
    case kQ8_16: f(std::integral_constant<int64_t, kQ8_16>{}); break;
    case kQ5_0: f(std::integral_constant<int64_t, kQ5_0>{}); break;
    default: f(std::integral_constant<int64_t, kQ5_1>{}); break;
  }
}

struct Packed {
  const uint8_t* codes;
  const float* d;
  const float* m;
  int64_t k;
  int64_t tile_code_bytes;  // bytes of codes per tile
  int64_t tile_scales;      // floats of d (and of m) per tile
};

// One weight: row j of a tile (codes: the tile's) at k, with that row's scale d and minimum m
// (used by the portable kernel and by row lookups; the vector kernels below do the same
// arithmetic 16 rows at a time).
template <int64_t QT>
inline float dequant_one(const uint8_t* codes, int64_t k, int64_t j, float d, float m) {
  const uint8_t* block = codes + (k / kBlock) * block_code_bytes(QT);
  const int64_t kk = k % kBlock;
  if constexpr (byte_codes(QT)) {
    return static_cast<float>(static_cast<int8_t>(block[kk * kTile + j])) * d;
  } else {
    const uint8_t byte = block[(kk / 2) * kTile + j];
    int q = (kk % 2 == 0) ? (byte & 0x0F) : (byte >> 4);
    if constexpr (five_bit(QT)) {
      q |= ((block[kNibbleBytes + kk * 2 + j / 8] >> (j % 8)) & 1) << 4;
    }
    if constexpr (has_min(QT)) {
      return d * static_cast<float>(q) + m;
    } else {
      return d * static_cast<float>(q - (QT == kQ5_0 ? 16 : 8));
    }
  }
}

#if defined(FERRY_VECTOR)

// ---- the ISA layer: a Vec holds 16 floats, one per row of a tile (one zmm, or two ymm) ----
#if defined(__AVX512F__)

using Vec = __m512;
constexpr int kMaxRows = 16;    // activation rows per register tile (32 zmm registers)
constexpr int kSplitBelow = 6;  // register tiles of fewer rows keep two accumulators a row

inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec vfmadd(Vec w, float x, Vec acc) { return _mm512_fmadd_ps(w, _mm512_set1_ps(x), acc); }
// the first cols (<= 16) floats of v
inline void vstore_cols(float* p, Vec v, int64_t cols) {
  const __mmask16 mask = cols >= kTile ? static_cast<__mmask16>(0xFFFF)
                                       : static_cast<__mmask16>((1u << cols) - 1);
  _mm512_mask_storeu_ps(p, mask, v);
}

// 16 rows' weights at one k; high: bit j set when row j's code has bit 4 (five-bit types only)
template <int64_t QT>
inline Vec dequant(__m128i codes16, Vec d, Vec m, uint32_t high) {
  if constexpr (byte_codes(QT)) {
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes16)), d);
  } else {
    __m512i q = _mm512_cvtepu8_epi32(codes16);
    if constexpr (five_bit(QT)) {
      q = _mm512_mask_add_epi32(q, static_cast<__mmask16>(high), q, _mm512_set1_epi32(16));
    }
    if constexpr (has_min(QT)) {
      return _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(q)), m);
    } else {
      q = _mm512_sub_epi32(q, _mm512_set1_epi32(QT == kQ5_0 ? 16 : 8));
      return _mm512_mul_ps(d, _mm512_cvtepi32_ps(q));
    }
  }
}

#else  // AVX2 + FMA

struct Vec {
  __m256 lo, hi;  // rows 0..7, 8..15
};
// NOTE: 16 ymm registers: a [4 x 16] tile takes 8 accumulators, leaving room for two weight
// vectors (4 registers) and the broadcast x; more rows spill.
constexpr int kMaxRows = 4;
constexpr int kSplitBelow = 3;

inline Vec vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline Vec vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void vstore(float* p, Vec v) {
  _mm256_storeu_ps(p, v.lo);
  _mm256_storeu_ps(p + 8, v.hi);
}
inline Vec vadd(Vec a, Vec b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline Vec vfmadd(Vec w, float x, Vec acc) {
  const __m256 xv = _mm256_set1_ps(x);
  return {_mm256_fmadd_ps(w.lo, xv, acc.lo), _mm256_fmadd_ps(w.hi, xv, acc.hi)};
}
inline void vstore_cols(float* p, Vec v, int64_t cols) {
  if (cols >= kTile) {
    vstore(p, v);
    return;
  }
  alignas(32) float tmp[kTile];
  vstore(tmp, v);
  std::memcpy(p, tmp, static_cast<size_t>(cols) * sizeof(float));
}

// q plus 16 in the lanes whose bit is set in high & bit (bit: one bit a lane)
inline __m256i add_fifth_bit(__m256i q, __m256i high, __m256i bit) {
  const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(high, bit), bit);
  return _mm256_or_si256(q, _mm256_and_si256(set, _mm256_set1_epi32(16)));
}

// as the AVX-512 dequant: the same float32 operations, eight rows at a time
template <int64_t QT>
inline __m256 dequant8(__m256i q, __m256 d, __m256 m) {
  if constexpr (byte_codes(QT)) {
    return _mm256_mul_ps(_mm256_cvtepi32_ps(q), d);
  } else if constexpr (has_min(QT)) {
    return _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(q)), m);
  } else {
    q = _mm256_sub_epi32(q, _mm256_set1_epi32(QT == kQ5_0 ? 16 : 8));
    return _mm256_mul_ps(d, _mm256_cvtepi32_ps(q));
  }
}

template <int64_t QT>
inline Vec dequant(__m128i codes16, Vec d, Vec m, uint32_t high) {
  const __m128i upper = _mm_unpackhi_epi64(codes16, codes16);  // rows 8..15 in the low half
  __m256i q_lo, q_hi;
  if constexpr (byte_codes(QT)) {
    q_lo = _mm256_cvtepi8_epi32(codes16);
    q_hi = _mm256_cvtepi8_epi32(upper);
  } else {
    q_lo = _mm256_cvtepu8_epi32(codes16);
    q_hi = _mm256_cvtepu8_epi32(upper);
    if constexpr (five_bit(QT)) {
      const __m256i bits = _mm256_set1_epi32(static_cast<int>(high));
      q_lo = add_fifth_bit(q_lo, bits, _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128));
      q_hi = add_fifth_bit(q_hi, bits,
                           _mm256_setr_epi32(256, 512, 1024, 2048, 4096, 8192, 16384, 32768));
    }
  }
  return {dequant8<QT>(q_lo, d.lo, m.lo), dequant8<QT>(q_hi, d.hi, m.hi)};
}

#endif

// ---- the kernels, written once over Vec ----

// The two weight vectors (k = 2j and 2j + 1 of a block, 16 rows each) of pair j of a block;
// d_lo scales the block's weights 0..15, d_hi 16..31 (the same vector unless kQ8_16).
template <int64_t QT>
inline void dequant_pair(const uint8_t* block_codes, int64_t j, Vec d_lo, Vec d_hi, Vec m,
                         Vec& w0, Vec& w1) {
  const Vec d = j < kBlock / 4 ? d_lo : d_hi;
  if constexpr (byte_codes(QT)) {
    w0 = dequant<QT>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block_codes + 2 * j * kTile)), d, m, 0);
    w1 = dequant<QT>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block_codes + (2 * j + 1) * kTile)), d, m, 0);
  } else {
    uint32_t high = 0;  // bit j: row j's fifth bit at k = 2j (low half) and 2j + 1 (high half)
    if constexpr (five_bit(QT)) std::memcpy(&high, block_codes + kNibbleBytes + 4 * j, 4);
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block_codes + j * kTile));
    w0 = dequant<QT>(_mm_and_si128(c, low4), d, m, high & 0xFFFF);
    w1 = dequant<QT>(_mm_and_si128(_mm_srli_epi16(c, 4), low4), d, m, high >> 16);
  }
}

// Calls visit(b, d_lo, d_hi, m, block_codes) for each 32-wide block of a tile, scales loaded.
template <int64_t QT, typename Visit>
inline void for_each_block(const Packed& p, int64_t tile, Visit visit) {
  constexpr int64_t per_block = kBlock / scale_span(QT);  // scale vectors per 32-wide block
  const uint8_t* codes = p.codes + tile * p.tile_code_bytes;
  const float* dt = p.d + tile * p.tile_scales;
  const float* mt = has_min(QT) ? p.m + tile * p.tile_scales : nullptr;
  for (int64_t b = 0; b < p.k / kBlock; ++b) {
    const Vec d_lo = vload(dt + b * per_block * kTile);
    const Vec d_hi = per_block == 1 ? d_lo : vload(dt + (b * per_block + 1) * kTile);
    const Vec m = has_min(QT) ? vload(mt + b * kTile) : vzero();
    visit(b, d_lo, d_hi, m, codes + b * block_code_bytes(QT));
  }
}

// A [R x 16] output tile in registers. With few rows, two accumulators a row (even and odd k)
// keep both FMA units busy instead of waiting on one dependency chain; with many, registers run
// out first. Both kernels below use it, in the same order, so their results are bit-identical.
template <int R>
struct TileAccumulator {
  static constexpr int S = R >= kSplitBelow ? 1 : 2;
  Vec acc[R][S];

  TileAccumulator() {
    for (int r = 0; r < R; ++r) {
      for (int s = 0; s < S; ++s) acc[r][s] = vzero();
    }
  }

  // rows r of x at k and k + 1 times the weight vectors of k and k + 1
  inline void add_pair(const float* x, int64_t ldx, int64_t k, Vec w0, Vec w1) {
    for (int r = 0; r < R; ++r) {
      acc[r][0] = vfmadd(w0, x[r * ldx + k], acc[r][0]);
      acc[r][S - 1] = vfmadd(w1, x[r * ldx + k + 1], acc[r][S - 1]);
    }
  }

  void store(float* out, int64_t ldo, int64_t cols) const {
    for (int r = 0; r < R; ++r) {
      const Vec sum = S == 1 ? acc[r][0] : vadd(acc[r][0], acc[r][S - 1]);
      vstore_cols(out + r * ldo, sum, cols);
    }
  }
};

// out[r, 0:cols] = sum_k x[r, k] * w[tile row, k] for r < R; x rows are ldx apart, out rows ldo.
template <int64_t QT, int R>
void tile_kernel(const float* x, int64_t ldx, const Packed& p, int64_t tile, float* out,
                 int64_t ldo, int64_t cols) {
  TileAccumulator<R> acc;
  for_each_block<QT>(p, tile, [&](int64_t b, Vec d_lo, Vec d_hi, Vec m,
                                      const uint8_t* block_codes) {
    // the next block's codes, a few cache lines ahead of the loads below
    _mm_prefetch(reinterpret_cast<const char*>(block_codes) + 1024, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(block_codes) + 1024 + 64, _MM_HINT_T0);
    for (int64_t j = 0; j < kBlock / 2; ++j) {
      Vec w0, w1;
      dequant_pair<QT>(block_codes, j, d_lo, d_hi, m, w0, w1);
      acc.add_pair(x, ldx, b * kBlock + 2 * j, w0, w1);
    }
  });
  acc.store(out, ldo, cols);
}

// The tile's weights dequantized once, k-major: scratch[k * 16 + j] = w(row 16 * tile + j, k).
// Used when many activation rows would otherwise dequantize the same tile again and again.
template <int64_t QT>
void dequantize_tile(const Packed& p, int64_t tile, float* scratch) {
  for_each_block<QT>(p, tile, [&](int64_t b, Vec d_lo, Vec d_hi, Vec m,
                                      const uint8_t* block_codes) {
    float* out = scratch + b * kBlock * kTile;
    for (int64_t j = 0; j < kBlock / 2; ++j) {
      Vec w0, w1;
      dequant_pair<QT>(block_codes, j, d_lo, d_hi, m, w0, w1);
      vstore(out + 2 * j * kTile, w0);
      vstore(out + (2 * j + 1) * kTile, w1);
    }
  });
}

// 16 rows' weights rounded to bfloat16 (to nearest even, as PyTorch rounds) and stored
inline void vstore_bf16(uint16_t* dst, Vec v) {
#if defined(__AVX512F__)
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(r));
#else
  auto round8 = [](__m256 x) {
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  };
  // packus works per 128-bit lane: [lo0..3 hi0..3 lo4..7 hi4..7] -> reorder the 64-bit quarters
  const __m256i packed = _mm256_packus_epi32(round8(v.lo), round8(v.hi));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                      _mm256_permute4x64_epi64(packed, 0xD8));
#endif
}

// The tile's weights in bfloat16, k-major into W.T: out[k * ldo + j] = bf16(w(16 * tile + j, k))
template <int64_t QT>
void dequantize_tile_bf16(const Packed& p, int64_t tile, uint16_t* out, int64_t ldo) {
  for_each_block<QT>(p, tile, [&](int64_t b, Vec d_lo, Vec d_hi, Vec m,
                                      const uint8_t* block_codes) {
    for (int64_t j = 0; j < kBlock / 2; ++j) {
      Vec w0, w1;
      dequant_pair<QT>(block_codes, j, d_lo, d_hi, m, w0, w1);
      const int64_t k = b * kBlock + 2 * j;
      vstore_bf16(out + k * ldo, w0);
      vstore_bf16(out + (k + 1) * ldo, w1);
    }
  });
}

// tile_kernel over an already dequantized tile
template <int R>
void dense_tile_kernel(const float* x, int64_t ldx, const float* w, int64_t k, float* out,
                       int64_t ldo, int64_t cols) {
  TileAccumulator<R> acc;
  for (int64_t kk = 0; kk < k; kk += 2) {
    acc.add_pair(x, ldx, kk, vload(w + kk * kTile), vload(w + (kk + 1) * kTile));
  }
  acc.store(out, ldo, cols);
}

template <int R>
void run_dense_rows(const float* x, int64_t ldx, const float* w, int64_t k, float* out,
                    int64_t ldo, int64_t cols, int64_t rows) {
  if constexpr (R > 1) {
    if (rows < R) {
      run_dense_rows<R - 1>(x, ldx, w, k, out, ldo, cols, rows);
      return;
    }
  }
  dense_tile_kernel<R>(x, ldx, w, k, out, ldo, cols);
}

#else  // portable fallback: same layout and arithmetic, one weight at a time

constexpr int kMaxRows = 16;  // activation rows per tile

template <int64_t QT, int R>
void tile_kernel(const float* x, int64_t ldx, const Packed& p, int64_t tile, float* out,
                 int64_t ldo, int64_t cols) {
  float acc[R][kTile] = {};
  const uint8_t* codes = p.codes + tile * p.tile_code_bytes;
  const float* dt = p.d + tile * p.tile_scales;
  const float* mt = has_min(QT) ? p.m + tile * p.tile_scales : nullptr;
  for (int64_t k = 0; k < p.k; ++k) {
    const int64_t b = k / scale_span(QT);
    float w[kTile];
    for (int64_t j = 0; j < kTile; ++j) {
      w[j] = dequant_one<QT>(codes, k, j, dt[b * kTile + j], mt ? mt[b * kTile + j] : 0.0f);
    }
    for (int r = 0; r < R; ++r) {
      const float xv = x[r * ldx + k];
      for (int64_t j = 0; j < kTile; ++j) acc[r][j] += w[j] * xv;
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int64_t j = 0; j < cols; ++j) out[r * ldo + j] = acc[r][j];
  }
}

#endif

template <int64_t QT, int R>
void run_rows(const float* x, int64_t ldx, const Packed& p, int64_t tile, float* out,
              int64_t ldo, int64_t cols, int64_t rows) {
  if constexpr (R > 1) {
    if (rows < R) {
      run_rows<QT, R - 1>(x, ldx, p, tile, out, ldo, cols, rows);
      return;
    }
  }
  tile_kernel<QT, R>(x, ldx, p, tile, out, ldo, cols);
}

template <int64_t QT>
void quant_matmul(const float* x, int64_t rows, const Packed& p, int64_t n, float* out) {
  const int64_t tiles = (n + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, tiles / (4 * at::get_num_threads()));
#if defined(FERRY_VECTOR)
  if (rows > 2 * kMaxRows) {  // prefill: dequantize each tile once, reuse it for every row block
    at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(static_cast<size_t>(p.k * kTile));
      for (int64_t t = begin; t < end; ++t) {
        const int64_t cols = std::min(kTile, n - t * kTile);
        dequantize_tile<QT>(p, t, scratch.data());
        for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
          run_dense_rows<kMaxRows>(x + r0 * p.k, p.k, scratch.data(), p.k,
                                   out + r0 * n + t * kTile, n, cols,
                                   std::min<int64_t>(kMaxRows, rows - r0));
        }
      }
    });
    return;
  }
#endif
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t cols = std::min(kTile, n - t * kTile);
      // NOTE: the tile's codes (<= 25 KB for K <= 1536) stay in L1 across the row blocks.
      for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
        run_rows<QT, kMaxRows>(x + r0 * p.k, p.k, p, t, out + r0 * n + t * kTile, n, cols,
                               std::min<int64_t>(kMaxRows, rows - r0));
      }
    }
  });
}

Packed check_packed(const at::Tensor& codes, const at::Tensor& d, const at::Tensor& m,
                    int64_t qtype, int64_t n, int64_t k) {
  TORCH_CHECK(qtype >= kQ4_0 && qtype <= kLastType, "unknown quant type ", qtype);
  TORCH_CHECK(k > 0 && k % kBlock == 0, "in_features must be a multiple of 32, got ", k);
  const int64_t tiles = (n + kTile - 1) / kTile;
  const int64_t tile_code_bytes = (k / kBlock) * block_code_bytes(qtype);
  const int64_t tile_scales = (k / scale_span(qtype)) * kTile;
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kByte &&
                  codes.is_contiguous() && codes.numel() == tiles * tile_code_bytes,
              "codes must be a contiguous uint8 CPU tensor of ", tiles * tile_code_bytes, " bytes");
  TORCH_CHECK(d.scalar_type() == at::kFloat && d.is_contiguous() &&
                  d.numel() == tiles * tile_scales,
              "d must be a contiguous float32 tensor [N/16, K/span, 16]");
  if (has_min(qtype)) {
    TORCH_CHECK(m.scalar_type() == at::kFloat && m.is_contiguous() && m.numel() == d.numel(),
                "m must be a contiguous float32 tensor shaped like d");
  }
  return Packed{codes.data_ptr<uint8_t>(), d.data_ptr<float>(),
                has_min(qtype) ? m.data_ptr<float>() : nullptr, k, tile_code_bytes, tile_scales};
}

// out[i, :] = dequantized row ids[i]
template <int64_t QT>
void lookup_rows(const int64_t* ids, int64_t t, const Packed& p, float* out) {
  for (int64_t i = 0; i < t; ++i) {
    const int64_t tile = ids[i] / kTile, j = ids[i] % kTile;
    const uint8_t* codes = p.codes + tile * p.tile_code_bytes;
    const float* dt = p.d + tile * p.tile_scales;
    const float* mt = has_min(QT) ? p.m + tile * p.tile_scales : nullptr;
    for (int64_t k = 0; k < p.k; ++k) {
      const int64_t s = (k / scale_span(QT)) * kTile + j;
      out[i * p.k + k] = dequant_one<QT>(codes, k, j, dt[s], mt ? mt[s] : 0.0f);
    }
  }
}

// float32 -> bfloat16, rounding to nearest even as PyTorch's .to(torch.bfloat16) does (weights are
// finite, so there is no NaN case)
inline uint16_t to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// out[k, n] = bf16(w[n, k]): the whole weight, transposed, for a bfloat16 GEMM over many rows
template <int64_t QT>
void dequantize_t_bf16(const Packed& p, int64_t n, uint16_t* out) {
  const int64_t tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> edge;  // a last, partial tile goes through a 16-wide buffer
    for (int64_t t = begin; t < end; ++t) {
      const int64_t cols = std::min(kTile, n - t * kTile);
#if defined(FERRY_VECTOR)
      if (cols == kTile) {
        dequantize_tile_bf16<QT>(p, t, out + t * kTile, n);
        continue;
      }
      edge.resize(static_cast<size_t>(p.k * kTile));
      dequantize_tile_bf16<QT>(p, t, edge.data(), kTile);
      for (int64_t k = 0; k < p.k; ++k) {
        std::memcpy(out + k * n + t * kTile, edge.data() + k * kTile, cols * sizeof(uint16_t));
      }
#else
      const uint8_t* codes = p.codes + t * p.tile_code_bytes;
      const float* dt = p.d + t * p.tile_scales;
      const float* mt = has_min(QT) ? p.m + t * p.tile_scales : nullptr;
      for (int64_t k = 0; k < p.k; ++k) {
        for (int64_t j = 0; j < cols; ++j) {
          const int64_t s = (k / scale_span(QT)) * kTile + j;
          out[k * n + t * kTile + j] = to_bf16(dequant_one<QT>(codes, k, j, dt[s], mt ? mt[s] : 0.0f));
        }
      }
#endif
    }
  });
}

}  // namespace

// The dense weight, transposed, W.T [K, N] in bfloat16, dequantized exactly and then rounded: the
// operand of a bfloat16 (AMX) GEMM when a step has many rows (see ferry/model/layers/linear.py)
at::Tensor dequantize_t_bf16(const at::Tensor& codes, const at::Tensor& d, const at::Tensor& m,
                             int64_t qtype, int64_t n, int64_t k) {
  const Packed p = check_packed(codes, d, m, qtype, n, k);
  at::Tensor out = at::empty({k, n}, d.options().dtype(at::kBFloat16));
  auto* o_ptr = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  dispatch(qtype, [&](auto qt) { dequantize_t_bf16<decltype(qt)::value>(p, n, o_ptr); });
  return out;
}

// x: [M, K] float32 -> x @ W.T: [M, N]
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& d,
                        const at::Tensor& m, int64_t qtype, int64_t n) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "x must be a float32 CPU [M, K] tensor");
  const int64_t k = x.size(1);
  const Packed p = check_packed(codes, d, m, qtype, n, k);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  if (x.size(0) == 0) return out;
  const float* xp = xc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  dispatch(qtype, [&](auto qt) { quant_matmul<decltype(qt)::value>(xp, x.size(0), p, n, op); });
  return out;
}

// Rows `ids` of the dequantized W (an embedding lookup): ids [T] int64 -> [T, K] float32
at::Tensor quant_rows(const at::Tensor& ids, const at::Tensor& codes, const at::Tensor& d,
                      const at::Tensor& m, int64_t qtype, int64_t n, int64_t k) {
  const Packed p = check_packed(codes, d, m, qtype, n, k);
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1, "ids must be int64 [T]");
  const at::Tensor idc = ids.contiguous();
  const int64_t t = idc.size(0);
  const int64_t* id_ptr = idc.data_ptr<int64_t>();
  for (int64_t i = 0; i < t; ++i) {
    TORCH_CHECK(id_ptr[i] >= 0 && id_ptr[i] < n, "row id ", id_ptr[i], " out of range [0, ", n,
                ")");
  }
  at::Tensor out = at::empty({t, k}, d.options());
  float* o_ptr = out.data_ptr<float>();
  dispatch(qtype, [&](auto qt) { lookup_rows<decltype(qt)::value>(id_ptr, t, p, o_ptr); });
  return out;
}

}  // namespace ferry
