//! Option maps -> runtime config structs. Unknown keys are errors that list the valid ones;
//! integers are narrowed with a check, never `as`.

use rhai::{Dynamic, EvalAltResult, Map};
use serde::de::DeserializeOwned;

use crate::error::script_error;

/// Parses `opts` into `T` (`#[serde(deny_unknown_fields)]`), naming `function` in errors.
pub fn from_options<T: DeserializeOwned>(
    ctx: &rhai::NativeCallContext,
    function: &str,
    opts: Map,
) -> Result<T, Box<EvalAltResult>> {
    // Through JSON, so that `lora_alpha: 32` fills an f64 as users expect.
    let fail = |text: String| {
        let mut err = script_error(
            "options",
            format!("invalid options for `{function}`: {text}"),
        );
        err.set_position(ctx.call_position());
        err
    };
    let json: serde_json::Value =
        rhai::serde::from_dynamic(&Dynamic::from_map(opts)).map_err(|e| fail(e.to_string()))?;
    serde_path_to_error::deserialize(json).map_err(|e| {
        let path = e.path().to_string();
        let text = plain_types(&e.into_inner().to_string());
        if let Some(rest) = text.strip_prefix("unknown field `") {
            // serde names the field and lists the valid ones; add the closest one.
            let field = rest.split('`').next().unwrap_or("");
            let valid: Vec<&str> = rest.split('`').skip(2).step_by(2).collect();
            let guess = valid
                .iter()
                .map(|v| (strsim::normalized_damerau_levenshtein(field, v), *v))
                .filter(|(score, _)| *score >= 0.5)
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .map_or_else(String::new, |(_, v)| format!("; did you mean `{v}`?"));
            return fail(format!("{text}{guess}"));
        }
        fail(if path == "." || path.is_empty() {
            text
        } else {
            format!("`{path}`: {text}")
        })
    })
}

/// serde's messages with the script's words for types (`expected an integer`, not `expected
/// i64`).
fn plain_types(text: &str) -> String {
    let mut out = text.to_string();
    for (rust, plain) in [
        ("expected usize", "expected a non-negative integer"),
        ("expected u64", "expected a non-negative integer"),
        ("expected u32", "expected a non-negative integer"),
        ("expected i64", "expected an integer"),
        ("expected i32", "expected an integer"),
        ("expected f64", "expected a number"),
        ("expected f32", "expected a number"),
        ("expected a boolean", "expected `true` or `false`"),
        ("invalid type: floating point", "invalid type: number"),
        ("invalid type: integer", "invalid type: number"),
    ] {
        out = out.replace(rust, plain);
    }
    out
}

/// A non-negative script integer as `usize`.
pub fn to_usize(what: &str, v: rhai::INT) -> Result<usize, Box<EvalAltResult>> {
    usize::try_from(v).map_err(|_| {
        script_error(
            "invalid_argument",
            format!("`{what}` must be >= 0, got {v}"),
        )
    })
}

/// A script array of token ids as `u32`s.
pub fn to_ids(what: &str, arr: &rhai::Array) -> Result<Vec<u32>, Box<EvalAltResult>> {
    arr.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_int()
                .ok()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    script_error(
                        "invalid_argument",
                        format!("`{what}[{i}]` is `{v}`, not a token id"),
                    )
                })
        })
        .collect()
}

/// Token ids as a script array.
pub fn from_ids(ids: &[u32]) -> rhai::Array {
    ids.iter()
        .map(|&i| Dynamic::from(rhai::INT::from(i)))
        .collect()
}
