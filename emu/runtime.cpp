// runtime.cpp — the execution model of the emulated CUDA device (see emu/device.h for what each
// CUDA construct becomes, docs/gpu.md for what this can and cannot tell).
//
//   launch   the argument count and sizes are checked against the kernel's parameters, the
//            grid, block and dynamic shared memory against CUDA's limits; then the blocks are
//            handed out one at a time to a pool of OS threads (VQX_EMU_THREADS, default: the
//            CPU count). Under TSan the blocks an OS thread runs one after another are
//            ordered (the end of one happens before the start of the next), so that their
//            reuse of its thread_local shared memory is not a race; blocks on different OS
//            threads, and the threads of one block between barriers, stay unordered.
//   block    runs on one OS thread: each CUDA thread is a fiber with its own mmap'd stack
//            (VQX_EMU_STACK_KIB, default 64) and a no-access guard page below it, resumed in
//            thread order until it reaches a barrier, a warp collective or its end.
//   barrier  the last thread to arrive releases the others. Threads at different
//            __syncthreads lines, a thread that exits while others wait, a lane missing from a
//            shuffle or in a different one, a lane outside the mask, and a block in which no
//            thread can run (a deadlock) end the launch with an error naming the kernel, the
//            block, the thread and the source lines, instead of hanging. A thread that never
//            reaches one (an endless loop) is reported by a watchdog, which aborts the process.
//
// The context switch is 20 lines of x86-64 assembly (glibc's swapcontext makes a system call
// per switch and was ~2x slower overall); other architectures use ucontext.
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "device.h"

#if defined(__SANITIZE_ADDRESS__) || defined(VQX_EMU_ASAN)
#define EMU_ASAN 1
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old,
                                     size_t* size_old);
void __asan_poison_memory_region(void const volatile* addr, size_t size);
void __asan_unpoison_memory_region(void const volatile* addr, size_t size);
}
#else
#define EMU_ASAN 0
#endif

// The runtime itself is compiled without -fsanitize=thread (its bookkeeping would be reported as
// races between fibers); build.rs defines VQX_EMU_TSAN and it calls TSan's fiber API instead.
#if defined(VQX_EMU_TSAN)
#define EMU_TSAN 1
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
// Switching fibers must not itself order their memory accesses: only barriers do.
static const unsigned TSAN_NO_SYNC = 1;
#else
#define EMU_TSAN 0
#endif

#if defined(__x86_64__)
#define EMU_ASM_SWITCH 1
// vqx_emu_switch(void** save_sp, void* next_sp): saves the callee-saved registers, MXCSR and the
// x87 control word on the current stack, stores the stack pointer in *save_sp, and resumes the
// context whose stack pointer is next_sp.
asm(R"(
    .text
    .p2align 4
    .globl vqx_emu_switch
    .hidden vqx_emu_switch
    .type vqx_emu_switch,@function
vqx_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size vqx_emu_switch,.-vqx_emu_switch
    .section .note.GNU-stack,"",@progbits
    .text
)");
extern "C" void vqx_emu_switch(void** save_sp, void* next_sp);
#else
#define EMU_ASM_SWITCH 0
#include <ucontext.h>
#endif

thread_local const vqx_emu::ThreadCtx* vqx_emu_ctx = nullptr;

namespace {

// Bumped whenever a scheduler resumes a fiber, that is after every barrier or collective
// arrival and every thread exit: a launch whose counter stops moving has a thread looping
// without end (fibers are not preempted), and the watchdog turns that hang into a message and
// an abort.
std::atomic<uint64_t> g_progress{0};
// What the running block is doing, for the watchdog's message (one launch at a time).
std::atomic<const char*> g_kernel{nullptr};
std::atomic<uint64_t> g_where{0};  // block linear index << 16 | thread linear index

inline void progress(uint64_t block, int thread) {
    g_progress.fetch_add(1, std::memory_order_relaxed);
    g_where.store(block << 16 | (uint64_t)(unsigned)thread, std::memory_order_relaxed);
}

using vqx_emu::Collective;
using vqx_emu::COLLECTIVE_IN;
using vqx_emu::COLLECTIVE_OUT;

struct Site {
    const char* file = nullptr;
    int line = 0;
    bool operator==(const Site& o) const {
        return line == o.line && (file == o.file || (file && o.file && !strcmp(file, o.file)));
    }
};

const char* base_name(const char* path) {
    if (!path) return "?";
    const char* s = strrchr(path, '/');
    return s ? s + 1 : path;
}

std::string site_str(Site s) { return std::string(base_name(s.file)) + ":" + std::to_string(s.line); }

std::string format(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

const char* collective_name(int op) {
    switch (op) {
        case vqx_emu::SHFL_IDX: return "__shfl_sync";
        case vqx_emu::SHFL_XOR: return "__shfl_xor_sync";
        case vqx_emu::SHFL_UP: return "__shfl_up_sync";
        case vqx_emu::SHFL_DOWN: return "__shfl_down_sync";
        case vqx_emu::SYNCWARP: return "__syncwarp";
        case vqx_emu::BALLOT: return "__ballot_sync";
        case vqx_emu::MMA_M16N8K8_TF32: return "mma.sync m16n8k8 tf32";
        case vqx_emu::MMA_M16N8K16_BF16: return "mma.sync m16n8k16 bf16";
    }
    return "warp collective";
}

enum class State : uint8_t { Runnable, AtBarrier, AtWarp, Done };

size_t page_size() {
    static const size_t p = (size_t)sysconf(_SC_PAGESIZE);
    return p;
}

size_t stack_bytes() {
    static const size_t s = [] {
        size_t kib = EMU_ASAN || EMU_TSAN ? 256 : 64;
        if (const char* e = getenv("VQX_EMU_STACK_KIB")) {
            long v = strtol(e, nullptr, 10);
            if (v >= 8) kib = (size_t)v;
        }
        size_t b = kib * 1024;
        return (b + page_size() - 1) / page_size() * page_size();
    }();
    return s;
}

struct Fiber {
    void* sp = nullptr;
    char* map = nullptr;  // guard page + stack
    size_t map_len = 0;
    char* stack_lo = nullptr;
    size_t stack_len = 0;
    vqx_emu::ThreadCtx ctx{};
    int linear = 0;
    State state = State::Done;
    Site site;
    uint32_t in[COLLECTIVE_IN] = {};
    uint32_t out[COLLECTIVE_OUT] = {};
#if EMU_ASAN
    void* fake_stack = nullptr;
#endif
#if EMU_TSAN
    void* tsan = nullptr;
#endif
#if !EMU_ASM_SWITCH
    ucontext_t uc;
#endif

    bool allocate() {
        map_len = stack_bytes() + page_size();
        void* m = mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) return false;
        map = (char*)m;
        // The guard page below the stack turns an overflow into a clean SIGSEGV.
        mprotect(map, page_size(), PROT_NONE);
        stack_lo = map + page_size();
        stack_len = stack_bytes();
#if EMU_TSAN
        tsan = __tsan_create_fiber(0);
#endif
        return true;
    }
    void release() {
        if (map) munmap(map, map_len);
        map = nullptr;
#if EMU_TSAN
        if (tsan) __tsan_destroy_fiber(tsan);
        tsan = nullptr;
#endif
    }
};

struct WarpState {
    uint32_t arrived = 0;
    uint32_t mask = 0;
    int op = -1;
    Site site;
    // TSan: lanes release at arrival and acquire on leaving, on the address of this
    // collective's parity, so that a lane that already went on to the next collective (and
    // released there) is not ordered before lanes still leaving this one.
    uint32_t phase = 0;
    char tsan_sync[2];
};

void fiber_main();

// One OS thread's emulation state: the fibers of the block it runs (stacks kept between blocks).
struct Worker {
    std::vector<std::unique_ptr<Fiber>> fibers;
    void* sched_sp = nullptr;
#if EMU_ASAN
    void* sched_fake = nullptr;
    const void* sched_bottom = nullptr;
    size_t sched_size = 0;
#endif
#if EMU_TSAN
    void* sched_tsan = nullptr;
    // Released by the OS thread when a block starts (after it joined the previous block's
    // fibers), acquired by each fiber when it starts.
    char block_sync;
#endif
#if !EMU_ASM_SWITCH
    ucontext_t sched_uc;
#endif
    // The block being run.
    const vqx_emu_kernel* kernel = nullptr;
    void** params = nullptr;
    int n = 0;
    int live = 0;
    int at_barrier = 0;
    Site barrier_site;
    // TSan: as WarpState::tsan_sync, one address per barrier parity.
    uint32_t barrier_phase = 0;
    char barrier_sync[2];
    std::vector<WarpState> warps;
    Fiber* current = nullptr;
    uint64_t block_linear = 0;
    bool failed = false;
    std::string error;

    ~Worker() {
        for (auto& f : fibers) f->release();
    }

    std::string who(const Fiber& f) const {
        const auto& c = f.ctx;
        return format("%s, block (%u,%u,%u), thread (%u,%u,%u)", kernel->name, c.block_idx.x,
                      c.block_idx.y, c.block_idx.z, c.thread_idx.x, c.thread_idx.y,
                      c.thread_idx.z);
    }

    // Switches from the scheduler into fiber f until it yields.
    void resume(Fiber& f) {
        progress(block_linear, f.linear);
        current = &f;
        vqx_emu_ctx = &f.ctx;
#if EMU_ASAN
        __sanitizer_start_switch_fiber(&sched_fake, f.stack_lo, f.stack_len);
#endif
#if EMU_TSAN
        __tsan_switch_to_fiber(f.tsan, TSAN_NO_SYNC);
#endif
#if EMU_ASM_SWITCH
        vqx_emu_switch(&sched_sp, f.sp);
#else
        swapcontext(&sched_uc, &f.uc);
#endif
#if EMU_ASAN
        __sanitizer_finish_switch_fiber(sched_fake, nullptr, nullptr);
#endif
        current = nullptr;
        vqx_emu_ctx = nullptr;
    }

    // From inside fiber f: back to the scheduler. `final` when f will never run again.
    void yield(Fiber& f, bool final) {
#if EMU_ASAN
        __sanitizer_start_switch_fiber(final ? nullptr : &f.fake_stack, sched_bottom, sched_size);
#else
        (void)final;
#endif
#if EMU_TSAN
        // Everything f did so far happens before the end of the block (join_fibers); nothing
        // else acquires this address, so fibers stay unordered among themselves.
        __tsan_release(&f);
        __tsan_switch_to_fiber(sched_tsan, TSAN_NO_SYNC);
#endif
#if EMU_ASM_SWITCH
        vqx_emu_switch(&f.sp, sched_sp);
#else
        swapcontext(&f.uc, &sched_uc);
#endif
#if EMU_ASAN
        __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
    }

    // Ends the block with an error about thread `f`; called from inside the running fiber,
    // never returns.
    [[noreturn]] void fail(const Fiber& f, const std::string& msg) {
        if (!failed) {
            failed = true;
            error = who(f) + ": " + msg;
        }
        yield(*current, true);
        abort();  // a failed block is never resumed
    }

    void prepare(Fiber& f) {
#if EMU_ASAN
        // A fiber abandoned by a failed block may have left its frames poisoned.
        __asan_unpoison_memory_region(f.stack_lo, f.stack_len);
        f.fake_stack = nullptr;
#endif
#if EMU_ASM_SWITCH
        // A frame vqx_emu_switch can return into: MXCSR/x87 control word, six callee-saved
        // registers, fiber_main as the return address, and a zero "return address" for
        // fiber_main so that it starts with the stack aligned as after a call.
        uintptr_t top = ((uintptr_t)(f.stack_lo + f.stack_len)) & ~(uintptr_t)15;
        uint64_t* s = (uint64_t*)top;
        *--s = 0;
        *--s = (uint64_t)(uintptr_t)&fiber_main;
        for (int i = 0; i < 6; ++i) *--s = 0;
        uint32_t mxcsr;
        uint16_t fpucw;
        asm volatile("stmxcsr %0" : "=m"(mxcsr));
        asm volatile("fnstcw %0" : "=m"(fpucw));
        *--s = (uint64_t)mxcsr | ((uint64_t)fpucw << 32);
        f.sp = s;
#else
        getcontext(&f.uc);
        f.uc.uc_stack.ss_sp = f.stack_lo;
        f.uc.uc_stack.ss_size = f.stack_len;
        f.uc.uc_link = nullptr;
        makecontext(&f.uc, &fiber_main, 0);
#endif
    }

    bool ensure_fibers(int count, std::string& err) {
        while ((int)fibers.size() < count) {
            auto f = std::make_unique<Fiber>();
            if (!f->allocate()) {
                err = format("cannot map a %zu-byte fiber stack: %s", stack_bytes(), strerror(errno));
                return false;
            }
            fibers.push_back(std::move(f));
        }
        return true;
    }

    std::string deadlock() const {
        std::string s = "deadlock: no thread of the block can run (";
        int barrier = 0, done = 0;
        for (int i = 0; i < n; ++i) {
            const Fiber& f = *fibers[i];
            if (f.state == State::AtBarrier) ++barrier;
            if (f.state == State::Done) ++done;
        }
        if (barrier) s += format("%d wait at __syncthreads %s; ", barrier, site_str(barrier_site).c_str());
        for (size_t w = 0; w < warps.size(); ++w) {
            const WarpState& ws = warps[w];
            if (!ws.arrived) continue;
            s += format("lanes 0x%08x of warp %zu wait at %s %s for mask 0x%08x; ", ws.arrived, w,
                        collective_name(ws.op), site_str(ws.site).c_str(), ws.mask);
        }
        s += format("%d exited)", done);
        return s;
    }

    // Runs one block to completion; false (with `error` set) when it failed.
    bool run_block(const vqx_emu_kernel* k, void** p, const unsigned grid[3],
                   const unsigned block[3], uint3 bidx, size_t dyn_bytes) {
        const bool ok = run_fibers(k, p, grid, block, bidx, dyn_bytes);
        join_fibers();
        return ok;
    }

    // The block's end as a join of its threads: with TSan the OS thread acquires what each
    // fiber released when it last yielded, so that whatever follows the launch on the host
    // (freeing device buffers, the Fiber objects themselves) is ordered after the kernel's
    // accesses, as a kernel's completion is on a GPU.
    void join_fibers() {
#if EMU_TSAN
        for (int i = 0; i < n && i < (int)fibers.size(); ++i) __tsan_acquire(fibers[i].get());
#endif
    }

    bool run_fibers(const vqx_emu_kernel* k, void** p, const unsigned grid[3],
                    const unsigned block[3], uint3 bidx, size_t dyn_bytes) {
        kernel = k;
        params = p;
        n = (int)(block[0] * block[1] * block[2]);
        block_linear = bidx.x + (uint64_t)grid[0] * (bidx.y + (uint64_t)grid[1] * bidx.z);
        if (!ensure_fibers(n, error)) {
            error = std::string(k->name) + ": " + error;
            return false;
        }
        if (k->dyn_shared) {
            char* smem = (char*)k->dyn_shared();
#if EMU_ASAN
            __asan_unpoison_memory_region(smem, VQX_EMU_DYN_SHARED_CAPACITY);
#endif
            // CUDA does not initialise shared memory: a pattern (NaN floats, huge integers)
            // makes a read of an unwritten bin visible instead of a lucky zero.
            memset(smem, 0xff, dyn_bytes);
#if EMU_ASAN
            // Past the bytes the launch asked for is not this block's memory.
            __asan_poison_memory_region(smem + dyn_bytes, VQX_EMU_DYN_SHARED_CAPACITY - dyn_bytes);
#endif
        }
        for (int i = 0; i < n; ++i) {
            Fiber& f = *fibers[i];
            f.linear = i;
            f.ctx.thread_idx = {(unsigned)i % block[0], ((unsigned)i / block[0]) % block[1],
                                (unsigned)i / (block[0] * block[1])};
            f.ctx.block_idx = bidx;
            f.ctx.block_dim = {block[0], block[1], block[2]};
            f.ctx.grid_dim = {grid[0], grid[1], grid[2]};
#if EMU_TSAN
            // A fiber abandoned inside a failed block is still inside the kernel for TSan
            // (its shadow call stack never unwound): a fresh TSan fiber instead.
            if (f.state != State::Done && f.tsan) {
                __tsan_destroy_fiber(f.tsan);
                f.tsan = __tsan_create_fiber(0);
            }
#endif
            f.state = State::Runnable;
            prepare(f);
        }
        live = n;
        at_barrier = 0;
        warps.assign((size_t)(n + 31) / 32, WarpState{});
        failed = false;
#if EMU_TSAN
        if (!sched_tsan) sched_tsan = __tsan_get_current_fiber();
        __tsan_release(&block_sync);
#endif
        while (live > 0) {
            bool progress = false;
            for (int i = 0; i < n; ++i) {
                if (fibers[i]->state != State::Runnable) continue;
                progress = true;
                resume(*fibers[i]);
                if (failed) return false;
            }
            if (!progress && live > 0) {
                error = format("%s, block (%u,%u,%u): ", k->name, bidx.x, bidx.y, bidx.z) + deadlock();
                failed = true;
                return false;
            }
        }
        return true;
    }
};

thread_local std::unique_ptr<Worker> tl_worker;

Worker& worker() {
    if (!tl_worker) tl_worker = std::make_unique<Worker>();
    return *tl_worker;
}

void fiber_main() {
    Worker& w = worker();
    Fiber& f = *w.current;
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &w.sched_bottom, &w.sched_size);
#endif
#if EMU_TSAN
    // The previous blocks of this OS thread, and the launch, happen before this thread starts.
    __tsan_acquire(&w.block_sync);
#endif
    w.kernel->invoke(w.params);
    f.state = State::Done;
    --w.live;
    if (w.at_barrier > 0) {
        w.fail(f, format("exited while %d thread(s) wait at __syncthreads %s", w.at_barrier,
                         site_str(w.barrier_site).c_str()));
    }
    const int lane = f.linear & 31;
    const WarpState& ws = w.warps[(size_t)f.linear / 32];
    if (ws.arrived && (ws.mask >> lane & 1u)) {
        w.fail(f, format("exited while lanes 0x%08x of its warp wait for it at %s %s (mask 0x%08x)",
                         ws.arrived, collective_name(ws.op), site_str(ws.site).c_str(), ws.mask));
    }
    w.yield(f, true);
    abort();  // a finished fiber is never resumed
}

// Lanes of warp `warp` that exist in a block of n threads.
uint32_t existing_lanes(int n, int warp) {
    const int here = n - warp * 32;
    return here >= 32 ? 0xffffffffu : ((1u << here) - 1u);
}

// The source lane a shuffle lane reads, or -1 when it keeps its own value.
int shuffle_source(int op, int lane, int arg, int width) {
    const int seg = lane & ~(width - 1);
    int src = lane;
    switch (op) {
        case vqx_emu::SHFL_IDX: src = seg + (arg & (width - 1)); break;
        case vqx_emu::SHFL_XOR: src = lane ^ arg; if ((src & ~(width - 1)) != seg || src > 31 || src < 0) src = lane; break;
        case vqx_emu::SHFL_UP: src = lane - arg; if (src < seg) src = lane; break;
        case vqx_emu::SHFL_DOWN: src = lane + arg; if (src >= seg + width) src = lane; break;
    }
    return src;
}

float word_f(uint32_t w) { float f; memcpy(&f, &w, 4); return f; }
uint32_t f_word(float f) { uint32_t w; memcpy(&w, &f, 4); return w; }
float bf16_lo(uint32_t w) { return word_f(w << 16); }
float bf16_hi(uint32_t w) { return word_f(w & 0xffff0000u); }

// D = A·B + C for one m16n8 tile, from every lane's fragment registers (PTX ISA, "Matrix
// fragments for mma.m16n8k8 / mma.m16n8k16"; g = lane / 4, t = lane % 4). The tensor cores'
// accumulation order and rounding are not specified bit for bit; this sums in increasing k in
// f32, each product rounded to f32 (exact for tf32 and bf16 operands), as nearest::emulate does.
void mma(int op, Fiber* const* lanes) {
    const bool bf16 = op == vqx_emu::MMA_M16N8K16_BF16;
    const int K = bf16 ? 16 : 8;
    float A[16][16], B[16][8], C[16][8];
    for (int lane = 0; lane < 32; ++lane) {
        const uint32_t* r = lanes[lane]->in;
        const int g = lane >> 2, t = lane & 3;
        if (bf16) {
            // a0 (g, 2t|2t+1), a1 (g+8, 2t|2t+1), a2 (g, 2t+8|2t+9), a3 (g+8, 2t+8|2t+9).
            const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
            for (int i = 0; i < 4; ++i) {
                A[rows[i]][cols[i]] = bf16_lo(r[i]);
                A[rows[i]][cols[i] + 1] = bf16_hi(r[i]);
            }
            // b0 (k = 2t|2t+1, n = g), b1 (k = 2t+8|2t+9, n = g).
            B[2 * t][g] = bf16_lo(r[4]);
            B[2 * t + 1][g] = bf16_hi(r[4]);
            B[2 * t + 8][g] = bf16_lo(r[5]);
            B[2 * t + 9][g] = bf16_hi(r[5]);
        } else {
            // a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4); b0 (k = t, n = g), b1 (k = t+4).
            A[g][t] = word_f(r[0]);
            A[g + 8][t] = word_f(r[1]);
            A[g][t + 4] = word_f(r[2]);
            A[g + 8][t + 4] = word_f(r[3]);
            B[t][g] = word_f(r[4]);
            B[t + 4][g] = word_f(r[5]);
        }
        // c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1).
        C[g][2 * t] = word_f(r[6]);
        C[g][2 * t + 1] = word_f(r[7]);
        C[g + 8][2 * t] = word_f(r[8]);
        C[g + 8][2 * t + 1] = word_f(r[9]);
    }
    float D[16][8];
    for (int m = 0; m < 16; ++m)
        for (int nn = 0; nn < 8; ++nn) {
            float acc = C[m][nn];
            for (int k = 0; k < K; ++k) {
                const float p = A[m][k] * B[k][nn];
                acc = acc + p;
            }
            D[m][nn] = acc;
        }
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane >> 2, t = lane & 3;
        uint32_t* o = lanes[lane]->out;
        o[0] = f_word(D[g][2 * t]);
        o[1] = f_word(D[g][2 * t + 1]);
        o[2] = f_word(D[g + 8][2 * t]);
        o[3] = f_word(D[g + 8][2 * t + 1]);
    }
}

}  // namespace

namespace vqx_emu {

void syncthreads(const char* file, int line) {
    Worker& w = worker();
    Fiber& f = *w.current;
    const Site site{file, line};
    if (w.live < w.n) {
        for (int i = 0; i < w.n; ++i) {
            if (w.fibers[i]->state == State::Done) {
                w.fail(f, format("reached __syncthreads %s after thread %d of the block exited "
                                 "(a barrier every thread must reach)",
                                 site_str(site).c_str(), i));
            }
        }
    }
    if (w.at_barrier > 0 && !(w.barrier_site == site)) {
        w.fail(f, format("threads at different barriers: this thread at __syncthreads %s, %d "
                         "other(s) at __syncthreads %s",
                         site_str(site).c_str(), w.at_barrier, site_str(w.barrier_site).c_str()));
    }
    w.barrier_site = site;
    f.state = State::AtBarrier;
    f.site = site;
#if EMU_TSAN
    char* const sync = &w.barrier_sync[w.barrier_phase & 1];
    __tsan_release(sync);
#endif
    if (++w.at_barrier == w.live) {
        for (int i = 0; i < w.n; ++i) {
            if (w.fibers[i]->state == State::AtBarrier) w.fibers[i]->state = State::Runnable;
        }
        w.at_barrier = 0;
        ++w.barrier_phase;
    } else {
        w.yield(f, false);
    }
#if EMU_TSAN
    __tsan_acquire(sync);
#endif
}

void warp_collective(Collective op, unsigned mask, const char* file, int line,
                     const uint32_t (&in)[COLLECTIVE_IN], uint32_t (&out)[COLLECTIVE_OUT]) {
    Worker& w = worker();
    Fiber& f = *w.current;
    const Site site{file, line};
    const int lane = f.linear & 31, warp = f.linear >> 5;
    const uint32_t lanes_here = existing_lanes(w.n, warp);
    if (!(mask >> lane & 1u)) {
        w.fail(f, format("lane %d calls %s %s with mask 0x%08x, which leaves it out", lane,
                         collective_name(op), site_str(site).c_str(), mask));
    }
    if (mask & ~lanes_here) {
        w.fail(f, format("%s %s names lanes 0x%08x that do not exist in this warp (lanes 0x%08x)",
                         collective_name(op), site_str(site).c_str(), mask & ~lanes_here,
                         lanes_here));
    }
    if ((op == MMA_M16N8K8_TF32 || op == MMA_M16N8K16_BF16) && mask != 0xffffffffu) {
        w.fail(f, format("%s %s needs all 32 lanes", collective_name(op), site_str(site).c_str()));
    }
    WarpState& ws = w.warps[(size_t)warp];
    if (ws.arrived == 0) {
        ws.op = op;
        ws.mask = mask;
        ws.site = site;
    } else if (ws.op != op || ws.mask != mask || !(ws.site == site)) {
        w.fail(f, format("lane %d reached %s %s (mask 0x%08x) while lanes 0x%08x of its warp wait "
                         "at %s %s (mask 0x%08x)",
                         lane, collective_name(op), site_str(site).c_str(), mask, ws.arrived,
                         collective_name(ws.op), site_str(ws.site).c_str(), ws.mask));
    }
    for (int l = 0; l < 32; ++l) {
        if (!(mask >> l & 1u)) continue;
        const Fiber& o = *w.fibers[(size_t)(warp * 32 + l)];
        if (o.state == State::Done) {
            w.fail(f, format("%s %s waits for lane %d, which has exited", collective_name(op),
                             site_str(site).c_str(), l));
        }
        if (o.state == State::AtBarrier) {
            w.fail(f, format("%s %s waits for lane %d, which waits at __syncthreads %s",
                             collective_name(op), site_str(site).c_str(), l,
                             site_str(o.site).c_str()));
        }
    }
    memcpy(f.in, in, sizeof f.in);
    f.state = State::AtWarp;
    f.site = site;
    ws.arrived |= 1u << lane;
#if EMU_TSAN
    char* const sync = &ws.tsan_sync[ws.phase & 1];
    __tsan_release(sync);
#endif
    if (ws.arrived == mask) {
        Fiber* lanes[32] = {};
        for (int l = 0; l < 32; ++l) {
            if (mask >> l & 1u) lanes[l] = w.fibers[(size_t)(warp * 32 + l)].get();
        }
        switch (op) {
            case SHFL_IDX:
            case SHFL_XOR:
            case SHFL_UP:
            case SHFL_DOWN:
                for (int l = 0; l < 32; ++l) {
                    if (!lanes[l]) continue;
                    const int width = (int)lanes[l]->in[3];
                    if (width < 1 || width > 32 || (width & (width - 1))) {
                        w.fail(*lanes[l], format("%s %s: width %d is not a power of two in 1..32",
                                                 collective_name(op), site_str(site).c_str(), width));
                    }
                    const int src = shuffle_source(op, l, (int)lanes[l]->in[2], width);
                    if (!(mask >> src & 1u)) {
                        w.fail(*lanes[l], format("%s %s: lane %d reads lane %d, which is not in the "
                                                 "mask 0x%08x", collective_name(op),
                                                 site_str(site).c_str(), l, src, mask));
                    }
                    lanes[l]->out[0] = lanes[src]->in[0];
                    lanes[l]->out[1] = lanes[src]->in[1];
                }
                break;
            case SYNCWARP:
                break;
            case BALLOT: {
                uint32_t bits = 0;
                for (int l = 0; l < 32; ++l)
                    if (lanes[l] && lanes[l]->in[0]) bits |= 1u << l;
                for (int l = 0; l < 32; ++l)
                    if (lanes[l]) lanes[l]->out[0] = bits;
                break;
            }
            case MMA_M16N8K8_TF32:
            case MMA_M16N8K16_BF16:
                mma(op, lanes);
                break;
        }
        for (int l = 0; l < 32; ++l)
            if (lanes[l]) lanes[l]->state = State::Runnable;
        ws.arrived = 0;
        ws.op = -1;
        ++ws.phase;
    } else {
        w.yield(f, false);
    }
#if EMU_TSAN
    __tsan_acquire(sync);
#endif
    memcpy(out, f.out, sizeof f.out);
}

}  // namespace vqx_emu

namespace {

unsigned pool_threads() {
    static const unsigned n = [] {
        if (const char* e = getenv("VQX_EMU_THREADS")) {
            long v = strtol(e, nullptr, 10);
            if (v >= 1 && v <= 1024) return (unsigned)v;
        }
        unsigned h = std::thread::hardware_concurrency();
        return h ? h : 1u;
    }();
    return n;
}

// One launch: blocks handed out by an atomic counter, the first error kept.
struct Job {
    const vqx_emu_kernel* kernel;
    void** params;
    unsigned grid[3];
    unsigned block[3];
    size_t dyn_bytes;
    uint64_t blocks;
    std::atomic<uint64_t> next{0};
    std::atomic<bool> failed{false};
    std::mutex err_mu;
    std::string error;

    void work() {
        Worker& w = worker();
        for (;;) {
            if (failed.load(std::memory_order_relaxed)) return;
            const uint64_t b = next.fetch_add(1);
            if (b >= blocks) return;
            const uint3 bidx = {(unsigned)(b % grid[0]), (unsigned)((b / grid[0]) % grid[1]),
                                (unsigned)(b / ((uint64_t)grid[0] * grid[1]))};
            if (!w.run_block(kernel, params, grid, block, bidx, dyn_bytes)) {
                std::lock_guard<std::mutex> g(err_mu);
                if (!failed.exchange(true)) error = w.error;
                return;
            }
        }
    }
};

// Persistent OS threads (leaked on purpose: they may still wait on the condition variable when
// the process exits, so nothing of theirs may be destroyed by static destructors).
struct Pool {
    std::mutex mu;
    std::condition_variable cv;
    std::condition_variable done_cv;
    Job* job = nullptr;
    uint64_t generation = 0;
    unsigned busy = 0;
    unsigned size = 0;

    explicit Pool(unsigned n) : size(n) {
        for (unsigned i = 0; i < n; ++i) std::thread([this] { loop(); }).detach();
    }
    void loop() {
        uint64_t seen = 0;
        for (;;) {
            Job* j;
            {
                std::unique_lock<std::mutex> g(mu);
                cv.wait(g, [&] { return generation != seen; });
                seen = generation;
                j = job;
            }
            j->work();
            std::lock_guard<std::mutex> g(mu);
            if (--busy == 0) done_cv.notify_all();
        }
    }
    void run(Job& j) {
        std::unique_lock<std::mutex> g(mu);
        job = &j;
        busy = size;
        ++generation;
        cv.notify_all();
        done_cv.wait(g, [&] { return busy == 0; });
        job = nullptr;
    }
};

uint64_t stall_seconds() {
    static const uint64_t s = [] {
        if (const char* e = getenv("VQX_EMU_STALL_S")) {
            long v = strtol(e, nullptr, 10);
            if (v >= 1) return (uint64_t)v;
        }
        return (uint64_t)120;
    }();
    return s;
}

// One thread for the process: while a launch runs, aborts it with a message when no thread of
// it has reached a barrier, a collective or its end for VQX_EMU_STALL_S seconds (default 120;
// a correct kernel's threads reach one every few milliseconds on the emulator).
void start_watchdog() {
    static std::once_flag once;
    std::call_once(once, [] {
        std::thread([] {
            uint64_t last = g_progress.load();
            uint64_t still = 0;
            for (;;) {
                std::this_thread::sleep_for(std::chrono::seconds(1));
                const char* k = g_kernel.load();
                const uint64_t now = g_progress.load();
                if (!k || now != last) {
                    last = now;
                    still = 0;
                    continue;
                }
                if (++still >= stall_seconds()) {
                    const uint64_t w = g_where.load();
                    fprintf(stderr,
                            "vqx cuda-emu: kernel %s made no progress for %llu s: thread %llu of "
                            "block %llu (linear indices) runs without reaching a barrier, a warp "
                            "collective or its end — an endless loop (e.g. a grid-stride loop "
                            "whose stride is 0) or a spin-wait on another thread, which fibers "
                            "cannot preempt. Aborting (VQX_EMU_STALL_S sets the limit).\n",
                            k, (unsigned long long)still, (unsigned long long)(w & 0xffff),
                            (unsigned long long)(w >> 16));
                    fflush(stderr);
                    abort();
                }
            }
        }).detach();
    });
}

// Constant-initialised (std::mutex's constructor is constexpr, its destructor trivial): no
// guard variable whose uninstrumented fast path would hide the initialisation from TSan.
std::mutex& launch_mutex() {
    static std::mutex m;
    return m;
}

void run_job(Job& j) {
    static Pool* pool = new Pool(pool_threads());
    pool->run(j);
}

void put(char* err, size_t len, const std::string& s) {
    if (!err || !len) return;
    snprintf(err, len, "%s", s.c_str());
}

}  // namespace

extern "C" int vqx_emu_launch(const vqx_emu_kernel* k, const unsigned grid[3],
                              const unsigned block[3], size_t dyn_bytes, void** params,
                              size_t n_params, const size_t* sizes, char* err, size_t err_len) {
    if (n_params != k->arity) {
        put(err, err_len, format("%s: launched with %zu arguments, the kernel takes %zu", k->name,
                                 n_params, k->arity));
        return 1;
    }
    for (size_t i = 0; i < n_params; ++i) {
        if (sizes[i] != k->param_sizes[i]) {
            put(err, err_len, format("%s: argument %zu is %zu bytes, parameter %zu of the kernel is "
                                     "%zu bytes",
                                     k->name, i, sizes[i], i, k->param_sizes[i]));
            return 1;
        }
        if (!params[i]) {
            put(err, err_len, format("%s: argument %zu is a null pointer to its value", k->name, i));
            return 1;
        }
    }
    const uint64_t threads = (uint64_t)block[0] * block[1] * block[2];
    if (!grid[0] || !grid[1] || !grid[2] || !block[0] || !block[1] || !block[2]) {
        put(err, err_len, format("%s: grid (%u,%u,%u) or block (%u,%u,%u) has a zero dimension",
                                 k->name, grid[0], grid[1], grid[2], block[0], block[1], block[2]));
        return 1;
    }
    if (threads > 1024 || block[0] > 1024 || block[1] > 1024 || block[2] > 64) {
        put(err, err_len, format("%s: block (%u,%u,%u) exceeds CUDA's limits (1024 threads; "
                                 "x, y ≤ 1024, z ≤ 64)",
                                 k->name, block[0], block[1], block[2]));
        return 1;
    }
    if (grid[0] > 0x7fffffffu || grid[1] > 65535 || grid[2] > 65535) {
        put(err, err_len, format("%s: grid (%u,%u,%u) exceeds CUDA's limits (x < 2^31, y, z ≤ "
                                 "65535)",
                                 k->name, grid[0], grid[1], grid[2]));
        return 1;
    }
    if (dyn_bytes > VQX_EMU_DYN_SHARED_LIMIT) {
        put(err, err_len, format("%s: %zu bytes of dynamic shared memory exceed the %u-byte "
                                 "default limit",
                                 k->name, dyn_bytes, VQX_EMU_DYN_SHARED_LIMIT));
        return 1;
    }
    std::lock_guard<std::mutex> g(launch_mutex());
    Job j;
    j.kernel = k;
    j.params = params;
    memcpy(j.grid, grid, sizeof j.grid);
    memcpy(j.block, block, sizeof j.block);
    j.dyn_bytes = dyn_bytes;
    j.blocks = (uint64_t)grid[0] * grid[1] * grid[2];
    start_watchdog();
    g_kernel.store(k->name);
    run_job(j);
    g_kernel.store(nullptr);
    if (j.failed.load()) {
        put(err, err_len, j.error);
        return 1;
    }
    return 0;
}

extern "C" const char* vqx_emu_describe(void) {
    static const std::string s = format(
        "%u OS threads, one fiber per CUDA thread (%zu KiB stacks, %s context switch)%s",
        pool_threads(), stack_bytes() / 1024, EMU_ASM_SWITCH ? "x86-64 assembly" : "ucontext",
        EMU_TSAN ? ", ThreadSanitizer"
                 : (EMU_ASAN ? ", AddressSanitizer" : ""));
    return s.c_str();
}
