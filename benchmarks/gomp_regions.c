/* LD_PRELOAD shim for benchmarks/parallel_regions.py: times every top-level OpenMP parallel region (GNU OpenMP's
 * GOMP_parallel, which PyTorch's parallel_for, MKL, oneDNN and overlock's kernels all enter) of the calling thread.
 *
 * Why: a step's wall time splits into time inside parallel regions (both cores can work) and time outside any
 * (Python, dispatch, allocation, serial ops: one core works, the other spins). Profilers see neither split. Only the
 * thread that called pr_start() records, and only its top-level regions (a region opened inside a region, by any
 * thread, is part of the outer one).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <time.h>

typedef void (*region_fn)(void *);
typedef void (*gomp_parallel_fn)(region_fn, void *, unsigned, unsigned);

#define MAX_RECORDS 2000000
static gomp_parallel_fn next_parallel;
static double starts[MAX_RECORDS], ends[MAX_RECORDS];
static void *fns[MAX_RECORDS];
static long count;
static int recording;
static __thread int depth, recorder;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

void GOMP_parallel(region_fn fn, void *data, unsigned threads, unsigned flags) {
    if (!next_parallel) next_parallel = (gomp_parallel_fn)dlsym(RTLD_NEXT, "GOMP_parallel");
    if (!recording || !recorder || depth > 0 || count >= MAX_RECORDS) {
        depth++;
        next_parallel(fn, data, threads, flags);
        depth--;
        return;
    }
    const long i = count++;
    fns[i] = (void *)fn;
    starts[i] = now();
    depth++;
    next_parallel(fn, data, threads, flags);
    depth--;
    ends[i] = now();
}

void pr_start(void) { count = 0; recorder = 1; recording = 1; }
void pr_stop(void) { recording = 0; }
long pr_count(void) { return count; }
double pr_now(void) { return now(); }

/* One line per region: start, end (seconds, CLOCK_MONOTONIC), the region function's offset in its library (hex),
 * the library's path. Resolved here, after the run: dladdr searches symbol tables and would slow the step. */
int pr_dump(const char *path) {
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    for (long i = 0; i < count; i++) {
        Dl_info info;
        const int ok = dladdr(fns[i], &info) && info.dli_fname;
        fprintf(f, "%.9f %.9f %lx %s\n", starts[i], ends[i],
                ok ? (unsigned long)((char *)fns[i] - (char *)info.dli_fbase) : 0UL, ok ? info.dli_fname : "?");
    }
    return fclose(f);
}
