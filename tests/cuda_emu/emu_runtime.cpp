// The CPU emulator's runtime: runs a launch's blocks one after another, the threads of a block as fibers,
// and keeps the launch log and the first fault for the test (see cuda_runtime.h for the model).
//
// Why fibers rather than 512 OS threads: a block reduction passes ten barriers, and releasing 512 OS
// threads from a barrier on a 2-core machine costs milliseconds; a fiber switch costs a fraction of a
// microsecond.  And the order in which the scheduler runs the threads between two barriers is a parameter
// (forward, reverse, shuffled), so a missing __syncthreads shows as results that change with the order.
//
// On x86-64 a fiber switch is the few instructions below (callee-saved registers and the stack pointer):
// glibc's swapcontext also makes a sigprocmask system call each time, which was half of the test's time.
// Elsewhere (or with -DLAMB_EMU_UCONTEXT) ucontext does it.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "cuda_runtime.h"

uint3 threadIdx{0, 0, 0};
uint3 blockIdx{0, 0, 0};
dim3 blockDim{1, 1, 1};
dim3 gridDim{1, 1, 1};

#if defined(__x86_64__) && defined(__linux__) && !defined(LAMB_EMU_UCONTEXT)
#define LAMB_EMU_ASM_SWITCH 1
// lamb_emu_switch(save, load): push the callee-saved registers, *save = rsp, rsp = load, pop them, return
// into the other fiber.  (MXCSR and the x87 control word are callee-saved too, but nothing here changes them.)
extern "C" void lamb_emu_switch(void** save, void* load);
asm(R"(
  .text
  .globl lamb_emu_switch
  .hidden lamb_emu_switch
  .type lamb_emu_switch, @function
lamb_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size lamb_emu_switch, .-lamb_emu_switch
)");
#else
#define LAMB_EMU_ASM_SWITCH 0
#endif

namespace {

constexpr size_t kStackBytes = 256 * 1024;  // a thread's stack; the kernels need a few KiB
constexpr size_t kGuardBytes = 4096;         // an inaccessible page below each stack: overflow faults
constexpr unsigned kMaxThreads = 1024;
constexpr size_t kMaxArgBytes = 4096;

enum State { kReady, kAtBarrier, kDone, kFaulted };

struct Fiber {
#if LAMB_EMU_ASM_SWITCH
  void* sp = nullptr;  // the saved stack pointer while suspended
#else
  ucontext_t ctx;
#endif
  char* stack = nullptr;  // kStackBytes usable, above a guard page
  State state = kDone;
};

std::vector<Fiber> fibers;  // grown to the largest block seen, reused by every block
#if LAMB_EMU_ASM_SWITCH
void* scheduler_sp = nullptr;
#else
ucontext_t scheduler;
#endif
int current = -1;          // the running fiber, -1 in the scheduler
int or_pending = 0;        // __syncthreads_or: the predicates of this barrier phase
int or_result = 0;         // ... and of the phase just released
void (*job)(void*) = nullptr;
void* job_ctx = nullptr;

cudaError_t last_error = cudaSuccess;
std::string fault;  // the first fault since emu_reset()
int schedule = 0;   // 0 forward, 1 reverse, >= 2 shuffled (the seed)

struct LaunchRecord {
  std::string name;
  unsigned grid, block;
  size_t arg_bytes;
};
std::vector<LaunchRecord> launches;

void set_fault(const std::string& what) {
  if (fault.empty()) fault = what;
}

char* new_stack() {
  void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  mprotect(p, kGuardBytes, PROT_NONE);
  return static_cast<char*>(p) + kGuardBytes;
}

// From the scheduler into fiber t, until it waits at a barrier or returns.
void resume(int t) {
#if LAMB_EMU_ASM_SWITCH
  lamb_emu_switch(&scheduler_sp, fibers[t].sp);
#else
  swapcontext(&scheduler, &fibers[t].ctx);
#endif
}

// From the running fiber back to the scheduler.
void suspend(int self) {
#if LAMB_EMU_ASM_SWITCH
  lamb_emu_switch(&fibers[self].sp, scheduler_sp);
#else
  swapcontext(&fibers[self].ctx, &scheduler);
#endif
}

void fiber_main() {
  job(job_ctx);
  fibers[current].state = kDone;
#if LAMB_EMU_ASM_SWITCH
  suspend(current);  // never resumed: the next block starts the fiber afresh
  __builtin_unreachable();
#endif
  // (ucontext) returning resumes uc_link: the scheduler
}

// A fiber at the start of the kernel, on its own stack.
void start(Fiber& f) {
#if LAMB_EMU_ASM_SWITCH
  // the frame lamb_emu_switch pops: six registers, then the "return" into fiber_main, whose own return
  // address slot leaves rsp = 8 mod 16 at its entry, as after a call
  void** s = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(f.stack + kStackBytes) & ~uintptr_t{15});
  *--s = nullptr;
  *--s = reinterpret_cast<void*>(&fiber_main);
  for (int k = 0; k < 6; ++k) *--s = nullptr;
  f.sp = s;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = &scheduler;
  makecontext(&f.ctx, fiber_main, 0);
#endif
  f.state = kReady;
}

// The order in which the ready threads run until their next barrier.
void order_for_phase(std::vector<int>& order, unsigned n, unsigned block, int phase) {
  order.resize(n);
  for (unsigned t = 0; t < n; ++t) order[t] = static_cast<int>(t);
  if (schedule == 1) {
    std::reverse(order.begin(), order.end());
  } else if (schedule >= 2) {
    std::mt19937 rng(static_cast<unsigned>(schedule) * 1000003u + block * 7919u + static_cast<unsigned>(phase));
    std::shuffle(order.begin(), order.end(), rng);
  }
}

// One block: every thread to completion, barrier phase by barrier phase.  False on a fault.
bool run_block(const char* name, unsigned b, unsigned nthreads) {
  blockIdx = uint3{b, 0, 0};
  for (unsigned t = 0; t < nthreads; ++t) start(fibers[t]);
  or_pending = 0;
  std::vector<int> order;
  for (int phase = 0;; ++phase) {
    order_for_phase(order, nthreads, b, phase);
    for (int t : order) {
      if (fibers[t].state != kReady) continue;
      current = t;
      threadIdx = uint3{static_cast<unsigned>(t), 0, 0};
      resume(t);
    }
    current = -1;
    for (unsigned t = 0; t < nthreads; ++t)
      if (fibers[t].state == kFaulted) return false;  // abandoned: the block stops here
    unsigned waiting = 0;
    for (unsigned t = 0; t < nthreads; ++t) waiting += fibers[t].state == kAtBarrier;
    if (waiting == 0) return true;  // every thread returned
    if (waiting != nthreads) {
      set_fault(std::string(name) + ": block " + std::to_string(b) + ": " + std::to_string(nthreads - waiting) +
                " threads returned while " + std::to_string(waiting) + " wait at __syncthreads (barrier " +
                std::to_string(phase) + "): undefined on the GPU");
      return false;
    }
    or_result = or_pending;  // every thread has read the previous result: it reads it right after waking
    or_pending = 0;
    for (unsigned t = 0; t < nthreads; ++t) fibers[t].state = kReady;
  }
}

}  // namespace

void __syncthreads() {
  if (current < 0) {
    set_fault("__syncthreads() called outside a kernel");
    return;
  }
  const int self = current;
  fibers[self].state = kAtBarrier;
  suspend(self);
}

int __syncthreads_or(int predicate) {
  if (predicate) or_pending = 1;
  __syncthreads();
  return or_result;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

namespace lamb_emu {

void run_grid(const char* name, dim3 grid, dim3 block, size_t arg_bytes, void (*body)(void*), void* ctx) {
  launches.push_back(LaunchRecord{name, grid.x, block.x, arg_bytes});
  if (grid.x == 0 || grid.y != 1 || grid.z != 1 || block.x == 0 || block.x > kMaxThreads || block.y != 1 ||
      block.z != 1) {
    last_error = cudaErrorInvalidConfiguration;
    set_fault(std::string(name) + ": invalid launch configuration <<<" + std::to_string(grid.x) + ", " +
              std::to_string(block.x) + ">>>");
    return;
  }
  if (arg_bytes > kMaxArgBytes) {
    last_error = cudaErrorInvalidValue;
    set_fault(std::string(name) + ": " + std::to_string(arg_bytes) + " bytes of kernel arguments (at most " +
              std::to_string(kMaxArgBytes) + ")");
    return;
  }
  if (current >= 0) {
    last_error = cudaErrorLaunchFailure;
    set_fault(std::string(name) + ": launched from inside a kernel");
    return;
  }
  while (fibers.size() < block.x) {
    fibers.emplace_back();
    fibers.back().stack = new_stack();
    if (fibers.back().stack == nullptr) {
      fibers.pop_back();
      last_error = cudaErrorLaunchFailure;
      set_fault("out of memory for fiber stacks");
      return;
    }
  }
  job = body;
  job_ctx = ctx;
  gridDim = grid;
  blockDim = block;
  for (unsigned b = 0; b < grid.x; ++b) {
    if (!run_block(name, b, block.x)) {
      last_error = cudaErrorLaunchFailure;
      break;
    }
  }
  job = nullptr;
  job_ctx = nullptr;
}

}  // namespace lamb_emu

// ------------------------------------------------------------------------------------------ sanitizer hooks
// The build adds -fsanitize=alignment,bounds: g++ then checks every typed access (a 16-byte vector load from
// an address that is not 16-byte aligned, which the GPU would fault on and x86 silently allows; an index past
// a fixed-size array such as the launcher's 36-tensor and 240-block tables) and calls these handlers, which
// record a fault for the test (or stop the process, see out_of_bounds) instead of needing libubsan.  The
// data layouts are the compiler's (GCC's and Clang's ubsan ABI); only the source location is read from them.
namespace {

struct SourceLocation {
  const char* file;
  uint32_t line, column;
};
struct TypeMismatchData {
  SourceLocation loc;
  const void* type;
  unsigned char log_alignment;
  unsigned char check_kind;
};
struct OutOfBoundsData {
  SourceLocation loc;
  const void* array_type;
  const void* index_type;
};

std::string where(const SourceLocation& loc) {
  const char* slash = strrchr(loc.file, '/');
  return std::string(slash ? slash + 1 : loc.file) + ":" + std::to_string(loc.line);
}

void misaligned(const TypeMismatchData* d, uintptr_t ptr) {
  char addr[32];
  snprintf(addr, sizeof(addr), "%#lx", static_cast<unsigned long>(ptr));
  set_fault(where(d->loc) + ": access at " + addr + " not aligned to " + std::to_string(1u << d->log_alignment) +
            " bytes (block " + std::to_string(blockIdx.x) + ", thread " + std::to_string(threadIdx.x) + ")");
}

// The access has not happened yet and must not: in a kernel thread the fiber is abandoned (the block
// stops, the launch fails); on the host (a write past the launcher's tables, say) there is no safe way on,
// so the process stops, saying where on stderr (run pytest with -s to see it).
[[noreturn]] void out_of_bounds(const OutOfBoundsData* d, uintptr_t index) {
  const std::string what = where(d->loc) + ": index " + std::to_string(static_cast<long long>(index)) +
                           " out of the array's bounds";
  if (current >= 0) {
    set_fault(what + " (block " + std::to_string(blockIdx.x) + ", thread " + std::to_string(current) + ")");
    fibers[current].state = kFaulted;
    suspend(current);  // never resumed
  }
  fprintf(stderr, "lamb CUDA emulator: %s\n", what.c_str());
  fflush(stderr);
  abort();
}

}  // namespace

extern "C" {
void __ubsan_handle_type_mismatch_v1(TypeMismatchData* d, uintptr_t ptr) { misaligned(d, ptr); }
void __ubsan_handle_type_mismatch_v1_abort(TypeMismatchData* d, uintptr_t ptr) { misaligned(d, ptr); }
void __ubsan_handle_out_of_bounds(OutOfBoundsData* d, uintptr_t index) { out_of_bounds(d, index); }
void __ubsan_handle_out_of_bounds_abort(OutOfBoundsData* d, uintptr_t index) { out_of_bounds(d, index); }
}  // extern "C"

// ------------------------------------------------------------------------------------------ C API (ctypes)
extern "C" {

// 0: threads in index order between barriers; 1: reverse; >= 2: a shuffled order per phase (the seed).
void emu_set_schedule(int mode) { schedule = mode; }

const char* emu_fault() { return fault.c_str(); }

void emu_reset() {
  fault.clear();
  launches.clear();
  last_error = cudaSuccess;
}

int emu_launch_count() { return static_cast<int>(launches.size()); }

// Launch i of the log: its kernel's name; grid and block sizes and argument bytes in out[0..2].
const char* emu_launch_info(int i, long long* out) {
  const LaunchRecord& r = launches.at(static_cast<size_t>(i));
  out[0] = r.grid;
  out[1] = r.block;
  out[2] = static_cast<long long>(r.arg_bytes);
  return r.name.c_str();
}

}  // extern "C"
