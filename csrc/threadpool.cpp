#include "threadpool.h"

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace lowbit {
namespace {

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
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
    const int helpers = int(std::min<int64_t>(n_threads, n_tasks)) - 1;
    grow(helpers);
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      n_tasks_ = n_tasks;
      next_.store(0);
      active_ = helpers;
      wanted_ = helpers;
      ++generation_;
    }
    cv_.notify_all();
    work();
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [&] { return active_ == 0; });
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
      const int64_t i = next_.fetch_add(1);
      if (i >= n_tasks_) break;
      fn(i);
    }
  }

  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(mu_);
        // Only the first `wanted_` workers join a call, so a call asking for fewer threads
        // than the pool holds gets exactly that many.
        cv_.wait(lk, [&] { return stop_ || (generation_ != seen && id < wanted_); });
        if (stop_) return;
        seen = generation_;
      }
      work();
      {
        std::lock_guard<std::mutex> lk(mu_);
        if (--active_ == 0) done_cv_.notify_one();
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
  int active_ = 0;
  int wanted_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
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
