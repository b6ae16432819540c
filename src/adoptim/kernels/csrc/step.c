/*
 * The exported fused CPU step: checks of the table, the memory-overlap check, and the split of all
 * tensors' elements into equal shares, one per thread.
 */
#include <stdint.h>
#include <stdlib.h>

#include "adopt_cpu.h"

typedef struct {
    const table_t *tab;
    int64_t lo, hi; /* global element range [lo, hi) over the concatenated tensors */
} task_t;

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
        if (end > start) adopt_run_segment(tab, i, start - tab->offsets[i], end - start);
    }
}

/* Below this many elements per thread, starting a thread costs more than it saves. */
#define MIN_PER_THREAD 65536

static void run_parallel(const table_t *tab, int64_t total, int nthreads) {
    int64_t max_threads = total / MIN_PER_THREAD;
    if (nthreads > max_threads) nthreads = (int)(max_threads > 1 ? max_threads : 1);
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    task_t tasks[MAX_THREADS];
    for (int k = 0; k < nthreads; k++) {
        tasks[k].tab = tab;
        adopt_share_of(total, nthreads, k, &tasks[k].lo, &tasks[k].hi);
    }
    adopt_parallel_for(run_task, tasks, sizeof(task_t), nthreads);
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
