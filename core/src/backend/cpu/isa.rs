//! Which x86 vector width the CPU backend's kernels (GEMMs and nc's own loops) use in this process.
//!
//! Picked once at run time from what the CPU has, so one binary serves AVX2-only and AVX-512 machines (no
//! `-C target-cpu=native`). `NC_CPU_ISA` forces a narrower path: `avx2` on an AVX-512 machine runs exactly
//! the kernels an AVX2 machine runs, which is how tests compare the two paths on one machine and how the
//! AVX2 path is benchmarked where only AVX-512 hardware is at hand. `baseline` (x86-64 SSE2 only) applies to
//! nc's own loops; the GEMMs never go below AVX2 on a CPU that has it (a scalar GEMM is no reference, just
//! slow).

use std::sync::OnceLock;

/// The environment variable that forces a narrower vector path.
pub const ISA_ENV: &str = "NC_CPU_ISA";

/// A vector instruction set level, ordered narrow to wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CpuIsa {
    /// x86-64 baseline (SSE2), or any non-x86 CPU.
    Baseline,
    /// AVX2 + FMA: 8 f32 lanes.
    Avx2,
    /// AVX-512 F (with AVX2 + FMA): 16 f32 lanes.
    Avx512,
}

impl CpuIsa {
    /// The name `NC_CPU_ISA` takes.
    pub fn name(self) -> &'static str {
        match self {
            CpuIsa::Baseline => "baseline",
            CpuIsa::Avx2 => "avx2",
            CpuIsa::Avx512 => "avx512",
        }
    }

    /// The widest level this CPU supports (asked once).
    pub fn detected() -> CpuIsa {
        static DETECTED: OnceLock<CpuIsa> = OnceLock::new();
        *DETECTED.get_or_init(CpuIsa::probe)
    }

    fn probe() -> CpuIsa {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if avx2 && is_x86_feature_detected!("avx512f") {
                return CpuIsa::Avx512;
            }
            if avx2 {
                return CpuIsa::Avx2;
            }
        }
        CpuIsa::Baseline
    }
}

/// The level to use given `NC_CPU_ISA`'s value (None: unset) and what the CPU has. Asking for a level the CPU
/// lacks, or for an unknown name, is an error that says what to set instead.
pub fn resolve(requested: Option<&str>, detected: CpuIsa) -> Result<CpuIsa, String> {
    let Some(text) = requested else {
        return Ok(detected);
    };
    let wanted = match text.trim() {
        "" => return Ok(detected),
        "avx512" => CpuIsa::Avx512,
        "avx2" => CpuIsa::Avx2,
        "baseline" => CpuIsa::Baseline,
        other => {
            return Err(format!(
                "{ISA_ENV}={other:?} is not a vector level: use avx512, avx2 or baseline (or unset it to use the \
                 widest this CPU has, {})",
                detected.name()
            ))
        }
    };
    if wanted > detected {
        return Err(format!(
            "{ISA_ENV}={} but this CPU supports at most {}: set {ISA_ENV}={} or a narrower level, or unset it",
            wanted.name(),
            detected.name(),
            detected.name()
        ));
    }
    Ok(wanted)
}

/// `NC_CPU_ISA` checked against this CPU: what the process will use, or why the setting is wrong. A program
/// can call this at start-up to refuse a bad setting; the kernels themselves go through `selected`.
pub fn from_env() -> Result<CpuIsa, String> {
    let value = std::env::var(ISA_ENV).ok();
    resolve(value.as_deref(), CpuIsa::detected())
}

/// The level every CPU kernel of this process uses, fixed at the first call (so one run never mixes paths).
/// A bad `NC_CPU_ISA` is reported once on stderr and the CPU's own level is used: the kernels cannot return
/// an error, and a wrong override must not stop a run that would otherwise work.
pub fn selected() -> CpuIsa {
    static SELECTED: OnceLock<CpuIsa> = OnceLock::new();
    *SELECTED.get_or_init(|| {
        from_env().unwrap_or_else(|e| {
            eprintln!("nc: {e}; using {}", CpuIsa::detected().name());
            CpuIsa::detected()
        })
    })
}

/// Defines `fn $name(args) -> ret`, which runs the `#[inline(always)]` function `$body` compiled for the level
/// this process uses, and `fn $at(level, args) -> ret`, which runs the copy for `level` (tests compare them).
/// The copies: AVX-512 F enabled, AVX2 + FMA enabled, and the baseline build. LLVM never fuses a * b + c on
/// its own, so every copy performs the same IEEE operations in the same order and gives the same bits; only
/// the vector width differs (the copies exist because the crate is built for baseline x86-64, where such
/// loops run 4 lanes wide).
macro_rules! isa_dispatched {
    ($(#[$meta:meta])* $vis:vis fn $name:ident / $at:ident ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:path) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            $at($crate::backend::cpu::isa::selected(), $($arg),*)
        }

        /// The copy of the same function for `level`, which the CPU must support (else this panics).
        #[allow(dead_code)]
        $vis fn $at(level: $crate::backend::cpu::isa::CpuIsa, $($arg: $ty),*) $(-> $ret)? {
            use $crate::backend::cpu::isa::CpuIsa;
            assert!(level <= CpuIsa::detected(), "{level:?} kernels on a CPU without them");
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn narrow($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                match level {
                    // SAFETY: the assert above: the CPU has this level's features.
                    CpuIsa::Avx512 => return unsafe { wide($($arg),*) },
                    CpuIsa::Avx2 => return unsafe { narrow($($arg),*) },
                    CpuIsa::Baseline => {}
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use isa_dispatched;

/// The levels this CPU can run, narrow to wide: what tests compare `isa_dispatched!` copies over.
#[cfg(test)]
pub(crate) fn levels_here() -> Vec<CpuIsa> {
    let all = [CpuIsa::Baseline, CpuIsa::Avx2, CpuIsa::Avx512];
    let here: Vec<CpuIsa> = all.into_iter().filter(|&l| l <= CpuIsa::detected()).collect();
    if here.len() == 1 {
        eprintln!("only the baseline level on this CPU: no vector copies to compare");
    }
    here
}

/// Values over several binades and both signs from a fixed LCG, for the copies' bit comparisons.
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|i| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            (2.0 * u - 1.0) * [0.01f32, 1.0, 30.0][i % 3]
        })
        .collect()
}

/// Asserts two slices are equal bit for bit.
#[cfg(test)]
pub(crate) fn assert_same_bits(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.to_bits(), y.to_bits(), "{what}: element {i}: {x} vs {y}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_or_empty_uses_the_cpu_level() {
        for detected in [CpuIsa::Baseline, CpuIsa::Avx2, CpuIsa::Avx512] {
            assert_eq!(resolve(None, detected), Ok(detected));
            assert_eq!(resolve(Some(""), detected), Ok(detected));
        }
    }

    #[test]
    fn narrower_levels_are_honoured() {
        assert_eq!(resolve(Some("avx2"), CpuIsa::Avx512), Ok(CpuIsa::Avx2));
        assert_eq!(resolve(Some("baseline"), CpuIsa::Avx512), Ok(CpuIsa::Baseline));
        assert_eq!(resolve(Some("baseline"), CpuIsa::Avx2), Ok(CpuIsa::Baseline));
        assert_eq!(resolve(Some(" avx512 "), CpuIsa::Avx512), Ok(CpuIsa::Avx512));
    }

    #[test]
    fn wider_than_the_cpu_or_unknown_is_an_error_naming_the_fix() {
        let e = resolve(Some("avx512"), CpuIsa::Avx2).unwrap_err();
        assert!(e.contains("at most avx2") && e.contains("NC_CPU_ISA=avx2"), "{e}");
        let e = resolve(Some("avx2"), CpuIsa::Baseline).unwrap_err();
        assert!(e.contains("at most baseline"), "{e}");
        let e = resolve(Some("sse9"), CpuIsa::Avx512).unwrap_err();
        assert!(e.contains("\"sse9\"") && e.contains("avx512, avx2 or baseline"), "{e}");
    }
}
