// Process-wide state of the CPU kernels, defined once here (net.h declares it): the private chunk pool,
// the worker choice, what a fork() child resets, and the environment switches read by every path.
#include <pthread.h>

#include <condition_variable>

#include "cpu/net.h"
#include "cpu/ordered_weights.h"
#include "cpu/variants.h"

namespace iosparse {

namespace {

// Level-path parallelism that never waits for a descheduled thread.
// at::parallel_for (OpenMP) forks and joins once per level: on a busy machine every join waits for the
// slowest thread to be scheduled again (measured: 14-40x slower than one thread at batch 1). Instead the
// calling thread posts one job for the whole network and works through its chunks itself; helper threads
// (a small private pool) claim chunks too if they wake up in time. A chunk of level l starts only when all
// chunks of earlier levels are done, and the caller returns as soon as every chunk is done, so a helper
// that is never scheduled costs nothing, and one that is descheduled holds back at most one chunk.
// The claim word packs (generation, next chunk, chunk count) so a late helper cannot claim a chunk of a
// finished job (compare-and-swap on the whole word).
class ChunkPool {
 public:
  using Fn = void (*)(const void* ctx, int64_t chunk);
  static ChunkPool& get() { return *instance(); }
  // Runs fn(ctx, c) for c in [0, n_chunks); chunk c may start once done >= first_of_level[c].
  void run(Fn fn, const void* ctx, int64_t n_chunks, const int64_t* wait_for, int64_t helpers) {
    std::lock_guard<std::mutex> run_lock(run_mutex_);  // one job at a time (concurrent callers queue)
    ensure_helpers(helpers);
    fn_ = fn;
    ctx_ = ctx;
    wait_for_ = wait_for;
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (gen_counter_ = (gen_counter_ + 1) & 0xFFFFFF);
    word_.store(pack(gen, 0, uint64_t(n_chunks)), std::memory_order_release);
    {
      std::lock_guard<std::mutex> lk(sleep_mutex_);
      posted_ = gen;
    }
    sleep_cv_.notify_all();
    while (work_once()) {
    }
    // Chunks claimed by helpers may still be running: wait for them (each holds at most one).
    spin_until(done_, n_chunks);
  }

 private:
  // Leaked on purpose: detached helpers outlive exit handlers. A fork() child has none of the helpers and
  // may inherit a mutex locked by a parent thread that is gone there: it starts from a fresh pool.
  static ChunkPool*& instance() {
    static ChunkPool* pool = [] {
      pthread_atfork(nullptr, nullptr, [] { instance() = new ChunkPool(); });
      return new ChunkPool();
    }();
    return pool;
  }
  static uint64_t pack(uint64_t gen, uint64_t next, uint64_t total) { return (gen << 40) | (next << 20) | total; }
  // Claims and runs one chunk; false when none is left.
  bool work_once() {
    uint64_t w = word_.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t next = (w >> 20) & 0xFFFFF, total = w & 0xFFFFF;
      if (next >= total) return false;
      if (word_.compare_exchange_weak(w, w + (uint64_t(1) << 20), std::memory_order_acq_rel)) {
        // Claimed: the caller waits for this chunk, so the job fields below are this job's.
        const int64_t need = wait_for_[next];
        spin_until(done_, need);
        fn_(ctx_, int64_t(next));
        done_.fetch_add(1, std::memory_order_acq_rel);
        return true;
      }
    }
  }
  void ensure_helpers(int64_t helpers) {
    while (int64_t(n_helpers_) < helpers) {
      std::thread([this] { helper_loop(); }).detach();
      ++n_helpers_;
    }
  }
  void helper_loop() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(sleep_mutex_);
        sleep_cv_.wait(lk, [&] { return posted_ != seen; });
        seen = posted_;
      }
      while (work_once()) {
      }
    }
  }
  std::mutex run_mutex_, sleep_mutex_;
  std::condition_variable sleep_cv_;
  std::atomic<uint64_t> word_{0};
  std::atomic<int64_t> done_{0};
  uint64_t gen_counter_ = 0, posted_ = 0;
  size_t n_helpers_ = 0;
  Fn fn_ = nullptr;
  const void* ctx_ = nullptr;
  const int64_t* wait_for_ = nullptr;
};

}  // namespace

void chunk_pool_run(ChunkFn fn, const void* ctx, int64_t n_chunks, const int64_t* wait_for, int64_t helpers) {
  ChunkPool::get().run(fn, ctx, n_chunks, wait_for, helpers);
}

std::atomic<bool> in_forked_child{false};

bool workers_are_omp() {
  static const bool omp = [] {
    const char* s = std::getenv("IOSPARSE_WORKERS");
    return !(s && std::strcmp(s, "pool") == 0);
  }();
  return omp && !in_forked_child.load(std::memory_order_relaxed);
}

namespace {
// A fork() child runs its chunks on the pool (in_forked_child, see run_chunked) and starts with a fresh,
// empty weight cache (ordered_weights.cpp): another parent thread may have held the cache's mutex, or been
// changing the list, at the fork. (The chunk pool resets itself, ChunkPool::instance.)
const int fork_hook = pthread_atfork(nullptr, nullptr, [] {
  in_forked_child.store(true);
  reset_ordered_weight_cache_in_child();
});
}  // namespace

template <typename T>
T* scratch(int slot, int64_t count) {
  struct Buf {
    std::unique_ptr<unsigned char, AlignedFree> p;
    size_t bytes = 0;
  };
  thread_local Buf bufs[5];
  Buf& b = bufs[slot];
  const size_t need = aligned_bytes<T>(count);
  if (b.bytes < need) {
    unsigned char* fresh = static_cast<unsigned char*>(std::aligned_alloc(64, need));
    TORCH_CHECK(fresh != nullptr, "iosparse: out of memory allocating ", need, " bytes");
    b.p.reset(fresh);
    b.bytes = need;
  }
  return reinterpret_cast<T*>(b.p.get());
}
template float* scratch<float>(int, int64_t);
template double* scratch<double>(int, int64_t);
template int32_t* scratch<int32_t>(int, int64_t);
template RowParams<float>* scratch<RowParams<float>>(int, int64_t);
template RowParams<double>* scratch<RowParams<double>>(int, int64_t);

bool poison_enabled() {
  const char* p = std::getenv("IOSPARSE_POISON");
  return p && p[0] == '1';
}

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  const long long r = std::strtoll(v, &end, 10);
  return (end && *end == 0 && r >= 0) ? int64_t(r) : fallback;
}

}  // namespace iosparse
