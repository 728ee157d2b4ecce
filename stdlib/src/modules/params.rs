//! `params(#{ ... })`: a recipe's knobs, with `--set key=value` overrides merged in. Each override
//! is parsed to the type of its default; an unknown key lists the declared ones.

#[allow(clippy::wildcard_imports)]
use rhai::plugin::*;

use std::collections::BTreeMap;

use rhai::Map;

use crate::context::Override;

/// Merges `overrides` into `defaults`, converting each value to the type of its default.
pub fn resolve(defaults: &Map, overrides: &BTreeMap<String, Override>) -> Result<Map, String> {
    let mut out = defaults.clone();
    for (key, Override { raw, origin }) in overrides {
        let Some(default) = defaults.get(key.as_str()) else {
            let declared: Vec<_> = defaults.keys().map(|k| format!("`{k}`")).collect();
            let declared = if declared.is_empty() {
                "none".to_string()
            } else {
                declared.join(", ")
            };
            return Err(format!(
                "unknown param `{key}` in {origin}; the recipe declares: {declared}"
            ));
        };
        let value = coerce(raw, default).map_err(|expected| {
            format!("{origin}: expected {expected} (the default is `{default}`)")
        })?;
        out.insert(key.as_str().into(), value);
    }
    Ok(out)
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
    #[rhai_fn(return_raw)]
    pub fn params(ctx: NativeCallContext, defaults: Map) -> Result<Map, Box<EvalAltResult>> {
        let rc = RunContext::of(&ctx)?;
        let resolved =
            super::resolve(&defaults, &rc.overrides).map_err(|m| script_error("params", m))?;
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
