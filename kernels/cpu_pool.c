/* The CPU kernels' own thread pool: workers that spin briefly between tasks, then sleep.
 * Built and loaded by radixflow/kernels/cpu_ext.py with the kernels.
 *
 * Why not OpenMP: radixflow runs torch's OpenMP pool with OMP_WAIT_POLICY=PASSIVE (spinning
 * threads starve everything else on a small machine), and waking a sleeping OpenMP thread costs
 * ~50-150 us on the VMs this runs on. A decode step calls ~150 kernels of 20-500 us each, a few
 * microseconds of Python apart, so those wake-ups ate up to half of the matmul time. These workers
 * spin for SPIN_NS after each task (yielding the core to any other runnable thread), which covers
 * the gaps inside a forward pass, and sleep on a futex between steps.
 *
 * rf_parallel(fn, arg, n) runs fn(arg, t, n) for t in [0, n) on the caller and n - 1 workers and
 * returns when all are done. One caller at a time: a concurrent caller runs its task alone
 * (fn(arg, 0, 1)), so every task must split its work by (t, n).
 */
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#if defined(__x86_64__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

typedef void (*rf_task)(void *arg, int t, int n);

#define MAX_WORKERS 63
#define SPIN_NS 300000L  /* longer than the gaps inside a forward pass, shorter than between steps */

static _Atomic int gen;        /* bumped once per task; workers futex-wait on it */
static _Atomic int pending;    /* workers still running the current task */
static _Atomic int sleepers;   /* workers in (or entering) futex_wait */
static rf_task task_fn;
static void *task_arg;
static int task_n;
static int n_workers;          /* started so far */
static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static int born_gen[MAX_WORKERS + 1];  /* gen before the task a worker was started for */

static void *worker(void *p) {
    int t = (int)(intptr_t)p;
    int seen = born_gen[t];
    for (;;) {
        int64_t start = now_ns();
        int g, spins = 0;
        while ((g = atomic_load(&gen)) == seen) {
            CPU_RELAX();
            if (++spins % 64) continue;
            if (now_ns() - start < SPIN_NS) {
                sched_yield();  /* let another runnable thread (torch's pool) have this core */
                continue;
            }
            atomic_fetch_add(&sleepers, 1);
            if (atomic_load(&gen) == seen) syscall(SYS_futex, &gen, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
            atomic_fetch_sub(&sleepers, 1);
            start = now_ns();
        }
        seen = g;
        if (t < task_n) task_fn(task_arg, t, task_n);
        atomic_fetch_sub(&pending, 1);
    }
    return NULL;
}

static void forget_workers(void) {  /* in a forked child the workers do not exist */
    n_workers = 0;
    atomic_store(&pending, 0);
    atomic_store(&sleepers, 0);
    pthread_mutex_init(&call_lock, NULL);
}

void rf_parallel(rf_task fn, void *arg, int n) {
    if (n > MAX_WORKERS + 1) n = MAX_WORKERS + 1;
    if (n <= 1 || pthread_mutex_trylock(&call_lock) != 0) {
        fn(arg, 0, 1);
        return;
    }
    static int atfork_set;
    if (!atfork_set) {
        pthread_atfork(NULL, NULL, forget_workers);
        atfork_set = 1;
    }
    while (n_workers < n - 1) {  /* grow on demand; a worker that cannot start shrinks the task */
        pthread_t th;
        born_gen[n_workers + 1] = atomic_load(&gen);
        if (pthread_create(&th, NULL, worker, (void *)(intptr_t)(n_workers + 1)) != 0) break;
        pthread_detach(th);
        n_workers++;
    }
    if (n > n_workers + 1) n = n_workers + 1;
    task_fn = fn;
    task_arg = arg;
    task_n = n;
    atomic_store(&pending, n_workers);
    atomic_fetch_add(&gen, 1);
    if (atomic_load(&sleepers)) syscall(SYS_futex, &gen, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    fn(arg, 0, n);
    /* Yield now and then: on an oversubscribed machine a worker may be waiting for this very core,
     * and spinning through our whole time slice would stall every kernel call by a slice. */
    for (int spins = 0; atomic_load(&pending);)
        if (++spins % 256) CPU_RELAX(); else sched_yield();
    pthread_mutex_unlock(&call_lock);
}
