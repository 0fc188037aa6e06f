// The CPU dual-sparse linear: torch.ops.duo.cpu_sparse_linear (fp32).
//
// Format (built by duo_vllm/kernels/cpu_kernel.py:pack): W [N, K] is cut into T equal tiles of `width`
// outputs (a multiple of 32). Each segment (tile t, input channel k) is one contiguous run in `blob`:
//   width / 32 mask words (uint32, stored bit for bit in the float array): bit b of word w <=> W[t width + 32 w + b, k] != 0
//   then the segment's nonzeros in output order
// offsets[t, k] (int32) is where the segment starts; segments are stored tile by tile, channel by channel;
// `blob` ends with 16 zeros of padding (the SIMD paths load 8 or 16 floats from any position).
//
// A call thresholds x (|x| > t kept), lists the channels live for at least one token, and each thread
// takes whole (tile, channel range) units and reads only the live channels' segments: pruned weights and
// dead channels are never read. Wide tiles and masks inside the segment make a live channel one long read
// and a dead one a hole: on the project's 2-core EPYC VMs, random 1 KB reads reach ~8 GB/s against ~14
// GB/s streaming, 4 KB reads ~11 GB/s. Each output is summed by one thread in channel order; where there
// are fewer tiles than threads, the channels of a tile are split at fixed points and the partial sums meet
// in a fixed order. A token's result does not depend on the rest of its batch (dead channels add zeros).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DUO_X86 1
#endif

namespace {

constexpr int kWord = 32;  // outputs per mask word

struct LiveChannels {
  std::vector<int32_t> channel;  // live input channels, increasing
  std::vector<float> x;          // [live, M]: thresholded x of each live channel, token-minor
};

LiveChannels find_live(const float* x, int64_t m, int64_t k, float t) {
  LiveChannels live;
  live.channel.reserve(k);
  live.x.reserve(k * m);
  std::vector<float> column(m);
  for (int64_t c = 0; c < k; ++c) {
    bool any = false;
    for (int64_t r = 0; r < m; ++r) {
      const float v = x[r * k + c];
      const bool keep = std::fabs(v) > t;  // NaN compares false: zeroed, like torch.where(|x| > t, x, 0)
      column[r] = keep ? v : 0.0f;
      any |= keep;
    }
    if (any) {
      live.channel.push_back(static_cast<int32_t>(c));
      live.x.insert(live.x.end(), column.begin(), column.end());
    }
  }
  return live;
}

// What one work unit computes: acc[r * ld + o] += x[r, c] * W[tile, c][o] over live channels j0..j1 of a
// tile (offsets: the tile's [K] segment starts in blob). acc starts zeroed.
struct Unit {
  const LiveChannels& live;
  int64_t j0, j1, m, words, ld;
  const int32_t* offsets;
  const float* blob;
  float* acc;
};

using UnitFn = void (*)(const Unit&);

inline const uint32_t* segment_masks(const float* seg) { return reinterpret_cast<const uint32_t*>(seg); }

void unit_portable(const Unit& u) {
  for (int64_t j = u.j0; j < u.j1; ++j) {
    const float* seg = u.blob + u.offsets[u.live.channel[j]];
    const uint32_t* mk = segment_masks(seg);
    const float* w = seg + u.words;
    const float* xv = u.live.x.data() + j * u.m;
    for (int64_t wd = 0; wd < u.words; ++wd) {
      for (uint32_t bits = mk[wd]; bits; bits &= bits - 1) {
        const int64_t out = wd * kWord + __builtin_ctz(bits);
        const float wv = *w++;
        for (int64_t r = 0; r < u.m; ++r) u.acc[r * u.ld + out] += xv[r] * wv;
      }
    }
  }
}

#ifdef DUO_X86
// Byte b of a mask places popcount(b) packed values into 8 lanes: perm[b][i] is the value's index for a
// lane whose bit is set, with the sign bit set (vpermps reads the low 3 bits; the sign bit then zeroes
// the other lanes).
struct ExpandTable {
  alignas(32) int32_t perm[256][8];
  ExpandTable() {
    for (int b = 0; b < 256; ++b) {
      int next = 0;
      for (int i = 0; i < 8; ++i) {
        const bool on = (b >> i) & 1;
        perm[b][i] = on ? static_cast<int32_t>(0x80000000u | next) : 0;
        next += on;
      }
    }
  }
};
const ExpandTable kExpand;

// How far ahead the next live segments are prefetched, one cache line per mask word (about what a word
// consumes at 50 % density): after a dead channel's hole the hardware prefetcher has nothing to follow, and
// a DRAM access must be asked for about this many bytes (~1 us at 10 GB/s) before it is needed. Into L2 (T1), not
// L1: at one thread the L1's few miss buffers cannot hold enough lines in flight (measured: README, CPU kernel).
constexpr int64_t kPrefetchBytes = 8192;

// Live channels taken together (NC) in one pass over their segments' words: each accumulator vector is loaded
// and stored once per NC channels instead of once per channel, and NC segments are read side by side (more
// misses in flight after dead channels' holes). The FMAs still run in channel order. Up to 4 tokens, NC is 4
// (AVX2: 2 for 3-4 tokens, whose x broadcasts would not fit in 16 ymm registers). From 5 tokens on, the
// accumulators ([M, width] floats, in L2 for wide tiles) cost more than the weights: NC is as many channels as
// the expanded vectors fit in registers (16 zmm, 8 ymm), and x is broadcast from memory.

// Channels j .. j + NC - 1 of a unit. MB > 0: exactly MB tokens; MB == 0: any m.
template <int NC>
struct Cursors {
  const uint32_t* mk[NC];  // the channels' mask words
  const float* w[NC];      // their next packed value
  const float* xv[NC];     // their thresholded x, [M]
  const char* ahead[NC];   // the segment `lead` live channels ahead, prefetched one line per word
  inline Cursors(const Unit& u, int64_t j, int64_t lead) {
    const int32_t* channel = u.live.channel.data();
    for (int c = 0; c < NC; ++c) {
      const float* seg = u.blob + u.offsets[channel[j + c]];
      mk[c] = segment_masks(seg);
      w[c] = seg + u.words;
      xv[c] = u.live.x.data() + (j + c) * u.m;
      ahead[c] = reinterpret_cast<const char*>(u.blob + u.offsets[channel[std::min(j + c + lead, u.j1 - 1)]]);
    }
  }
};

template <int MB, int NC>
__attribute__((target("avx2,fma,popcnt"))) void channels_avx2(const Unit& u, int64_t j, int64_t lead) {
  Cursors<NC> cur(u, j, lead);
  const float* const* xv = cur.xv;
  const float** w = cur.w;
  __m256 xb[NC][MB > 0 ? MB : 1];
  for (int c = 0; c < NC; ++c)
    for (int r = 0; r < MB; ++r) xb[c][r] = _mm256_broadcast_ss(xv[c] + r);
  for (int64_t wd = 0; wd < u.words; ++wd) {
    const float* starts[NC][4];
    uint32_t bits[NC];
    for (int c = 0; c < NC; ++c) {
      bits[c] = cur.mk[c][wd];
      _mm_prefetch(cur.ahead[c] + 64 * wd, _MM_HINT_T1);
      // where each byte's values start, independently (a chain of popcounts would serialize the loads)
      starts[c][0] = w[c];
      starts[c][1] = w[c] + _mm_popcnt_u32(bits[c] & 0xFFu);
      starts[c][2] = w[c] + _mm_popcnt_u32(bits[c] & 0xFFFFu);
      starts[c][3] = w[c] + _mm_popcnt_u32(bits[c] & 0xFFFFFFu);
      w[c] += _mm_popcnt_u32(bits[c]);
    }
    for (int g = 0; g < 4; ++g) {
      __m256 v[NC];
      for (int c = 0; c < NC; ++c) {
        const __m256i perm =
            _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.perm[(bits[c] >> (8 * g)) & 0xFF]));
        v[c] = _mm256_blendv_ps(_mm256_setzero_ps(), _mm256_permutevar8x32_ps(_mm256_loadu_ps(starts[c][g]), perm),
                                _mm256_castsi256_ps(perm));
      }
      float* a = u.acc + wd * kWord + 8 * g;
      if (MB > 0) {
        for (int r = 0; r < MB; ++r, a += u.ld) {
          __m256 sum = _mm256_load_ps(a);
          for (int c = 0; c < NC; ++c) sum = _mm256_fmadd_ps(xb[c][r], v[c], sum);
          _mm256_store_ps(a, sum);
        }
      } else {
        for (int64_t r = 0; r < u.m; ++r, a += u.ld) {
          __m256 sum = _mm256_load_ps(a);
          for (int c = 0; c < NC; ++c) sum = _mm256_fmadd_ps(_mm256_broadcast_ss(xv[c] + r), v[c], sum);
          _mm256_store_ps(a, sum);
        }
      }
    }
  }
}

// AVX-512: one masked expand places a 16-output half word's packed values into its lanes (no table, no blend),
// and 32 zmm registers hold 4 channels' x broadcasts for up to 4 tokens.
template <int MB, int NC>
__attribute__((target("avx512f,avx512bw,fma,popcnt"))) void channels_avx512(const Unit& u, int64_t j, int64_t lead) {
  Cursors<NC> cur(u, j, lead);
  __m512 xb[NC][MB > 0 ? MB : 1];
  for (int c = 0; c < NC; ++c)
    for (int r = 0; r < MB; ++r) xb[c][r] = _mm512_set1_ps(cur.xv[c][r]);
  for (int64_t wd = 0; wd < u.words; ++wd) {
    uint32_t bits[NC];
    for (int c = 0; c < NC; ++c) {
      bits[c] = cur.mk[c][wd];
      _mm_prefetch(cur.ahead[c] + 64 * wd, _MM_HINT_T1);
    }
    // Few tokens: both halves expanded before their FMAs, as before (no faster or slower within noise); 16 channels: one
    // half at a time, so the expanded values fit in the registers.
    constexpr int kHalves = MB > 0 ? 2 : 1;
    for (int h0 = 0; h0 < 2; h0 += kHalves) {
      __m512 v[NC][kHalves];
      for (int c = 0; c < NC; ++c)
        for (int h = 0; h < kHalves; ++h) {
          const auto half = static_cast<__mmask16>(bits[c] >> (16 * (h0 + h)));
          v[c][h] = _mm512_maskz_expand_ps(half, _mm512_loadu_ps(cur.w[c]));
          cur.w[c] += _mm_popcnt_u32(half);
        }
      for (int h = 0; h < kHalves; ++h) {
        float* a = u.acc + wd * kWord + 16 * (h0 + h);
        for (int64_t r = 0; r < (MB > 0 ? MB : u.m); ++r, a += u.ld) {
          __m512 sum = _mm512_load_ps(a);
          for (int c = 0; c < NC; ++c)
            sum = _mm512_fmadd_ps(MB > 0 ? xb[c][r] : _mm512_set1_ps(cur.xv[c][r]), v[c][h], sum);
          _mm512_store_ps(a, sum);
        }
      }
    }
  }
}

template <int MB, int NC>
struct Avx2 {
  static void run(const Unit& u, int64_t j, int64_t lead) { channels_avx2<MB, NC>(u, j, lead); }
};
template <int MB, int NC>
struct Avx512 {
  static void run(const Unit& u, int64_t j, int64_t lead) { channels_avx512<MB, NC>(u, j, lead); }
};

// Live channels j .. j1 of a unit, NC at a time, then the rest in halving chunks (channel order kept).
template <template <int, int> class Isa, int MB, int NC>
void channels_from(const Unit& u, int64_t j, int64_t lead) {
  for (; j + NC <= u.j1; j += NC) Isa<MB, NC>::run(u, j, lead);
  if constexpr (NC > 1) channels_from<Isa, MB, NC / 2>(u, j, lead);
}

template <template <int, int> class Isa, int MB, int NC>
void unit_simd(const Unit& u) {
  const int64_t lead = std::max<int64_t>(NC, kPrefetchBytes / (64 * u.words));  // in live channels
  channels_from<Isa, MB, NC>(u, u.j0, lead);
}

template <template <int, int> class Isa, int NC34, int NC_MANY>
UnitFn simd_unit_fn(int64_t m) {
  switch (m) {
    case 1: return unit_simd<Isa, 1, 4>;
    case 2: return unit_simd<Isa, 2, 4>;
    case 3: return unit_simd<Isa, 3, NC34>;
    case 4: return unit_simd<Isa, 4, NC34>;
    default: return unit_simd<Isa, 0, NC_MANY>;
  }
}
#endif

UnitFn unit_fn(const std::string& isa, int64_t m) {
#ifdef DUO_X86
  if (isa == "avx512") return simd_unit_fn<Avx512, 4, 16>(m);
  if (isa == "avx2") return simd_unit_fn<Avx2, 2, 8>(m);
#endif
  return unit_portable;
}

bool cpu_supports(const std::string& isa) {
#ifdef DUO_X86
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
  if (isa == "avx2") return avx2;
  if (isa == "avx512") return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#endif
  return isa == "portable";
}

// Above the crossover: the thresholded x through vLLM's oneDNN GEMM (_C::onednn_mm, the dense model's own).
at::Tensor dense_linear(const at::Tensor& x, float t, const std::optional<at::Tensor>& bias,
                        const at::Tensor& handle, int64_t n) {
  static const auto onednn_mm =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("_C::onednn_mm", "")
          .typed<void(at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&)>();
  // one pass, one buffer (at::where with abs and compare would make three passes and three temporaries)
  at::Tensor xt = at::empty_like(x);
  const float* src = x.data_ptr<float>();
  float* dst = xt.data_ptr<float>();
  at::parallel_for(0, x.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dst[i] = std::fabs(src[i]) > t ? src[i] : 0.0f;  // NaN -> 0
  });
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  onednn_mm.call(y, xt, bias, handle);
  return y;
}

at::Tensor cpu_sparse_linear(const at::Tensor& x_in, const at::Tensor& threshold, const at::Tensor& blob,
                             const at::Tensor& offsets, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& dense_handle, int64_t out_features,
                             int64_t max_sparse_m, c10::string_view isa) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() == 2,
              "duo::cpu_sparse_linear: x must be a 2-D float32 CPU tensor, got ", x_in.sizes(), " ",
              x_in.scalar_type(), " on ", x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0), k = x.size(1), n = out_features;
  TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.is_contiguous() && offsets.dim() == 2 &&
                  offsets.size(1) == k && offsets.size(0) >= 1,
              "duo::cpu_sparse_linear: offsets must be contiguous int32 [tiles, ", k, "], got ", offsets.sizes());
  const int64_t tiles = offsets.size(0), words = (n + tiles * kWord - 1) / (tiles * kWord), width = words * kWord;
  TORCH_CHECK(n >= 1 && (tiles - 1) * width < n,
              "duo::cpu_sparse_linear: ", tiles, " tiles do not split ", n, " outputs into equal tiles");
  TORCH_CHECK(blob.scalar_type() == at::kFloat && blob.is_contiguous() && blob.dim() == 1,
              "duo::cpu_sparse_linear: blob must be contiguous 1-D float32");
  TORCH_CHECK(threshold.numel() == 1, "duo::cpu_sparse_linear: threshold must hold one value");
  const std::string isa_name(isa);
  TORCH_CHECK(isa_name == "avx512" || isa_name == "avx2" || isa_name == "portable",
              "duo::cpu_sparse_linear: isa must be 'avx512', 'avx2' or 'portable', got ", isa_name);
  TORCH_CHECK(cpu_supports(isa_name), "duo::cpu_sparse_linear: isa '", isa_name, "' asked on a CPU without it");
  const float* bias_ptr = nullptr;
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    bias_c = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bias_c.numel() == n, "duo::cpu_sparse_linear: bias has ", bias_c.numel(), " values, expected ", n);
    bias_ptr = bias_c.data_ptr<float>();
  }

  const float t = threshold.to(at::kFloat).item<float>();
  if (m > max_sparse_m && dense_handle.has_value() && dense_handle->defined())
    return dense_linear(x, t, bias, *dense_handle, n);
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0) return y;
  const LiveChannels live = find_live(x.data_ptr<float>(), m, k, t);
  const int32_t* off_ptr = offsets.data_ptr<int32_t>();
  const float* blob_ptr = blob.data_ptr<float>();
  float* y_ptr = y.data_ptr<float>();

  // Units: (tile, fixed range of input channels); channels split only where tiles are fewer than threads.
  const int64_t threads = at::get_num_threads();
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(k, (threads + tiles - 1) / tiles));
  std::vector<int64_t> split_begin(splits + 1);  // positions in the live list
  for (int64_t s = 0; s <= splits; ++s) {
    const int32_t first_channel = static_cast<int32_t>(k * s / splits);
    split_begin[s] = std::lower_bound(live.channel.begin(), live.channel.end(), first_channel) - live.channel.begin();
  }
  // accumulators [splits][m][tiles * width]; torch's allocator aligns to 64 bytes, so no 32-byte access
  // straddles two cache lines
  const int64_t ld = tiles * width;
  at::Tensor acc = at::empty({splits, m, ld}, x.options());
  float* acc_ptr = acc.data_ptr<float>();
  const UnitFn run_unit = unit_fn(isa_name, m);
  at::parallel_for(0, tiles * splits, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t tile = unit / splits, s = unit % splits;
      float* a = acc_ptr + s * m * ld + tile * width;
      for (int64_t r = 0; r < m; ++r) std::fill(a + r * ld, a + r * ld + width, 0.0f);
      run_unit(Unit{live, split_begin[s], split_begin[s + 1], m, words, ld, off_ptr + tile * k, blob_ptr, a});
    }
  });
  at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t i = 0; i < n; ++i) {
        float sum = acc_ptr[r * ld + i];
        for (int64_t s = 1; s < splits; ++s) sum += acc_ptr[(s * m + r) * ld + i];
        y_ptr[r * n + i] = sum + (bias_ptr ? bias_ptr[i] : 0.0f);
      }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(duo, m) {
  m.def(
      "cpu_sparse_linear(Tensor x, Tensor threshold, Tensor blob, Tensor offsets, Tensor? bias, Tensor? dense_handle, "
      "int out_features, int max_sparse_m, str isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(duo, CPU, m) { m.impl("cpu_sparse_linear", &cpu_sparse_linear); }
