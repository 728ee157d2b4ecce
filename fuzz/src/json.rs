//! Structure-aware mutation of JSON inputs: the document (or one line of JSON Lines) is
//! parsed, one value in it is changed (huge, negative, zero or fractional numbers, long
//! strings, deep nesting, wrong types, repeated or dropped elements, keys from the target's
//! dictionary) and the document is written back, compact or pretty.

use rand::Rng;
use rand::rngs::StdRng;
use serde_json::{Map, Value, json};

use crate::interesting::INTERESTING;
use crate::targets::Target;

/// A mutation of the JSON in `input`, or `None` when it is not JSON (nor JSON Lines).
pub fn mutate(rng: &mut StdRng, input: &[u8], target: &Target) -> Option<Vec<u8>> {
    if let Ok(mut v) = serde_json::from_slice::<Value>(input) {
        for _ in 0..rng.random_range(1..=3) {
            at_random_node(rng, &mut v, target);
        }
        return write(rng, &v);
    }
    // JSON Lines: one line's value mutated, or a line repeated or dropped.
    let text = std::str::from_utf8(input).ok()?;
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let parsed: Vec<usize> = (0..lines.len())
        .filter(|&i| serde_json::from_str::<Value>(&lines[i]).is_ok())
        .collect();
    if parsed.is_empty() {
        return None;
    }
    let i = parsed[rng.random_range(0..parsed.len())];
    match rng.random_range(0..6) {
        0 => {
            let n = rng
                .random_range(1..=1000)
                .min(target.max_len / (lines[i].len() + 1))
                .max(1);
            let l = lines[i].clone();
            lines.splice(i..i, std::iter::repeat_n(l, n));
        }
        1 => {
            lines.remove(i);
        }
        _ => {
            let mut v: Value = serde_json::from_str(&lines[i]).ok()?;
            at_random_node(rng, &mut v, target);
            lines[i] = serde_json::to_string(&v).ok()?;
        }
    }
    Some((lines.join("\n") + "\n").into_bytes())
}

/// `v` written compact, or pretty by chance (not for deep nesting, whose indentation grows with
/// the square of its depth).
fn write(rng: &mut StdRng, v: &Value) -> Option<Vec<u8>> {
    let compact = serde_json::to_vec(v).ok()?;
    if rng.random_bool(0.5) {
        let pretty = serde_json::to_vec_pretty(v).ok()?;
        if pretty.len() <= compact.len() * 4 {
            return Some(pretty);
        }
    }
    Some(compact)
}

/// Descends to a random node of `v` (stopping early by chance) and mutates it.
fn at_random_node(rng: &mut StdRng, v: &mut Value, target: &Target) {
    let mut node = v;
    loop {
        let n = match &*node {
            Value::Array(a) => a.len(),
            Value::Object(m) => m.len(),
            _ => 0,
        };
        if n == 0 || rng.random_bool(0.3) {
            break;
        }
        let i = rng.random_range(0..n);
        node = match node {
            Value::Array(a) => &mut a[i],
            Value::Object(m) => match m.values_mut().nth(i) {
                Some(x) => x,
                None => return,
            },
            _ => return,
        };
    }
    change(rng, node, target);
}

/// A dictionary token as a key: quotes stripped.
fn dict_key(rng: &mut StdRng, target: &Target) -> String {
    if target.dict.is_empty() {
        return "x".into();
    }
    target.dict[rng.random_range(0..target.dict.len())]
        .trim_matches('"')
        .to_string()
}

/// A number, string or other value that breaks assumptions.
fn hostile(rng: &mut StdRng, target: &Target) -> Value {
    match rng.random_range(0..10) {
        0..=3 => {
            let n = INTERESTING[rng.random_range(0..INTERESTING.len())];
            i64::try_from(n)
                .map(Value::from)
                .or_else(|_| u64::try_from(n).map(Value::from))
                .unwrap_or_else(|_| json!(n as f64))
        }
        4 => json!(
            [
                0.0,
                -0.0,
                0.5,
                -1.5,
                1e-300,
                1e300,
                -1e300,
                f64::MAX,
                f64::MIN_POSITIVE,
                1e12
            ][rng.random_range(0..10)]
        ),
        5 => {
            let unit =
                ["A", "\u{0}", "é", "🙂", "{%", "<|im_end|>", "\\", "\n"][rng.random_range(0..8)];
            Value::String(unit.repeat(rng.random_range(0..=20_000)))
        }
        6 => Value::String(dict_key(rng, target)),
        7 => [Value::Null, json!(true), json!(false), json!([]), json!({})][rng.random_range(0..5)]
            .clone(),
        8 => {
            // Deep nesting of arrays or objects.
            let depth = rng.random_range(10..=1000);
            let mut v = json!(1);
            for _ in 0..depth {
                v = if rng.random_bool(0.5) {
                    json!([v])
                } else {
                    json!({ "a": v })
                };
            }
            v
        }
        _ => json!(""),
    }
}

/// Mutates `node` in place.
fn change(rng: &mut StdRng, node: &mut Value, target: &Target) {
    match node {
        Value::Array(a) if !a.is_empty() && rng.random_bool(0.5) => {
            let i = rng.random_range(0..a.len());
            match rng.random_range(0..3) {
                0 => {
                    // Repeated, within the target's size (a value many times the largest
                    // input only costs the parent time).
                    let x = a[i].clone();
                    let size = serde_json::to_vec(&x).map_or(1, |b| b.len() + 1);
                    let n = rng.random_range(1..=500).min(target.max_len / size).max(1);
                    a.splice(i..i, std::iter::repeat_n(x, n));
                }
                1 => {
                    a.remove(i);
                }
                _ => a.clear(),
            }
        }
        Value::Object(m) if rng.random_bool(0.6) => {
            let key = dict_key(rng, target);
            match rng.random_range(0..4) {
                0 if !m.is_empty() => {
                    let k = m.keys().nth(rng.random_range(0..m.len())).cloned();
                    if let Some(k) = k {
                        m.remove(&k);
                    }
                }
                1 if !m.is_empty() => {
                    // A key renamed to a dictionary token.
                    let k = m.keys().nth(rng.random_range(0..m.len())).cloned();
                    if let Some(k) = k
                        && let Some(v) = m.remove(&k)
                    {
                        m.insert(key, v);
                    }
                }
                _ => {
                    let v = hostile(rng, target);
                    m.insert(key, v);
                }
            }
        }
        Value::Number(n) if rng.random_bool(0.5) => {
            // Near the old value: off by one, negated, scaled.
            let x = n.as_f64().unwrap_or(0.0);
            let y =
                [x + 1.0, x - 1.0, -x, x * 1e6, x / 1e6, x.trunc() + 0.5][rng.random_range(0..6)];
            *node = if y.fract() == 0.0 && y.abs() < 9e15 {
                json!(y as i64)
            } else {
                json!(y)
            };
        }
        Value::String(s) if rng.random_bool(0.5) => {
            let k = rng.random_range(1..=2000);
            *s = match rng.random_range(0..3) {
                0 => s.repeat(k.min(target.max_len / (s.len() + 1) + 1)),
                1 => format!("{s}{}", dict_key(rng, target)),
                _ => String::new(),
            };
        }
        _ => *node = hostile(rng, target),
    }
    if let Value::Object(m) = node
        && m.len() > 10_000
    {
        *m = Map::new();
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;
    use crate::targets::{Harness, Shape};

    struct Nothing;

    impl Harness for Nothing {
        fn run(&mut self, _: &[u8]) -> crate::targets::Outcome {
            Ok(())
        }
    }

    static SMALL: Target = Target {
        name: "small",
        entry: "a test target",
        max_len: 4096,
        shape: Shape::Json,
        dict: &["\"k\""],
        seeds: Vec::new,
        harness: || Ok(Box::new(Nothing)),
    };

    /// Mutations stay near the target's size: repeating elements and lines of a growing
    /// document once built values of gigabytes in the parent (seconds per input).
    #[test]
    fn mutations_stay_near_the_size_limit() {
        // The parent mutates on its main thread (8 MiB of stack); a test thread has 2.
        std::thread::Builder::new()
            .stack_size(8 << 20)
            .spawn(mutate_a_while)
            .unwrap()
            .join()
            .unwrap();
    }

    fn mutate_a_while() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut doc = br#"{"a": [{"b": "xxxxxxxxxxxxxxxx", "c": [1, 2, 3]}], "d": "s"}"#.to_vec();
        let line = b"{\"text\": \"hello\"}\n".repeat(20);
        for i in 0..1000 {
            let input = if i % 2 == 0 { &doc } else { &line };
            let out = mutate(&mut rng, input, &SMALL).unwrap_or_default();
            assert!(
                out.len() < 64 * SMALL.max_len + (256 << 10),
                "{}",
                out.len()
            );
            if i % 2 == 0
                && out.len() <= SMALL.max_len
                && serde_json::from_slice::<Value>(&out).is_ok()
            {
                doc = out;
            }
        }
    }
}
