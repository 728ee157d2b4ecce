//! One `#[export_module]` per domain, registered as static modules (`io::read_text(..)`), plus
//! the global functions every recipe uses (`params`).

pub mod core;
pub mod data;
pub mod io;
pub mod lora;
pub mod model;
pub mod params;
pub mod serve;
pub mod tokenizer;
pub mod train;
