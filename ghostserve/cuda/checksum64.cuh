// The GPU path's chunk checksum ("sum64"), shared by the CUDA kernel
// (checksum_kernels.cu) and its host build (checksum_host.cpp), like gf256.cuh.
// The numpy reference (the oracle the tests compare with) and the statement of
// what it detects are in ghostserve/codec/gpu_checksum.py.
//
// Definition. A chunk is a byte string B of n bytes, given as pieces (address,
// length) in order; n = the sum of the lengths. Bytes masked out (below) read as 0.
// Word i (0 <= i < ceil(n/8)) is bytes B[8i .. 8i+8) as a little-endian uint64,
// zero-padded past n. With seed s (per chunk, default 0):
//
//     sum64(B) = SUM_i  mix(w_i XOR ((s + i) * GS_SUM_KEY))   (mod 2^64)
//
//     mix(z): z ^= z >> 30; z *= GS_SUM_MIX1; z ^= z >> 27; z *= GS_SUM_MIX2; z ^= z >> 31
//             (the SplitMix64 finalizer: a bijection of 64-bit words)
//
// Each term is a bijection of its word, so changing any single word changes the
// sum; the terms depend on the word's position; the sum is an integer sum, so the
// value does not depend on how the work is cut among threads, on the order of the
// reduction, on how B is cut into pieces or on the pieces' alignment.
//
// Masking (slot-addressed blocks): with a slot map (uint16 per byte of a layer of
// the chunk, `period` bytes), byte p of B counts only if slot_map[p % period] <
// fill; otherwise it reads as zero.
//
// Descriptors (arrays of uint64, so no struct layout is shared):
//   chunk c: chunks[GS_SUM_CHUNK_FIELDS*c + f], f =
//     GS_SUM_FIRST   index of its first piece in `pieces`
//     GS_SUM_COUNT   number of pieces (0 allowed)
//     GS_SUM_TOTAL   n: must equal the sum of the pieces' lengths (else the kernel traps)
//     GS_SUM_SLOTS   address of the uint16 slot map (2-byte aligned), or 0: no mask
//     GS_SUM_FILL    slots < fill count (ignored without a slot map)
//     GS_SUM_PERIOD  bytes per slot-map period, > 0 with a slot map
//     GS_SUM_SEED    s
//   piece j: pieces[GS_SUM_PIECE_FIELDS*j + 0] = address, [.. + 1] = length in bytes
//
// Per-thread work (gs_sum_thread): the words first, first + step, first + 2*step,
// ... of the chunk, where a kernel thread has first = its index in the x grid and
// step = the threads of the x grid. A word inside one piece is read with the
// widest aligned loads its address allows (8, 4, 2 or 1 bytes; the same for every
// word of a piece); a word that runs over the end of its piece is gathered byte by
// byte from the next ones (at most one per piece boundary). Over all first in
// [0, step) every word of the chunk is summed exactly once.

#ifndef GHOSTSERVE_CHECKSUM64_CUH
#define GHOSTSERVE_CHECKSUM64_CUH

// From gf256.cuh: GS_HD, GS_INLINE, GS_UNROLL, u8/u32/u64, gs_addr, the GS_HOST_ALIGN_HOOK convention.
#include "gf256.cuh"

#if !defined(__CUDACC_RTC__) && !defined(__CUDA_ARCH__)
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "sum64 words are little-endian; the host build assumes a little-endian host (as the GPU is)"
#endif
#endif

namespace gs {

typedef unsigned short u16;

enum {
    GS_SUM_THREADS = 256,  // threads per block of gs_checksum64 (its __launch_bounds__)
    GS_SUM_CHUNK_FIELDS = 7,
    GS_SUM_PIECE_FIELDS = 2,
    GS_SUM_FIRST = 0,
    GS_SUM_COUNT = 1,
    GS_SUM_TOTAL = 2,
    GS_SUM_SLOTS = 3,
    GS_SUM_FILL = 4,
    GS_SUM_PERIOD = 5,
    GS_SUM_SEED = 6,
};

GS_HD GS_INLINE u64 gs_sum_key() { return 0x9E3779B97F4A7C15ull; }   // odd: (s + i) * key is injective in i
GS_HD GS_INLINE u64 gs_sum_mix1() { return 0xBF58476D1CE4E5B9ull; }  // odd
GS_HD GS_INLINE u64 gs_sum_mix2() { return 0x94D049BB133111EBull; }  // odd

// SplitMix64's finalizer: xor-shifts and odd multiplications, each invertible.
GS_HD GS_INLINE u64 gs_sum_mix(u64 z) {
    z = (z ^ (z >> 30)) * gs_sum_mix1();
    z = (z ^ (z >> 27)) * gs_sum_mix2();
    return z ^ (z >> 31);
}

// The term of word w at word index i of a chunk with seed s.
GS_HD GS_INLINE u64 gs_sum_term(u64 seed, u64 i, u64 w) { return gs_sum_mix(w ^ ((seed + i) * gs_sum_key())); }

// ------------------------------------------------------------- loads
// An aligned load of a T at p. On the device a misaligned one faults; the host
// build reports it through GS_HOST_ALIGN_HOOK (see gf256.cuh).
template <class T>
GS_HD GS_INLINE T gs_sum_ld(const u8* p) {
#if defined(__CUDA_ARCH__)
    return *reinterpret_cast<const T*>(p);
#else
#if defined(GS_HOST_ALIGN_HOOK)
    if (gs_addr(p) & static_cast<u64>(sizeof(T) - 1)) GS_HOST_ALIGN_HOOK(p);
#endif
    T v;
    memcpy(&v, p, sizeof(T));
    return v;
#endif
}

// The 8 bytes at p as a little-endian word, by loads of `width` bytes (p is
// width-aligned; width is 8, 4, 2 or 1).
GS_HD GS_INLINE u64 gs_sum_word(const u8* p, u32 width) {
    if (width == 8) return gs_sum_ld<u64>(p);
    u64 w = 0;
    if (width == 4) {
        w = static_cast<u64>(gs_sum_ld<u32>(p)) | (static_cast<u64>(gs_sum_ld<u32>(p + 4)) << 32);
    } else if (width == 2) {
        GS_UNROLL
        for (u32 h = 0; h < 4; ++h) w |= static_cast<u64>(gs_sum_ld<u16>(p + 2 * h)) << (16 * h);
    } else {
        GS_UNROLL
        for (u32 b = 0; b < 8; ++b) w |= static_cast<u64>(p[b]) << (8 * b);
    }
    return w;
}

// Widest load the words of a piece allow: its word starts lie at addr + 8i - off.
GS_HD GS_INLINE u32 gs_sum_width(u64 addr, u64 off) {
    const u64 d = addr - off;  // mod 2^64: only the low bits matter
    return (d & 7ull) == 0 ? 8u : (d & 3ull) == 0 ? 4u : (d & 1ull) == 0 ? 2u : 1u;
}

// Bytes [p, p + 8) of the chunk, from piece a (which holds p, starting at logical
// offset off) onward; bytes past the last piece read as 0.
GS_HD GS_INLINE u64 gs_sum_gather(const u64* pc, u64 npieces, u64 a, u64 off, u64 p) {
    u64 w = 0;
    for (u32 b = 0; b < 8; ++b) {
        const u64 q = p + b;
        while (a < npieces && q >= off + pc[GS_SUM_PIECE_FIELDS * a + 1]) {
            off += pc[GS_SUM_PIECE_FIELDS * a + 1];
            ++a;
        }
        if (a == npieces) break;
        const u8* base = reinterpret_cast<const u8*>(pc[GS_SUM_PIECE_FIELDS * a]);
        w |= static_cast<u64>(base[q - off]) << (8 * b);
    }
    return w;
}

// ------------------------------------------------------------- mask

struct GsSumMask {
    const u16* slots;  // null: nothing masked
    u64 fill;
    u64 period;
};

GS_HD GS_INLINE u16 gs_sum_slot(const u16* slots, u64 m) {
    return gs_sum_ld<u16>(reinterpret_cast<const u8*>(slots + m));
}

// AND mask of the word whose first byte has mask index m (= its position mod period).
GS_HD GS_INLINE u64 gs_sum_keep(const GsSumMask& mk, u64 m) {
    u64 keep = 0;
    for (u32 b = 0; b < 8; ++b) {
        u64 mb = m + b;
        while (mb >= mk.period) mb -= mk.period;  // once at most when period >= 8
        if (static_cast<u64>(gs_sum_slot(mk.slots, mb)) < mk.fill) keep |= 0xFFull << (8 * b);
    }
    return keep;
}

// (a * b) mod n without overflow for a, b < n (n < 2^63).
GS_HD GS_INLINE u64 gs_sum_mulmod(u64 a, u64 b, u64 n) {
    u64 r = 0;
    a %= n;
    while (b) {
        if (b & 1ull) {
            r += a;
            if (r >= n) r -= n;
        }
        a += a;
        if (a >= n) a -= n;
        b >>= 1;
    }
    return r;
}

// ------------------------------------------------------------- per thread

// What one thread adds to chunk `chunk`'s sum: its words first, first + step, ...
// Sets *bad (and returns 0) when the descriptor is inconsistent: the pieces' lengths
// do not add up to GS_SUM_TOTAL, a slot map without a period or not 2-byte aligned.
GS_HD GS_INLINE u64 gs_sum_thread(const u64* chunk, const u64* pieces, u64 first, u64 step, int* bad) {
    const u64 npieces = chunk[GS_SUM_COUNT];
    const u64 total = chunk[GS_SUM_TOTAL];
    const u64 seed = chunk[GS_SUM_SEED];
    const u64* pc = pieces + GS_SUM_PIECE_FIELDS * chunk[GS_SUM_FIRST];
    GsSumMask mk;
    mk.slots = reinterpret_cast<const u16*>(chunk[GS_SUM_SLOTS]);
    mk.fill = chunk[GS_SUM_FILL];
    mk.period = chunk[GS_SUM_PERIOD];
    const bool masked = mk.slots != 0;
    if (step == 0 || (masked && (mk.period == 0 || mk.period >= (1ull << 60) || (gs_addr(mk.slots) & 1ull)))) {
        *bad = 1;
        return 0;
    }
    // m: mask index of word w's first byte, (8 w) mod period, kept up to date as w moves.
    const u64 dm = masked ? gs_sum_mulmod(8, step, mk.period) : 0;
    u64 m = masked ? gs_sum_mulmod(8, first, mk.period) : 0;
    u64 acc = 0;
    u64 off = 0;    // logical offset of piece a
    u64 w = first;  // the thread's next word: the first of its class starting at or after `off`
    for (u64 a = 0; a < npieces; ++a) {
        const u64 addr = pc[GS_SUM_PIECE_FIELDS * a];
        const u64 len = pc[GS_SUM_PIECE_FIELDS * a + 1];
        const u64 end = off + len;
        if (end < off || end > total) {
            *bad = 1;
            return 0;
        }
        const u64 wend = (end + 7) >> 3;  // words starting in [off, end): [ceil(off/8), ceil(end/8))
        const u32 width = gs_sum_width(addr, off);
        const u8* base = reinterpret_cast<const u8*>(addr);
        for (; w < wend; w += step) {
            const u64 p = w << 3;  // >= off: w >= ceil(off/8) by the invariant
            u64 word = p + 8 <= end ? gs_sum_word(base + (p - off), width) : gs_sum_gather(pc, npieces, a, off, p);
            if (masked) {
                word &= gs_sum_keep(mk, m);
                m += dm;
                if (m >= mk.period) m -= mk.period;
            }
            acc += gs_sum_term(seed, w, word);
        }
        off = end;
    }
    if (off != total) {
        *bad = 1;
        return 0;
    }
    return acc;
}

}  // namespace gs

#endif  // GHOSTSERVE_CHECKSUM64_CUH
