//! Script handles for engine objects. They are cheap to clone (`Arc`), and operations return new
//! handles rather than mutating their inputs, so re-running a cell never sees a later cell's edits.

use std::sync::Arc;

use qscript_runtime::data::Dataset;
use qscript_runtime::model::Model;
use qscript_runtime::tokenizer::Tokenizer;

pub use qscript_runtime::data::Data;

/// A loaded model (`Model` in scripts).
#[derive(Clone, Debug)]
pub struct ModelHandle(pub Arc<Model>);

/// A tokenizer (`Tokenizer` in scripts).
#[derive(Clone, Debug)]
pub struct TokenizerHandle(pub Arc<Tokenizer>);

/// A dataset (`Dataset` in scripts): records or tokenized examples ([`Data`]), shared.
#[derive(Clone, Debug)]
pub struct DatasetHandle(pub Arc<Data>);

impl DatasetHandle {
    /// Where the dataset lives: the same for every copy of this handle.
    pub fn address(&self) -> usize {
        Arc::as_ptr(&self.0) as usize
    }

    /// From records.
    pub fn records(ds: Dataset) -> Self {
        Self::new(Data::Records(ds))
    }

    /// From records or examples.
    pub fn new(data: Data) -> Self {
        Self(Arc::new(data))
    }
}

impl std::ops::Deref for DatasetHandle {
    type Target = Data;

    fn deref(&self) -> &Data {
        &self.0
    }
}

/// `for r in ds { }`: each record (or example) as a map, in order.
#[derive(Clone, Debug)]
pub struct DatasetIter {
    ds: DatasetHandle,
    next: usize,
}

impl Iterator for DatasetIter {
    type Item = rhai::Dynamic;

    fn next(&mut self) -> Option<rhai::Dynamic> {
        let row = self.ds.row_json(self.next)?;
        self.next += 1;
        rhai::serde::to_dynamic(row).ok()
    }
}

impl IntoIterator for DatasetHandle {
    type Item = rhai::Dynamic;
    type IntoIter = DatasetIter;

    fn into_iter(self) -> DatasetIter {
        DatasetIter { ds: self, next: 0 }
    }
}

/// A server a recipe started (`Server` in scripts): where it listens, and its id in the
/// session's [`crate::servers::Servers`].
#[derive(Clone, Debug)]
pub struct ServerHandle {
    /// `http://host:port`.
    pub url: String,
    /// The session's id of it (`None`: a dry run started nothing).
    pub id: Option<usize>,
}

/// Registers the handle types with their script names.
pub fn register(engine: &mut rhai::Engine) {
    engine.register_type_with_name::<ModelHandle>("Model");
    engine.register_type_with_name::<TokenizerHandle>("Tokenizer");
    engine.register_type_with_name::<DatasetHandle>("Dataset");
    engine.register_type_with_name::<ServerHandle>("Server");
    engine.register_iterator::<DatasetHandle>();
}
