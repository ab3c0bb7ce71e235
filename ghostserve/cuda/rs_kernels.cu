// Reed-Solomon encode and reconstruct on the GPU. Both are one GF(2^8)
// matrix-apply, dst (r shards) = coeffs (r x k) * src (k shards), byte column
// by byte column. Loaded by ghostserve/codec/cupy_backend.py with
// cupy.RawModule (NVRTC); also compiled by nvcc in tests/test_cuda.py.
//
// Kernels (extern "C", so no name mangling):
//
//   gs_matmul_tables(tables, addrs, r, k, len)   tables: r*k*256 product tables
//   gs_matmul_logexp(blob, addrs, r, k, len)     blob: exp | log | clog (gf256.cuh)
//
//   tables/blob  device buffer, built on the host (layouts in gf256.cuh);
//                16-byte aligned for the fast staging copy (any alignment works)
//   addrs        device array of gridDim.y sets of k + r uint64 addresses: the
//                k sources, then the r destinations; any alignment, any
//                distinct buffers. Blocks with blockIdx.y = y compute set y
//                (one launch for many stripes of the same length)
//   r, k         int32; len uint64 bytes per shard
//
// Launch: grid (x, sets), GS_BLOCK_THREADS (256) threads a block, any number of
// x blocks (grid-stride loops), dynamic shared memory gs_smem_bytes(r, k, logexp)
// bytes: the pointer arrays plus the tables (gs_matmul_tables, when that fits
// in 48 KiB) or the much smaller log/exp blob (gs_matmul_logexp, any r*k).
// A launch with less shared memory than that, or r or k < 1, traps (a loud
// launch failure rather than wrong parity).
//
// Each thread runs gs_thread() from gf256.cuh: aligned 4-byte words
// (32-bit loads and stores, all r outputs of a word accumulated in registers,
// so each source word is read once for up to 8 outputs), then the unaligned
// head/tail bytes, or every byte one by one when the k + r pointers disagree
// modulo 4. The host library runs the very same function; the CPU tests check
// it against ISA-L.

#include "gf256.cuh"

namespace {

using gs::u8;
using gs::u64;

__device__ __forceinline__ unsigned int gs_dynamic_smem_size() {
    unsigned int n;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(n));
    return n;
}

// n bytes (a multiple of 16) from global to shared memory, by the whole block.
__device__ __forceinline__ void gs_stage(u8* sdst, const u8* gsrc, u64 n) {
    if ((gs::gs_addr(gsrc) & 15ull) == 0) {
        const uint4* s = reinterpret_cast<const uint4*>(gsrc);
        uint4* d = reinterpret_cast<uint4*>(sdst);
        for (u64 x = threadIdx.x; x < (n >> 4); x += blockDim.x) d[x] = s[x];
    } else {
        for (u64 x = threadIdx.x; x < n; x += blockDim.x) sdst[x] = gsrc[x];
    }
}

template <bool LOGEXP>
struct GsMulOf {
    typedef gs::GsTableMul type;
};
template <>
struct GsMulOf<true> {
    typedef gs::GsLogExpMul type;
};

template <bool LOGEXP>
__device__ __forceinline__ void gs_matmul_body(const u8* __restrict__ tables, const u64* __restrict__ addrs, int r,
                                               int k, u64 len) {
    extern __shared__ uint4 gs_smem[];  // uint4: 16-byte aligned
    u8* smem = reinterpret_cast<u8*>(gs_smem);
    if (!gs::gs_launch_ok(r, k, LOGEXP, gs_dynamic_smem_size())) __trap();
    const u64 ptr_bytes = gs::gs_ptr_bytes(r, k);
    const u64 table_bytes = LOGEXP ? gs::gs_blob_bytes(r, k) : gs::gs_tables_bytes(r, k);

    // Stage this set's k + r pointers (read by every thread, every word) and the tables.
    addrs += static_cast<u64>(blockIdx.y) * static_cast<u64>(k + r);
    u8** ptrs = reinterpret_cast<u8**>(smem);
    for (int t = threadIdx.x; t < k + r; t += blockDim.x) ptrs[t] = reinterpret_cast<u8*>(addrs[t]);
    u8* staged = smem + ptr_bytes;
    gs_stage(staged, tables, table_bytes);
    __syncthreads();

    const typename GsMulOf<LOGEXP>::type mul = {staged, k};
    const u64 first = static_cast<u64>(blockIdx.x) * blockDim.x + threadIdx.x;
    const u64 step = static_cast<u64>(gridDim.x) * blockDim.x;
    gs::gs_thread(mul, r, k, ptrs, len, first, step);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(gs::GS_BLOCK_THREADS)
    gs_matmul_tables(const unsigned char* __restrict__ tables, const unsigned long long* __restrict__ addrs, int r,
                     int k, unsigned long long len) {
    gs_matmul_body<false>(tables, addrs, r, k, len);
}

extern "C" __global__ void __launch_bounds__(gs::GS_BLOCK_THREADS)
    gs_matmul_logexp(const unsigned char* __restrict__ blob, const unsigned long long* __restrict__ addrs, int r,
                     int k, unsigned long long len) {
    gs_matmul_body<true>(blob, addrs, r, k, len);
}
