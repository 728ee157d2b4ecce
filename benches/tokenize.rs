//! Benchmark (not a test): load + convert + SFT-tokenize huanhuan.json and alpaca_zh_demo.json with
//! the real Qwen2.5 tokenizer, the work `data::to_messages` + `data::sft` do in a recipe. The peer
//! is `scripts/bench_tokenize_hf.py` (HF datasets.map + a transformers tokenizer).
//!
//! ```sh
//! cargo bench --bench tokenize
//! ```
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::Instant;

use qscript_runtime::cancel::CancelToken;
use qscript_runtime::data::formats::{FormatOptions, to_messages};
use qscript_runtime::data::load_files;
use qscript_runtime::data::sft::{SftOptions, sft, stats};
use qscript_runtime::testing::fixtures_dir;
use qscript_runtime::tokenizer::Tokenizer;

fn main() {
    let Some(fx) = fixtures_dir("the tokenize benchmark") else {
        return;
    };
    let t = Instant::now();
    let tok = Tokenizer::load(
        &fx.join("tokenizers/qwen2.5"),
        &qscript_runtime::cancel::CancelToken::new(),
    )
    .unwrap();
    println!("tokenizer load: {:.3} s", t.elapsed().as_secs_f64());
    let fmt = FormatOptions {
        system: Some("现在你要扮演皇帝身边的女人--甄嬛".into()),
        ..FormatOptions::default()
    };
    let opts = SftOptions {
        max_length: 1024,
        ..SftOptions::default()
    };
    for (name, path) in [
        ("huanhuan", "datasets/huanhuan/huanhuan.json"),
        (
            "alpaca_zh_demo",
            "datasets/llamafactory/alpaca_zh_demo.json",
        ),
    ] {
        let mut best = f64::MAX;
        let mut tokens = 0;
        let mut records = 0;
        for _ in 0..5 {
            let t0 = Instant::now();
            let ds = load_files(&[fx.join(path)]).unwrap();
            let conv = to_messages(&ds, &fmt).unwrap();
            let r = sft(&conv.dataset, &tok, &opts, &CancelToken::new()).unwrap();
            best = best.min(t0.elapsed().as_secs_f64());
            let s = stats(&r.examples);
            (tokens, records) = (s.total_tokens, s.count);
        }
        println!(
            "{}",
            serde_json::json!({"system": "qscript", "dataset": name, "records": records, "tokens": tokens, "seconds": (best * 1000.0).round() / 1000.0, "threads": rayon_threads()})
        );
    }
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}
