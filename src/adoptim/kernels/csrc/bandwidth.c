/*
 * For benchmarks only (benchmarks/step_time.py): not part of the optimizer step.
 */
#include <stdint.h>

#include "adopt_cpu.h"

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
EXPORT void adopt_bench_bandwidth_bound(float *p, float *g, float *m, float *v, int64_t n, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    bound_task_t tasks[MAX_THREADS];
    for (int k = 0; k < nthreads; k++) {
        bound_task_t bt = {p, g, m, v, 0, 0};
        adopt_share_of(n, nthreads, k, &bt.lo, &bt.hi);
        tasks[k] = bt;
    }
    adopt_parallel_for(bound_task, tasks, sizeof(bound_task_t), nthreads);
}
