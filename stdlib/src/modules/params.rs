//! `params(#{ ... })`: a recipe's knobs, with `--set key=value` overrides merged in. Each override
//! is parsed to the type of its default; an unknown key lists the declared ones.

#[allow(clippy::wildcard_imports)]
use rhai::plugin::*;

use std::collections::BTreeMap;

use rhai::Map;

use qscript_runtime::train::TrainConfig;

use crate::context::Override;

/// Keys of LLaMA-Factory's and TRL's configs (and HF's `TrainingArguments`) that steer their
/// processes, not the training: a config file may hold them; they have no effect here (one notice
/// names them).
pub const NO_EFFECT: [&str; 16] = [
    "dataloader_num_workers",
    "dataloader_pin_memory",
    "ddp_timeout",
    "disable_tqdm",
    "do_eval",
    "do_predict",
    "do_train",
    "log_level",
    "logging_first_step",
    "overwrite_cache",
    "overwrite_output_dir",
    "plot_loss",
    "preprocessing_num_workers",
    "remove_unused_columns",
    "save_only_model",
    "trust_remote_code",
];

/// Merges `overrides` into `defaults`, converting each value to the type of its default. Keys the
/// recipe does not declare are fine when they are training options (HF's names, for
/// `train::options`) or, from a config file, in [`NO_EFFECT`]; any other is unknown, and all
/// unknown keys make one error, each with the closest name.
pub fn resolve(defaults: &Map, overrides: &BTreeMap<String, Override>) -> Result<Map, String> {
    let train = TrainConfig::option_names();
    let mut out = defaults.clone();
    let mut unknown = Vec::new();
    for (key, ov) in overrides {
        let Override { raw, origin } = ov;
        let Some(default) = defaults.get(key.as_str()) else {
            if train.contains(key) || (ov.from_config() && NO_EFFECT.contains(&key.as_str())) {
                continue;
            }
            unknown.push((key, origin));
            continue;
        };
        let value = coerce(raw, default).map_err(|expected| {
            format!("{origin}: expected {expected} (the default is `{default}`)")
        })?;
        out.insert(key.as_str().into(), value);
    }
    if unknown.is_empty() {
        return Ok(out);
    }
    let declared: Vec<_> = defaults.keys().map(|k| format!("`{k}`")).collect();
    let declared = if declared.is_empty() {
        "none".to_string()
    } else {
        declared.join(", ")
    };
    let mut names: Vec<String> = defaults.keys().map(ToString::to_string).collect();
    names.extend(train);
    let guess = |key: &str| {
        names
            .iter()
            .map(|c| (strsim::normalized_damerau_levenshtein(key, c), c))
            .filter(|(score, _)| *score >= 0.6)
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, c)| c.clone())
    };
    let hint = "training options (HF's names) go to the recipe's `train::options`";
    if let [(key, origin)] = unknown.as_slice() {
        let guess = guess(key).map_or_else(String::new, |g| format!("; did you mean `{g}`?"));
        return Err(format!(
            "unknown param `{key}` in {origin}; the recipe declares: {declared}{guess} ({hint})"
        ));
    }
    let listed: Vec<String> = unknown
        .iter()
        .map(|(key, origin)| {
            let guess = guess(key).map_or_else(String::new, |g| format!(", did you mean `{g}`?"));
            format!("`{key}` (in {origin}{guess})")
        })
        .collect();
    Err(format!(
        "{} unknown params: {}; the recipe declares: {declared} ({hint})",
        unknown.len(),
        listed.join(", ")
    ))
}

/// The keys of `overrides` from a config file that the recipe does not declare and that have no
/// effect here ([`NO_EFFECT`]).
pub fn without_effect(defaults: &Map, overrides: &BTreeMap<String, Override>) -> Vec<String> {
    overrides
        .iter()
        .filter(|(k, o)| {
            o.from_config() && !defaults.contains_key(k.as_str()) && NO_EFFECT.contains(&k.as_str())
        })
        .map(|(k, _)| k.clone())
        .collect()
}

/// Parses `raw` as a value of the same type as `default`; on failure returns what was expected.
fn coerce(raw: &str, default: &Dynamic) -> Result<Dynamic, &'static str> {
    let raw = raw.trim();
    if default.is_int() {
        raw.parse::<rhai::INT>()
            .map(Dynamic::from)
            .map_err(|_| "an integer")
    } else if default.is_float() {
        raw.parse::<rhai::FLOAT>()
            .ok()
            .filter(|v| v.is_finite())
            .map(Dynamic::from)
            .ok_or("a finite number")
    } else if default.is_bool() {
        match raw {
            "true" => Ok(true.into()),
            "false" => Ok(false.into()),
            _ => Err("`true` or `false`"),
        }
    } else if default.is_string() {
        Ok(raw.into())
    } else if default.is_array() || default.is_map() || default.is_unit() {
        let json: Result<serde_json::Value, _> = serde_json::from_str(raw);
        match json {
            Ok(v) => {
                let d = rhai::serde::to_dynamic(v).map_err(|_| "JSON")?;
                if default.is_unit() || d.type_id() == default.type_id() {
                    Ok(d)
                } else if default.is_array() {
                    Err("a JSON array, e.g. `[\"q_proj\",\"v_proj\"]`")
                } else {
                    Err("a JSON object")
                }
            }
            Err(_) if default.is_unit() => Ok(raw.into()),
            Err(_) if default.is_array() => Err("a JSON array, e.g. `[\"q_proj\",\"v_proj\"]`"),
            Err(_) => Err("a JSON object"),
        }
    } else {
        Err("a value of a type `--set` supports (int, float, bool, string, array, map)")
    }
}

/// The global `params` function.
#[export_module]
pub mod params_module {
    use rhai::{EvalAltResult, Map};

    use crate::context::{RunContext, lock};
    use crate::error::script_error;

    /// Declares the recipe's parameters with their defaults and returns them, with values from
    /// `--set key=value` merged in. Each `--set` value must parse as the type of its default (int,
    /// float, bool, string; arrays and maps as JSON); an unknown key is an error that lists the
    /// declared params.
    ///
    /// ```rhai
    /// let p = params(#{ lr: 1e-4, max_steps: 100, bf16: true, model: "tiny" });
    /// assert(p.max_steps == 100);
    /// print(`lr = ${p.lr}`);
    /// ```
    // (`--config FILE` values go under `--set`; training options among them are for
    // `train::options`: see `super::resolve`. The docs above are a snapshot of `:help params`.)
    #[rhai_fn(return_raw)]
    pub fn params(ctx: NativeCallContext, defaults: Map) -> Result<Map, Box<EvalAltResult>> {
        let rc = RunContext::of(&ctx)?;
        let resolved =
            super::resolve(&defaults, &rc.overrides).map_err(|m| script_error("params", m))?;
        let ignored = super::without_effect(&defaults, &rc.overrides);
        if !ignored.is_empty()
            && let Some(file) = &rc.config_file
        {
            let keys: Vec<_> = ignored.iter().map(|k| format!("`{k}`")).collect();
            rc.sink.err(&format!(
                "note: `{}`: {} steer other tools' processes and have no effect here",
                file.display(),
                keys.join(", ")
            ));
        }
        *lock(&rc.params_declared) = Some(defaults.keys().map(ToString::to_string).collect());
        Ok(resolved)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn defaults() -> Map {
        let engine = rhai::Engine::new();
        engine
            .eval::<Map>(r#"#{ lr: 1e-4, steps: 10, bf16: true, model: "m", targets: ["q"] }"#)
            .unwrap()
    }

    fn set(pairs: &[(&str, &str)]) -> BTreeMap<String, Override> {
        pairs
            .iter()
            .map(|(k, v)| {
                let origin = format!("`--set {k}={v}`");
                (
                    (*k).to_string(),
                    Override {
                        raw: (*v).to_string(),
                        origin,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn overrides_take_the_type_of_the_default() {
        let p = resolve(
            &defaults(),
            &set(&[
                ("lr", "2e-4"),
                ("steps", "3"),
                ("bf16", "false"),
                ("targets", r#"["a","b"]"#),
            ]),
        )
        .unwrap();
        assert!((p["lr"].as_float().unwrap() - 2e-4).abs() < 1e-12);
        assert_eq!(p["steps"].as_int().unwrap(), 3);
        assert!(!p["bf16"].as_bool().unwrap());
        assert_eq!(p["targets"].clone().into_array().unwrap().len(), 2);
        assert_eq!(p["model"].clone().into_string().unwrap(), "m");
    }

    #[test]
    fn bad_overrides_are_explained() {
        let e = resolve(&defaults(), &set(&[("steps", "ten")])).unwrap_err();
        assert_eq!(
            e,
            "`--set steps=ten`: expected an integer (the default is `10`)"
        );
        let e = resolve(&defaults(), &set(&[("bf16", "yes")])).unwrap_err();
        assert_eq!(
            e,
            "`--set bf16=yes`: expected `true` or `false` (the default is `true`)"
        );
        let e = resolve(&defaults(), &set(&[("lrr", "1")])).unwrap_err();
        assert!(
            e.starts_with("unknown param `lrr` in `--set lrr=1`; the recipe declares: "),
            "{e}"
        );
        assert!(e.contains("`lr`"), "{e}");
    }
}
