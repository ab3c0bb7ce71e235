// sum64 checksums of many KV chunks in one launch (definition, descriptors and
// per-thread work: checksum64.cuh). Loaded by ghostserve/codec/gpu_checksum.py
// with cupy.RawModule (NVRTC); also compiled by nvcc in the tests.
//
//   gs_checksum64(chunks, pieces, nchunks, out)
//
//   chunks   device array of nchunks * GS_SUM_CHUNK_FIELDS (7) uint64: the chunk descriptors
//   pieces   device array of GS_SUM_PIECE_FIELDS (2) uint64 per piece: address, length
//   nchunks  uint64
//   out      device array of nchunks uint64, ZEROED by the caller: each block adds
//            its part of chunk c's sum to out[c] (atomicAdd, mod 2^64), so the
//            result does not depend on the order the blocks run in
//
// Launch: grid (gx, gy), block (GS_SUM_THREADS, 1, 1), no dynamic shared memory.
// Blocks with blockIdx.y = y take chunks y, y + gy, ...; in each, thread t of the
// x grid sums words t, t + gx*GS_SUM_THREADS, ... (gs_sum_thread), a warp adds up
// its threads' partial sums with shuffles and one lane adds that to out[c]. Any
// gx >= 1 and 1 <= gy <= 65535 give the same results. A block of another shape, or
// a descriptor gs_sum_thread rejects, traps: a loud launch failure rather than a
// wrong checksum.

#include "checksum64.cuh"

namespace {

using gs::u64;

// Sum of v over the 32 lanes of a full warp, in lane 0.
__device__ __forceinline__ u64 gs_warp_sum(u64 v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

}  // namespace

extern "C" __global__ void __launch_bounds__(gs::GS_SUM_THREADS)
    gs_checksum64(const unsigned long long* __restrict__ chunks, const unsigned long long* __restrict__ pieces,
                  unsigned long long nchunks, unsigned long long* __restrict__ out) {
    if (blockDim.x != gs::GS_SUM_THREADS || blockDim.y != 1 || blockDim.z != 1) __trap();
    const u64 first = static_cast<u64>(blockIdx.x) * blockDim.x + threadIdx.x;
    const u64 step = static_cast<u64>(gridDim.x) * blockDim.x;
    // Every thread of a block walks the same chunks: the warps stay full for the shuffles.
    for (u64 c = blockIdx.y; c < nchunks; c += gridDim.y) {
        int bad = 0;
        const u64 part = gs::gs_sum_thread(chunks + gs::GS_SUM_CHUNK_FIELDS * c, pieces, first, step, &bad);
        if (bad) __trap();
        const u64 warp = gs_warp_sum(part);
        if ((threadIdx.x & 31u) == 0 && warp != 0) atomicAdd(out + c, warp);
    }
}
