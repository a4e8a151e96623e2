//! The VAES kernels' key schedules and dispatch, and the 512-bit kernel:
//! XTS-AES-256 with AVX-512F + VAES + AES-NI, sixteen AES blocks per step,
//! tweaks generated in the vector registers, for x86-64 CPUs that have it
//! (Intel Ice Lake, AMD Zen 4 and later). CPUs with VAES but no AVX-512
//! get the 256-bit loops in `xts_vaes_avx2.rs`. Chosen
//! at run time by `xts.rs`; other CPUs use the portable path there, so
//! release binaries need no `-C target-cpu=native`.
//!
//! Hand-written because no maintained crate offers a VAES XTS and the cipher
//! is the product's hot path. Tweak update: for a 128-bit lane t (IEEE 1619
//! little-endian), t·α⁴ = (t << 4) ⊕ (top four bits of t)·0x87, where the
//! carry-less product of a 4-bit v with 0x87 is v ⊕ v<<1 ⊕ v<<2 ⊕ v<<7.
//!
//! Soundness of the `unsafe` here: every `#[target_feature]` function is
//! reached only through a [`VaesKeys`], which [`VaesKeys::with_width`]
//! builds only when the CPU reports the features of its width (avx512f or
//! avx2, plus vaes and aes); and every unaligned load or store
//! touches `ptr + 64*i .. ptr + 64*(i+1)` with `64*(i+1) <= len`, checked
//! by the loop bounds on a slice whose length is a multiple of 64.

use std::arch::x86_64::*;

use zeroize::{Zeroize, ZeroizeOnDrop};

/// The vector width a VAES kernel runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    /// 512-bit vectors (AVX-512F + VAES).
    Avx512,
    /// 256-bit vectors (AVX2 + VAES).
    Avx2,
}

impl Width {
    /// Whether this CPU can run the kernel of this width.
    pub fn supported(self) -> bool {
        let wide = match self {
            Width::Avx512 => is_x86_feature_detected!("avx512f"),
            Width::Avx2 => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("vpclmulqdq")
            }
        };
        wide && is_x86_feature_detected!("vaes") && is_x86_feature_detected!("aes")
    }

    pub fn name(self) -> &'static str {
        match self {
            Width::Avx512 => "vaes-avx512",
            Width::Avx2 => "vaes-avx2",
        }
    }
}

/// Expanded AES-256 round keys (encryption and decryption schedules).
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct VaesKeys {
    enc: [[u8; 16]; 15],
    dec: [[u8; 16]; 15],
    /// Encryption schedule of the tweak key.
    tweak: [[u8; 16]; 15],
    #[zeroize(skip)]
    width: Width,
}

impl VaesKeys {
    /// The keys for the kernel of `width`, or `None` when this CPU cannot
    /// run it (tests and benchmarks pick each kernel this way).
    pub fn with_width(data_key: &[u8; 32], tweak_key: &[u8; 32], width: Width) -> Option<Self> {
        if !width.supported() {
            return None;
        }
        let empty = || VaesKeys {
            enc: [[0; 16]; 15],
            dec: [[0; 16]; 15],
            tweak: [[0; 16]; 15],
            width,
        };
        let mut keys = empty();
        let mut tweak = empty();
        // SAFETY: AES-NI presence was checked just above.
        unsafe {
            expand_key(data_key, &mut keys);
            expand_key(tweak_key, &mut tweak);
        }
        keys.tweak = tweak.enc;
        Some(keys)
    }

    /// Encrypts sector numbers into initial tweaks in place: `blocks` holds
    /// 16-byte little-endian sector numbers, and its length must satisfy
    /// [`VaesKeys::fits`]. Batched because one serial AES block per sector
    /// waits out each block's latency.
    pub fn encrypt_tweaks(&self, blocks: &mut [u8]) {
        assert!(Self::fits(blocks.len()));
        // SAFETY: `self` exists only if the CPU has its width's features
        // (`with_width`).
        unsafe {
            match self.width {
                Width::Avx512 => ecb_encrypt(&self.tweak, blocks),
                Width::Avx2 => super::xts_vaes_avx2::ecb_encrypt(&self.tweak, blocks),
            }
        }
    }

    pub fn width(&self) -> Width {
        self.width
    }

    /// Whether a buffer of `len` bytes can take the vector path.
    pub fn fits(len: usize) -> bool {
        len.is_multiple_of(64)
    }

    /// Encrypts one data unit in place; `tweak` is the already-encrypted
    /// initial tweak. `sector.len()` must satisfy [`VaesKeys::fits`].
    pub fn encrypt(&self, sector: &mut [u8], tweak: u128) {
        assert!(Self::fits(sector.len()));
        let (ptr, len) = (sector.as_mut_ptr(), sector.len());
        // SAFETY: one valid range, in place.
        unsafe { self.apply::<true>(ptr, ptr, len, tweak) }
    }

    /// Decrypts one data unit in place (see [`VaesKeys::encrypt`]).
    pub fn decrypt(&self, sector: &mut [u8], tweak: u128) {
        assert!(Self::fits(sector.len()));
        let (ptr, len) = (sector.as_mut_ptr(), sector.len());
        // SAFETY: one valid range, in place.
        unsafe { self.apply::<false>(ptr, ptr, len, tweak) }
    }

    /// Decrypts one data unit from `source` into `target` (same length):
    /// the ciphertext stays where it is, and `target` is only stored to.
    ///
    /// # Safety
    /// `source.len()` bytes at `target` valid for writes, not overlapping
    /// `source`.
    pub unsafe fn decrypt_to_raw(&self, source: &[u8], target: *mut u8, tweak: u128) {
        assert!(Self::fits(source.len()));
        // SAFETY: the caller's contract.
        unsafe { self.apply::<false>(source.as_ptr(), target, source.len(), tweak) }
    }

    /// Encrypts one data unit from `source` (same length as `target`)
    /// into `target`: `source` is only loaded from, once per block.
    ///
    /// # Safety
    /// `target.len()` bytes at `source` valid for reads, not overlapping
    /// `target`.
    pub unsafe fn encrypt_from_raw(&self, source: *const u8, target: &mut [u8], tweak: u128) {
        assert!(Self::fits(target.len()));
        // SAFETY: the caller's contract.
        unsafe { self.apply::<true>(source, target.as_mut_ptr(), target.len(), tweak) }
    }

    /// # Safety
    /// `len` bytes at `src` valid for reads and at `dst` for writes, the
    /// two the same range or disjoint.
    unsafe fn apply<const ENCRYPT: bool>(
        &self,
        src: *const u8,
        dst: *mut u8,
        len: usize,
        tweak: u128,
    ) {
        let keys = if ENCRYPT { &self.enc } else { &self.dec };
        // SAFETY: `self` exists only if the CPU has its width's features
        // (`with_width`); the ranges are the caller's contract.
        unsafe {
            match self.width {
                Width::Avx512 => xts_vaes::<ENCRYPT>(keys, src, dst, len, tweak),
                Width::Avx2 => super::xts_vaes_avx2::xts::<ENCRYPT>(keys, src, dst, len, tweak),
            }
        }
    }
}

#[target_feature(enable = "aes,sse2")]
unsafe fn expand_key(key: &[u8; 32], out: &mut VaesKeys) {
    #[inline(always)]
    fn mix(mut k: __m128i, assist: __m128i) -> __m128i {
        // SAFETY (whole fn): pure register operations, sse2 enabled by caller.
        unsafe {
            k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
            k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
            k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
            _mm_xor_si128(k, assist)
        }
    }
    let mut rk = [_mm_setzero_si128(); 15];
    // SAFETY: the key array is 32 bytes; two unaligned 16-byte loads.
    let (mut a, mut b) = unsafe {
        (
            _mm_loadu_si128(key.as_ptr().cast()),
            _mm_loadu_si128(key.as_ptr().add(16).cast()),
        )
    };
    rk[0] = a;
    rk[1] = b;
    macro_rules! round {
        ($i:expr, $rcon:expr) => {
            a = mix(
                a,
                _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(b)),
            );
            rk[$i] = a;
            if $i + 1 < 15 {
                b = mix(
                    b,
                    _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(a)),
                );
                rk[$i + 1] = b;
            }
        };
    }
    round!(2, 0x01);
    round!(4, 0x02);
    round!(6, 0x04);
    round!(8, 0x08);
    round!(10, 0x10);
    round!(12, 0x20);
    // The last round key needs only the first half of a step.
    a = mix(
        a,
        _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<0x40>(b)),
    );
    rk[14] = a;
    for (i, k) in rk.iter().enumerate() {
        let dec = match i {
            0 => rk[14],
            14 => rk[0],
            _ => _mm_aesimc_si128(rk[14 - i]),
        };
        // SAFETY: each destination is a 16-byte array.
        unsafe {
            _mm_storeu_si128(out.enc[i].as_mut_ptr().cast(), *k);
            _mm_storeu_si128(out.dec[i].as_mut_ptr().cast(), dec);
        }
    }
    a = _mm_setzero_si128();
    b = a;
    let _ = (a, b);
}

/// Vectors processed together in the main loop (8 × 4 blocks = 512 bytes,
/// one 512-byte sector or an eighth of a 4 KiB one).
const WIDE: usize = 8;

/// Multiplies each 128-bit lane by α⁴ in GF(2¹²⁸).
#[inline(always)]
fn mul_alpha4(t: __m512i, mask_lo: __m512i, mask_hi: __m512i) -> __m512i {
    // SAFETY (whole fn): register-only AVX-512F operations; only called from
    // `xts_vaes`, which enables avx512f.
    unsafe {
        let carry = _mm512_shuffle_epi32::<0x4E>(_mm512_srli_epi64::<60>(t));
        let into_hi = _mm512_and_si512(carry, mask_hi);
        let v = _mm512_and_si512(carry, mask_lo);
        let reduced = _mm512_xor_si512(
            _mm512_xor_si512(v, _mm512_slli_epi64::<1>(v)),
            _mm512_xor_si512(_mm512_slli_epi64::<2>(v), _mm512_slli_epi64::<7>(v)),
        );
        _mm512_xor_si512(
            _mm512_slli_epi64::<4>(t),
            _mm512_xor_si512(into_hi, reduced),
        )
    }
}

#[inline(always)]
fn rounds<const ENCRYPT: bool>(mut x: __m512i, rk: &[__m512i; 15]) -> __m512i {
    // SAFETY (whole fn): register-only VAES operations; only called from
    // functions that enable avx512f and vaes.
    unsafe {
        x = _mm512_xor_si512(x, rk[0]);
        for k in &rk[1..14] {
            x = if ENCRYPT {
                _mm512_aesenc_epi128(x, *k)
            } else {
                _mm512_aesdec_epi128(x, *k)
            };
        }
        if ENCRYPT {
            _mm512_aesenclast_epi128(x, rk[14])
        } else {
            _mm512_aesdeclast_epi128(x, rk[14])
        }
    }
}

/// Broadcasts a 15-round schedule into 512-bit registers.
#[inline(always)]
fn broadcast(keys: &[[u8; 16]; 15]) -> [__m512i; 15] {
    // SAFETY (whole fn): AVX-512F register operations and 16-byte loads from
    // 16-byte arrays; only called from functions that enable avx512f.
    unsafe {
        let mut rk = [_mm512_setzero_si512(); 15];
        for (dst, k) in rk.iter_mut().zip(keys) {
            *dst = _mm512_broadcast_i32x4(_mm_loadu_si128(k.as_ptr().cast()));
        }
        rk
    }
}

/// AES-256 ECB encryption of `data` (a multiple of 64 bytes) in place.
#[target_feature(enable = "avx512f,vaes,aes,sse2")]
unsafe fn ecb_encrypt(keys: &[[u8; 16]; 15], data: &mut [u8]) {
    let rk = broadcast(keys);
    for chunk in data.chunks_exact_mut(64) {
        // SAFETY: `chunk` is exactly 64 bytes.
        unsafe {
            let x = _mm512_loadu_si512(chunk.as_ptr().cast());
            _mm512_storeu_si512(chunk.as_mut_ptr().cast(), rounds::<true>(x, &rk));
        }
    }
}

#[target_feature(enable = "avx512f,vaes,aes,sse2")]
unsafe fn xts_vaes<const ENCRYPT: bool>(
    keys: &[[u8; 16]; 15],
    src: *const u8,
    dst: *mut u8,
    len: usize,
    tweak: u128,
) {
    let rk = broadcast(keys);
    let mask_lo = _mm512_set_epi64(0, -1, 0, -1, 0, -1, 0, -1);
    let mask_hi = _mm512_set_epi64(-1, 0, -1, 0, -1, 0, -1, 0);

    let mut first = [0u8; 64];
    let mut t = tweak;
    for lane in first.chunks_exact_mut(16) {
        lane.copy_from_slice(&t.to_le_bytes());
        t = (t << 1) ^ ((t >> 127) * 0x87);
    }
    // SAFETY: `first` is 64 bytes.
    let mut tw = unsafe { _mm512_loadu_si512(first.as_ptr().cast()) };

    let mut at = 0;
    // WIDE vectors (4 blocks each) per step, round-major so the AES units
    // always have independent work: VAES has ~5 cycles of latency at one
    // issue per cycle, so fewer than five vectors in flight leave it idle.
    while at + 64 * WIDE <= len {
        let mut t = [tw; WIDE];
        for i in 1..WIDE {
            t[i] = mul_alpha4(t[i - 1], mask_lo, mask_hi);
        }
        tw = mul_alpha4(t[WIDE - 1], mask_lo, mask_hi);
        // SAFETY: at + 64 * WIDE <= len, so every 64-byte access is in bounds.
        let (p, q) = unsafe { (src.add(at), dst.add(at)) };
        let mut x = [_mm512_setzero_si512(); WIDE];
        for i in 0..WIDE {
            // SAFETY: see above.
            let block = unsafe { _mm512_loadu_si512(p.add(64 * i).cast()) };
            x[i] = _mm512_xor_si512(_mm512_xor_si512(block, t[i]), rk[0]);
        }
        for k in &rk[1..14] {
            for v in x.iter_mut() {
                *v = if ENCRYPT {
                    _mm512_aesenc_epi128(*v, *k)
                } else {
                    _mm512_aesdec_epi128(*v, *k)
                };
            }
        }
        for i in 0..WIDE {
            let y = if ENCRYPT {
                _mm512_aesenclast_epi128(x[i], rk[14])
            } else {
                _mm512_aesdeclast_epi128(x[i], rk[14])
            };
            // SAFETY: see above.
            unsafe { _mm512_storeu_si512(q.add(64 * i).cast(), _mm512_xor_si512(y, t[i])) };
        }
        at += 64 * WIDE;
    }
    while at + 64 <= len {
        let t0 = tw;
        tw = mul_alpha4(t0, mask_lo, mask_hi);
        // SAFETY: at + 64 <= len.
        unsafe {
            let x = _mm512_xor_si512(_mm512_loadu_si512(src.add(at).cast()), t0);
            _mm512_storeu_si512(
                dst.add(at).cast(),
                _mm512_xor_si512(rounds::<ENCRYPT>(x, &rk), t0),
            );
        }
        at += 64;
    }
}
