//! Checks on the checked-in PTX that need no CUDA toolkit: each PTX was generated from the current `.cu`
//! (its first line carries the source's FNV-1a 64 hash), declares every kernel of the contract with the
//! documented parameter list, targets what the driver accepts, and the launch-dimension helpers are sane.

mod support;

use nc_kernels::*;
use support::{entry_params, fnv1a64, source};

const REGENERATE: &str = "run kernels-ptx/build_ptx.sh (see kernels-ptx/README.md) and commit the regenerated ptx/";

#[test]
fn fnv1a64_matches_known_values() {
    assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
}

#[test]
fn every_ptx_was_generated_from_the_current_source() {
    for (module, ptx) in MODULES {
        let want = format!("// nc-source-fnv1a64: {:016x}", fnv1a64(&source(module)));
        let first = ptx.lines().next().unwrap_or("");
        assert_eq!(
            first, want,
            "ptx/{module}.ptx is stale or missing: cuda/{module}.cu or a header it includes changed since its PTX was generated; {REGENERATE}"
        );
    }
}

#[test]
fn every_ptx_targets_compute_80_with_an_isa_the_driver_accepts() {
    for (module, ptx) in MODULES {
        let version = ptx
            .lines()
            .find_map(|l| l.trim().strip_prefix(".version "))
            .unwrap_or_else(|| panic!("ptx/{module}.ptx has no .version line; {REGENERATE}"));
        let (major, minor) = version.trim().split_once('.').expect("version is major.minor");
        let v: (u32, u32) = (major.parse().unwrap(), minor.parse().unwrap());
        assert!(
            v <= (9, 0),
            "ptx/{module}.ptx has PTX ISA {version}; the target driver (580) takes <= 9.0 (CUDA 13.0): build with the pinned nvcc 13.0"
        );
        let target = ptx.lines().find_map(|l| l.trim().strip_prefix(".target "));
        assert_eq!(
            target.map(str::trim),
            Some("sm_80"),
            "ptx/{module}.ptx must target sm_80 (compute_80)"
        );
    }
}

/// The documented parameters of each kernel, one letter each: p = pointer (.u64), u = u64 (.u64),
/// i = i32 (.u32), f = f32 (.f32), t = the by-value `AdamwTable` (`.align 8 .b8 name[1024]`).
fn signature(name: &str) -> &'static str {
    match name {
        "nc_fill_f32" => "puf",
        "nc_add_inplace_f32" => "ppu",
        "nc_relu2_forward_f32" | "nc_relu2_backward_f32" => "ppu",
        "nc_softcap_f32" => "puf",
        "nc_embedding_forward_f32" | "nc_embedding_backward_f32" => "pppii",
        "nc_rmsnorm_forward_f32" => "pppiif",
        "nc_rmsnorm_backward_f32" => "ppppiii",
        "nc_rotary_f32" => "ppiiiiiif",
        "nc_softcap_cross_entropy_f32" => "pppiiffi",
        "nc_attention_forward_f32" => "pppppiiiiiiif",
        "nc_attention_backward_delta_f32" => "pppiiii",
        "nc_attention_backward_dkdv_f32" => "ppppppppiiiiif",
        "nc_attention_backward_dq_f32" => "pppppppiiiiif",
        "nc_axpby_f32" => "ppuff",
        "nc_scale_f32" => "puf",
        "nc_sum_squares_f64" => "pup",
        "nc_muon_momentum_f32" => "pppuf",
        "nc_adamw_f32" => "ppppuffffff",
        "nc_flash_forward_d128_bf16" | "nc_flash_forward_d64_bf16" => "pppppiiiiiif",
        "nc_flash_backward_dq_d128_bf16" | "nc_flash_backward_dq_d64_bf16" => "ppppppppiiiif",
        "nc_flash_backward_dkdv_d128_bf16" | "nc_flash_backward_dkdv_d64_bf16" => "ppppppppiiiif",
        "nc_embedding_forward_bf16_f32" | "nc_embedding_forward_bf16_bf16" => "pppii",
        "nc_embedding_backward_sorted_f32" | "nc_embedding_backward_sorted_bf16" => "pppippi",
        "nc_rmsnorm_forward_f32_bf16" | "nc_rmsnorm_forward_bf16_bf16" => "pppiif",
        "nc_rmsnorm_backward_dy_bf16_dx_f32"
        | "nc_rmsnorm_backward_dy_bf16_dx_bf16"
        | "nc_rmsnorm_backward_dy_f32_dx_f32"
        | "nc_rmsnorm_backward_dy_f32_dx_bf16" => "ppppiii",
        "nc_rotary_qknorm_forward_f32" | "nc_rotary_qknorm_forward_bf16" => "ppppiiiiiif",
        "nc_rotary_qknorm_backward_dy_f32_dx_f32"
        | "nc_rotary_qknorm_backward_dy_f32_dx_bf16"
        | "nc_rotary_qknorm_backward_dy_bf16_dx_f32"
        | "nc_rotary_qknorm_backward_dy_bf16_dx_bf16" => "pppppiiiiii",
        "nc_cast_f32_to_bf16" | "nc_cast_bf16_to_f32" => "ppu",
        "nc_relu2_forward_f32_to_bf16" | "nc_relu2_forward_bf16_to_bf16" => "ppu",
        "nc_relu2_backward_u_bf16_dh_bf16"
        | "nc_relu2_backward_u_bf16_dh_f32"
        | "nc_relu2_backward_u_f32_dh_bf16"
        | "nc_relu2_backward_u_f32_dh_f32" => "pppu",
        "nc_adamw_multi_f32" => "tifff",
        "nc_ns_sum_squares_f64" => "pup",
        "nc_ns_normalize_bf16" => "pupifp",
        "nc_muon_apply_bf16" => "pupupuf",
        other => panic!("kernel {other} has no signature in this test: add it"),
    }
}

#[test]
fn every_kernel_is_an_entry_of_its_module_with_the_documented_parameters() {
    for k in ALL {
        let (_, module_ptx) = MODULES
            .iter()
            .find(|(m, _)| *m == k.module)
            .unwrap_or_else(|| panic!("{}: module {} not in MODULES", k.name, k.module));
        assert_eq!(k.ptx, *module_ptx, "{}: its ptx is not its module's", k.name);
        let params = entry_params(k.ptx, k.name).unwrap_or_else(|| {
            panic!(
                "ptx/{}.ptx has no `.visible .entry {}(`; {REGENERATE}",
                k.module, k.name
            )
        });
        let want: String = signature(k.name)
            .chars()
            .map(|c| if c == 'u' { 'p' } else { c })
            .collect();
        assert_eq!(
            params, want,
            "{}: PTX parameters (p pointer/u64, i i32, f f32) differ from the contract",
            k.name
        );
    }
    // Every entry of every module is in ALL (no kernel the backend would not know about).
    for (module, ptx) in MODULES {
        for line in ptx.lines().filter(|l| l.starts_with(".visible .entry ")) {
            let name = line[".visible .entry ".len()..].trim_end_matches('(');
            assert!(
                ALL.iter().any(|k| k.name == name && k.module == module),
                "ptx/{module}.ptx has entry {name} that ALL lacks"
            );
        }
    }
}

/// The optimizer kernels promise the CPU's roundings bit for bit: every f32 multiply, add and divide in
/// optim.ptx carries an explicit rounding mode (which neither nvcc nor ptxas fuses), no f32 fma appears, and
/// nothing is approximate or flushes denormals. The f64 fma of the sum of squares is allowed: its product, the
/// square of an f32, is exact.
#[test]
fn the_optimizer_kernels_round_like_the_cpu() {
    assert_rounds_like_the_cpu("optim", ptx::OPTIM, 15, &["mul", "add", "div"], &["sqrt.rn.f32"]);
}

/// The checks of a module whose kernels promise the CPU's roundings: no f32 fma; nothing approximate or
/// flushing; no `<base>.f32` without a rounding mode for each of `unrounded`; every sqrt one of `sqrts`; at
/// least `min_rn` `.rn` f32 ops (fewer: the PTX is not what this test was written for).
fn assert_rounds_like_the_cpu(module: &str, text: &str, min_rn: usize, unrounded: &[&str], sqrts: &[&str]) {
    let mut seen_rn = 0;
    for line in text.lines().map(str::trim) {
        let op = line.split_whitespace().next().unwrap_or("");
        assert!(
            !(op.starts_with("fma.") && op.ends_with(".f32")),
            "{module}.ptx fuses a multiply-add: `{line}`"
        );
        assert!(
            !op.contains(".approx") && !op.contains(".ftz"),
            "{module}.ptx has an approximate or flushing op: `{line}`"
        );
        for base in unrounded {
            assert!(
                op != format!("{base}.f32"),
                "{module}.ptx has `{line}` without a rounding mode (contractible)"
            );
        }
        if op.ends_with(".rn.f32") {
            seen_rn += 1;
        }
        if op.starts_with("sqrt.") {
            assert!(
                sqrts.contains(&op),
                "{module}.ptx: `{line}`: sqrt must be correctly rounded"
            );
        }
    }
    assert!(
        seen_rn >= min_rn,
        "{module}.ptx: only {seen_rn} .rn f32 ops; {REGENERATE}"
    );
}

/// Static shared memory of each entry: its own `.shared` declarations plus the module-level ones.
fn static_shared_bytes(ptx: &str, name: &str) -> usize {
    let size = |l: &str| -> usize {
        let l = l.trim();
        if !l.starts_with(".shared ") {
            return 0;
        }
        let Some(open) = l.rfind('[') else {
            // A scalar (nvcc turns a one-element array into one): its type's size.
            let ty = l
                .split_whitespace()
                .find(|w| w.len() > 2 && w[2..].parse::<usize>().is_ok() && w.starts_with('.'));
            return ty.map_or(8, |w| w[2..].parse::<usize>().unwrap() / 8);
        };
        l[open + 1..l.rfind(']').unwrap()].parse::<usize>().unwrap()
    };
    let first_entry = ptx.find(".visible .entry ").unwrap_or(ptx.len());
    let module_level: usize = ptx[..first_entry].lines().map(size).sum();
    let start = ptx.find(&format!(".visible .entry {name}(")).unwrap();
    let rest = &ptx[start + 1..];
    let end = rest.find(".visible .entry ").unwrap_or(rest.len());
    module_level + rest[..end].lines().map(size).sum::<usize>()
}

#[test]
fn static_shared_memory_fits_without_an_opt_in() {
    for k in ALL {
        let bytes = static_shared_bytes(k.ptx, k.name);
        assert!(bytes < 48 * 1024, "{}: {bytes} bytes of static shared memory", k.name);
        if k.module == "attention" {
            assert!(
                bytes <= ATTENTION_MAX_STATIC_SHARED_BYTES as usize,
                "{}: {bytes} bytes",
                k.name
            );
        }
    }
    let dkdv = static_shared_bytes(ATTENTION_BACKWARD_DKDV.ptx, ATTENTION_BACKWARD_DKDV.name);
    assert_eq!(dkdv, ATTENTION_MAX_STATIC_SHARED_BYTES as usize, "update the constant");
}

/// The value of `#define NAME <integer>` in `src`.
fn define(src: &str, name: &str) -> usize {
    let value = support::define(src, name);
    let first = value.split_whitespace().next().unwrap_or("");
    first
        .parse()
        .unwrap_or_else(|_| panic!("#define {name} {value}: not an integer"))
}

#[test]
fn attention_dims_constants_match_the_kernel_source() {
    let src = String::from_utf8(source("attention")).unwrap();
    assert_eq!(define(&src, "MAX_D"), ATTENTION_MAX_HEAD_DIM);
    assert_eq!(define(&src, "FWD_BQ"), ATTENTION_FORWARD_ROWS);
    assert_eq!(define(&src, "DELTA_WARPS"), ATTENTION_DELTA_ROWS);
    assert_eq!(32 * define(&src, "DELTA_WARPS"), ATTENTION_DELTA_THREADS as usize);
    assert_eq!(define(&src, "DKV_BK"), ATTENTION_DKDV_KEYS);
    assert_eq!(define(&src, "DQ_BQ"), ATTENTION_DQ_ROWS);
    for warps in ["FWD_WARPS", "DKV_WARPS", "DQ_WARPS"] {
        assert_eq!(32 * define(&src, warps), ATTENTION_THREADS as usize, "{warps}");
    }
}

fn sane(d: LaunchDims, what: &str) {
    let (gx, gy, gz) = d.grid;
    let (bx, by, bz) = d.block;
    assert!(gx >= 1 && gy >= 1 && gz >= 1, "{what}: empty grid {:?}", d.grid);
    assert!(
        gx < (1 << 31) && gy <= 65535 && gz <= 65535,
        "{what}: grid {:?} past the limits",
        d.grid
    );
    assert!(
        bx >= 32 && bx % 32 == 0 && by == 1 && bz == 1,
        "{what}: block {:?}",
        d.block
    );
    assert!(bx * by * bz <= 1024, "{what}: block {:?} over 1024 threads", d.block);
    assert!(
        d.shared_bytes < 48 * 1024,
        "{what}: {} bytes of dynamic shared memory",
        d.shared_bytes
    );
}

/// A tiled launch: sane, `threads` threads a block, grid.x tiles of `per_tile` covering `rows`, grid.y the
/// heads and grid.z the batch.
fn assert_tiles(
    what: &str,
    d: LaunchDims,
    threads: u32,
    (rows, per_tile): (usize, usize),
    heads_batch: (usize, usize),
) {
    sane(d, what);
    assert_eq!(d.block.0, threads, "{what}: threads");
    assert!(d.grid.0 as usize * per_tile >= rows, "{what}: rows");
    assert_eq!(
        (d.grid.1 as usize, d.grid.2 as usize),
        heads_batch,
        "{what}: heads, batch"
    );
}

#[test]
fn launch_dims_are_sane_and_cover_every_row_and_tile() {
    for n in [0u64, 1, 255, 256, 257, 1 << 20, 24 * 2048 * 3328 * 4, 24 * 2048 * 65536] {
        let d = elementwise_dims(n);
        sane(d, "elementwise");
        assert_eq!(d.block.0, ELEMENTWISE_THREADS);
        // Grid-stride kernels: the grid need not cover n, but it covers min(n, 2^20 blocks).
        assert!(d.grid.0 as u64 * d.block.0 as u64 >= n.min((1 << 20) * ELEMENTWISE_THREADS as u64));
    }
    for n in [0u64, 1, 255, 256, 257, 256 * 1024, 256 * 1024 + 1, 24 * 2048 * 65536] {
        let d = sum_squares_dims(n);
        sane(d, "sum_squares");
        assert_eq!(d.block.0, SUM_SQUARES_THREADS);
        assert!(
            d.grid.0 <= SUM_SQUARES_MAX_BLOCKS,
            "sum_squares: more partials than the buffer holds"
        );
        assert!(d.grid.0 as u64 * d.block.0 as u64 >= n.min((SUM_SQUARES_MAX_BLOCKS * SUM_SQUARES_THREADS) as u64));
    }
    for rows in [1usize, 7, 24 * 2048, 24 * 2048 * 26] {
        let d = row_dims(rows, ROW_THREADS);
        sane(d, "rows");
        assert_eq!(d.grid.0 as usize, rows);
    }
    // (batch, t or tq, n_head, n_kv_head, head_dim): tests' small shapes, decoding, the presets.
    let shapes = [
        (1, 1, 1, 1, 8),
        (2, 19, 4, 2, 8),
        (1, 40, 2, 1, 16),
        (3, 1, 26, 26, 128),
        (1, 7, 4, 1, 16),
        (24, 2048, 26, 26, 128),
        (8, 2048, 19, 19, 128),
        (2, 2048, 8, 2, 128),
        (1, 2049, 1, 1, 1),
    ];
    for (b, t, h, hkv, d) in shapes {
        let what = format!("shape b {b} t {t} h {h} hkv {hkv} d {d}");
        let f = attention_forward_dims(b, h, t, d);
        assert_tiles(
            &format!("{what} forward"),
            f,
            ATTENTION_THREADS,
            (t, ATTENTION_FORWARD_ROWS),
            (h, b),
        );
        assert!(
            (f.grid.0 as usize - 1) * ATTENTION_FORWARD_ROWS < t.max(1),
            "{what}: forward has idle tiles"
        );

        let dl = attention_delta_dims(b, h, t, d);
        sane(dl, &what);
        assert_eq!(dl.block.0 as usize, 32 * ATTENTION_DELTA_ROWS);
        assert!(
            dl.grid.0 as usize * ATTENTION_DELTA_ROWS >= b * t * h,
            "{what}: delta rows"
        );

        let kv = attention_dkdv_dims(b, hkv, t, d);
        assert_tiles(
            &format!("{what} dkdv"),
            kv,
            ATTENTION_THREADS,
            (t, ATTENTION_DKDV_KEYS),
            (hkv, b),
        );
        let dq = attention_dq_dims(b, h, t, d);
        assert_tiles(
            &format!("{what} dq"),
            dq,
            ATTENTION_THREADS,
            (t, ATTENTION_DQ_ROWS),
            (h, b),
        );
    }
}

#[test]
#[should_panic(expected = "head_dim")]
fn attention_dims_reject_a_head_dim_over_the_maximum() {
    attention_forward_dims(1, 1, 1, ATTENTION_MAX_HEAD_DIM + 1);
}

#[test]
fn flash_constants_match_the_kernel_source() {
    let src = String::from_utf8(source("flash_attention")).unwrap();
    assert_eq!(define(&src, "FLASH_THREADS"), FLASH_THREADS as usize);
    assert_eq!(32 * define(&src, "FLASH_WARPS"), FLASH_THREADS as usize);
    assert_eq!(define(&src, "FWD_BQ"), FLASH_FORWARD_ROWS);
    assert_eq!(define(&src, "FWD_BK"), FLASH_FORWARD_KEYS);
    assert_eq!(define(&src, "DQ_BQ"), FLASH_DQ_ROWS);
    assert_eq!(define(&src, "DQ_BK"), FLASH_DQ_KEYS);
    assert_eq!(define(&src, "DKV_BK"), FLASH_DKDV_KEYS);
    assert_eq!(define(&src, "DKV_BQ"), FLASH_DKDV_ROWS);
    // 16 query rows (dk/dv: keys) per warp: the mma tile height.
    assert_eq!(FLASH_FORWARD_ROWS, 16 * define(&src, "FLASH_WARPS"));
    assert_eq!(FLASH_DQ_ROWS, 16 * define(&src, "FLASH_WARPS"));
    assert_eq!(FLASH_DKDV_KEYS, 16 * define(&src, "FLASH_WARPS"));
}

#[test]
fn flash_kernels_exist_for_their_head_dims_only() {
    for d in FLASH_HEAD_DIMS {
        let k = flash_kernels(d).unwrap_or_else(|| panic!("no flash kernels for head_dim {d}"));
        for kernel in [k.forward, k.backward_dq, k.backward_dkdv] {
            assert!(kernel.name.contains(&format!("_d{d}_")), "{}", kernel.name);
        }
        assert!(k.forward.name.contains("forward") && k.backward_dq.name.contains("_dq_"));
        assert!(k.backward_dkdv.name.contains("_dkdv_"));
    }
    for d in [0, 1, 8, 32, 63, 96, 127, 129, 256] {
        assert!(flash_kernels(d).is_none(), "head_dim {d}");
    }
}

#[test]
fn flash_dims_are_sane_and_cover_every_row() {
    // (batch, tq, n_head): small, decoding, d20 and d52-like training shapes.
    for (b, tq, h) in [
        (1, 1, 1),
        (2, 19, 4),
        (1, 64, 2),
        (1, 65, 2),
        (32, 2048, 10),
        (8, 2048, 26),
        (3, 3, 6),
    ] {
        let what = format!("flash b {b} tq {tq} h {h}");
        let f = flash_forward_dims(b, h, tq);
        assert_tiles(
            &format!("{what} forward"),
            f,
            FLASH_THREADS,
            (tq, FLASH_FORWARD_ROWS),
            (h, b),
        );
        assert!((f.grid.0 as usize - 1) * FLASH_FORWARD_ROWS < tq, "{what}: idle tiles");
        let dq = flash_dq_dims(b, h, tq);
        assert_tiles(&format!("{what} dq"), dq, FLASH_THREADS, (tq, FLASH_DQ_ROWS), (h, b));
        let hkv = if h % 2 == 0 { h / 2 } else { h };
        let kv = flash_dkdv_dims(b, hkv, tq);
        assert_tiles(
            &format!("{what} dkdv"),
            kv,
            FLASH_THREADS,
            (tq, FLASH_DKDV_KEYS),
            (hkv, b),
        );
        assert!(
            (kv.grid.0 as usize - 1) * FLASH_DKDV_KEYS < tq,
            "{what}: dkdv idle tiles"
        );
        for dims in [f, dq, kv] {
            assert_eq!(dims.shared_bytes, 0, "{what}: static shared memory only");
        }
    }
}
/// The bf16 engine's optimizer kernels (multi-tensor AdamW, Newton-Schulz's normalize and apply) promise the
/// CPU's roundings as optim.ptx does: no f32 fma, every f32 multiply/add/divide with an explicit rounding mode,
/// nothing approximate or flushing, sqrt correctly rounded.
#[test]
fn the_bf16_optimizer_kernels_round_like_the_cpu() {
    for (module, text, min_rn) in [
        ("adamw_multi", ptx::ADAMW_MULTI, 10),
        ("newton_schulz", ptx::NEWTON_SCHULZ, 4),
    ] {
        let unrounded = ["mul", "add", "sub", "div"];
        assert_rounds_like_the_cpu(module, text, min_rn, &unrounded, &["sqrt.rn.f32", "sqrt.rn.f64"]);
    }
}

#[test]
fn the_adamw_table_has_the_kernels_layout() {
    use std::mem::{offset_of, size_of};
    assert_eq!(size_of::<AdamwTensor>(), 64);
    assert_eq!(offset_of!(AdamwTensor, p_bf16), 32);
    assert_eq!(offset_of!(AdamwTensor, n), 40);
    assert_eq!(offset_of!(AdamwTensor, decay), 48);
    assert_eq!(offset_of!(AdamwTensor, inv_bc2), 56);
    assert_eq!(size_of::<AdamwTable>(), 64 * ADAMW_MAX_TENSORS);
    let src = String::from_utf8(source("adamw_multi")).unwrap();
    assert!(
        src.contains(&format!("#define ADAMW_MAX_TENSORS {ADAMW_MAX_TENSORS}\n")),
        "adamw_multi.cu's ADAMW_MAX_TENSORS differs from lib.rs"
    );
    assert!(
        src.contains("sizeof(AdamwTensor) == 64"),
        "adamw_multi.cu no longer asserts the 64-byte layout"
    );
}

#[test]
fn bf16_kernel_constants_match_their_sources() {
    let qk = String::from_utf8(source("rotary_qknorm")).unwrap();
    assert!(qk.contains(&format!("#define QKNORM_WARPS {QKNORM_WARPS}\n")));
    assert!(qk.contains(&format!("#define QKNORM_MAX_HEAD_DIM {QKNORM_MAX_HEAD_DIM}\n")));
    let ns = String::from_utf8(source("newton_schulz")).unwrap();
    assert!(ns.contains(&format!("#define NS_PARTS {NS_PARTS}\n")));
}

#[test]
fn bf16_launch_dims_are_sane_and_cover_their_work() {
    for n in [0u64, 1, 7, 8, 9, 1 << 23, 24 * 2048 * 5120] {
        let d = elementwise_bf16_dims(n);
        sane(d, "elementwise_bf16");
        assert!(d.grid.0 as u64 * d.block.0 as u64 * 8 >= n.min((1 << 20) * ELEMENTWISE_THREADS as u64 * 8));
    }
    for (units, hd) in [(1usize, 2usize), (30, 128), (24 * 2048 * 26, 128), (9, 256)] {
        let d = qknorm_dims(units, hd);
        sane(d, "qknorm");
        assert_eq!(d.block.0, 32 * QKNORM_WARPS);
        assert!(
            d.grid.0 as usize * QKNORM_WARPS as usize >= units,
            "qknorm covers every (row, head)"
        );
    }
    for (segs, dim) in [(1usize, 1usize), (11, 300), (65536, 3328)] {
        let d = embedding_sorted_dims(segs, dim);
        sane(d, "embedding sorted");
        assert_eq!(d.grid.0 as usize, segs);
        assert!(
            d.grid.1 as usize * d.block.0 as usize >= dim,
            "every column has a thread"
        );
    }
    for (n, count) in [(0u64, 1usize), (5, 16), (65536 * 3328, 2)] {
        let d = adamw_multi_dims(n, count);
        sane(d, "adamw multi");
        assert_eq!(d.grid.1 as usize, count);
    }
    for (n, batch) in [(1u64, 1usize), (1280 * 5120, 20), (3, 65535)] {
        let s = ns_sum_squares_dims(batch);
        sane(s, "ns sum squares");
        assert_eq!((s.grid.0, s.grid.1 as usize), (NS_PARTS, batch));
        let e = ns_elementwise_dims(n, batch);
        sane(e, "ns elementwise");
        assert_eq!(e.grid.1 as usize, batch);
    }
}

#[test]
#[should_panic(expected = "head_dim")]
fn qknorm_dims_reject_an_odd_head_dim() {
    qknorm_dims(4, 7);
}
