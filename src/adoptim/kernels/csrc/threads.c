/*
 * Threads of the fused CPU step: torch's OpenMP team where it can be found, else pthreads per call.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* dl_iterate_phdr, RTLD_NOLOAD */
#endif
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "adopt_cpu.h"

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

void adopt_parallel_for(void (*fn)(void *), void *args, size_t size, int n) {
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
void adopt_share_of(int64_t total, int nthreads, int k, int64_t *lo, int64_t *hi) {
    const int64_t share = (total / nthreads + 63) / 64 * 64;
    *lo = share * k < total ? share * k : total;
    *hi = share * (k + 1) < total && k + 1 < nthreads ? share * (k + 1) : total;
}

/*
 * Which threads run a parallel step: 1 torch's OpenMP threads (where found), 0 threads started per
 * call; `enable` 0 or 1 chooses (1 only where found), -1 only asks. For tests and benchmarks/threads.py.
 */
EXPORT int adopt_cpu_openmp(int enable) {
    openmp_in_use();
    if (enable >= 0) gomp.use = enable && gomp.found;
    return gomp.use;
}

