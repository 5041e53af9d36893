/* Dequantization of llama.cpp's simplest block formats to float32, matching the `gguf`
 * package's numpy reference (gguf/quants.py) bit for bit. Layouts (ggml-common.h):
 *   Q8_0: 34 bytes per 32 weights: fp16 d, int8 q[32];            w = d * q
 *   Q4_0: 18 bytes per 32 weights: fp16 d, uint8 qs[16];          w = d * (nibble - 8)
 *   Q4_1: 20 bytes per 32 weights: fp16 d, fp16 m, uint8 qs[16];  w = d * nibble + m
 * In Q4_0/Q4_1 byte j holds weight j in its low nibble and weight j + 16 in its high one.
 * The Python twin is gguf.quants.dequantize (native/dequant.py falls back to it).
 */
#include <stdint.h>
#include <string.h>

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while ((mant & 0x400) == 0) { mant <<= 1; exp--; }
            mant &= 0x3ff;
            bits = sign | (exp << 23) | (mant << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

void dequant_q8_0(const uint8_t *src, int64_t nblocks, float *dst) {
    for (int64_t b = 0; b < nblocks; b++, src += 34, dst += 32) {
        float d = half_to_float(rd16(src));
        const int8_t *q = (const int8_t *)(src + 2);
        for (int i = 0; i < 32; i++) dst[i] = d * (float)q[i];
    }
}

void dequant_q4_0(const uint8_t *src, int64_t nblocks, float *dst) {
    for (int64_t b = 0; b < nblocks; b++, src += 18, dst += 32) {
        float d = half_to_float(rd16(src));
        const uint8_t *qs = src + 2;
        for (int j = 0; j < 16; j++) {
            dst[j] = d * (float)((int)(qs[j] & 0x0f) - 8);
            dst[j + 16] = d * (float)((int)(qs[j] >> 4) - 8);
        }
    }
}

void dequant_q4_1(const uint8_t *src, int64_t nblocks, float *dst) {
    for (int64_t b = 0; b < nblocks; b++, src += 20, dst += 32) {
        float d = half_to_float(rd16(src));
        float m = half_to_float(rd16(src + 2));
        const uint8_t *qs = src + 4;
        for (int j = 0; j < 16; j++) {
            dst[j] = d * (float)(qs[j] & 0x0f) + m;
            dst[j + 16] = d * (float)(qs[j] >> 4) + m;
        }
    }
}
