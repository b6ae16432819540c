/*
 * The fused step of low-precision ADOPT state on one float32 tensor: m and v stored as 8-bit codes with
 * one float32 scale per block, or as bfloat16. Per block of elements it decodes m and v, runs one ADOPT
 * step and encodes them back, in one pass over memory. It repeats the torch path (kernels/lowbit.py and
 * kernels/quant.py) operation for operation, so it writes the same parameter bits, the same codes, scales
 * and bfloat16 values:
 *   - every float operation is one IEEE float32 rounding, in the torch path's order (no contraction
 *     into fused multiply-adds: see the pragmas), with the same float32 constants, which the caller
 *     rounds from the same Python floats; division and square root are correctly rounded in vector
 *     registers as in scalar ones, so vectorising changes no bit;
 *   - the code search uses the caller's tables (quant._bucket_counts), the map values the caller's map;
 *   - stochastic rounding draws hash32((i mod 2^32) ^ key ^ hash32(i >> 32)), as quant.uniform.
 * An 8-bit block is worked in separate passes (decode, arithmetic, largest magnitude, encode: the codes
 * need the block's new largest magnitude), a bfloat16 chunk with both moments rounded stochastically (the
 * default) in one loop, so its arithmetic overlaps its memory traffic; each loop is without branches
 * and vectorised by the compiler (gathers for the table lookups); MULTIVERSION builds them for the
 * widest vector ISA the CPU has. Called through ctypes on raw data pointers
 * (kernels/lowbit_cpu.py), all of a param group's tensors of one format in one call.
 */
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "adopt_cpu.h"

/* The code tables of one map, as the caller packs them (lowbit_cpu._maps) from the torch path's
 * (quant._bucket_counts, the map): per bucket of a value (the top 17 bits of its float32 pattern) one
 * 64-bit word, the count of boundaries below the bucket (low half) and the next boundary, the one the value
 * is compared with (high half), for nearest ("mid") and stochastic ("tab") rounding; and per code k the
 * pair of neighbouring map values (map[k], map[k + 1]). A lookup is one load where the tables as the
 * torch path keeps them take two (and the pair one where they take two): the loads are most of an
 * encode's time, as the vectoriser gathers them element by element. */
typedef struct {
    const float *map;
    int64_t len;
    const uint64_t *mid_bucket;
    const uint64_t *tab_bucket;
    const uint64_t *pairs;
} lowbit_map_t;

typedef struct {
    float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, wd, decay;
    int coupled, decoupled, has_clip, maximize;
} lowbit_hyper_t;

/* One tensor of a call: n elements, its step count before the call, its clip bound t^gamma, the keys of
 * its moments' rounding; m and v are uint8 codes with float32 scales, or bfloat16 bit patterns. */
typedef struct {
    int64_t n, step;
    float *p;
    const float *g;
    void *m_data, *v_data;
    float *m_absmax, *v_absmax;
    float bound;
    uint32_t m_key, v_key;
    int64_t first; /* its first block (chunk) in the call's numbering: set by the call */
} lowbit_tensor_t;

#define CHUNK 256 /* elements of a bfloat16 step's pass (its scratch); any value gives the same bits */
#define MAX_BLOCK 4096 /* the largest 8-bit block (its scratch is on the stack); larger ones are left */

/* hash32 but for its last step, x ^ (x >> 16), which each use below applies in full or in part. */
static inline __attribute__((always_inline)) uint32_t hash32_mix(uint32_t x) {
    x ^= x >> 16;
    x *= 0x45D9F3Bu;
    x ^= x >> 16;
    return x * 0x2C1B3C6Du;
}

static inline __attribute__((always_inline)) uint32_t hash32(uint32_t x) {
    x = hash32_mix(x);
    return x ^ (x >> 16);
}

/* hash32(x) >> 16, two operations shorter: the last step leaves the top 16 bits as they are. */
static inline __attribute__((always_inline)) uint32_t hash32_high16(uint32_t x) {
    return hash32_mix(x) >> 16;
}

/* hash32(x) >> 8, one operation shorter: of the last step's result, the top 24 bits are (x >> 8) ^ (x >> 24). */
static inline __attribute__((always_inline)) uint32_t hash32_high24(uint32_t x) {
    x = hash32_mix(x);
    return (x >> 8) ^ (x >> 24);
}

static inline __attribute__((always_inline)) uint32_t f32_bits(float x) {
    uint32_t b;
    memcpy(&b, &x, 4);
    return b;
}

static inline __attribute__((always_inline)) float bits_f32(uint32_t b) {
    float x;
    memcpy(&x, &b, 4);
    return x;
}

/* ADOPT's arithmetic on one element: the parameter p0, the gradient g0 as stored, the decoded moments m0
 * and v0 (float32); step > 0. A bound of +-infinity where there is no clip: clamping to it changes no
 * value (NaN included), so one loop serves both. */
typedef struct {
    float p, m, v;
} elem_t;

static inline __attribute__((always_inline)) elem_t adopt_elem(const lowbit_hyper_t *h, float clip, float g0,
                                                                float p0, float m0, float v0, int maximize,
                                                                int coupled, int decoupled) {
    float gi = maximize ? -g0 : g0;
    gi = coupled ? gi + p0 * h->wd : gi;
    const float pi = decoupled ? p0 - p0 * h->decay : p0;
    float denom = sqrtf(v0);
    denom = denom < h->eps ? h->eps : denom; /* clamp(min=eps); NaN stays NaN */
    float nrm = gi / denom;
    nrm = nrm < -clip ? -clip : nrm;
    nrm = nrm > clip ? clip : nrm;
    const float mn = m0 * h->beta1 + nrm * h->one_minus_beta1;
    const float gg = gi * gi;
    const elem_t out = {pi - mn * h->lr, mn, v0 * h->beta2 + gg * h->one_minus_beta2};
    return out;
}

/* CALL(maximize, coupled, decoupled) with the step's flags as constants (coupled and decoupled weight decay
 * exclude each other), so that each loop is compiled without the options it does not use. */
#define WITH_FLAGS(h, CALL)                                                                                     \
    do {                                                                                                       \
        if ((h)->maximize) {                                                                                   \
            if ((h)->coupled) CALL(1, 1, 0);                                                                   \
            else if ((h)->decoupled) CALL(1, 0, 1);                                                            \
            else CALL(1, 0, 0);                                                                                \
        } else {                                                                                               \
            if ((h)->coupled) CALL(0, 1, 0);                                                                   \
            else if ((h)->decoupled) CALL(0, 0, 1);                                                            \
            else CALL(0, 0, 0);                                                                                \
        }                                                                                                      \
    } while (0)

static inline __attribute__((always_inline)) float clip_of(const lowbit_hyper_t *h, float bound) {
    return h->has_clip ? bound : INFINITY;
}

/* ADOPT's arithmetic on len elements: p and m, v (decoded, float32) in place; step > 0. */
static inline __attribute__((always_inline)) void step_loop(float *restrict p, const float *restrict g,
                                                             float *restrict m, float *restrict v, int64_t len,
                                                             const lowbit_hyper_t *h, float clip, int maximize,
                                                             int coupled, int decoupled) {
    for (int64_t j = 0; j < len; j++) {
        const elem_t e = adopt_elem(h, clip, g[j], p[j], m[j], v[j], maximize, coupled, decoupled);
        p[j] = e.p, m[j] = e.m, v[j] = e.v;
    }
}

static inline __attribute__((always_inline)) void step_pass(float *restrict p, const float *restrict g,
                                                             float *restrict m, float *restrict v, int64_t len,
                                                             const lowbit_hyper_t *h, float bound) {
    const lowbit_hyper_t hc = *h; /* a local copy: its fields stay in registers */
    const float clip = clip_of(h, bound);
#define STEP_LOOP(mx, cp, dc) step_loop(p, g, m, v, len, &hc, clip, mx, cp, dc)
    WITH_FLAGS(h, STEP_LOOP);
#undef STEP_LOOP
}

/* The first call's v = g*g (after maximize and coupled decay); p and m do not change. */
static inline __attribute__((always_inline)) void first_pass(const float *restrict p, const float *restrict g,
                                                              float *restrict v, int64_t len,
                                                              const lowbit_hyper_t *h) {
    const float wd = h->wd;
    const int coupled = h->coupled, maximize = h->maximize;
    for (int64_t j = 0; j < len; j++) {
        float gi = maximize ? -g[j] : g[j];
        gi = coupled ? gi + p[j] * wd : gi;
        v[j] = gi * gi;
    }
}

/* ------------------------------------------------------------------ 8-bit codes */

static inline __attribute__((always_inline)) void decode_8bit(const uint8_t *restrict codes, float scale,
                                                               const float *restrict map, float *restrict out,
                                                               int64_t len) {
    for (int64_t j = 0; j < len; j++) out[j] = map[codes[j]] * scale;
}

/* The largest magnitude of x[0..len), NaN if any element is NaN (as torch's amax). On the bit patterns
 * with the sign cleared, which order as the magnitudes do, NaNs above infinity: an integer maximum,
 * which vectorises where the float comparison with its NaN rule does not. */
static inline __attribute__((always_inline)) float absmax_pass(const float *restrict x, int64_t len) {
    uint32_t top = 0;
    for (int64_t j = 0; j < len; j++) {
        const uint32_t b = f32_bits(x[j]) & 0x7FFFFFFFu;
        top = b > top ? b : top;
    }
    return bits_f32(top > 0x7F800000u ? 0x7FC00000u : top); /* every NaN as the default quiet NaN */
}

/* Stochastic codes of x[0..len) with the divisor div; element j's number is hash32((base + j) ^ k), where
 * k folds hash32(i >> 32) into the key (one value over the range). */
static inline __attribute__((always_inline)) void encode_8bit_stochastic(const float *restrict x, int64_t len,
                                                                          uint32_t base, uint32_t k, float div,
                                                                          const lowbit_map_t *mp,
                                                                          uint8_t *restrict codes) {
    const uint64_t *restrict buckets = mp->tab_bucket;
    const uint64_t *restrict pairs = mp->pairs;
    const int32_t top = (int32_t)mp->len - 2;
    for (int32_t j = 0; j < (int32_t)len; j++) { /* a block: at most MAX_BLOCK; 32-bit lanes for the hash */
        const float s = x[j] / div;
        const uint64_t w = buckets[(f32_bits(s) >> 15) & 0x1FFFFu];
        const int32_t c = (int32_t)(uint32_t)w;
        int32_t lo = c + (bits_f32((uint32_t)(w >> 32)) <= s) - 1;
        lo = lo < 0 ? 0 : lo;
        lo = lo > top ? top : lo;
        const uint64_t pair = pairs[lo];
        const float below = bits_f32((uint32_t)pair), above = bits_f32((uint32_t)(pair >> 32));
        const float frac = (s - below) / (above - below);
        const float u = (float)(int32_t)hash32_high24((base + (uint32_t)j) ^ k) * 5.9604644775390625e-08f; /* 2^-24 */
        codes[j] = (uint8_t)(lo + (u < frac));
    }
}

/* Where the element index i = first + j crosses a multiple of 2^32 inside [first, first + len): the
 * length of the part before it, else len (a power-of-two block never crosses one). */
static inline __attribute__((always_inline)) int64_t until_2_32(int64_t first, int64_t len) {
    const int64_t next = (int64_t)((((uint64_t)first >> 32) + 1) << 32);
    return first + len > next ? next - first : len;
}

/* Codes of x[0..len) with the scale amax: s = x / amax (x / 1 for a zero block), then the bucket lookup;
 * stochastic rounding draws the element's number from hash32(i ^ key ^ hash32(i >> 32)) with i = first + j. */
static inline __attribute__((always_inline)) void encode_8bit(const float *restrict x, int64_t len, int64_t first,
                                                               float amax, const lowbit_map_t *mp, int stochastic,
                                                               uint32_t key, uint8_t *restrict codes) {
    const float div = amax == 0.0f ? 1.0f : amax;
    if (!stochastic) {
        const uint64_t *restrict buckets = mp->mid_bucket;
        for (int64_t j = 0; j < len; j++) {
            const float s = x[j] / div;
            const uint64_t w = buckets[(f32_bits(s) >> 15) & 0x1FFFFu];
            codes[j] = (uint8_t)((int32_t)(uint32_t)w + (bits_f32((uint32_t)(w >> 32)) < s));
        }
        return;
    }
    for (int64_t done = 0; done < len;) {
        const int64_t i = first + done, part = until_2_32(i, len - done);
        encode_8bit_stochastic(x + done, part, (uint32_t)i, key ^ hash32((uint32_t)((uint64_t)i >> 32)), div, mp,
                               codes + done);
        done += part;
    }
}

/* ------------------------------------------------------------------ bfloat16 */

static inline __attribute__((always_inline)) float bf16_value(uint16_t x) {
    return bits_f32((uint32_t)x << 16);
}

static inline __attribute__((always_inline)) void decode_bf16(const uint16_t *restrict x, float *restrict out,
                                                               int64_t len) {
    for (int64_t j = 0; j < len; j++) out[j] = bf16_value(x[j]);
}

/* torch's float32 -> bfloat16 conversion: round to nearest even, every NaN to 0xFFFF. */
static inline __attribute__((always_inline)) uint16_t bf16_nearest(uint32_t b) {
    const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    return (b & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0xFFFFu : (uint16_t)rounded;
}

/* b (a float32 bit pattern) in bfloat16 by stochastic rounding with 16 bits of noise: added to the low half
 * of the pattern, which is then cut off; a value that is not finite, or becomes infinite, is rounded to
 * nearest, as quant.round_bfloat16. Without branches (the fused loops vectorise with it). */
static inline __attribute__((always_inline)) uint16_t bf16_stochastic(uint32_t b, uint32_t noise) {
    const uint32_t cut = (b + noise) & 0xFFFF0000u;
    const uint32_t finite = ((b & 0x7F800000u) != 0x7F800000u) & ((cut & 0x7F800000u) != 0x7F800000u);
    return finite ? (uint16_t)(cut >> 16) : bf16_nearest(b);
}

/* x[0..len) in bfloat16 by stochastic rounding (bf16_stochastic), element j's noise the top 16 bits of
 * hash32((base + j) ^ k). */
static inline __attribute__((always_inline)) void encode_bf16_stochastic(const float *restrict x, int64_t len,
                                                                          uint32_t base, uint32_t k,
                                                                          uint16_t *restrict out) {
    for (int64_t j = 0; j < len; j++)
        out[j] = bf16_stochastic(f32_bits(x[j]), hash32_high16((base + (uint32_t)j) ^ k)); /* (u * 65536) truncated */
}

/* x[0..len) in bfloat16, element i = first + j: nearest (key unused) or stochastic rounding. */
static inline __attribute__((always_inline)) void encode_bf16(const float *restrict x, int64_t len, int64_t first,
                                                               int stochastic, uint32_t key,
                                                               uint16_t *restrict out) {
    if (!stochastic) {
        for (int64_t j = 0; j < len; j++) out[j] = bf16_nearest(f32_bits(x[j]));
        return;
    }
    for (int64_t done = 0; done < len;) {
        const int64_t i = first + done, part = until_2_32(i, len - done);
        encode_bf16_stochastic(x + done, part, (uint32_t)i, key ^ hash32((uint32_t)((uint64_t)i >> 32)), out + done);
        done += part;
    }
}

/* The largest magnitude (bit pattern, sign cleared) for which adding 16 bits of noise cannot carry into
 * the exponent's all-ones: at or below it bf16_stochastic(b, noise) is (b + noise) >> 16, finite. */
#define BF16_PLAIN_TOP 0x7F7F0000u

/* One bfloat16 chunk (never across a multiple of 2^32) with both moments rounded stochastically, in one
 * loop: decode, step, encode, so the arithmetic runs while the loads of the next elements are in flight.
 * The encodes take the short form, (b + noise) >> 16, and the new m and v also go to mb and vb; returns
 * the largest magnitude among them (as bit patterns), and where that is above BF16_PLAIN_TOP (an
 * infinite or NaN moment, or one within 2^-8 of the float32 range) the caller encodes the chunk again
 * from mb and vb with bf16_stochastic. The same bits as the passes (step_pass, encode_bf16). */
static inline __attribute__((always_inline)) uint32_t bf16_stochastic_loop(
        float *restrict p, const float *restrict g, uint16_t *restrict m16, uint16_t *restrict v16,
        float *restrict mb, float *restrict vb, int32_t len, const lowbit_hyper_t *h, float clip, uint32_t base,
        uint32_t mk, uint32_t vk, int maximize, int coupled, int decoupled) {
    uint32_t top = 0;
    for (int32_t j = 0; j < len; j++) { /* 32-bit lanes for the counter the hash takes */
        const elem_t e = adopt_elem(h, clip, g[j], p[j], bf16_value(m16[j]), bf16_value(v16[j]), maximize, coupled,
                                    decoupled);
        const uint32_t i = base + (uint32_t)j, mbits = f32_bits(e.m), vbits = f32_bits(e.v);
        p[j] = e.p;
        mb[j] = e.m, vb[j] = e.v;
        const uint32_t ma = mbits & 0x7FFFFFFFu, va = vbits & 0x7FFFFFFFu, big = ma > va ? ma : va;
        top = big > top ? big : top;
        m16[j] = (uint16_t)((mbits + hash32_high16(i ^ mk)) >> 16);
        v16[j] = (uint16_t)((vbits + hash32_high16(i ^ vk)) >> 16);
    }
    return top;
}

static inline __attribute__((always_inline)) void step_bf16_stochastic(float *restrict p, const float *restrict g,
                                                                        uint16_t *restrict m16, uint16_t *restrict v16,
                                                                        float *restrict mb, float *restrict vb,
                                                                        int64_t len, int64_t first,
                                                                        const lowbit_hyper_t *h, float bound,
                                                                        uint32_t m_key, uint32_t v_key) {
    const lowbit_hyper_t hc = *h;
    const float clip = clip_of(h, bound);
    const uint32_t hi = hash32((uint32_t)((uint64_t)first >> 32)), base = (uint32_t)first;
    uint32_t top = 0;
#define BF16_LOOP(mx, cp, dc) \
    top = bf16_stochastic_loop(p, g, m16, v16, mb, vb, (int32_t)len, &hc, clip, base, m_key ^ hi, v_key ^ hi, mx, cp, dc)
    WITH_FLAGS(h, BF16_LOOP);
#undef BF16_LOOP
    if (top > BF16_PLAIN_TOP) {
        encode_bf16(mb, len, first, 1, m_key, m16);
        encode_bf16(vb, len, first, 1, v_key, v16);
    }
}

/* ------------------------------------------------------------------ the jobs */

typedef struct {
    const lowbit_tensor_t *t;
    int64_t count, block, b0, b1; /* blocks (chunks for bfloat16) [b0, b1) of the call's numbering */
    const lowbit_hyper_t *h;
    const lowbit_map_t *signed_map, *unsigned_map;
    int m_stochastic, v_stochastic;
} lowbit_job_t;

/* The 8-bit blocks of one job (one thread): every element's result depends on its own tensor and index
 * alone, so the split over threads changes no bit. */
MULTIVERSION static void run_8bit(void *arg) {
    const lowbit_job_t *a = (const lowbit_job_t *)arg;
    const lowbit_hyper_t *h = a->h;
    const int64_t block = a->block;
    float mb[MAX_BLOCK], vb[MAX_BLOCK];
    int64_t k = 0;
    while (k + 1 < a->count && a->t[k + 1].first <= a->b0) k++;
    for (int64_t b = a->b0; b < a->b1; b++) {
        while (k + 1 < a->count && a->t[k + 1].first <= b) k++;
        const lowbit_tensor_t *t = &a->t[k];
        const int64_t bi = b - t->first, first = bi * block;
        const int64_t len = t->n - first < block ? t->n - first : block;
        float *p = t->p + first;
        const float *g = t->g + first;
        uint8_t *m_codes = (uint8_t *)t->m_data + first, *v_codes = (uint8_t *)t->v_data + first;
        if (t->step == 0) {
            first_pass(p, g, vb, len, h);
        } else {
            decode_8bit(m_codes, t->m_absmax[bi], a->signed_map->map, mb, len);
            decode_8bit(v_codes, t->v_absmax[bi], a->unsigned_map->map, vb, len);
            step_pass(p, g, mb, vb, len, h, t->bound);
            const float ma = absmax_pass(mb, len);
            encode_8bit(mb, len, first, ma, a->signed_map, a->m_stochastic, t->m_key, m_codes);
            t->m_absmax[bi] = ma;
        }
        const float va = absmax_pass(vb, len);
        encode_8bit(vb, len, first, va, a->unsigned_map, a->v_stochastic, t->v_key, v_codes);
        t->v_absmax[bi] = va;
    }
}

MULTIVERSION static void run_bf16(void *arg) {
    const lowbit_job_t *a = (const lowbit_job_t *)arg;
    const lowbit_hyper_t *h = a->h;
    float mb[CHUNK], vb[CHUNK];
    int64_t k = 0;
    for (int64_t b = a->b0; b < a->b1; b++) {
        while (k + 1 < a->count && a->t[k + 1].first <= b) k++;
        const lowbit_tensor_t *t = &a->t[k];
        const int64_t first = (b - t->first) * CHUNK;
        const int64_t len = t->n - first < CHUNK ? t->n - first : CHUNK;
        float *p = t->p + first;
        const float *g = t->g + first;
        uint16_t *m_data = (uint16_t *)t->m_data + first, *v_data = (uint16_t *)t->v_data + first;
        if (t->step == 0) {
            first_pass(p, g, vb, len, h);
            encode_bf16(vb, len, first, a->v_stochastic, t->v_key, v_data);
        } else if (a->m_stochastic && a->v_stochastic) {
            step_bf16_stochastic(p, g, m_data, v_data, mb, vb, len, first, h, t->bound, t->m_key, t->v_key);
        } else {
            decode_bf16(m_data, mb, len);
            decode_bf16(v_data, vb, len);
            step_pass(p, g, mb, vb, len, h, t->bound);
            encode_bf16(mb, len, first, a->m_stochastic, t->m_key, m_data);
            encode_bf16(vb, len, first, a->v_stochastic, t->v_key, v_data);
        }
    }
}

/*
 * One step of `count` float32 tensors (none empty) whose moments are 8-bit codes in blocks of `block`
 * (kind 8; at most MAX_BLOCK) or bfloat16 (kind 16), on up to `nthreads` threads in one parallel region:
 * the tensors' blocks are numbered one after another and cut into equal shares. Returns 0, or -1 for
 * an argument it does not take (nothing was changed then).
 */
EXPORT int adopt_lowbit_step(int kind, int64_t count, lowbit_tensor_t *tensors, int64_t block,
                             const lowbit_hyper_t *h, const lowbit_map_t *signed_map,
                             const lowbit_map_t *unsigned_map, int m_stochastic, int v_stochastic, int nthreads) {
    if (kind == 16) block = CHUNK;
    else if (kind != 8 || block < 1 || block > MAX_BLOCK) return -1;
    int64_t total = 0;
    for (int64_t i = 0; i < count; i++) {
        if (tensors[i].n < 1) return -1;
        tensors[i].first = total;
        total += (tensors[i].n + block - 1) / block;
    }
    if (total == 0) return 0;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads > total) nthreads = (int)total;
    if (nthreads < 1) nthreads = 1;
    lowbit_job_t jobs[MAX_THREADS];
    for (int k = 0; k < nthreads; k++) {
        lowbit_job_t *j = &jobs[k];
        j->t = tensors, j->count = count, j->block = block, j->h = h;
        j->b0 = total * k / nthreads, j->b1 = total * (k + 1) / nthreads;
        j->signed_map = signed_map, j->unsigned_map = unsigned_map;
        j->m_stochastic = m_stochastic, j->v_stochastic = v_stochastic;
    }
    void (*fn)(void *) = kind == 8 ? run_8bit : run_bf16;
    if (nthreads == 1)
        fn(&jobs[0]);
    else
        adopt_parallel_for(fn, jobs, sizeof(lowbit_job_t), nthreads);
    return 0;
}
