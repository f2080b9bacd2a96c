// A small fork-join pool of persistent std::threads, so the kernels never start a second
// OpenMP runtime next to torch's. The caller passes the thread count (torch.get_num_threads()
// or LOWBIT_NUM_THREADS, decided in Python). Between calls an idle worker polls for the next
// call for LOWBIT_SPIN_US microseconds (default 100), then sleeps on a condition variable; the
// calling thread always takes part and polls for the helpers' completion. If another caller
// is using the pool (e.g. several Python threads calling kernels at once) the call runs on the
// calling thread alone, so concurrent calls never block each other or deadlock.
#pragma once
#include <cstdint>
#include <functional>

namespace lowbit {

// Runs fn(i) for every i in [0, n_tasks) on up to n_threads threads; returns when all are done.
// Exceptions must not escape fn.
void parallel_for(int64_t n_tasks, int n_threads, const std::function<void(int64_t)>& fn);

// Threads the pool has started so far (for backend_info).
int pool_size();

}  // namespace lowbit
