/*
 * The fused CPU ADOPT step: one pass over memory per element (read p, g, m, v; write p, m, v),
 * split over threads and auto-vectorised. Plain C with no torch or Python headers beyond the module
 * stub in module.c; Python calls the two exported functions through ctypes on raw data pointers.
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
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* dl_iterate_phdr, RTLD_NOLOAD */
#endif
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
/* One binary for every x86-64 machine: the loader picks the widest vector ISA the CPU has. */
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

#ifdef _WIN32
#define EXPORT __declspec(dllexport)
#else
#define EXPORT __attribute__((visibility("default")))
#endif

enum { DT_F32 = 0, DT_F64 = 1, DT_BF16 = 2, DT_F16 = 3 };

/* Hyper-parameters of one call, already in the precision of the math (float or double). */
typedef struct {
    double lr, beta1, beta2, eps, wd, grad_scale, clip_exponent;
    int decoupled, has_clip, maximize, has_scale;
} hyper_t;

/* Tensor table laid out by the caller: 7 rows of n int64 each. */
typedef struct {
    int64_t n;
    const int64_t *p, *g, *m, *v, *step, *numel, *codes;
    const int64_t *offsets; /* prefix sums of numel, n + 1 entries */
    const double *t;        /* step count of each tensor before this call */
    const hyper_t *h;
} table_t;

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

/* ------------------------------------------------------------------ threads */

typedef struct {
    const table_t *tab;
    int64_t lo, hi; /* global element range [lo, hi) over the concatenated tensors */
} task_t;

static void run_segment(const table_t *tab, int64_t i, int64_t off, int64_t len) {
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

static void run_task(void *arg) {
    const task_t *task = (const task_t *)arg;
    const table_t *tab = task->tab;
    /* First tensor that ends after lo (binary search over the prefix sums). */
    int64_t a = 0, b = tab->n;
    while (a < b) {
        int64_t mid = (a + b) / 2;
        if (tab->offsets[mid + 1] <= task->lo) a = mid + 1;
        else b = mid;
    }
    for (int64_t i = a; i < tab->n && tab->offsets[i] < task->hi; i++) {
        int64_t start = tab->offsets[i] > task->lo ? tab->offsets[i] : task->lo;
        int64_t end = tab->offsets[i + 1] < task->hi ? tab->offsets[i + 1] : task->hi;
        if (end > start) run_segment(tab, i, start - tab->offsets[i], end - start);
    }
}

/* Below this many elements per thread, starting a thread costs more than it saves. */
#define MIN_PER_THREAD 65536
#define MAX_THREADS 256

/*
 * Where torch runs on GNU OpenMP (its libgomp, loaded by torch before this library), a step runs on
 * torch's own OpenMP threads, through libgomp's entry point for a parallel region: they are the
 * threads torch's operations just used, awake (they spin a while after each region) and on their own
 * cores, so nothing competes with them and nothing waits for a thread to start. Elsewhere (another
 * OpenMP runtime, none, or a child process after fork, where libgomp's threads are gone and a region
 * would hang, as torch's own operations do there) threads are started and joined in every call.
 * benchmarks/threads.py measures the two; the library is only looked up, never loaded.
 */
#if defined(__linux__)
#include <dlfcn.h>
#include <link.h>
#define HAVE_GOMP_LOOKUP 1
#endif

static struct {
    void (*parallel)(void (*)(void *), void *, unsigned, unsigned); /* GOMP_parallel */
    int (*thread_num)(void), (*num_threads)(void);
    int found, use;
} gomp;
static pthread_once_t gomp_once = PTHREAD_ONCE_INIT;

static int forked_child = 0;

/* In a child made by fork after this library was loaded: never libgomp's threads there. */
static void gomp_forget(void) {
    forked_child = 1;
    gomp.found = gomp.use = 0;
}
__attribute__((constructor)) static void gomp_watch_fork(void) { pthread_atfork(NULL, NULL, gomp_forget); }

#ifdef HAVE_GOMP_LOOKUP
/* The loaded libraries: torch's libtorch_cpu and every libgomp (some torch wheels carry theirs in
 * torch/lib under a hashed name, libgomp-<hash>.so.1, soname included; others as libgomp.so.1). */
typedef struct {
    char torch_dir[4096];
    char gomp[8][4096];
    int n_gomp;
} loaded_t;

static int note_object(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size;
    loaded_t *seen = (loaded_t *)data;
    const char *path = info->dlpi_name;
    const char *base = path ? strrchr(path, '/') : NULL;
    if (!base || strlen(path) >= sizeof seen->torch_dir) return 0;
    base++;
    if (strncmp(base, "libtorch_cpu.", 13) == 0) {
        memcpy(seen->torch_dir, path, (size_t)(base - path));
        seen->torch_dir[base - path] = 0;
    } else if (strncmp(base, "libgomp", 7) == 0 && strstr(base, ".so") && seen->n_gomp < 8) {
        strcpy(seen->gomp[seen->n_gomp++], path);
    }
    return 0;
}

/* torch's libgomp: the one beside libtorch_cpu, else whichever libgomp.so.1 is loaded; never loads one. */
static void *torch_gomp(void) {
    static loaded_t seen; /* 36 KiB: not on the stack of whichever thread steps first (once only) */
    memset(&seen, 0, sizeof seen);
    dl_iterate_phdr(note_object, &seen);
    const size_t dir = strlen(seen.torch_dir);
    for (int i = 0; dir && i < seen.n_gomp; i++) {
        if (strncmp(seen.gomp[i], seen.torch_dir, dir) == 0 && !strchr(seen.gomp[i] + dir, '/')) {
            void *lib = dlopen(seen.gomp[i], RTLD_NOW | RTLD_NOLOAD);
            if (lib) return lib;
        }
    }
    return dlopen("libgomp.so.1", RTLD_NOW | RTLD_NOLOAD);
}
#endif

static void gomp_find(void) {
#ifdef HAVE_GOMP_LOOKUP
    if (forked_child) return;
    void *lib = torch_gomp();
    if (!lib) return;
    *(void **)&gomp.parallel = dlsym(lib, "GOMP_parallel");
    *(void **)&gomp.thread_num = dlsym(lib, "omp_get_thread_num");
    *(void **)&gomp.num_threads = dlsym(lib, "omp_get_num_threads");
    gomp.found = gomp.use = gomp.parallel && gomp.thread_num && gomp.num_threads;
#endif
}

static int openmp_in_use(void) {
    pthread_once(&gomp_once, gomp_find);
    return gomp.use;
}

typedef struct {
    void (*fn)(void *);
    char *args;
    size_t size;
    int n;
} job_t;

static void omp_job(void *data) {
    const job_t *job = (const job_t *)data;
    /* The team may be smaller than asked (OMP_THREAD_LIMIT, nesting): its threads share the rest. */
    for (int k = gomp.thread_num(), team = gomp.num_threads(); k < job->n; k += team)
        job->fn(job->args + (size_t)k * job->size);
}

typedef struct {
    const job_t *job;
    int k;
} thread_arg_t;

static void *thread_job(void *data) {
    const thread_arg_t *a = (const thread_arg_t *)data;
    a->job->fn(a->job->args + (size_t)a->k * a->job->size);
    return NULL;
}

/* fn(args + k * size) for k in [0, n), on n threads (the calling one included). */
static void parallel_for(void (*fn)(void *), void *args, size_t size, int n) {
    job_t job = {fn, (char *)args, size, n};
    if (n > 1 && openmp_in_use()) {
        gomp.parallel(omp_job, &job, (unsigned)n, 0);
        return;
    }
    pthread_t threads[MAX_THREADS];
    thread_arg_t targs[MAX_THREADS];
    int started[MAX_THREADS];
    for (int k = 1; k < n; k++) {
        targs[k].job = &job;
        targs[k].k = k;
        started[k] = pthread_create(&threads[k], NULL, thread_job, &targs[k]) == 0;
    }
    fn(args);
    for (int k = 1; k < n; k++) {
        if (started[k]) pthread_join(threads[k], NULL);
        else fn((char *)args + (size_t)k * size); /* could not start a thread: do its share here */
    }
}

/* Thread k's share [lo, hi) of total elements: equal shares, cut at multiples of 64 elements so threads
 * do not share cache lines; the last takes the rest. */
static void share_of(int64_t total, int nthreads, int k, int64_t *lo, int64_t *hi) {
    const int64_t share = (total / nthreads + 63) / 64 * 64;
    *lo = share * k < total ? share * k : total;
    *hi = share * (k + 1) < total && k + 1 < nthreads ? share * (k + 1) : total;
}

static void run_parallel(const table_t *tab, int64_t total, int nthreads) {
    int64_t max_threads = total / MIN_PER_THREAD;
    if (nthreads > max_threads) nthreads = (int)(max_threads > 1 ? max_threads : 1);
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    task_t tasks[MAX_THREADS];
    for (int k = 0; k < nthreads; k++) {
        tasks[k].tab = tab;
        share_of(total, nthreads, k, &tasks[k].lo, &tasks[k].hi);
    }
    parallel_for(run_task, tasks, sizeof(task_t), nthreads);
}

/* ------------------------------------------------------------------ exported */

/*
 * Which threads run a parallel step: 1 torch's OpenMP threads (where found), 0 threads started per
 * call; `enable` 0 or 1 chooses (1 only where found), -1 only asks. For tests and benchmarks/threads.py.
 */
EXPORT int adopt_cpu_openmp(int enable) {
    openmp_in_use();
    if (enable >= 0) gomp.use = enable && gomp.found;
    return gomp.use;
}

typedef struct {
    uintptr_t lo, hi; /* bytes [lo, hi) */
} span_t;

static int span_cmp(const void *a, const void *b) {
    uintptr_t x = ((const span_t *)a)->lo, y = ((const span_t *)b)->lo;
    return (x > y) - (x < y);
}

static const int ELEMENT_SIZE[] = {4, 8, 2, 2}; /* DT_F32, DT_F64, DT_BF16, DT_F16 */

/* 1 when the memory of two parameters with elements overlaps, 0 when not, -1 when out of memory. */
static int params_overlap(int64_t n, const int64_t *p, const int64_t *numel, const int64_t *codes) {
    span_t *spans = (span_t *)malloc((size_t)n * sizeof(span_t));
    if (!spans) return -1;
    int64_t k = 0;
    int sorted = 1;
    for (int64_t i = 0; i < n; i++) {
        if (numel[i] <= 0) continue; /* empty tensors may share an address */
        uintptr_t lo = (uintptr_t)p[i];
        spans[k].lo = lo;
        spans[k].hi = lo + (uintptr_t)numel[i] * (uintptr_t)ELEMENT_SIZE[codes[i] & 0xff];
        if (k > 0 && lo < spans[k - 1].lo) sorted = 0;
        k++;
    }
    if (!sorted) qsort(spans, (size_t)k, sizeof(span_t), span_cmp);
    int overlap = 0;
    for (int64_t i = 1; i < k && !overlap; i++) overlap = spans[i].lo < spans[i - 1].hi;
    free(spans);
    return overlap;
}

/*
 * One ADOPT step over n tensors. `table` holds 7 rows of n int64: data pointers of p, g, m, v, the
 * step tensors, then numel, then codes (parameter dtype | step dtype << 8; step dtype 0 = float32,
 * 1 = float64). Every tensor must be dense and laid out alike in p, g, m and v. Steps are read, used,
 * and incremented here. Returns 0; 1 when the memory of two parameters overlaps (a parameter listed
 * twice, or two views of one buffer), which the threads would update at once where the for-loop kernel
 * updates them in order; 2 when a tensor with elements has a null data pointer (a ZeroTensor); -1 when
 * memory for the bookkeeping could not be allocated. Nothing has changed when it returns 1, 2 or -1.
 */
EXPORT int adopt_cpu_step(int64_t n, const int64_t *table, double lr, double beta1, double beta2,
                          double eps, double weight_decay, int decoupled, int has_clip,
                          double clip_exponent, int maximize, int has_scale, double grad_scale,
                          int nthreads) {
    if (n <= 0) return 0;
    for (int64_t i = 0; i < n; i++) { /* a tensor with elements but no memory (a ZeroTensor): refuse */
        if (table[5 * n + i] > 0 && !(table[i] && table[n + i] && table[2 * n + i] && table[3 * n + i]))
            return 2;
        if (!table[4 * n + i]) return 2; /* the step counter always has an element */
    }
    const int overlap = n > 1 ? params_overlap(n, table, table + 5 * n, table + 6 * n) : 0;
    if (overlap != 0) return overlap;
    hyper_t h = {lr, beta1, beta2, eps, weight_decay, grad_scale, clip_exponent,
                 decoupled, has_clip, maximize, has_scale};
    int64_t *offsets = (int64_t *)malloc((size_t)(n + 1) * sizeof(int64_t));
    double *t = (double *)malloc((size_t)n * sizeof(double));
    if (!offsets || !t) {
        free(offsets);
        free(t);
        return -1;
    }
    table_t tab = {n, table, table + n, table + 2 * n, table + 3 * n, table + 4 * n, table + 5 * n,
                   table + 6 * n, offsets, t, &h};
    offsets[0] = 0;
    for (int64_t i = 0; i < n; i++) {
        offsets[i + 1] = offsets[i] + tab.numel[i];
        void *s = (void *)(intptr_t)tab.step[i];
        t[i] = (tab.codes[i] >> 8) & 1 ? *(double *)s : (double)*(float *)s;
    }
    run_parallel(&tab, offsets[n], nthreads < 1 ? 1 : nthreads);
    for (int64_t i = 0; i < n; i++) {
        void *s = (void *)(intptr_t)tab.step[i];
        if ((tab.codes[i] >> 8) & 1) *(double *)s += 1.0;
        else *(float *)s += 1.0f;
    }
    free(offsets);
    free(t);
    return 0;
}

/* ------------------------------------------------------------------ bandwidth bound (benchmarks) */

typedef struct {
    float *p, *g, *m, *v;
    int64_t lo, hi;
} bound_task_t;

MULTIVERSION static void bound_range(float *restrict p, const float *restrict g, float *restrict m,
                                     float *restrict v, int64_t lo, int64_t hi) {
    /* The access pattern of the step (read p, g, m, v; write p, m, v) with trivial arithmetic. */
    for (int64_t i = lo; i < hi; i++) {
        float gi = g[i];
        m[i] = 0.5f * m[i] + gi;
        v[i] = 0.5f * v[i] + gi;
        p[i] = p[i] - 1e-3f * gi;
    }
}

static void bound_task(void *arg) {
    bound_task_t *b = (bound_task_t *)arg;
    bound_range(b->p, b->g, b->m, b->v, b->lo, b->hi);
}

/*
 * A STREAM-like kernel with the step's memory traffic (28 bytes per float32 element), threaded as the
 * step is (the same threads): the time it takes is the memory-bandwidth bound of a step over as many elements.
 */
EXPORT void adopt_cpu_bound(float *p, float *g, float *m, float *v, int64_t n, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    bound_task_t tasks[MAX_THREADS];
    for (int k = 0; k < nthreads; k++) {
        bound_task_t bt = {p, g, m, v, 0, 0};
        share_of(n, nthreads, k, &bt.lo, &bt.hi);
        tasks[k] = bt;
    }
    parallel_for(bound_task, tasks, sizeof(bound_task_t), nthreads);
}
