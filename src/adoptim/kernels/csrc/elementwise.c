/*
 * The arithmetic of the fused CPU ADOPT step on one segment of one tensor, auto-vectorised; one loop
 * per (storage type, math type), specialised on the flags.
 *
 * Arithmetic (see adoptim/reference.py): per tensor with step t (calls so far),
 *   t == 0:  v = g*g                                   (no parameter or momentum change)
 *   t >= 1:  p = p - lr*wd*p (decoupled only); n = clamp(g / max(sqrt(v), eps), -t^c, t^c);
 *            m = lerp(m, n, 1 - beta1); p = p - lr*m; v = beta2*v + (1 - beta2)*g*g
 * with g = g / grad_scale (the gradient itself is left as it is), negated when maximising, plus
 * wd*p with coupled decay. The operations and their order follow the for-loop kernel, so float32 and
 * float64 results differ from it only where the compiler fuses a multiply-add. bfloat16 and float16
 * values are widened to float32, updated, and rounded once when stored.
 */
#include <math.h>
#include <string.h>

#include "adopt_cpu.h"

/* ------------------------------------------------------------------ bfloat16 / float16 */

static inline float bf16_load(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t bf16_store(float f) {
    /* Round to nearest even; any NaN becomes the canonical quiet NaN (as torch rounds). */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (f != f) ? (uint16_t)0x7fc0 : (uint16_t)rounded;
}

/*
 * float16 by integer arithmetic, so the loops vectorise on every ISA (the compiler does not vectorise
 * _Float16 conversions without AVX512-FP16). Both directions are exact / round to nearest even. This
 * is the portable path; CPUs with F16C take the faster one below ("float16 through F16C").
 */
/* cond ? a : b without a branch (nested conditionals would stop the vectoriser). */
static inline uint32_t pick(int cond, uint32_t a, uint32_t b) {
    uint32_t mask = 0u - (uint32_t)(cond != 0);
    return (a & mask) | (b & ~mask);
}

static inline float f16_load(uint16_t x) {
    uint32_t sign = (uint32_t)(x & 0x8000u) << 16, em = x & 0x7fffu;
    uint32_t normal = (em << 13) + (112u << 23);   /* rebias the exponent from 15 to 127 */
    uint32_t inf_nan = (em << 13) | 0x7f800000u;
    float sub = (float)em * 0x1p-24f;             /* zero and subnormals: mantissa * 2^-24 */
    uint32_t sub_bits;
    memcpy(&sub_bits, &sub, sizeof sub_bits);
    uint32_t u = sign | pick(em >= 0x7c00u, inf_nan, pick(em >= 0x0400u, normal, sub_bits));
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f16_store(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    float af;
    memcpy(&af, &a, sizeof af);
    /* Below 2^-14 the result is a multiple of 2^-24: adding 0.5 (whose ulp is 2^-24) rounds to it. */
    float shifted = af + 0.5f;
    uint32_t sub;
    memcpy(&sub, &shifted, sizeof sub);
    sub -= 0x3f000000u;
    /* Normal range: drop 13 mantissa bits with round to nearest even, rebias 127 -> 15. */
    uint32_t normal = ((a - (112u << 23)) + 0xfffu + ((a >> 13) & 1u)) >> 13;
    uint32_t h = pick(a > 0x7f800000u, 0x7e00u,                  /* NaN */
                      pick(a >= 0x477ff000u, 0x7c00u,            /* rounds to 65536 or more: inf */
                           pick(a < 0x38800000u, sub, normal)));
    return (uint16_t)(sign | h);
}

/* ------------------------------------------------------------------ element loops */

/* The clipping bound of the normalised gradient at step t (calls so far): t^c, or no bound. */
static inline double clip_bound(const hyper_t *h, double t) {
    return h->has_clip ? pow(t, h->clip_exponent) : INFINITY;
}

/*
 * BODY(args..., first, coupled, decoupled, scaled) with the four flags as constants, so each call site
 * is specialised: eight forms of the update, four of the first call (decoupled decay is inert there).
 */
#define SPECIALISED(BODY, h, t, ...)                                                                     \
    do {                                                                                                 \
        const int c_ = (h)->wd != 0.0 && !(h)->decoupled, d_ = (h)->wd != 0.0 && (h)->decoupled;         \
        const int s_ = (h)->has_scale;                                                                   \
        if ((t) == 0.0) {                                                                                \
            if (c_ && s_) BODY(__VA_ARGS__, 1, 1, 0, 1);                                                 \
            else if (c_) BODY(__VA_ARGS__, 1, 1, 0, 0);                                                  \
            else if (s_) BODY(__VA_ARGS__, 1, 0, 0, 1);                                                  \
            else BODY(__VA_ARGS__, 1, 0, 0, 0);                                                          \
        } else if (c_) {                                                                                 \
            if (s_) BODY(__VA_ARGS__, 0, 1, 0, 1);                                                       \
            else BODY(__VA_ARGS__, 0, 1, 0, 0);                                                          \
        } else if (d_) {                                                                                 \
            if (s_) BODY(__VA_ARGS__, 0, 0, 1, 1);                                                       \
            else BODY(__VA_ARGS__, 0, 0, 1, 0);                                                          \
        } else {                                                                                         \
            if (s_) BODY(__VA_ARGS__, 0, 0, 0, 1);                                                       \
            else BODY(__VA_ARGS__, 0, 0, 0, 0);                                                          \
        }                                                                                                \
    } while (0)

/*
 * One loop per (storage type, math type); the flags are arguments of an always-inlined body so each
 * call site below is specialised and the loop has no branch left but the ones the vectoriser turns
 * into selects. `first` selects the first-call form.
 */
#define DEFINE_LOOPS(NAME, STORE_T, MATH_T, LOAD, STORE, SQRT)                                           \
    static inline __attribute__((always_inline)) void NAME##_body(                                       \
        STORE_T *restrict p, const STORE_T *restrict g, STORE_T *restrict m, STORE_T *restrict v, int64_t n,   \
        const hyper_t *h, MATH_T bound, int first, int coupled, int decoupled, int scaled) {             \
        const MATH_T sign = h->maximize ? (MATH_T)-1 : (MATH_T)1;                                         \
        const MATH_T scale = (MATH_T)h->grad_scale;                                                      \
        const MATH_T wd = (MATH_T)h->wd;                                                                 \
        const MATH_T decay = (MATH_T)(-h->lr * h->wd);                                                   \
        const MATH_T neg_lr = (MATH_T)(-h->lr);                                                          \
        const MATH_T eps = (MATH_T)h->eps;                                                               \
        const MATH_T w = (MATH_T)(1.0 - h->beta1);                                                       \
        const int small_w = w < (MATH_T)0.5;                                                             \
        const MATH_T lerp_coeff = small_w ? w : w - (MATH_T)1;                                           \
        const MATH_T b2 = (MATH_T)h->beta2;                                                              \
        const MATH_T c2 = (MATH_T)(1.0 - h->beta2);                                                      \
        for (int64_t i = 0; i < n; i++) {                                                                \
            MATH_T gi = LOAD(g[i]);                                                                      \
            if (scaled) gi = gi / scale;                                                                 \
            gi = gi * sign;                                                                              \
            MATH_T pi = LOAD(p[i]);                                                                      \
            if (coupled) gi = gi + wd * pi;                                                              \
            if (first) {                                                                                 \
                v[i] = STORE(gi * gi);                                                                   \
                continue;                                                                                \
            }                                                                                            \
            if (decoupled) pi = pi + decay * pi;                                                         \
            MATH_T vi = LOAD(v[i]);                                                                      \
            MATH_T den = SQRT(vi);                                                                       \
            den = den < eps ? eps : den; /* NaN stays NaN, as torch.clamp keeps it */                   \
            MATH_T ni = gi / den;                                                                        \
            ni = ni < -bound ? -bound : ni;                                                              \
            ni = ni > bound ? bound : ni;                                                                \
            MATH_T mi = LOAD(m[i]);                                                                      \
            mi = (small_w ? mi : ni) + lerp_coeff * (ni - mi); /* torch's lerp, both weight ranges */   \
            pi = pi + neg_lr * mi;                                                                       \
            vi = vi * b2;                                                                                \
            vi = vi + c2 * gi * gi;                                                                      \
            p[i] = STORE(pi);                                                                            \
            m[i] = STORE(mi);                                                                            \
            v[i] = STORE(vi);                                                                            \
        }                                                                                                \
    }                                                                                                    \
    MULTIVERSION static void NAME##_segment(STORE_T *p, const STORE_T *g, STORE_T *m, STORE_T *v, int64_t n,   \
                                            const hyper_t *h, double t) {                                \
        const MATH_T bound = (MATH_T)clip_bound(h, t);                                                   \
        SPECIALISED(NAME##_body, h, t, p, g, m, v, n, h, bound);                                         \
    }

#define IDENT(x) (x)
#define TO_F32(x) ((float)(x))
DEFINE_LOOPS(f32, float, float, IDENT, IDENT, sqrtf)
DEFINE_LOOPS(f64, double, double, IDENT, IDENT, sqrt)
DEFINE_LOOPS(bf16, uint16_t, float, bf16_load, bf16_store, sqrtf)
DEFINE_LOOPS(f16, uint16_t, float, f16_load, f16_store, sqrtf)

/* ------------------------------------------------------------------ float16 through F16C */

/*
 * x86-64 CPUs with F16C (all with AVX2) convert eight float16 values to or from float32 in one
 * instruction, exactly and with round to nearest even, as f16_load and f16_store do in integer
 * arithmetic. With them a float16 segment is staged through float32 buffers small enough for L1: widen
 * a block, run the float32 loop on it, narrow the results back. Values are the same as the integer
 * path's; only the payload of a NaN that a parameter or state already held may differ (torch keeps no
 * payloads either). The first call writes only v, as the integer path does.
 */
#if defined(__GNUC__) && defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#define HAVE_F16C_PATH 1
#define STAGE 512 /* elements per block: four float32 buffers of 2 KiB */

__attribute__((target("avx2,fma,f16c"))) static void widen_f16(float *dst, const uint16_t *src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++) dst[i] = _cvtsh_ss(src[i]);
}

__attribute__((target("avx2,fma,f16c"))) static void narrow_f16(uint16_t *dst, const float *src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}

static inline __attribute__((always_inline)) void f16c_blocks(uint16_t *p, const uint16_t *g, uint16_t *m,
                                                             uint16_t *v, int64_t n, const hyper_t *h,
                                                             float bound, int first, int coupled,
                                                             int decoupled, int scaled) {
    float bp[STAGE], bg[STAGE], bm[STAGE], bv[STAGE];
    for (int64_t off = 0; off < n; off += STAGE) {
        const int64_t len = n - off < STAGE ? n - off : STAGE;
        widen_f16(bp, p + off, len);
        widen_f16(bg, g + off, len);
        if (!first) { /* the first call reads neither m nor v, and writes only v */
            widen_f16(bm, m + off, len);
            widen_f16(bv, v + off, len);
        }
        f32_body(bp, bg, bm, bv, len, h, bound, first, coupled, decoupled, scaled);
        if (!first) {
            narrow_f16(p + off, bp, len);
            narrow_f16(m + off, bm, len);
        }
        narrow_f16(v + off, bv, len);
    }
}

__attribute__((target("avx2,fma,f16c"))) static void f16_segment_f16c(uint16_t *p, const uint16_t *g, uint16_t *m,
                                                                     uint16_t *v, int64_t n, const hyper_t *h,
                                                                     double t) {
    const float bound = (float)clip_bound(h, t);
    SPECIALISED(f16c_blocks, h, t, p, g, m, v, n, h, bound);
}

static int f16c_supported(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 29))) return 0; /* F16C */
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); /* and the OS saves ymm */
}

static int use_f16c = 0;
__attribute__((constructor)) static void pick_f16_path(void) { use_f16c = f16c_supported(); }
#endif

/*
 * Whether float16 goes through F16C (1) or the portable integer conversions (0); `enable` 0 or 1
 * chooses (1 only where the CPU has F16C), -1 only asks. For tests that compare the two paths.
 */
EXPORT int adopt_cpu_f16c(int enable) {
#ifdef HAVE_F16C_PATH
    if (enable >= 0) use_f16c = enable && f16c_supported();
    return use_f16c;
#else
    (void)enable;
    return 0;
#endif
}

/* ------------------------------------------------------------------ dispatch on the dtype */

void adopt_run_segment(const table_t *tab, int64_t i, int64_t off, int64_t len) {
    const int code = (int)(tab->codes[i] & 0xff);
    const double t = tab->t[i];
#define ARGS(T) (T *)(intptr_t)tab->p[i] + off, (T *)(intptr_t)tab->g[i] + off, \
                (T *)(intptr_t)tab->m[i] + off, (T *)(intptr_t)tab->v[i] + off, len, tab->h, t
    switch (code) {
    case DT_F32: f32_segment(ARGS(float)); break;
    case DT_F64: f64_segment(ARGS(double)); break;
    case DT_BF16: bf16_segment(ARGS(uint16_t)); break;
    case DT_F16:
#ifdef HAVE_F16C_PATH
        if (use_f16c) {
            f16_segment_f16c(ARGS(uint16_t));
            break;
        }
#endif
        f16_segment(ARGS(uint16_t));
        break;
    default: break;
    }
#undef ARGS
}
