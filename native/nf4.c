/* NF4 blockwise quantization (Dettmers et al. 2023, QLoRA, arXiv:2305.14314), bit-identical to
 * bitsandbytes' quantize_4bit(quant_type="nf4") on CPU: per block, absmax scaling, nearest
 * code by the midpoints between the 16 sorted NF4 values (ties go to the lower code, as
 * torch.bucketize(right=False) does), two codes per byte, first element in the high nibble.
 *
 * bitsandbytes 0.50's CPU path does this with torch.bucketize, ~40 ns per weight here; this
 * loop is ~2 ns. The pure-Python twin is native.nf4.quantize_nf4_torch.
 */
#include <math.h>
#include <stdint.h>

/* Midpoints between consecutive NF4 code values, computed in float32 exactly like
 * bitsandbytes: (code[i] + code[i + 1]) / 2. Filled by the caller (from bitsandbytes' own
 * table) so both paths share one source of truth. */
/* blocksize must be even and at most 4096; n a multiple of blocksize (the caller checks). */
void nf4_quantize(const float *w, int64_t n, int64_t blocksize, const float *mid,
                  uint8_t *out, float *absmax) {
    int64_t blocks = (n + blocksize - 1) / blocksize;
    for (int64_t b = 0; b < blocks; b++) {
        int64_t start = b * blocksize;
        int64_t end = start + blocksize < n ? start + blocksize : n;
        float m = 0.0f;
        for (int64_t i = start; i < end; i++) {
            float a = fabsf(w[i]);
            m = a > m ? a : m;
        }
        absmax[b] = m;
        float inv = 1.0f / (m > 1e-38f ? m : 1e-38f);
        uint8_t codes[4096];
        int64_t len = end - start;
        /* Branch-free: code = number of midpoints strictly below s. A binary search
         * mispredicts on random weights (~40 ns per weight); 15 compares vectorise. */
        for (int64_t i = 0; i < len; i++) {
            float s = w[start + i] * inv;
            s = s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
            int q = 0;
            for (int k = 0; k < 15; k++) q += s > mid[k];
            codes[i] = (uint8_t)q;
        }
        for (int64_t i = 0; i + 1 < len; i += 2)
            out[(start + i) >> 1] = (uint8_t)((codes[i] << 4) | codes[i + 1]);
    }
}

/* NF4 blockwise dequantization, the inverse of nf4_quantize: w = code[q] * absmax[block],
 * first element of a byte in its high nibble. Equal to bitsandbytes' dequantize_4bit (nf4)
 * bit for bit: each weight is one float32 product code[q] * absmax, computed here once per
 * block and code into a 16-entry table. The pure-torch twin is native.nf4.dequantize_nf4_torch.
 * n a multiple of blocksize, blocksize even (the caller checks).
 *
 * It runs on every forward and backward of every NF4 layer (106 M weights twice per SmolLM2
 * step), bounded by writing the fp32 output: with AVX2 the 16-entry lookup is two in-register
 * permutes and a blend per 8 codes (scalar table lookups measured 2.2x slower). */
#if defined(__AVX2__)
#include <immintrin.h>
#endif

static void nf4_block_scalar(const uint8_t *p, int64_t half, const float *lut, float *o) {
    for (int64_t i = 0; i < half; i++) {
        o[2 * i] = lut[p[i] >> 4];
        o[2 * i + 1] = lut[p[i] & 0x0f];
    }
}

void nf4_dequantize(const uint8_t *packed, const float *absmax, int64_t n, int64_t blocksize,
                    const float *code, float *out) {
    int64_t blocks = n / blocksize;
    int64_t half = blocksize / 2;
#pragma omp parallel for schedule(static) if (blocks >= 1024)
    for (int64_t b = 0; b < blocks; b++) {
        float lut[16];
        float m = absmax[b];
        for (int k = 0; k < 16; k++) lut[k] = code[k] * m;
        const uint8_t *p = packed + b * half;
        float *o = out + b * blocksize;
#if defined(__AVX2__)
        __m256 lut_lo = _mm256_loadu_ps(lut), lut_hi = _mm256_loadu_ps(lut + 8);
        __m256i seven = _mm256_set1_epi32(7), fifteen = _mm256_set1_epi32(15);
        int64_t i = 0;
        for (; i + 8 <= half; i += 8) {
            __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + i)));
            __m256i qh = _mm256_srli_epi32(v, 4), ql = _mm256_and_si256(v, fifteen);
            /* permutevar8x32 uses the index's low 3 bits; bit 3 picks the table half. */
            __m256 h = _mm256_blendv_ps(
                _mm256_permutevar8x32_ps(lut_lo, qh), _mm256_permutevar8x32_ps(lut_hi, qh),
                _mm256_castsi256_ps(_mm256_cmpgt_epi32(qh, seven)));
            __m256 l = _mm256_blendv_ps(
                _mm256_permutevar8x32_ps(lut_lo, ql), _mm256_permutevar8x32_ps(lut_hi, ql),
                _mm256_castsi256_ps(_mm256_cmpgt_epi32(ql, seven)));
            /* interleave: h0 l0 h1 l1 ... (unpack works per 128-bit lane; fix the lanes) */
            __m256 a = _mm256_unpacklo_ps(h, l), c = _mm256_unpackhi_ps(h, l);
            _mm256_storeu_ps(o + 2 * i, _mm256_permute2f128_ps(a, c, 0x20));
            _mm256_storeu_ps(o + 2 * i + 8, _mm256_permute2f128_ps(a, c, 0x31));
        }
        nf4_block_scalar(p + i, half - i, lut, o + 2 * i);
#else
        nf4_block_scalar(p, half, lut, o);
#endif
    }
}

/* NF4 -> bfloat16: nf4_dequantize's fp32 value rounded to the nearest bf16 (ties to even, as
 * torch's fp32 -> bf16 conversion rounds), for `--compute bf16`. The rounding happens on the
 * block's 16-entry table, so each weight is one 16-bit lookup: half the bytes written of the
 * fp32 kernel and no separate conversion pass. Values are finite (code * absmax). */
static uint16_t bf16_round(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#if defined(__SSSE3__)
#include <immintrin.h>
#endif

void nf4_dequantize_bf16(const uint8_t *packed, const float *absmax, int64_t n,
                         int64_t blocksize, const float *code, uint16_t *out) {
    int64_t blocks = n / blocksize;
    int64_t half = blocksize / 2;
#pragma omp parallel for schedule(static) if (blocks >= 1024)
    for (int64_t b = 0; b < blocks; b++) {
        uint16_t lut[16];
        float m = absmax[b];
        for (int k = 0; k < 16; k++) lut[k] = bf16_round(code[k] * m);
        const uint8_t *p = packed + b * half;
        uint16_t *o = out + b * blocksize;
        int64_t i = 0;
#if defined(__SSSE3__)
        /* The table's low and high bytes as two 16-byte shuffle tables: a code picks its
         * value's two bytes with one pshufb each. */
        uint8_t lo_bytes[16], hi_bytes[16];
        for (int k = 0; k < 16; k++) {
            lo_bytes[k] = (uint8_t)(lut[k] & 0xff);
            hi_bytes[k] = (uint8_t)(lut[k] >> 8);
        }
        __m128i t_lo = _mm_loadu_si128((const __m128i *)lo_bytes);
        __m128i t_hi = _mm_loadu_si128((const __m128i *)hi_bytes);
        __m128i nib = _mm_set1_epi8(0x0f);
        for (; i + 16 <= half; i += 16) {
            __m128i v = _mm_loadu_si128((const __m128i *)(p + i));
            __m128i qh = _mm_and_si128(_mm_srli_epi16(v, 4), nib), ql = _mm_and_si128(v, nib);
            /* codes in order: high nibble first, then low, byte by byte */
            __m128i c0 = _mm_unpacklo_epi8(qh, ql), c1 = _mm_unpackhi_epi8(qh, ql);
            __m128i l0 = _mm_shuffle_epi8(t_lo, c0), h0 = _mm_shuffle_epi8(t_hi, c0);
            __m128i l1 = _mm_shuffle_epi8(t_lo, c1), h1 = _mm_shuffle_epi8(t_hi, c1);
            _mm_storeu_si128((__m128i *)(o + 2 * i), _mm_unpacklo_epi8(l0, h0));
            _mm_storeu_si128((__m128i *)(o + 2 * i + 8), _mm_unpackhi_epi8(l0, h0));
            _mm_storeu_si128((__m128i *)(o + 2 * i + 16), _mm_unpacklo_epi8(l1, h1));
            _mm_storeu_si128((__m128i *)(o + 2 * i + 24), _mm_unpackhi_epi8(l1, h1));
        }
#endif
        for (; i < half; i++) {
            o[2 * i] = lut[p[i] >> 4];
            o[2 * i + 1] = lut[p[i] & 0x0f];
        }
    }
}
