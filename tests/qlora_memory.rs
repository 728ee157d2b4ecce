//! Quantizing on load streams: the host's peak while a checkpoint loads with `load_in_4bit`
//! stays under one layer's bf16 size on top of the 4-bit model itself, measured by a counting
//! allocator (this binary has this one test, so nothing else allocates meanwhile).
#![allow(clippy::unwrap_used)]
// A global allocator is an `unsafe impl`; it only forwards to the system's and counts.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use qscript_runtime::model::tiny::{TinyConfig, tiny};
use qscript_runtime::model::{LoadOptions, Model};
use qscript_runtime::nn::Weight;
use qscript_runtime::quant::Quant4Config;

struct Counting;

static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call forwards to `System` with the caller's layout; the counters are atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = NOW.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        NOW.fetch_sub(layout.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn quantizing_on_load_holds_at_most_one_layer_in_bf16() {
    let t = TinyConfig {
        hidden: 512,
        layers: 6,
        heads: 8,
        kv_heads: 8,
        intermediate: 2048,
        vocab: 256,
        dtype: "bf16".into(),
        tie_embeddings: false,
        ..TinyConfig::default()
    };
    let dir = tempfile::tempdir().unwrap();
    tiny(&t).unwrap().save(dir.path()).unwrap();
    let opts = LoadOptions {
        dtype: "bf16".into(),
        device: "cpu".into(),
        quant: Some(Quant4Config::default()),
        ..LoadOptions::default()
    };
    let before = NOW.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let m = Model::load(dir.path(), &opts).unwrap();
    let peak = PEAK.load(Ordering::SeqCst) - before;
    // What the loaded model holds: its 4-bit weights and its float tensors.
    let mut held = 0u64;
    let mut layer_bf16 = 0u64;
    for b in &m.decoder.blocks {
        for p in qscript_runtime::model::block::Proj::ALL {
            match &b.proj(p).weight {
                Weight::Quant4(q) => held += q.bytes(),
                Weight::Dense(_) => panic!("{p:?} is not 4-bit"),
            }
        }
    }
    for b in m.decoder.blocks.iter().take(1) {
        for p in qscript_runtime::model::block::Proj::ALL {
            layer_bf16 += b.proj(p).weight.elem_count() as u64 * 2;
        }
    }
    let floats = (m.decoder.embed.elem_count()
        + m.decoder.norm.elem_count()
        + m.decoder.lm_head.as_ref().unwrap().elem_count()
        + m.decoder.blocks.len() * 2 * 512) as u64
        * 2;
    held += floats;
    assert!(
        (peak as u64) <= held + layer_bf16,
        "peak {peak} bytes over the model's {held} plus a layer's {layer_bf16}"
    );
    // And the bound is not slack: the whole model in bf16 would be far above it.
    let whole_bf16 = layer_bf16 * 6 + floats;
    assert!(
        held + layer_bf16 < whole_bf16 * 6 / 10,
        "{held} {layer_bf16} {whole_bf16}"
    );
}
