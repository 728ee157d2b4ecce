//! `data`: datasets from JSON/JSONL files or LLaMA-Factory's dataset_info.json, conversion to chat
//! messages, SFT tokenization with label masks, and the usual dataset operations. The work is
//! `qscript_runtime::data`'s; this module reads the options, calls it, wraps the result in a
//! `Dataset` handle and prints what it did. `map` and `filter` call script functions, so they
//! live here.

#[allow(clippy::wildcard_imports)]
use rhai::plugin::*;

use rhai::{EvalAltResult, FnPtr};

use crate::context::RunContext;
use crate::error::script_error;
use crate::handles::{Data, DatasetHandle};
use qscript_runtime::data::split::SplitOptions;

type Res<T> = Result<T, Box<EvalAltResult>>;

/// Entry `name` of the `dataset_info.json` at `path`, as chat messages.
fn info_entry(ctx: &NativeCallContext, path: &str, name: &str) -> Res<DatasetHandle> {
    use crate::error::to_rhai_at;
    use qscript_runtime::data::{formats, info, load_files};
    let rc = RunContext::of(ctx)?;
    let real = rc.sandbox.resolve_read(path).map_err(to_rhai_at(ctx))?;
    let (file, opts) = info::read_info(&real, name).map_err(to_rhai_at(ctx))?;
    let file = rc.sandbox.resolve_read(&file).map_err(to_rhai_at(ctx))?;
    let ds = load_files(&[file]).map_err(to_rhai_at(ctx))?;
    if let Some(column) = ds
        .rows
        .first()
        .and_then(|r| info::pretrain_column(&opts, r))
    {
        let text = formats::to_text(&ds, &column).map_err(to_rhai_at(ctx))?;
        rc.sink.err(&format!(
            "data: `{name}`: {} records, format `text` (pretraining text, column `{column}`) from dataset_info.json",
            text.len()
        ));
        return Ok(DatasetHandle::records(text));
    }
    if opts.preference {
        let trl =
            qscript_runtime::data::pref_records::to_trl(&ds, &opts).map_err(to_rhai_at(ctx))?;
        rc.sink.err(&format!(
            "data: `{name}`: {} records, preference data (`{}`) from dataset_info.json, for `data::preference`",
            trl.len(),
            if opts.columns.kto_tag.is_some() { "kto_tag" } else { "ranking" }
        ));
        return Ok(DatasetHandle::records(trl));
    }
    let conv = formats::to_messages(&ds, &opts).map_err(to_rhai_at(ctx))?;
    rc.sink.err(&format!(
        "data: `{name}`: {} records, format `{}` from dataset_info.json",
        conv.dataset.len(),
        conv.format
    ));
    Ok(DatasetHandle::records(conv.dataset))
}

/// The datasets of a script list, or an error naming the item that is not one.
fn datasets(ctx: &NativeCallContext, what: &str, list: rhai::Array) -> Res<Vec<DatasetHandle>> {
    if list.is_empty() {
        return Err(at(
            ctx,
            script_error(
                "invalid_argument",
                format!("`{what}` needs a list of datasets, got an empty one"),
            ),
        ));
    }
    list.into_iter()
        .enumerate()
        .map(|(k, d)| {
            let shown = d.to_string();
            d.try_cast::<DatasetHandle>().ok_or_else(|| {
                at(
                    ctx,
                    script_error(
                        "invalid_argument",
                        format!("`{what}`: item {k} is not a dataset: `{shown}`"),
                    ),
                )
            })
        })
        .collect()
}

/// The datasets the handles hold, for the runtime's operations.
fn contents(parts: &[DatasetHandle]) -> Vec<&Data> {
    parts.iter().map(|p| &*p.0).collect()
}

/// The options of `train_test_split`, read as they always have been: an unknown key as
/// `from_options` words it, at the call; a bad value on its own. Read from the script's values
/// themselves (not through JSON, as `from_options` does), so that a value JSON cannot hold (`NaN`,
/// a char, a blob) reads as it did.
fn split_options(ctx: &NativeCallContext, opts: rhai::Map) -> Res<SplitOptions> {
    use rhai::{LexError, ParseErrorType};
    // Values of a type serde cannot take (a handle, a function) are named here, by their script
    // type, before serde would name its own.
    for (k, v) in &opts {
        let number = v.is_float() || v.is_int();
        match k.as_str() {
            "test_size" if !number => {
                return Err(script_error(
                    "options",
                    format!(
                        "`test_size` is {}, expected a number",
                        ctx.engine().map_type_name(v.type_name())
                    ),
                ));
            }
            "seed" if !v.is_int() => {
                return Err(script_error(
                    "options",
                    "`seed` must be a non-negative integer",
                ));
            }
            _ => {}
        }
    }
    rhai::serde::from_dynamic(&Dynamic::from_map(opts)).map_err(|e| {
        let fail = |m: &str| {
            at(
                ctx,
                script_error(
                    "options",
                    format!("invalid options for `train_test_split`: {m}"),
                ),
            )
        };
        // rhai carries the options' own messages (serde's `custom`) as this lex error.
        match *e {
            EvalAltResult::ErrorParsing(
                ParseErrorType::BadInput(LexError::ImproperSymbol(_, m)),
                _,
            ) => {
                if m.starts_with("unknown field") {
                    fail(&m)
                } else {
                    script_error("options", m)
                }
            }
            other => fail(&other.to_string()),
        }
    })
}

/// Calls `f(record)` on every record in parallel (order kept); errors name the record.
fn par_call(
    ctx: &NativeCallContext,
    ds: &DatasetHandle,
    f: &FnPtr,
    what: &str,
) -> Res<Vec<Dynamic>> {
    use rayon::prelude::*;
    let engine = ctx.engine();
    let n = ds.len();
    let bar = (n >= 20_000).then(|| {
        let b = indicatif::ProgressBar::new(n as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed}<{eta}]")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_message(what.to_string());
        b
    });
    let ast = crate::context::lock(&RunContext::of(ctx)?.functions).clone();
    // Captured variables are shared cells; parallel calls would contend for them. Each call gets
    // a plain copy instead (so a map function cannot mutate what it captured).
    let mut f = f.clone();
    let captured: Vec<Dynamic> = f.curry().iter().map(Dynamic::flatten_clone).collect();
    f.set_curry(captured);
    let f = &f;
    // On the workers: the main thread's stack, so a callback within the call-depth limit is as
    // safe there as on the main thread.
    // The callback's file reads go through the run's sandbox there too.
    let sandbox = qscript_runtime::sandbox::active();
    let results: Vec<Res<Dynamic>> = qscript_runtime::panic::in_workers(|| {
        (0..n)
            .into_par_iter()
            .map(|i| {
                let row = ds.row_json(i).unwrap_or_default();
                let arg = rhai::serde::to_dynamic(&row)?;
                let call = || f.call::<Dynamic>(engine, &ast, (arg,));
                let r = qscript_runtime::sandbox::with_active(sandbox.clone(), call).map_err(|e| {
                    let shown = serde_json::to_string(&row).unwrap_or_default();
                    let shown: String = shown.chars().take(400).collect();
                    script_error(what, format!("record {i}: {e}\n  record: {shown}"))
                });
                if let Some(b) = &bar {
                    b.inc(1);
                }
                r
            })
            .collect()
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    results.into_iter().collect()
}

/// Positions an error at the script's call site unless it has a position.
fn at(ctx: &NativeCallContext, mut e: Box<EvalAltResult>) -> Box<EvalAltResult> {
    if e.position().is_none() {
        e.set_position(ctx.call_position());
    }
    e
}

/// The `data` module and the `Dataset` methods.
// rhai's macro unwraps the `&mut` receiver of functions that also take a NativeCallContext.
#[allow(clippy::unwrap_used)]
#[export_module]
pub mod data_module {
    use std::path::PathBuf;

    use qscript_runtime::data::formats::{self, FormatOptions};
    use qscript_runtime::data::interleave::{self as interleave_impl, InterleaveOptions};
    use qscript_runtime::data::records::{self, LoadOptions};
    use qscript_runtime::data::sft::{self as sft_impl, SftOptions};
    use qscript_runtime::data::split as split_impl;
    use qscript_runtime::data::{Dataset, TokenizedDataset};
    use rhai::{Array, FnPtr, Map};

    use super::{Res, at, contents, datasets, info_entry, par_call, split_options};
    use crate::context::{Memo, RunContext};
    use crate::error::{script_error, to_rhai, to_rhai_at};
    use crate::handles::{Data, DatasetHandle, TokenizerHandle};
    use crate::options::{from_options, to_usize};

    /// Loads records from a JSON array, a JSONL file, a parquet file (HF datasets'
    /// `data/train-00000-of-00001.parquet`: each row a record, lists and structs as arrays and
    /// maps), an Arrow IPC file (`.arrow`, as HF datasets caches them), or a glob of them (`data/*.jsonl`), relative to the recipe. A bad JSONL line is
    /// reported with its file and line number. A `.txt` file is plain text: one `#{ text }`
    /// record per non-blank line (HF datasets' `text` loader), for pretraining with `data::sft`.
    ///
    /// ```rhai
    /// io::write_text("d.jsonl", "{\"instruction\": \"hi\", \"output\": \"hello\"}\n");
    /// let ds = data::load(io::output_dir() + "/d.jsonl");
    /// assert(ds.len() == 1);
    /// ```
    #[rhai_fn(return_raw)]
    pub fn load(ctx: NativeCallContext, path: &str) -> Res<DatasetHandle> {
        load_with(ctx, path, Map::new())
    }

    /// Loads records with options: `max_samples` keeps the first N. A hub id
    /// (`"llamafactory/DPO-En-Zh-20k"`) that is not a local path loads the dataset from the HF
    /// cache where `huggingface-cli download --repo-type dataset` put it: `split` (default
    /// `train`) picks the data files named for it, `revision` a branch, tag or commit; a
    /// dataset only `datasets.load_dataset` built (its Arrow files in `$HF_DATASETS_CACHE` or
    /// `~/.cache/huggingface/datasets`) loads from there. A directory (a dataset repo's files,
    /// `data/train-00000-of-00001.parquet`, `test.jsonl`) loads its `split` the same way.
    ///
    /// ```rhai
    /// io::write_text("d.json", `[{"x": 1}, {"x": 2}, {"x": 3}]`);
    /// let ds = data::load(io::output_dir() + "/d.json", #{ max_samples: 2 });
    /// assert(ds.len() == 2);
    /// ```
    #[rhai_fn(name = "load", return_raw)]
    pub fn load_with(ctx: NativeCallContext, path: &str, opts: Map) -> Res<DatasetHandle> {
        let rc = RunContext::of(&ctx)?;
        let o: LoadOptions = from_options(&ctx, "data::load", opts)?;
        let files = if rc.is_hub_id(path) {
            // A hub dataset in the HF cache: its split's data files; or, when the hub cache
            // has not got it, the Arrow files `datasets.load_dataset` built.
            let split = o.split.as_deref().unwrap_or("train");
            let named = |e: qscript_runtime::Error| {
                to_rhai_at(&ctx)(qscript_runtime::Error::InvalidArgument(format!(
                    "`{path}` (HF cache): {e}"
                )))
            };
            match rc.resolve_repo_dir(
                path,
                qscript_runtime::hub::RepoType::Dataset,
                o.revision.as_deref(),
            ) {
                Ok(dir) => records::split_files(&dir, split, &rc.cancel)
                    .and_then(|fs| rc.readable_files(fs))
                    .map_err(named)?,
                Err(e) => {
                    let built = qscript_runtime::hub::datasets_cache_root().and_then(|root| {
                        qscript_runtime::hub::datasets_cache_split(&root, path, split)
                    });
                    let Some((folder, files)) = built.filter(|_| o.revision.is_none()) else {
                        return Err(to_rhai_at(&ctx)(e));
                    };
                    rc.sandbox.allow_hub_repo(&folder).map_err(named)?;
                    let files = rc.readable_files(files).map_err(named)?;
                    rc.sink.err(&format!(
                        "hub: `{path}` ({split}) from the datasets cache (`{}`, {} Arrow file{})",
                        folder.display(),
                        files.len(),
                        if files.len() == 1 { "" } else { "s" }
                    ));
                    files
                }
            }
        } else if let Some(dir) = rc
            .sandbox
            .resolve_read(path)
            .ok()
            .filter(|p| p.is_dir() && !path.contains(['*', '?', '[']))
        {
            // A dataset directory (a hub dataset's files, `data/train-*.parquet`): its split.
            if o.revision.is_some() {
                return Err(at(
                    &ctx,
                    script_error(
                        "invalid_argument",
                        format!(
                            "`revision` is for a hub dataset in the HF cache; `{path}` is a directory"
                        ),
                    ),
                ));
            }
            let split = o.split.as_deref().unwrap_or("train");
            records::split_files(&dir, split, &rc.cancel)
                .and_then(|fs| rc.readable_files(fs))
                .map_err(|e| {
                    to_rhai_at(&ctx)(qscript_runtime::Error::InvalidArgument(format!(
                        "`{path}`: {e}"
                    )))
                })?
        } else {
            if o.split.is_some() || o.revision.is_some() {
                return Err(at(
                    &ctx,
                    script_error(
                        "invalid_argument",
                        format!(
                            "`split` and `revision` are for a dataset directory or a hub dataset in the HF cache; `{path}` is a file"
                        ),
                    ),
                ));
            }
            records::resolve_files(&rc.sandbox, path, &rc.cancel).map_err(to_rhai_at(&ctx))?
        };
        let refs: Vec<&std::path::Path> = files.iter().map(PathBuf::as_path).collect();
        let key = Memo::key("data::load", &format!("{files:?} {o:?}"), &refs).map_err(to_rhai)?;
        let v = rc.memo.get_or_try_insert(&key, || {
            let ds = records::load(&files, &o).map_err(to_rhai_at(&ctx))?;
            Ok::<_, Box<EvalAltResult>>(Dynamic::from(DatasetHandle::records(ds)))
        })?;
        Ok(v.cast())
    }

    /// Loads entry `name` of a LLaMA-Factory `dataset_info.json` (`file_name`, `formatting`,
    /// `columns`, `tags`) and converts it to chat messages. An entry of pretraining text (only a
    /// `prompt` column, records without a response: `c4_demo`, `wiki_demo`) gives `#{ text }`
    /// records, which `data::sft` trains as plain causal LM. Preference and KTO entries
    /// (`ranking`, `kto_tag`) give TRL's records (`{prompt, chosen, rejected}` or `{prompt,
    /// completion, label}`, conversations), for `data::preference`.
    ///
    /// ```rhai
    /// io::write_text("info/d.json", `[{"q": "hi", "a": "hello"}]`);
    /// io::write_text("info/dataset_info.json", `{"demo": {"file_name": "d.json", "columns": {"prompt": "q", "response": "a"}}}`);
    /// let ds = data::from_info(io::output_dir() + "/info/dataset_info.json", "demo");
    /// assert(ds[0].messages[1].content == "hello");
    /// ```
    #[rhai_fn(return_raw)]
    pub fn from_info(ctx: NativeCallContext, path: &str, name: &str) -> Res<DatasetHandle> {
        if name.contains(',') {
            // LLaMA-Factory's `dataset: a,b`.
            let names = name
                .split(',')
                .map(|n| Dynamic::from(n.trim().to_string()))
                .collect();
            return from_info_many(ctx, path, names);
        }
        info_entry(&ctx, path, name)
    }

    /// Loads several entries of a `dataset_info.json` and concatenates them, as LLaMA-Factory's
    /// `dataset: a,b` does.
    ///
    /// ```rhai
    /// io::write_text("info/a.json", `[{"q": "hi", "a": "hello"}]`);
    /// io::write_text("info/b.json", `[{"conversations": [{"from": "human", "value": "yo"}, {"from": "gpt", "value": "hey"}]}]`);
    /// io::write_text("info/dataset_info.json", `{"a": {"file_name": "a.json", "columns": {"prompt": "q", "response": "a"}}, "b": {"file_name": "b.json", "formatting": "sharegpt"}}`);
    /// let ds = data::from_info(io::output_dir() + "/info/dataset_info.json", ["a", "b"]);
    /// assert(ds.len() == 2 && ds[1].messages[1].content == "hey");
    /// ```
    #[rhai_fn(name = "from_info", return_raw)]
    pub fn from_info_many(ctx: NativeCallContext, path: &str, names: Array) -> Res<DatasetHandle> {
        let mut parts = Vec::with_capacity(names.len());
        for (k, n) in names.into_iter().enumerate() {
            let Ok(name) = n.into_string() else {
                return Err(at(
                    &ctx,
                    script_error(
                        "invalid_argument",
                        format!("`data::from_info`: name {k} is not a string"),
                    ),
                ));
            };
            parts.push(info_entry(&ctx, path, &name)?);
        }
        Data::concat(&contents(&parts))
            .map(DatasetHandle::new)
            .map_err(to_rhai_at(&ctx))
    }

    /// The datasets one after another (all records, or all tokenized examples).
    ///
    /// ```rhai
    /// io::write_text("a.json", `[{"x": 1}, {"x": 2}]`);
    /// io::write_text("b.json", `[{"x": 3}]`);
    /// let a = data::load(io::output_dir() + "/a.json");
    /// let ds = data::concat([a, data::load(io::output_dir() + "/b.json")]);
    /// assert(ds.len() == 3 && ds[2].x == 3);
    /// let total = 0;
    /// for r in ds { total += r.x; }
    /// assert(total == 6);
    /// ```
    #[rhai_fn(return_raw)]
    pub fn concat(ctx: NativeCallContext, list: Array) -> Res<DatasetHandle> {
        let parts = datasets(&ctx, "data::concat", list)?;
        Data::concat(&contents(&parts))
            .map(DatasetHandle::new)
            .map_err(to_rhai_at(&ctx))
    }

    /// Alternates between datasets, as HF datasets' `interleave_datasets` does: in turn, or drawn
    /// with `probabilities` (seeded by `seed`), until one runs out (`stopping_strategy:
    /// "first_exhausted"`) or every one has been used up once, the others starting over
    /// (`"all_exhausted"`). The draws are qscript's own (seeded), not numpy's.
    ///
    /// ```rhai
    /// io::write_text("a.json", `[{"x": 1}, {"x": 2}]`);
    /// io::write_text("b.json", `[{"x": 10}, {"x": 20}, {"x": 30}]`);
    /// let a = data::load(io::output_dir() + "/a.json");
    /// let b = data::load(io::output_dir() + "/b.json");
    /// let ds = data::interleave([a, b], #{ stopping_strategy: "all_exhausted" });
    /// assert(ds.len() == 6 && ds[1].x == 10 && ds[4].x == 1);
    /// let mixed = data::interleave([a, b], #{ probabilities: [0.5, 0.5], seed: 42 });
    /// assert(mixed.len() >= 2);
    /// ```
    #[rhai_fn(return_raw)]
    pub fn interleave(ctx: NativeCallContext, list: Array, opts: Map) -> Res<DatasetHandle> {
        let o: InterleaveOptions = from_options(&ctx, "data::interleave", opts)?;
        let parts = datasets(&ctx, "data::interleave", list)?;
        interleave_impl::interleave(&contents(&parts), &o)
            .map(DatasetHandle::new)
            .map_err(to_rhai_at(&ctx))
    }

    /// `interleave` in turn, until one dataset runs out.
    ///
    /// ```rhai
    /// io::write_text("a.json", `[{"x": 1}, {"x": 2}]`);
    /// io::write_text("b.json", `[{"x": 10}]`);
    /// let ds = data::interleave([data::load(io::output_dir() + "/a.json"), data::load(io::output_dir() + "/b.json")]);
    /// assert(ds.len() == 3 && ds[2].x == 2);
    /// ```
    #[rhai_fn(name = "interleave", return_raw)]
    pub fn interleave_default(ctx: NativeCallContext, list: Array) -> Res<DatasetHandle> {
        interleave(ctx, list, Map::new())
    }

    /// Converts records to chat messages (`#{ messages: [#{ role, content }] }`).
    ///
    /// # Options
    /// `format` (`"auto"`, `"alpaca"`, `"sharegpt"`, `"messages"`, `"conversation"`), `system`
    /// (a system prompt for records without one), `columns` and `tags` (LLaMA-Factory's names),
    /// `input_separator` (`"\n"`). `auto` prints what it detected and why.
    ///
    /// ```rhai
    /// io::write_text("a.json", `[{"instruction": "你是谁？", "input": "", "output": "我是甄嬛。"}]`);
    /// let ds = data::to_messages(data::load(io::output_dir() + "/a.json"), #{ system: "现在你要扮演甄嬛" });
    /// assert(ds[0].messages.len() == 3);
    /// ```
    #[rhai_fn(global, return_raw)]
    pub fn to_messages(ctx: NativeCallContext, ds: DatasetHandle, opts: Map) -> Res<DatasetHandle> {
        let rc = RunContext::of(&ctx)?;
        let o: FormatOptions = from_options(&ctx, "data::to_messages", opts)?;
        let Data::Records(records) = &*ds.0 else {
            return Err(at(
                &ctx,
                script_error(
                    "invalid_argument",
                    "`data::to_messages` takes records, not tokenized examples",
                ),
            ));
        };
        let conv = formats::to_messages(records, &o).map_err(to_rhai_at(&ctx))?;
        if o.format == "auto" {
            rc.sink.err(&format!(
                "data: detected format `{}`: {}",
                conv.format, conv.reason
            ));
        }
        Ok(DatasetHandle::records(conv.dataset))
    }

    /// Converts records to chat messages, detecting the format.
    ///
    /// ```rhai
    /// io::write_text("s.json", `[{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]`);
    /// let ds = data::to_messages(data::load(io::output_dir() + "/s.json"));
    /// assert(ds[0].messages[0].role == "user");
    /// ```
    #[rhai_fn(global, name = "to_messages", return_raw)]
    pub fn to_messages_auto(ctx: NativeCallContext, ds: DatasetHandle) -> Res<DatasetHandle> {
        to_messages(ctx, ds, Map::new())
    }

    /// Tokenizes conversations for supervised fine-tuning: `input_ids`, `labels` (-100 on system,
    /// user and template tokens) and `attention_mask`. Reports how many examples were truncated,
    /// and drops (with a count) those left with no label.
    ///
    /// Records of plain text (no `messages`; a string `text`, or the field
    /// `dataset_text_field` names) are pretraining data, as TRL's language-modeling datasets and
    /// LLaMA-Factory's `stage: pt`: tokenized with the tokenizer's special tokens, eos appended,
    /// every token learned; `train::fit`'s `packing: true` packs them. Preference and KTO records
    /// (`chosen`/`rejected`, a boolean `label`) are an error: preference training is not
    /// supported yet.
    ///
    /// # Options
    /// `max_length` (1024), `train_on` (`"assistant"`, `"last_assistant"`, `"all"`), `template`
    /// (`"model"` or a Jinja template; saved with the tokenizer, so the exported model chats as
    /// it was trained), `dataset_text_field` (`"text"`).
    ///
    /// ```rhai
    /// io::write_text("a.json", `[{"instruction": "hi", "output": "hello"}]`);
    /// let msgs = data::to_messages(data::load(io::output_dir() + "/a.json"));
    /// let ds = data::sft(msgs, tokenizer::builtin(), #{ max_length: 128 });
    /// assert(ds[0].labels[0] == -100);
    ///
    /// // Pretraining text (a `.txt` file: one document a line; or `{"text": ...}` records)
    /// io::write_text("wiki.txt", "Anarchism is a political philosophy.\nAutism is a condition.\n");
    /// let pt = data::sft(data::load(io::output_dir() + "/wiki.txt"), tokenizer::builtin());
    /// assert(pt.len() == 2 && pt[0].labels == pt[0].input_ids);
    /// assert(pt[0].input_ids[-1] == tokenizer::builtin().eos_id);
    /// io::write_text("c4.jsonl", `{"content": "Some web text."}`);
    /// let c4 = data::sft(data::load(io::output_dir() + "/c4.jsonl"), tokenizer::builtin(), #{ dataset_text_field: "content" });
    /// assert(c4.stats().trained_tokens == c4.stats().total_tokens);
    /// ```
    #[rhai_fn(global, return_raw)]
    pub fn sft(
        ctx: NativeCallContext,
        ds: DatasetHandle,
        tok: TokenizerHandle,
        opts: Map,
    ) -> Res<DatasetHandle> {
        let rc = RunContext::of(&ctx)?;
        let mut o: SftOptions = from_options(&ctx, "data::sft", opts)?;
        o.max_record_bytes = rc.max_record_bytes;
        let Data::Records(records) = &*ds.0 else {
            return Err(at(
                &ctx,
                script_error(
                    "invalid_argument",
                    "`data::sft` takes conversations (records with `messages`), not tokenized examples",
                ),
            ));
        };
        let r = sft_impl::sft(records, &tok.0, &o, &rc.cancel).map_err(to_rhai_at(&ctx))?;
        if o.template == "model"
            && o.train_on == "assistant"
            && tok
                .0
                .chat_template
                .as_deref()
                .and_then(qscript_runtime::chat_template::training_variant)
                .is_some()
        {
            rc.sink.err(
                "data: the tokenizer's chat template (Qwen3's) drops earlier turns' <think> blocks; \
                 SFT renders every assistant turn with its block and learns each, as TRL's \
                 `assistant_only_loss` does",
            );
        }
        if o.template != "model" {
            // Saved with the tokenizer: the exported model chats as it was trained.
            tok.0.set_trained_template(&o.template);
        }
        rc.sink.err(&format!(
            "data: tokenized {} examples ({} truncated at {} tokens, {} dropped with every label masked)",
            r.examples.len(),
            r.truncated,
            o.max_length,
            r.dropped
        ));
        if r.text > 0 {
            rc.sink.err(&format!(
                "data: {} records are plain text (`{}`): every token learned, eos appended",
                r.text, o.dataset_text_field
            ));
        }
        if r.tool_turns_dropped > 0 || r.tools_ignored > 0 {
            let via = tok.0.template_source.as_ref().map_or_else(
                || "the tokenizer's chat template".to_string(),
                |p| format!("the chat template of `{}`", p.display()),
            );
            rc.sink.err(&format!(
                "warning: {via} does not render tool calls: {} assistant turns with tool calls are \
                 not trained (they would teach an empty turn) and {} records' `tools` lists are \
                 left out; use a tokenizer whose template renders tools (Qwen2.5's does) or pass \
                 `template` to `data::sft`",
                r.tool_turns_dropped, r.tools_ignored
            ));
        }
        if r.examples.is_empty() {
            return Err(at(
                &ctx,
                script_error(
                    "data",
                    format!("`{}`: no example is left to train on", records.source),
                ),
            ));
        }
        let mut check_fact = None;
        if rc.check_mode.load(std::sync::atomic::Ordering::Relaxed) {
            let longest = r
                .examples
                .iter()
                .map(|e| e.input_ids.len())
                .max()
                .unwrap_or(0);
            let fact = format!(
                "{} examples from `{}` (longest {longest} tokens, {} cut at {}, {} dropped)",
                r.examples.len(),
                records.source,
                r.truncated,
                o.max_length,
                r.dropped
            );
            rc.check_fact("data", fact.clone());
            check_fact = Some(fact);
            for (k, ex) in r.examples.iter().take(2).enumerate() {
                rc.sink.out(&format!(
                    "check: example {k} (record {}), {} tokens, learned spans in [[...]]:",
                    r.source_index[k],
                    ex.input_ids.len()
                ));
                rc.sink.out(&sft_impl::masked_spans(&tok.0, ex));
            }
        }
        let out = DatasetHandle::new(Data::Tokenized(TokenizedDataset::from_report(
            r,
            records.source.clone(),
            tok.0.vocab_size(),
        )));
        if let Some(fact) = check_fact {
            crate::context::lock(&rc.sft_facts).insert(out.address(), (out.len(), fact));
        }
        Ok(out)
    }

    /// `sft` with the default options.
    ///
    /// ```rhai
    /// io::write_text("a.json", `[{"instruction": "hi", "output": "hello"}]`);
    /// let ds = data::sft(data::to_messages(data::load(io::output_dir() + "/a.json")), tokenizer::builtin());
    /// assert(ds.len() == 1);
    /// // every data function that takes a dataset is also a method
    /// let same = data::load(io::output_dir() + "/a.json").to_messages().sft(tokenizer::builtin());
    /// assert(same[0].input_ids == ds[0].input_ids);
    /// ```
    #[rhai_fn(global, name = "sft", return_raw)]
    pub fn sft_default(
        ctx: NativeCallContext,
        ds: DatasetHandle,
        tok: TokenizerHandle,
    ) -> Res<DatasetHandle> {
        sft(ctx, ds, tok, Map::new())
    }

    /// Tokenizes preference data for `train::dpo` (pairs) or `train::kto` (a `label` per
    /// answer), as TRL does: the shapes users have are detected (TRL's `{prompt, chosen,
    /// rejected}` as text or conversations, with or without an explicit prompt; LLaMA-Factory's
    /// ShareGPT and alpaca ranking data, v1's `chosen_messages` / `rejected_messages`; KTO's
    /// `{prompt, completion, label}` or a conversation and a `label`). Conversations go through
    /// the chat template; the answer starts where the prompt's tokens end, so both rows share the
    /// prompt exactly. Records with a missing side, an empty answer, or the same answer twice are
    /// skipped and named.
    ///
    /// | option | default | meaning |
    /// |---|---|---|
    /// | `max_length` | 1024 | each row (prompt + answer) keeps its first this many tokens; a record whose prompt alone fills it is dropped (0: no limit) |
    /// | `max_prompt_length` | none | a longer prompt keeps its last this many tokens |
    /// | `template` | `"model"` | the tokenizer's chat template, or a Jinja template |
    ///
    /// ```rhai
    /// io::write_text("p.jsonl", `{"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}`);
    /// let pairs = data::preference(data::load(io::output_dir() + "/p.jsonl"), tokenizer::builtin(), #{ max_length: 512 });
    /// assert(pairs.len() == 1);
    /// assert(pairs[0].chosen_ids != pairs[0].rejected_ids);
    /// ```
    #[rhai_fn(global, return_raw)]
    pub fn preference(
        ctx: NativeCallContext,
        ds: DatasetHandle,
        tok: TokenizerHandle,
        opts: Map,
    ) -> Res<DatasetHandle> {
        use qscript_runtime::data::pref::{self, PrefOptions};
        let rc = RunContext::of(&ctx)?;
        let mut o: PrefOptions = from_options(&ctx, "data::preference", opts)?;
        o.max_record_bytes = rc.max_record_bytes;
        let Data::Records(records) = &*ds.0 else {
            return Err(at(
                &ctx,
                script_error(
                    "invalid_argument",
                    "`data::preference` takes records (pairs or KTO data), not tokenized examples",
                ),
            ));
        };
        let r = pref::tokenize(records, &tok.0, &o, &rc.cancel).map_err(to_rhai_at(&ctx))?;
        if o.template != "model" {
            tok.0.set_trained_template(&o.template);
        }
        let what = if r.desirable == (0, 0) {
            "pairs".to_string()
        } else {
            format!(
                "KTO answers ({} desirable, {} undesirable)",
                r.desirable.0, r.desirable.1
            )
        };
        rc.sink.err(&format!(
            "data: tokenized {} {what} ({} truncated, {} dropped with the prompt filling `max_length` {})",
            r.examples.len(),
            r.truncated,
            r.dropped,
            o.max_length
        ));
        if !r.skipped.is_empty() {
            let shown: Vec<String> = r
                .skipped
                .iter()
                .take(3)
                .map(|(i, why)| format!("record {i}: {why}"))
                .collect();
            rc.sink.err(&format!(
                "warning: `{}`: {} records skipped ({}{})",
                records.source,
                r.skipped.len(),
                shown.join("; "),
                if r.skipped.len() > 3 { "; ..." } else { "" }
            ));
        }
        if r.examples.is_empty() {
            return Err(at(
                &ctx,
                script_error(
                    "data",
                    format!("`{}`: no example is left to train on", records.source),
                ),
            ));
        }
        if rc.check_mode.load(std::sync::atomic::Ordering::Relaxed) {
            let longest = r
                .examples
                .iter()
                .map(qscript_runtime::data::example::Example::longest)
                .max()
                .unwrap_or(0);
            rc.check_fact(
                "data",
                format!(
                    "{} {what} from `{}` (longest row {longest} tokens, two rows an example)",
                    r.examples.len(),
                    records.source
                ),
            );
        }
        Ok(DatasetHandle::new(Data::Tokenized(TokenizedDataset {
            examples: r.examples,
            source: records.source.clone(),
            truncated: r.truncated,
            dropped: r.dropped,
            vocab: tok.0.vocab_size(),
        })))
    }

    /// `preference` with the default options.
    ///
    /// ```rhai
    /// io::write_text("k.jsonl", "{\"prompt\": \"Q: 2+2? A:\", \"completion\": \" 4\", \"label\": true}\n{\"prompt\": \"Q: 3+3? A:\", \"completion\": \" 7\", \"label\": false}\n");
    /// let kto = data::preference(data::load(io::output_dir() + "/k.jsonl"), tokenizer::builtin());
    /// assert(kto.len() == 2 && kto[1].label == false);
    /// ```
    #[rhai_fn(global, name = "preference", return_raw)]
    pub fn preference_default(
        ctx: NativeCallContext,
        ds: DatasetHandle,
        tok: TokenizerHandle,
    ) -> Res<DatasetHandle> {
        preference(ctx, ds, tok, Map::new())
    }

    /// Number of records.
    ///
    /// ```rhai
    /// io::write_text("d.json", `[{"x": 1}]`);
    /// assert(data::load(io::output_dir() + "/d.json").len() == 1);
    /// ```
    #[rhai_fn(global, pure)]
    pub fn len(ds: &mut DatasetHandle) -> rhai::INT {
        rhai::INT::try_from(ds.len()).unwrap_or(rhai::INT::MAX)
    }

    /// Record `i` as a map (negative counts from the end).
    ///
    /// ```rhai
    /// io::write_text("d.json", `[{"x": 1}, {"x": 2}]`);
    /// let ds = data::load(io::output_dir() + "/d.json");
    /// assert(ds[0].x == 1 && ds[-1].x == 2);
    /// ```
    #[rhai_fn(global, index_get, return_raw)]
    pub fn get(ds: &mut DatasetHandle, i: rhai::INT) -> Res<Dynamic> {
        let n = rhai::INT::try_from(ds.len()).unwrap_or(rhai::INT::MAX);
        let k = if i < 0 { n + i } else { i };
        let row = usize::try_from(k)
            .ok()
            .and_then(|k| ds.row_json(k))
            .ok_or_else(|| {
                script_error(
                    "index",
                    format!("record {i} is out of range: the dataset has {n} records"),
                )
            })?;
        rhai::serde::to_dynamic(row)
    }

    /// Column names, in first-seen order.
    ///
    /// ```rhai
    /// io::write_text("d.json", `[{"a": 1, "b": 2}]`);
    /// assert(data::load(io::output_dir() + "/d.json").columns() == ["a", "b"]);
    /// ```
    #[rhai_fn(global, pure)]
    pub fn columns(ds: &mut DatasetHandle) -> Array {
        ds.columns().into_iter().map(Dynamic::from).collect()
    }

    /// The records in `range` (`ds.select(0..100)`).
    ///
    /// ```rhai
    /// io::write_text("d.json", `[{"x": 1}, {"x": 2}, {"x": 3}]`);
    /// assert(data::load(io::output_dir() + "/d.json").select(1..3).len() == 2);
    /// ```
    #[rhai_fn(global, pure, return_raw)]
    pub fn select(ds: &mut DatasetHandle, range: std::ops::Range<rhai::INT>) -> Res<DatasetHandle> {
        let (start, end) = (to_usize("start", range.start)?, to_usize("end", range.end)?);
        Ok(DatasetHandle::new(ds.select(start, end)))
    }

    /// The records in an inclusive range (`ds.select(0..=9)`).
    ///
    /// ```rhai
    /// io::write_text("d.json", `[{"x": 1}, {"x": 2}, {"x": 3}]`);
    /// assert(data::load(io::output_dir() + "/d.json").select(0..=1).len() == 2);
    /// ```
    #[rhai_fn(global, pure, name = "select", return_raw)]
    pub fn select_inclusive(
        ds: &mut DatasetHandle,
        range: std::ops::RangeInclusive<rhai::INT>,
    ) -> Res<DatasetHandle> {
        let end = range.end().saturating_add(1);
        select(ds, *range.start()..end)
    }

    /// The records in an order shuffled from `seed`.
    ///
    /// ```rhai
    /// io::write_text("d.json", `[{"x": 1}, {"x": 2}, {"x": 3}]`);
    /// let ds = data::load(io::output_dir() + "/d.json");
    /// assert(ds.shuffle(1).len() == 3);
    /// ```
    #[rhai_fn(global, pure, return_raw)]
    pub fn shuffle(ds: &mut DatasetHandle, seed: rhai::INT) -> Res<DatasetHandle> {
        Ok(DatasetHandle::new(
            ds.shuffle(u64::try_from(seed).unwrap_or(0)),
        ))
    }

    /// The records for which `f(record)` is true (run in parallel).
    ///
    /// ```rhai
    /// io::write_text("d.json", `[{"x": 1}, {"x": 2}, {"x": 3}]`);
    /// assert(data::load(io::output_dir() + "/d.json").filter(|r| r.x > 1).len() == 2);
    /// ```
    #[rhai_fn(global, pure, return_raw)]
    pub fn filter(ctx: NativeCallContext, ds: &mut DatasetHandle, f: FnPtr) -> Res<DatasetHandle> {
        let keep = par_call(&ctx, ds, &f, "filter").map_err(|e| at(&ctx, e))?;
        let mut idx = Vec::new();
        for (i, k) in keep.into_iter().enumerate() {
            match k.as_bool() {
                Ok(true) => idx.push(i),
                Ok(false) => {}
                Err(t) => {
                    return Err(at(
                        &ctx,
                        script_error(
                            "filter",
                            format!("record {i}: the function returned {t}, not a bool"),
                        ),
                    ));
                }
            }
        }
        Ok(DatasetHandle::new(ds.subset(&idx)))
    }

    /// A new dataset of `f(record)` for every record, computed in parallel on all cores, in order.
    /// Memoized on the function and the input, so a re-run cell is instant. An error names the
    /// record and shows it.
    ///
    /// ```rhai
    /// io::write_text("d.json", `[{"instruction": "a", "output": "b"}]`);
    /// let ds = data::load(io::output_dir() + "/d.json").map(|r| #{ prompt: r.instruction, answer: r.output });
    /// assert(ds[0].answer == "b");
    /// ```
    #[rhai_fn(global, pure, return_raw)]
    pub fn map(ctx: NativeCallContext, ds: &mut DatasetHandle, f: FnPtr) -> Res<DatasetHandle> {
        let rc = RunContext::of(&ctx)?;
        let content: Vec<serde_json::Value> =
            (0..ds.len()).filter_map(|i| ds.row_json(i)).collect();
        let args = format!(
            "{} {:?} {}",
            f.fn_name(),
            f.curry(),
            serde_json::to_string(&content).unwrap_or_default()
        );
        let key = Memo::key("Dataset.map", &args, &[]).map_err(to_rhai)?;
        let source = ds.source().to_string();
        let v = rc.memo.get_or_try_insert(&key, || {
            let out = par_call(&ctx, ds, &f, "map").map_err(|e| at(&ctx, e))?;
            let mut rows = Vec::with_capacity(out.len());
            for (i, d) in out.into_iter().enumerate() {
                let v: serde_json::Value = rhai::serde::from_dynamic(&d)?;
                if !v.is_object() {
                    return Err(at(
                        &ctx,
                        script_error(
                            "map",
                            format!(
                                "record {i}: the function returned {}, not a map",
                                d.type_name()
                            ),
                        ),
                    ));
                }
                rows.push(v);
            }
            Ok(Dynamic::from(DatasetHandle::records(Dataset {
                rows,
                source: source.clone(),
            })))
        })?;
        Ok(v.cast())
    }

    /// Splits into `#{ train, test }` after a seeded shuffle; `test_size` is a fraction (0.1) or
    /// a count (100).
    ///
    /// ```rhai
    /// io::write_text("d.json", `[{"x": 1}, {"x": 2}, {"x": 3}, {"x": 4}]`);
    /// let s = data::load(io::output_dir() + "/d.json").train_test_split(#{ test_size: 0.25, seed: 0 });
    /// assert(s.train.len() == 3 && s.test.len() == 1);
    /// ```
    #[rhai_fn(global, pure, return_raw)]
    pub fn train_test_split(ctx: NativeCallContext, ds: &mut DatasetHandle, opts: Map) -> Res<Map> {
        let o = split_options(&ctx, opts)?;
        let split = split_impl::train_test_split(ds, &o)
            .map_err(|e| at(&ctx, script_error("options", e.to_string())))?;
        let mut out = Map::new();
        out.insert("test".into(), Dynamic::from(DatasetHandle::new(split.test)));
        out.insert(
            "train".into(),
            Dynamic::from(DatasetHandle::new(split.train)),
        );
        Ok(out)
    }

    /// The records without the given columns.
    ///
    /// ```rhai
    /// io::write_text("d.json", `[{"a": 1, "b": 2}]`);
    /// assert(data::load(io::output_dir() + "/d.json").remove_columns(["b"]).columns() == ["a"]);
    /// ```
    #[rhai_fn(global, pure, return_raw)]
    pub fn remove_columns(ds: &mut DatasetHandle, names: Array) -> Res<DatasetHandle> {
        let names: Vec<String> = names.into_iter().map(|n| n.to_string()).collect();
        ds.remove_columns(&names)
            .map(DatasetHandle::new)
            .map_err(to_rhai)
    }

    /// The records with column `from` renamed to `to`.
    ///
    /// ```rhai
    /// io::write_text("d.json", `[{"q": 1}]`);
    /// assert(data::load(io::output_dir() + "/d.json").rename_column("q", "instruction").columns() == ["instruction"]);
    /// ```
    #[rhai_fn(global, pure, return_raw)]
    pub fn rename_column(ds: &mut DatasetHandle, from: &str, to: &str) -> Res<DatasetHandle> {
        ds.rename_column(from, to)
            .map(DatasetHandle::new)
            .map_err(to_rhai)
    }

    /// Length statistics of tokenized examples: `count`, `min`, `max`, `mean`, `p50`, `p90`,
    /// `p99`, `trained_tokens`, `total_tokens`, `truncated`, `dropped`.
    ///
    /// ```rhai
    /// io::write_text("a.json", `[{"instruction": "hi", "output": "hello"}]`);
    /// let ds = data::sft(data::to_messages(data::load(io::output_dir() + "/a.json")), tokenizer::builtin());
    /// print(ds.stats());
    /// ```
    #[rhai_fn(global, pure, return_raw)]
    pub fn stats(ds: &mut DatasetHandle) -> Res<Map> {
        let Data::Tokenized(t) = &*ds.0 else {
            return Err(script_error(
                "invalid_argument",
                "`stats` describes tokenized examples; call `data::sft` first",
            ));
        };
        let s = sft_impl::stats(&t.examples);
        let mut m = Map::new();
        let int = |v: usize| Dynamic::from(rhai::INT::try_from(v).unwrap_or(rhai::INT::MAX));
        for (k, v) in [
            ("count", s.count),
            ("min", s.min),
            ("max", s.max),
            ("p50", s.p50),
            ("p90", s.p90),
            ("p99", s.p99),
            ("trained_tokens", s.trained_tokens),
            ("total_tokens", s.total_tokens),
            ("truncated", t.truncated),
            ("dropped", t.dropped),
        ] {
            m.insert(k.into(), int(v));
        }
        m.insert("mean".into(), Dynamic::from(s.mean));
        Ok(m)
    }

    /// `Dataset(3729 records from huanhuan.json, columns: instruction, input, output)`.
    ///
    /// ```rhai
    /// io::write_text("d.json", `[{"a": 1}]`);
    /// print(data::load(io::output_dir() + "/d.json"));
    /// ```
    #[rhai_fn(global, name = "to_string", name = "to_debug", pure)]
    pub fn describe(ds: &mut DatasetHandle) -> String {
        match &*ds.0 {
            Data::Records(d) => format!(
                "Dataset({} records from {}, columns: {})",
                d.len(),
                d.source,
                d.columns().join(", ")
            ),
            Data::Tokenized(t) => format!(
                "Dataset({} tokenized examples from {})",
                t.examples.len(),
                t.source
            ),
        }
    }
}
