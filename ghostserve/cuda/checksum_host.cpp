// Host build of the sum64 checksum kernel (checksum_kernels.cu): the very
// per-thread code of checksum64.cuh, run on the CPU for every thread of an
// emulated launch. The tests load it with ctypes and compare it with the numpy
// reference (ghostserve/codec/gpu_checksum.py) on random chunks, piece splits,
// alignments and masks.
//
//   g++ -O2 -shared -fPIC -std=c++17 -Wall -Wextra -Werror checksum_host.cpp -o libgssum.so
#include <stddef.h>
#include <stdint.h>

#include <atomic>

// Count loads a GPU could not make (misaligned): the host does them fine, so
// without this an alignment bug would go unseen (as in host_lib.cpp).
static std::atomic<unsigned long long> gs_sum_misaligned{0};
#define GS_HOST_ALIGN_HOOK(p) ((void)(p), gs_sum_misaligned.fetch_add(1, std::memory_order_relaxed))

#include "checksum64.cuh"

extern "C" {

uint64_t gs_host_sum_mix(uint64_t x) { return gs::gs_sum_mix(x); }

uint64_t gs_host_sum_term(uint64_t seed, uint64_t i, uint64_t w) { return gs::gs_sum_term(seed, i, w); }

int gs_host_sum_threads(void) { return gs::GS_SUM_THREADS; }
int gs_host_sum_chunk_fields(void) { return gs::GS_SUM_CHUNK_FIELDS; }
int gs_host_sum_piece_fields(void) { return gs::GS_SUM_PIECE_FIELDS; }

// What one thread (first, step) of the x grid adds for one chunk; *bad set as the
// kernel would trap.
uint64_t gs_host_sum_thread(const unsigned long long* chunk, const unsigned long long* pieces, uint64_t first,
                            uint64_t step, int* bad) {
    *bad = 0;
    return gs::gs_sum_thread(chunk, pieces, first, step, bad);
}

// Emulates one launch of gs_checksum64 with grid (grid_x, grid_y) and block
// (block_x, 1, 1): every block and thread, in order, adding into out[c] as the
// kernel's atomicAdds do (out must be zeroed by the caller, as for the kernel).
// Returns 0; -2 when a load was misaligned (the sums are still right, but the
// kernel would have faulted); -3 when the launch itself would fail or trap (a
// block of other than GS_SUM_THREADS threads, an empty grid, grid_y > 65535,
// grid_x > 2^31 - 1); -4 when a descriptor makes the kernel trap.
int gs_host_checksum_launch(const unsigned long long* chunks, const unsigned long long* pieces, uint64_t nchunks,
                            unsigned long long* out, uint64_t grid_x, uint64_t grid_y, uint64_t block_x) {
    if (block_x != static_cast<uint64_t>(gs::GS_SUM_THREADS) || grid_x < 1 || grid_x > 0x7fffffffull ||
        grid_y < 1 || grid_y > 65535ull)
        return -3;
    const unsigned long long misaligned_before = gs_sum_misaligned.load();
    const uint64_t step = grid_x * block_x;
    for (uint64_t by = 0; by < grid_y; ++by)
        for (uint64_t c = by; c < nchunks; c += grid_y)
            for (uint64_t t = 0; t < step; ++t) {
                int bad = 0;
                const unsigned long long part =
                    gs::gs_sum_thread(chunks + gs::GS_SUM_CHUNK_FIELDS * c, pieces, t, step, &bad);
                if (bad) return -4;
                out[c] += part;
            }
    return gs_sum_misaligned.load() == misaligned_before ? 0 : -2;
}

}  // extern "C"
