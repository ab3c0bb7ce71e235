// GF(2^8) arithmetic (polynomial 0x11D, as ISA-L) and the Reed-Solomon
// matrix-apply core shared by the CUDA kernels (rs_kernels.cu) and the host
// library (host_lib.cpp).
//
// Everything a kernel thread computes after staging goes through gs_thread()
// (split, then gs_apply_slice): the kernels call it with (first, step) =
// (global thread id, threads in the grid), the host library for every thread
// of an emulated grid. So the CPU tests, which compare the host library with
// ISA-L byte for byte, prove the arithmetic, the word/tail split and the
// grid-stride coverage of the kernels.
//
// The header compiles three ways: nvcc (device + host), NVRTC as CuPy drives it
// (device only, with --device-as-default-execution-space) and plain C++ (g++).
//
// Layout conventions (the CuPy backend mirrors them, see cupy_backend.py):
//   * product tables: r*k tables of 256 bytes; table (j*k + i) holds
//     coeffs[j][i] * x at offset x.
//   * log/exp blob: exp[512] | log[256] | clog[r*k] | zero padding to 16 bytes,
//     clog[j*k + i] = log(coeffs[j][i]), or GS_LOG_ZERO (255) for a zero coefficient.
//   * dynamic shared memory of a block: k+r pointers (8 bytes each, the k
//     sources then the r destinations) padded to 16 bytes, then the tables or the blob.

#ifndef GHOSTSERVE_GF256_CUH
#define GHOSTSERVE_GF256_CUH

#if defined(__CUDACC__)
#define GS_HD __host__ __device__
#define GS_INLINE __forceinline__
#else
#define GS_HD
#define GS_INLINE inline
#endif

// Device passes only: nvcc hands the host pass's pragmas to the host compiler,
// which would warn about an unknown pragma.
#if defined(__CUDA_ARCH__)
#define GS_UNROLL _Pragma("unroll")
#else
#define GS_UNROLL
#endif

#if !defined(__CUDACC_RTC__)
#include <string.h>
#endif

namespace gs {

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;

enum {
    GS_POLY = 0x11D,           // x^8 + x^4 + x^3 + x^2 + 1
    GS_LOG_ZERO = 255,         // clog entry of a zero coefficient (logs are 0..254)
    GS_ROWS_PER_PASS = 8,      // outputs accumulated in registers at once
    GS_BLOCK_THREADS = 256,    // threads per block of every kernel
    GS_EXP_OFFSET = 0,         // blob: exp[512]
    GS_LOG_OFFSET = 512,       // blob: log[256]
    GS_CLOG_OFFSET = 768,      // blob: clog[r*k]
};

// ------------------------------------------------------------------ scalars

// a * b by shift-and-add (no tables): the plain definition, to check the tables against.
GS_HD GS_INLINE u8 gs_mul_slow(u8 a, u8 b) {
    u32 x = a, y = b, p = 0;
    while (y) {
        if (y & 1u) p ^= x;
        x <<= 1;
        if (x & 0x100u) x ^= GS_POLY;
        y >>= 1;
    }
    return static_cast<u8>(p);
}

// a * b through log/exp tables (exp has 512 entries: no modulo needed).
GS_HD GS_INLINE u8 gs_mul(const u8* log, const u8* exp, u8 a, u8 b) {
    return (a == 0 || b == 0) ? static_cast<u8>(0) : exp[log[a] + log[b]];
}

// ------------------------------------------------------------------- sizes

GS_HD GS_INLINE u64 gs_align16(u64 n) { return (n + 15ull) & ~15ull; }
GS_HD GS_INLINE u64 gs_ptr_bytes(int r, int k) { return gs_align16(8ull * static_cast<u64>(r + k)); }
GS_HD GS_INLINE u64 gs_tables_bytes(int r, int k) { return 256ull * static_cast<u64>(r) * static_cast<u64>(k); }
GS_HD GS_INLINE u64 gs_blob_bytes(int r, int k) {
    return gs_align16(static_cast<u64>(GS_CLOG_OFFSET) + static_cast<u64>(r) * static_cast<u64>(k));
}
// Dynamic shared memory a block of the tables / log-exp kernel needs.
GS_HD GS_INLINE u64 gs_smem_bytes(int r, int k, bool logexp) {
    return gs_ptr_bytes(r, k) + (logexp ? gs_blob_bytes(r, k) : gs_tables_bytes(r, k));
}

// ---------------------------------------------------------- multipliers

// Multiplication by coefficient (j, i) through its 256-byte product table.
struct GsTableMul {
    const u8* tab;  // r*k*256 bytes
    int k;
    GS_HD GS_INLINE const u8* table(int j, int i) const { return tab + (static_cast<u32>(j * k + i) << 8); }
    GS_HD GS_INLINE u8 byte(int j, int i, u8 x) const { return table(j, i)[x]; }
    GS_HD GS_INLINE u32 word(int j, int i, u32 x) const {
        const u8* t = table(j, i);
        return static_cast<u32>(t[x & 0xffu]) | (static_cast<u32>(t[(x >> 8) & 0xffu]) << 8) |
               (static_cast<u32>(t[(x >> 16) & 0xffu]) << 16) | (static_cast<u32>(t[x >> 24]) << 24);
    }
};

// Multiplication by coefficient (j, i) through log/exp tables (the blob).
struct GsLogExpMul {
    const u8* blob;  // gs_blob_bytes(r, k) bytes
    int k;
    GS_HD GS_INLINE u8 one(u32 c, u32 x) const {
        return (c == GS_LOG_ZERO || x == 0) ? static_cast<u8>(0)
                                            : blob[GS_EXP_OFFSET + c + blob[GS_LOG_OFFSET + x]];
    }
    GS_HD GS_INLINE u32 coeff_log(int j, int i) const { return blob[GS_CLOG_OFFSET + j * k + i]; }
    GS_HD GS_INLINE u8 byte(int j, int i, u8 x) const { return one(coeff_log(j, i), x); }
    GS_HD GS_INLINE u32 word(int j, int i, u32 x) const {
        const u32 c = coeff_log(j, i);
        return static_cast<u32>(one(c, x & 0xffu)) | (static_cast<u32>(one(c, (x >> 8) & 0xffu)) << 8) |
               (static_cast<u32>(one(c, (x >> 16) & 0xffu)) << 16) | (static_cast<u32>(one(c, x >> 24)) << 24);
    }
};

// ------------------------------------------------------------ word access
// On the device a misaligned 32-bit access faults; on x86 it silently works. A
// host build may define GS_HOST_ALIGN_HOOK(p) to be told of any word access the
// device could not make (host_lib.cpp does, and reports it to the tests).

GS_HD GS_INLINE u64 gs_addr(const void* p) { return static_cast<u64>(reinterpret_cast<unsigned long long>(p)); }

GS_HD GS_INLINE u32 gs_load32(const u8* p) {
#if defined(__CUDA_ARCH__)
    return *reinterpret_cast<const u32*>(p);  // p is 4-byte aligned (gs_split)
#else
#if defined(GS_HOST_ALIGN_HOOK)
    if (gs_addr(p) & 3ull) GS_HOST_ALIGN_HOOK(p);
#endif
    u32 v;
    memcpy(&v, p, 4);
    return v;
#endif
}

GS_HD GS_INLINE void gs_store32(u8* p, u32 v) {
#if defined(__CUDA_ARCH__)
    *reinterpret_cast<u32*>(p) = v;
#else
#if defined(GS_HOST_ALIGN_HOOK)
    if (gs_addr(p) & 3ull) GS_HOST_ALIGN_HOOK(p);
#endif
    memcpy(p, &v, 4);
#endif
}

// ------------------------------------------------------------------ core

// dst[j][off..off+4) = XOR_i coeffs[j][i] * src[i][off..off+4), all j < r.
// Every source word is read once per pass of GS_ROWS_PER_PASS outputs (once
// in all when r <= 8); the outputs of a pass stay in registers.
template <class Mul>
GS_HD GS_INLINE void gs_apply_word(const Mul& mul, int r, int k, const u8* const* src, u8* const* dst, u64 off) {
    for (int r0 = 0; r0 < r; r0 += GS_ROWS_PER_PASS) {
        const int nr = r - r0 < GS_ROWS_PER_PASS ? r - r0 : GS_ROWS_PER_PASS;
        u32 acc[GS_ROWS_PER_PASS];
        GS_UNROLL
        for (int j = 0; j < GS_ROWS_PER_PASS; ++j) acc[j] = 0;
        for (int i = 0; i < k; ++i) {
            const u32 x = gs_load32(src[i] + off);
            GS_UNROLL
            for (int j = 0; j < GS_ROWS_PER_PASS; ++j)
                if (j < nr) acc[j] ^= mul.word(r0 + j, i, x);
        }
        GS_UNROLL
        for (int j = 0; j < GS_ROWS_PER_PASS; ++j)
            if (j < nr) gs_store32(dst[r0 + j] + off, acc[j]);
    }
}

// The same for the single byte at off (unaligned pointers, head and tail).
template <class Mul>
GS_HD GS_INLINE void gs_apply_byte(const Mul& mul, int r, int k, const u8* const* src, u8* const* dst, u64 off) {
    for (int r0 = 0; r0 < r; r0 += GS_ROWS_PER_PASS) {
        const int nr = r - r0 < GS_ROWS_PER_PASS ? r - r0 : GS_ROWS_PER_PASS;
        u32 acc[GS_ROWS_PER_PASS];
        GS_UNROLL
        for (int j = 0; j < GS_ROWS_PER_PASS; ++j) acc[j] = 0;
        for (int i = 0; i < k; ++i) {
            const u8 x = src[i][off];
            GS_UNROLL
            for (int j = 0; j < GS_ROWS_PER_PASS; ++j)
                if (j < nr) acc[j] ^= mul.byte(r0 + j, i, x);
        }
        GS_UNROLL
        for (int j = 0; j < GS_ROWS_PER_PASS; ++j)
            if (j < nr) dst[r0 + j][off] = static_cast<u8>(acc[j]);
    }
}

// How [0, len) is cut: bytes [0, head) and [head + 4*nwords, len) are "edge"
// bytes done one at a time; [head, head + 4*nwords) is done in aligned 4-byte
// words. Words need every one of the k + r pointers to have the same address
// modulo 4; otherwise all len bytes are edge bytes (head = nwords = 0).
struct GsSplit {
    u64 head;
    u64 nwords;
};

GS_HD GS_INLINE GsSplit gs_split(int r, int k, const u8* const* src, u8* const* dst, u64 len) {
    const u64 a0 = gs_addr(src[0]);
    u64 diff = 0;
    for (int i = 0; i < k; ++i) diff |= gs_addr(src[i]) ^ a0;
    for (int j = 0; j < r; ++j) diff |= gs_addr(dst[j]) ^ a0;
    GsSplit s;
    s.head = 0;
    s.nwords = 0;
    if ((diff & 3ull) == 0) {
        u64 head = (0ull - a0) & 3ull;
        if (head > len) head = len;
        s.head = head;
        s.nwords = (len - head) >> 2;
    }
    return s;
}

GS_HD GS_INLINE u64 gs_edge_count(GsSplit s, u64 len) { return len - (s.nwords << 2); }

// Byte offset of edge byte number e (0 <= e < gs_edge_count).
GS_HD GS_INLINE u64 gs_edge_byte(GsSplit s, u64 e) { return e < s.head ? e : e + (s.nwords << 2); }

// THE per-thread work: words first, first, first + step, ... then edge bytes
// likewise. A kernel thread calls it with (global id, grid size); the host
// library with (0, 1). Over all first in [0, step) it covers [0, len) once.
template <class Mul>
GS_HD GS_INLINE void gs_apply_slice(const Mul& mul, int r, int k, const u8* const* src, u8* const* dst, u64 len,
                                    GsSplit s, u64 first, u64 step) {
    for (u64 w = first; w < s.nwords; w += step) gs_apply_word(mul, r, k, src, dst, s.head + (w << 2));
    const u64 nedge = gs_edge_count(s, len);
    for (u64 e = first; e < nedge; e += step) gs_apply_byte(mul, r, k, src, dst, gs_edge_byte(s, e));
}

// What one kernel thread does once its block has staged the pointers and the
// tables: ptrs holds the k source then the r destination addresses. The kernels
// call it with (global thread id, threads in the grid); host_lib.cpp with the
// same values for every thread of an emulated launch.
template <class Mul>
GS_HD GS_INLINE void gs_thread(const Mul& mul, int r, int k, u8* const* ptrs, u64 len, u64 first, u64 step) {
    const u8* const* src = ptrs;
    u8* const* dst = ptrs + k;
    gs_apply_slice(mul, r, k, src, dst, len, gs_split(r, k, src, dst, len), first, step);
}

// Whether a block may run: r, k >= 1 and at least gs_smem_bytes of dynamic shared
// memory (the kernels trap otherwise).
GS_HD GS_INLINE bool gs_launch_ok(int r, int k, bool logexp, u64 dynamic_smem) {
    return r >= 1 && k >= 1 && dynamic_smem >= gs_smem_bytes(r, k, logexp);
}

// The whole range on one thread.
template <class Mul>
GS_HD GS_INLINE void gs_apply_range(const Mul& mul, int r, int k, const u8* const* src, u8* const* dst, u64 len) {
    gs_apply_slice(mul, r, k, src, dst, len, gs_split(r, k, src, dst, len), 0, 1);
}

// ------------------------------------------------- host-side table builders
// Not for NVRTC: CuPy compiles with --device-as-default-execution-space, and the
// tables are built on the host anyway (the CuPy backend builds the same bytes
// with numpy; the tests compare them).
#if !defined(__CUDACC_RTC__)

inline void gs_build_log_exp(u8 log[256], u8 exp[512]) {
    u32 x = 1;
    log[0] = 0;  // unused: gs_mul and GsLogExpMul test for zero first
    for (u32 i = 0; i < 255; ++i) {
        exp[i] = static_cast<u8>(x);
        log[x] = static_cast<u8>(i);
        x <<= 1;
        if (x & 0x100u) x ^= GS_POLY;
    }
    for (u32 i = 255; i < 512; ++i) exp[i] = exp[i - 255];
}

// out[(j*k + i)*256 + x] = coeffs[j*k + i] * x; out holds gs_tables_bytes(r, k).
inline void gs_build_product_tables(const u8* coeffs, int r, int k, u8* out) {
    u8 log[256], exp[512];
    gs_build_log_exp(log, exp);
    for (int c = 0; c < r * k; ++c)
        for (u32 x = 0; x < 256; ++x) out[(static_cast<u64>(c) << 8) + x] = gs_mul(log, exp, coeffs[c], static_cast<u8>(x));
}

// The log/exp blob (layout at the top); out holds gs_blob_bytes(r, k).
inline void gs_build_logexp_blob(const u8* coeffs, int r, int k, u8* out) {
    memset(out, 0, gs_blob_bytes(r, k));
    gs_build_log_exp(out + GS_LOG_OFFSET, out + GS_EXP_OFFSET);
    const u8* log = out + GS_LOG_OFFSET;
    for (int c = 0; c < r * k; ++c)
        out[GS_CLOG_OFFSET + c] = coeffs[c] ? log[coeffs[c]] : static_cast<u8>(GS_LOG_ZERO);
}

#endif  // !__CUDACC_RTC__

}  // namespace gs

#endif  // GHOSTSERVE_GF256_CUH
