//! Script handles for engine objects. They are cheap to clone (`Arc`), and operations return new
//! handles rather than mutating their inputs, so re-running a cell never sees a later cell's edits.

use std::sync::Arc;

use qscript_runtime::model::Model;
use qscript_runtime::tokenizer::Tokenizer;

/// A loaded model (`Model` in scripts).
#[derive(Clone, Debug)]
pub struct ModelHandle(pub Arc<Model>);

/// A tokenizer (`Tokenizer` in scripts).
#[derive(Clone, Debug)]
pub struct TokenizerHandle(pub Arc<Tokenizer>);

/// Registers the handle types with their script names.
pub fn register(engine: &mut rhai::Engine) {
    engine.register_type_with_name::<ModelHandle>("Model");
    engine.register_type_with_name::<TokenizerHandle>("Tokenizer");
}
