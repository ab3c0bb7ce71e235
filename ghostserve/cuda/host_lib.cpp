// Host build of the GPU kernels' arithmetic: the gf256.cuh core, run on the CPU
// over the same (word, edge byte) units a kernel grid walks. The CPU tests load
// this with ctypes and compare its output byte for byte with ISA-L, so the
// kernels' math (tables, log/exp fallback, word/tail split, grid-stride
// coverage) is tested without a GPU.
//
//   g++ -O2 -shared -fPIC -std=c++17 -Wall -Wextra -Werror host_lib.cpp -o libgshost.so
//
// Pointer arrays have the kernels' layout: 64-bit addresses, any alignment.
#include <stddef.h>
#include <stdint.h>

#include <atomic>
#include <vector>

// Count word accesses a GPU could not make (misaligned 32-bit loads/stores): the
// host executes them fine, so without this an alignment bug would go unseen.
static std::atomic<unsigned long long> gs_host_misaligned{0};
#define GS_HOST_ALIGN_HOOK(p) ((void)(p), gs_host_misaligned.fetch_add(1, std::memory_order_relaxed))

#include "gf256.cuh"

namespace {

using gs::u8;
using gs::u64;

bool valid(int r, int k) { return r >= 1 && r <= 255 && k >= 1 && k <= 255; }

// Runs what every thread of a launch of `blocks` x `per_block` threads runs, the
// tables (or blob) already built, pointers given as the kernels get them.
// Returns 0, or -2 when a word access was misaligned (the output is still
// right, but the kernel would have faulted).
template <class Mul>
int launch(const Mul& mul, const uint64_t* addrs, int r, int k, uint64_t len, uint64_t blocks, uint64_t per_block) {
    std::vector<u8*> ptrs(static_cast<size_t>(k + r));
    for (int t = 0; t < k + r; ++t) ptrs[t] = reinterpret_cast<u8*>(static_cast<uintptr_t>(addrs[t]));
    const unsigned long long misaligned_before = gs_host_misaligned.load();
    const u64 step = blocks * per_block;
    for (u64 b = 0; b < blocks; ++b)
        for (u64 t = 0; t < per_block; ++t) gs::gs_thread(mul, r, k, ptrs.data(), len, b * per_block + t, step);
    return gs_host_misaligned.load() == misaligned_before ? 0 : -2;
}

int launch_buffer(bool logexp, const u8* buffer, const uint64_t* addrs, int r, int k, uint64_t len, uint64_t blocks,
                  uint64_t per_block) {
    if (logexp) return launch(gs::GsLogExpMul{buffer, k}, addrs, r, k, len, blocks, per_block);
    return launch(gs::GsTableMul{buffer, k}, addrs, r, k, len, blocks, per_block);
}

// From coefficients and pointer arrays: builds the tables, then runs an
// emulated grid of `threads` threads (1: the plain host path).
int run(const uint8_t* coeffs, int r, int k, const uint8_t* const* src, uint8_t* const* dst, uint64_t len,
        bool logexp, uint64_t threads) {
    if (!valid(r, k) || threads < 1) return -1;
    if (len == 0) return 0;
    std::vector<uint64_t> addrs;
    for (int i = 0; i < k; ++i) addrs.push_back(reinterpret_cast<uintptr_t>(src[i]));
    for (int j = 0; j < r; ++j) addrs.push_back(reinterpret_cast<uintptr_t>(dst[j]));
    std::vector<u8> buffer(logexp ? gs::gs_blob_bytes(r, k) : gs::gs_tables_bytes(r, k));
    if (logexp)
        gs::gs_build_logexp_blob(coeffs, r, k, buffer.data());
    else
        gs::gs_build_product_tables(coeffs, r, k, buffer.data());
    return launch_buffer(logexp, buffer.data(), addrs.data(), r, k, len, 1, threads);
}

}  // namespace

extern "C" {

// a * b in GF(2^8) through log/exp tables, and by shift-and-add.
uint8_t gs_host_mul(uint8_t a, uint8_t b) {
    static u8 log[256], exp[512];
    static const bool built = (gs::gs_build_log_exp(log, exp), true);
    (void)built;
    return gs::gs_mul(log, exp, a, b);
}

uint8_t gs_host_mul_slow(uint8_t a, uint8_t b) { return gs::gs_mul_slow(a, b); }

// dst[j] = XOR_i coeffs[j*k + i] * src[i] over len bytes, through product tables
// (what gs_matmul_tables computes). Returns 0, -1 for bad r, k, -2 for a
// misaligned word access (see run).
int gs_host_matmul(const uint8_t* coeffs, int r, int k, const uint8_t* const* src, uint8_t* const* dst,
                   uint64_t len) {
    return run(coeffs, r, k, src, dst, len, false, 1);
}

// The same through the log/exp blob (what gs_matmul_logexp computes).
int gs_host_matmul_logexp(const uint8_t* coeffs, int r, int k, const uint8_t* const* src, uint8_t* const* dst,
                          uint64_t len) {
    return run(coeffs, r, k, src, dst, len, true, 1);
}

// Either path, with the work cut among `threads` emulated kernel threads exactly
// as a grid of that many threads cuts it.
int gs_host_matmul_grid(const uint8_t* coeffs, int r, int k, const uint8_t* const* src, uint8_t* const* dst,
                        uint64_t len, int logexp, uint64_t threads) {
    return run(coeffs, r, k, src, dst, len, logexp != 0, threads);
}

// Emulates one launch of gs_matmul_tables (logexp = 0) or gs_matmul_logexp with
// the arguments the launcher passes: the device buffer it built (product tables
// or blob), the k + r addresses, r, k, len, the grid, the block size and the
// dynamic shared memory. Returns 0; -1 for bad r, k; -2 for a misaligned word
// access; -3 when the launch would fail or trap: more than GS_BLOCK_THREADS
// threads a block (the __launch_bounds__), no blocks, less shared memory than
// the kernel needs or more than a block gets by default (48 KiB).
int gs_host_launch(int logexp, const uint8_t* buffer, const uint64_t* addrs, int r, int k, uint64_t len,
                   uint64_t blocks, uint64_t threads_per_block, uint64_t shared_mem) {
    if (r < 1 || k < 1) return -1;
    if (blocks < 1 || blocks > 0x7fffffffull || threads_per_block < 1 ||
        threads_per_block > static_cast<uint64_t>(gs::GS_BLOCK_THREADS) || shared_mem > 48u * 1024u ||
        !gs::gs_launch_ok(r, k, logexp != 0, shared_mem))
        return -3;
    return launch_buffer(logexp != 0, buffer, addrs, r, k, len, blocks, threads_per_block);
}

// The kernels' word/edge split for these pointers.
void gs_host_split(const uint8_t* const* src, uint8_t* const* dst, int r, int k, uint64_t len, uint64_t* head,
                   uint64_t* nwords) {
    const gs::GsSplit s = gs::gs_split(r, k, reinterpret_cast<const u8* const*>(src),
                                       reinterpret_cast<u8* const*>(dst), len);
    *head = s.head;
    *nwords = s.nwords;
}

// Dynamic shared memory per block of the tables (logexp = 0) or log/exp kernel.
uint64_t gs_host_smem_bytes(int r, int k, int logexp) { return gs::gs_smem_bytes(r, k, logexp != 0); }

int gs_host_block_threads(void) { return gs::GS_BLOCK_THREADS; }

// The device buffers the launcher uploads (the CuPy backend builds them with
// numpy; the tests compare): r*k*256 product tables, or the log/exp blob.
void gs_host_product_tables(const uint8_t* coeffs, int r, int k, uint8_t* out) {
    gs::gs_build_product_tables(coeffs, r, k, out);
}

void gs_host_logexp_blob(const uint8_t* coeffs, int r, int k, uint8_t* out) {
    gs::gs_build_logexp_blob(coeffs, r, k, out);
}

}  // extern "C"
