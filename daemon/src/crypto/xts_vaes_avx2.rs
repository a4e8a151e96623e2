//! XTS-AES-256 on 256-bit vectors with VAES + AVX2: two AES blocks per
//! vector, eight vectors in flight, for x86-64 CPUs that have VAES but not
//! AVX-512 (AMD Zen 3, Intel Alder Lake and later client cores). The key
//! schedules, the dispatch and the 512-bit kernel are `xts_vaes.rs`; this
//! file only holds the 256-bit loops.
//!
//! Hand-written for the same reason as the 512-bit kernel (no maintained
//! crate has a VAES XTS): the `aes` crate's AES-NI batch path runs one
//! 128-bit block per instruction (benches/results/history.md, "XTS micro-benchmarks").
//! The AES rounds are inline asm (`middle_rounds`), the rest intrinsics.
//! Tweak update: each vector holds two consecutive tweaks (t, t·α), so the
//! next vector is this one times α²; in general t·α^K = (t << K) ⊕ (top K
//! bits of t)·0x87, the carry-less product of a K-bit v with 0x87 being
//! v ⊕ v<<1 ⊕ v<<2 ⊕ v<<7 (no overflow of the low 64 bits for K ≤ 8).
//! When K is a whole number of bytes, a byte shift and one VPCLMULQDQ by
//! 0x87 do the same in four operations (`mul_alpha_bytes`): the wide loop
//! keeps its twelve tweaks and moves each on by α^24 per step.
//!
//! Soundness of the `unsafe` here: both entry points are `unsafe fn`s that
//! `VaesKeys` calls only after it checked avx2, vpclmulqdq, vaes and aes on
//! this CPU;
//! every unaligned load or store touches `ptr + 32*i .. ptr + 32*(i+1)` with
//! `32*(i+1) <= len`, checked by the loop bounds; the asm only reads the
//! 13 middle round keys of a 15-key array and writes named registers.

use std::arch::x86_64::*;

/// Vectors per step (12 × 2 blocks = 384 bytes): with the key and the
/// twelve blocks in registers, the three spare ones hold the tweak chain
/// (the widths tried are in benches/results/history.md, "XTS micro-benchmarks").
const WIDE: usize = 12;

/// Multiplies each 128-bit lane by α^K in GF(2¹²⁸), for K ≤ 8; `R` must
/// be 64 − K (two parameters because stable Rust cannot compute it).
#[inline(always)]
fn mul_alpha<const K: i32, const R: i32>(
    t: __m256i,
    mask_lo: __m256i,
    mask_hi: __m256i,
) -> __m256i {
    // SAFETY (whole fn): register-only AVX2 operations; only called from
    // `xts`, which enables avx2.
    unsafe {
        // The top K bits of each 64-bit half, moved to the other half.
        let carry = _mm256_shuffle_epi32::<0x4E>(_mm256_srli_epi64::<R>(t));
        let into_hi = _mm256_and_si256(carry, mask_hi);
        let v = _mm256_and_si256(carry, mask_lo);
        let reduced = _mm256_xor_si256(
            _mm256_xor_si256(v, _mm256_slli_epi64::<1>(v)),
            _mm256_xor_si256(_mm256_slli_epi64::<2>(v), _mm256_slli_epi64::<7>(v)),
        );
        _mm256_xor_si256(
            _mm256_slli_epi64::<K>(t),
            _mm256_xor_si256(into_hi, reduced),
        )
    }
}

/// Multiplies each 128-bit lane by α^(8·B) in GF(2¹²⁸): a shift by `B`
/// bytes, and one carry-less multiply of the byte(s) shifted out by the
/// field's 0x87 (`OUT` must be 16 − B; for B ≤ 7 the product stays in the
/// low 64 bits). Four operations, against about eleven for `mul_alpha`'s
/// bit shifts.
#[inline(always)]
fn mul_alpha_bytes<const B: i32, const OUT: i32>(t: __m256i, poly: __m256i) -> __m256i {
    // SAFETY (whole fn): register-only AVX2 and VPCLMULQDQ operations;
    // only called from functions that enable both.
    unsafe {
        let out = _mm256_bsrli_epi128::<OUT>(t);
        _mm256_xor_si256(
            _mm256_bslli_epi128::<B>(t),
            _mm256_clmulepi64_epi128::<0x00>(out, poly),
        )
    }
}

/// Broadcasts a 15-round schedule into 256-bit registers.
#[inline(always)]
fn broadcast(keys: &[[u8; 16]; 15]) -> [__m256i; 15] {
    // SAFETY (whole fn): AVX2 register operations and 16-byte loads from
    // 16-byte arrays; only called from functions that enable avx2.
    unsafe {
        let mut rk = [_mm256_setzero_si256(); 15];
        for (dst, k) in rk.iter_mut().zip(keys) {
            *dst = _mm256_broadcastsi128_si256(_mm_loadu_si128(k.as_ptr().cast()));
        }
        rk
    }
}

#[inline(always)]
fn rounds<const ENCRYPT: bool>(mut x: __m256i, rk: &[__m256i; 15]) -> __m256i {
    // SAFETY (whole fn): register-only VAES operations; only called from
    // functions that enable avx2 and vaes.
    unsafe {
        x = _mm256_xor_si256(x, rk[0]);
        for k in &rk[1..14] {
            x = if ENCRYPT {
                _mm256_aesenc_epi128(x, *k)
            } else {
                _mm256_aesdec_epi128(x, *k)
            };
        }
        if ENCRYPT {
            _mm256_aesenclast_epi128(x, rk[14])
        } else {
            _mm256_aesdeclast_epi128(x, rk[14])
        }
    }
}

/// Defines `$name`: rounds 1..=13 on `$n` vectors, interleaved round by
/// round. In asm because LLVM's scheduler, short of registers (AVX2 has 16),
/// turned the round-major Rust loop back into one vector's fourteen
/// dependent rounds after another, leaving the AES units idle for most of
/// each latency.
macro_rules! middle_rounds {
    ($name:ident, $n:literal, [$($x:ident),+]) => {
        /// # Safety
        /// The CPU must have avx2, vaes and aes.
        #[inline]
        #[target_feature(enable = "avx2,vaes,aes")]
        unsafe fn $name<const ENCRYPT: bool>(x: &mut [__m256i; $n], rk: &[__m256i; 15]) {
            let [$($x),+] = x;
            macro_rules! rounds_asm {
                ($op:literal) => {
                    // SAFETY: reads 13 × 32 bytes from rk[1..14], in bounds
                    // of the 15-key array; registers only otherwise.
                    unsafe {
                        std::arch::asm!(
                            "2:",
                            "vmovdqu {key}, ymmword ptr [{p}]",
                            $(concat!($op, " {", stringify!($x), "}, {", stringify!($x), "}, {key}"),)+
                            "add {p}, 32",
                            "dec {n:e}",
                            "jnz 2b",
                            p = inout(reg) rk.as_ptr().add(1) => _,
                            n = inout(reg) 13u32 => _,
                            key = out(ymm_reg) _,
                            $($x = inout(ymm_reg) *$x,)+
                            options(nostack, readonly),
                        )
                    }
                };
            }
            if ENCRYPT {
                rounds_asm!("vaesenc");
            } else {
                rounds_asm!("vaesdec");
            }
        }
    };
}

middle_rounds!(
    middle_rounds_12,
    12,
    [x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11]
);
middle_rounds!(middle_rounds_8, 8, [x0, x1, x2, x3, x4, x5, x6, x7]);

/// One step over `N` vectors at `p` whose tweaks are `t`: whitening, the
/// rounds (`middle`), whitening again.
///
/// # Safety
/// The CPU must have avx2, vaes and aes; `p .. p + 32 * N` must be valid
/// for reads and `q .. q + 32 * N` for writes (the same range, in place).
#[inline]
#[target_feature(enable = "avx2,vaes,aes")]
unsafe fn step<const N: usize, const ENCRYPT: bool>(
    (p, q): (*const u8, *mut u8),
    t: &[__m256i],
    rk: &[__m256i; 15],
    middle: impl Fn(&mut [__m256i; N]),
) {
    let mut x = [_mm256_setzero_si256(); N];
    for i in 0..N {
        // SAFETY: i < N, in bounds by the caller's contract.
        let block = unsafe { _mm256_loadu_si256(p.add(32 * i).cast()) };
        x[i] = _mm256_xor_si256(_mm256_xor_si256(block, t[i]), rk[0]);
    }
    middle(&mut x);
    for i in 0..N {
        let y = if ENCRYPT {
            _mm256_aesenclast_epi128(x[i], rk[14])
        } else {
            _mm256_aesdeclast_epi128(x[i], rk[14])
        };
        // SAFETY: as above.
        unsafe { _mm256_storeu_si256(q.add(32 * i).cast(), _mm256_xor_si256(y, t[i])) };
    }
}

/// One step over `WIDE` vectors at `p` whose tweaks are `t`, which it
/// then moves on by α^(2·WIDE) (α^24) for the next step: a byte shift and
/// one carry-less multiply per vector, where bit shifts take about eleven
/// vector operations that compete with VAES for the same pipes
/// (benches/results/history.md, "The AVX2 kernel's tweaks by byte shift").
///
/// # Safety
/// The CPU must have avx2, vaes, aes and vpclmulqdq; the `32 * WIDE`
/// bytes at `p.0` must be valid for reads and at `p.1` for writes.
#[inline]
#[target_feature(enable = "avx2,vaes,aes,vpclmulqdq")]
unsafe fn wide_step<const ENCRYPT: bool>(
    p: (*const u8, *mut u8),
    t: &mut [__m256i; WIDE],
    rk: &[__m256i; 15],
    poly: __m256i,
) {
    // SAFETY: the caller's contract is `step`'s; features as this fn's.
    unsafe {
        step::<WIDE, ENCRYPT>(p, t, rk, |x| middle_rounds_12::<ENCRYPT>(x, rk));
    }
    for ti in t.iter_mut() {
        *ti = mul_alpha_bytes::<3, 13>(*ti, poly);
    }
}

/// The tweaks of `WIDE` vectors in a row, the first holding `tw`.
#[inline]
#[target_feature(enable = "avx2,vpclmulqdq")]
fn wide_tweaks(tw: __m256i, poly: __m256i) -> [__m256i; WIDE] {
    let mask_lo = _mm256_set_epi64x(0, -1, 0, -1);
    let mask_hi = _mm256_set_epi64x(-1, 0, -1, 0);
    let mut t = [tw; WIDE];
    t[1] = mul_alpha::<2, 62>(tw, mask_lo, mask_hi);
    t[2] = mul_alpha::<4, 60>(tw, mask_lo, mask_hi);
    t[3] = mul_alpha::<6, 58>(tw, mask_lo, mask_hi);
    for i in 4..WIDE {
        t[i] = mul_alpha_bytes::<1, 15>(t[i - 4], poly);
    }
    t
}

/// AES-256 ECB encryption of `data` (a multiple of 32 bytes) in place.
///
/// # Safety
/// The CPU must have avx2, vaes and aes.
#[target_feature(enable = "avx2,vaes,aes,sse2")]
pub(super) unsafe fn ecb_encrypt(keys: &[[u8; 16]; 15], data: &mut [u8]) {
    let rk = broadcast(keys);
    for chunk in data.chunks_exact_mut(32) {
        // SAFETY: `chunk` is exactly 32 bytes.
        unsafe {
            let x = _mm256_loadu_si256(chunk.as_ptr().cast());
            _mm256_storeu_si256(chunk.as_mut_ptr().cast(), rounds::<true>(x, &rk));
        }
    }
}

/// XTS over one data unit of `len` bytes (a multiple of 32) from `src`
/// into `dst` (the same pointer: in place); `tweak` is the encrypted
/// initial tweak.
///
/// # Safety
/// The CPU must have avx2, vaes, aes and vpclmulqdq; `len` bytes at `src`
/// must be valid for reads and at `dst` for writes, and the two ranges
/// either the same or disjoint.
#[target_feature(enable = "avx2,vaes,aes,vpclmulqdq,sse2")]
pub(super) unsafe fn xts<const ENCRYPT: bool>(
    keys: &[[u8; 16]; 15],
    src: *const u8,
    dst: *mut u8,
    len: usize,
    tweak: u128,
) {
    let rk = broadcast(keys);
    let mask_lo = _mm256_set_epi64x(0, -1, 0, -1);
    let mask_hi = _mm256_set_epi64x(-1, 0, -1, 0);
    let second = (tweak << 1) ^ ((tweak >> 127) * 0x87);
    let mut first = [0u8; 32];
    first[..16].copy_from_slice(&tweak.to_le_bytes());
    first[16..].copy_from_slice(&second.to_le_bytes());
    // SAFETY: `first` is 32 bytes.
    let tw = unsafe { _mm256_loadu_si256(first.as_ptr().cast()) };

    let at_ = |at: usize| (src.wrapping_add(at), dst.wrapping_add(at));
    let poly = _mm256_set_epi64x(0, 0x87, 0, 0x87);
    let mut t = wide_tweaks(tw, poly);
    let mut at = 0;
    while at + 32 * WIDE <= len {
        // SAFETY: at + 32 * WIDE <= len; features as this fn's.
        unsafe { wide_step::<ENCRYPT>(at_(at), &mut t, &rk, poly) };
        at += 32 * WIDE;
    }
    // Less than a wide step is left: the rest of a 4 KiB sector (256
    // bytes) in one eight-vector step, which still covers VAES's latency,
    // on the tweaks the wide steps left.
    let mut tw = t[0];
    if at + 32 * 8 <= len {
        // SAFETY: at + 256 <= len; features as this fn's.
        unsafe {
            step::<8, ENCRYPT>(at_(at), &t[..8], &rk, |x| {
                middle_rounds_8::<ENCRYPT>(x, &rk)
            })
        };
        tw = t[8];
        at += 32 * 8;
    }
    while at + 32 <= len {
        let t0 = tw;
        tw = mul_alpha::<2, 62>(t0, mask_lo, mask_hi);
        // SAFETY: at + 32 <= len.
        unsafe {
            let x = _mm256_xor_si256(_mm256_loadu_si256(src.add(at).cast()), t0);
            _mm256_storeu_si256(
                dst.add(at).cast(),
                _mm256_xor_si256(rounds::<ENCRYPT>(x, &rk), t0),
            );
        }
        at += 32;
    }
}
