/*
 * The fused step of 8-bit ADOPT state on one float32 tensor: dequantize m and v, one ADOPT step, and
 * quantize them back, one block at a time, in one pass over memory. It repeats the torch path
 * (kernels/lowbit.py and kernels/quant.py) operation for operation, so it writes the same parameter
 * bits, the same codes and the same scales:
 *   - every float operation is one IEEE float32 rounding, in the torch path's order (no contraction
 *     into fused multiply-adds: see the pragmas), with the same float32 constants, which the caller
 *     rounds from the same Python floats;
 *   - the code search uses the caller's tables (quant._bucket_counts), the map values the caller's map;
 *   - stochastic rounding draws hash32((i mod 2^32) ^ key ^ hash32(i >> 32)), as quant.uniform.
 * Called through ctypes on raw data pointers (kernels/lowbit_cpu.py).
 */
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "adopt_cpu.h"

/* The code tables of one map: the map, and the bucket lookups of nearest ("mids") and stochastic
 * ("table") rounding (quant._bucket_counts): counts[bucket] and the boundaries padded with +inf. */
typedef struct {
    const float *map;
    int64_t len;
    const int64_t *mid_counts;
    const float *mid_next;
    const int64_t *tab_counts;
    const float *tab_next;
} lowbit_map_t;

typedef struct {
    float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, wd, decay, bound;
    int coupled, decoupled, has_clip, maximize;
} lowbit_hyper_t;

static uint32_t hash32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x45D9F3Bu;
    x ^= x >> 16;
    x *= 0x2C1B3C6Du;
    return x ^ (x >> 16);
}

static uint32_t f32_bits(float x) {
    uint32_t b;
    memcpy(&b, &x, 4);
    return b;
}

/* Codes of x[0..len) (one block, global index of x[0] is first) and the block's scale. */
static void quantize_block(const float *x, int64_t len, int64_t first, const lowbit_map_t *mp, int stochastic,
                           uint32_t key, uint8_t *codes, float *absmax_out) {
    float amax = 0.0f;
    for (int64_t j = 0; j < len; j++) {
        float a = fabsf(x[j]);
        if (a > amax || a != a) amax = a; /* NaN propagates, as torch's amax */
        if (amax != amax) break;
    }
    *absmax_out = amax;
    const float div = amax == 0.0f ? 1.0f : amax;
    for (int64_t j = 0; j < len; j++) {
        const float s = x[j] / div;
        const uint32_t bucket = (f32_bits(s) >> 15) & 0x1FFFFu;
        int64_t code;
        if (!stochastic) {
            const int64_t c = mp->mid_counts[bucket];
            code = c + (mp->mid_next[c] < s);
        } else {
            const int64_t c = mp->tab_counts[bucket];
            int64_t lo = c + (mp->tab_next[c] <= s) - 1;
            if (lo < 0) lo = 0;
            if (lo > mp->len - 2) lo = mp->len - 2;
            const float below = mp->map[lo], above = mp->map[lo + 1];
            const float frac = (s - below) / (above - below);
            const uint64_t i = (uint64_t)(first + j);
            const uint32_t h = hash32(((uint32_t)i) ^ key ^ hash32((uint32_t)(i >> 32)));
            const float u = (float)(h >> 8) * 5.9604644775390625e-08f; /* 2^-24 */
            code = lo + (u < frac);
        }
        codes[j] = (uint8_t)code;
    }
}

typedef struct {
    int64_t n, block, step, b0, b1; /* blocks [b0, b1) of the tensor */
    float *p, *m_absmax, *v_absmax, *scratch;
    const float *g;
    uint8_t *m_codes, *v_codes;
    const lowbit_hyper_t *h;
    const lowbit_map_t *signed_map, *unsigned_map;
    int m_stochastic, v_stochastic;
    uint32_t m_key, v_key;
} lowbit_job_t;

/* The blocks of one job (one thread): every element's result depends on its own index alone, so the
 * split over threads changes no bit. */
static void run_blocks(void *arg) {
    const lowbit_job_t *a = (const lowbit_job_t *)arg;
    const lowbit_hyper_t *h = a->h;
    const int64_t n = a->n, block = a->block, step = a->step;
    float *mb = a->scratch, *vb = a->scratch + block;
    float *p = a->p;
    const float *g = a->g;
    for (int64_t bi = a->b0; bi < a->b1; bi++) {
        const int64_t first = bi * block;
        const int64_t len = n - first < block ? n - first : block;
        const float ma = a->m_absmax[bi], va = a->v_absmax[bi];
        for (int64_t j = 0; j < len; j++) {
            const int64_t i = first + j;
            float gi = h->maximize ? -g[i] : g[i];
            if (h->coupled) gi = gi + p[i] * h->wd;
            if (step == 0) {
                vb[j] = gi * gi; /* v_0 = g_0^2; no parameter update, m stays */
                continue;
            }
            float pi = p[i];
            if (h->decoupled) pi = pi - pi * h->decay;
            const float m = a->signed_map->map[a->m_codes[i]] * ma;
            const float v = a->unsigned_map->map[a->v_codes[i]] * va;
            float denom = sqrtf(v);
            if (denom < h->eps) denom = h->eps; /* clamp(min=eps); NaN stays NaN */
            float nrm = gi / denom;
            if (h->has_clip) {
                if (nrm < -h->bound) nrm = -h->bound;
                else if (nrm > h->bound) nrm = h->bound;
            }
            const float mn = m * h->beta1 + nrm * h->one_minus_beta1;
            p[i] = pi - mn * h->lr;
            const float gg = gi * gi;
            vb[j] = v * h->beta2 + gg * h->one_minus_beta2;
            mb[j] = mn;
        }
        if (step != 0)
            quantize_block(mb, len, first, a->signed_map, a->m_stochastic, a->m_key, a->m_codes + first,
                           a->m_absmax + bi);
        quantize_block(vb, len, first, a->unsigned_map, a->v_stochastic, a->v_key, a->v_codes + first,
                       a->v_absmax + bi);
    }
}

/* One step of one float32 tensor of n elements in blocks of `block` on up to `nthreads` threads; `step`
 * is its count before the call. Returns 0, or -1 when the scratch memory could not be allocated
 * (nothing was changed then). */
EXPORT int adopt_lowbit8_step(int64_t n, float *p, const float *g, uint8_t *m_codes, float *m_absmax,
                              uint8_t *v_codes, float *v_absmax, int64_t block, int64_t step,
                              const lowbit_hyper_t *h, const lowbit_map_t *signed_map,
                              const lowbit_map_t *unsigned_map, int m_stochastic, uint32_t m_key,
                              int v_stochastic, uint32_t v_key, int nthreads) {
    const int64_t nblocks = (n + block - 1) / block;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads > nblocks) nthreads = (int)nblocks;
    if (nthreads < 1) nthreads = 1;
    float *scratch = (float *)malloc(sizeof(float) * (size_t)(2 * block) * (size_t)nthreads);
    if (scratch == NULL) return -1;
    lowbit_job_t jobs[MAX_THREADS];
    for (int k = 0; k < nthreads; k++) {
        lowbit_job_t *j = &jobs[k];
        j->n = n, j->block = block, j->step = step;
        j->b0 = nblocks * k / nthreads, j->b1 = nblocks * (k + 1) / nthreads;
        j->p = p, j->g = g, j->m_codes = m_codes, j->m_absmax = m_absmax, j->v_codes = v_codes;
        j->v_absmax = v_absmax, j->scratch = scratch + (size_t)(2 * block) * (size_t)k, j->h = h;
        j->signed_map = signed_map, j->unsigned_map = unsigned_map;
        j->m_stochastic = m_stochastic, j->v_stochastic = v_stochastic, j->m_key = m_key, j->v_key = v_key;
    }
    if (nthreads == 1)
        run_blocks(&jobs[0]);
    else
        adopt_parallel_for(run_blocks, jobs, sizeof(lowbit_job_t), nthreads);
    free(scratch);
    return 0;
}
