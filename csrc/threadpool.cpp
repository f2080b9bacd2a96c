#include "threadpool.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace lowbit {
namespace {

// One short pause of a spin-wait loop (lets the sibling hyperthread run, saves power).
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

using Clock = std::chrono::steady_clock;

// How long an idle worker keeps polling for the next call before it sleeps on the condition
// variable (LOWBIT_SPIN_US, default 100 us; 0 sleeps at once): back-to-back calls (a model's
// layers) then start without a futex wake-up (tens of microseconds), while an idle process
// stops burning CPU soon after its last call. Polling yields the core after the first few
// hundred pauses, so it does not hold up other runnable threads.
std::chrono::microseconds spin_time() {
  static const std::chrono::microseconds t = [] {
    const char* e = std::getenv("LOWBIT_SPIN_US");
    long us = 100;
    if (e && *e) us = std::strtol(e, nullptr, 10);
    return std::chrono::microseconds(us < 0 ? 0 : us);
  }();
  return t;
}

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_.store(true);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void run(int64_t n_tasks, int n_threads, const std::function<void(int64_t)>& fn) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || n_threads <= 1 || n_tasks <= 1) {
      for (int64_t i = 0; i < n_tasks; ++i) fn(i);
      return;
    }
    const int helpers = int(std::min<int64_t>(std::min(n_threads, kMaxThreads), n_tasks)) - 1;
    grow(helpers);
    fn_ = &fn;
    n_tasks_ = n_tasks;
    next_.store(0, std::memory_order_relaxed);
    active_.store(helpers, std::memory_order_relaxed);
    // Publish the call: its number and its helper count in one word, so a worker always sees
    // the two together. (With separate words, a worker that woke late for the previous call,
    // which it had no part in, could read this call's helper count, run this call's tasks
    // under the old number and then again under the new one: one completion counted twice,
    // the caller returning early or waiting forever.) Sleeping workers need the mutex + notify
    // (a worker checks the word under mu_ before it waits); spinning ones see it directly.
    // (only the caller holding busy_ writes call_, so its own last value is current)
    const uint64_t number = (call_.load(std::memory_order_relaxed) >> kWantedBits) + 1;
    call_.store(number << kWantedBits | uint64_t(helpers), std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lk(mu_); }
      cv_.notify_all();
    }
    work();
    wait_done();
    fn_ = nullptr;
  }

  int size() {
    std::lock_guard<std::mutex> lk(mu_);
    return int(workers_.size());
  }

 private:
  void grow(int n) {
    std::lock_guard<std::mutex> lk(mu_);
    while (int(workers_.size()) < n) {
      const int id = int(workers_.size());
      workers_.emplace_back([this, id] { loop(id); });
    }
  }

  void work() {
    const std::function<void(int64_t)>& fn = *fn_;
    for (;;) {
      const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
      if (i >= n_tasks_) break;
      fn(i);
    }
  }

  // The caller, after its own share: spin until the helpers are done (they are finishing
  // their last task), and sleep if that takes long (a helper was descheduled).
  void wait_done() {
    const auto t0 = Clock::now();
    for (int i = 0; active_.load(std::memory_order_acquire) != 0; ++i) {
      if (i < 1024) cpu_relax();
      else std::this_thread::yield();
      if ((i & 255) == 255 && Clock::now() - t0 > std::chrono::microseconds(200)) {
        std::unique_lock<std::mutex> lk(mu_);
        caller_sleeping_.store(true, std::memory_order_seq_cst);
        done_cv_.wait(lk, [&] { return active_.load(std::memory_order_seq_cst) == 0; });
        caller_sleeping_.store(false, std::memory_order_relaxed);
        return;
      }
    }
  }

  void loop(int id) {
    uint64_t seen = 0;  // the number of the last call this worker looked at
    for (;;) {
      // wait for a new call: poll for spin_time(), then sleep on the condition variable
      uint64_t call = call_.load(std::memory_order_acquire);
      if (call >> kWantedBits == seen) {
        const auto t0 = Clock::now();
        for (int i = 0; (call = call_.load(std::memory_order_acquire)) >> kWantedBits == seen; ++i) {
          if (stop_.load(std::memory_order_relaxed)) return;
          // pause first; then yield, so that other runnable threads (torch's own pool between
          // our calls, on a machine with as many threads as cores) get the core
          if (i < 256) cpu_relax();
          else std::this_thread::yield();
          if ((i & 63) == 63 && Clock::now() - t0 > spin_time()) {
            std::unique_lock<std::mutex> lk(mu_);
            sleeping_.fetch_add(1, std::memory_order_seq_cst);
            cv_.wait(lk, [&] {
              return stop_.load() || call_.load(std::memory_order_seq_cst) >> kWantedBits != seen;
            });
            sleeping_.fetch_sub(1, std::memory_order_relaxed);
            if (stop_.load()) return;
          }
        }
      }
      seen = call >> kWantedBits;
      // Only the first `wanted` workers join a call, so a call asking for fewer threads than
      // the pool holds gets exactly that many. A worker that joins is counted in active_, so
      // the call it read cannot end, nor a newer one start, before it has finished: what it
      // reads below belongs to that call.
      if (uint64_t(id) >= (call & kWantedMask)) continue;
      work();
      if (active_.fetch_sub(1, std::memory_order_seq_cst) == 1 &&
          caller_sleeping_.load(std::memory_order_seq_cst)) {
        { std::lock_guard<std::mutex> lk(mu_); }
        done_cv_.notify_one();
      }
    }
  }

  std::mutex busy_;  // held by the caller that owns the pool for one call
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_tasks_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<int> active_{0};
  std::atomic<int> sleeping_{0};
  std::atomic<bool> caller_sleeping_{false};
  // The current call: its number (counting from 1) << kWantedBits | its helper count.
  static constexpr int kWantedBits = 24;
  static constexpr int kMaxThreads = 4096;  // per call; more are not started
  static constexpr uint64_t kWantedMask = (uint64_t(1) << kWantedBits) - 1;
  std::atomic<uint64_t> call_{0};
  std::atomic<bool> stop_{false};
};

Pool& pool() {
  // Leaked on purpose: joining threads from a static destructor at interpreter exit can hang.
  static Pool* p = new Pool();
  return *p;
}

}  // namespace

void parallel_for(int64_t n_tasks, int n_threads, const std::function<void(int64_t)>& fn) {
  pool().run(n_tasks, n_threads, fn);
}

int pool_size() { return pool().size(); }

}  // namespace lowbit
