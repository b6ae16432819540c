/*
 * Declarations shared by the fused CPU kernel's C files (plain C, no torch or Python headers):
 *   elementwise.c  the arithmetic of one step on one segment of one tensor, per dtype
 *   threads.c      running work on torch's OpenMP threads (libgomp lookup, fork handling) or pthreads
 *   step.c         the exported step: argument checks, the memory-overlap check, the split over threads
 *   bandwidth.c    a benchmark-only kernel with the step's memory traffic (not part of the step)
 * Python calls the exported functions through ctypes on raw data pointers (kernels/fused_cpu.py).
 */
#ifndef ADOPT_CPU_H
#define ADOPT_CPU_H

#include <stddef.h>
#include <stdint.h>

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

/* elementwise.c: tensor i of the table, elements [off, off + len). */
void adopt_run_segment(const table_t *tab, int64_t i, int64_t off, int64_t len);

/* threads.c */
#define MAX_THREADS 256
/* fn(args + k * size) for k in [0, n), on n threads (the calling one included). */
void adopt_parallel_for(void (*fn)(void *), void *args, size_t size, int n);
/* Thread k's share [lo, hi) of total elements (cut at multiples of 64 elements). */
void adopt_share_of(int64_t total, int nthreads, int k, int64_t *lo, int64_t *hi);

#endif
