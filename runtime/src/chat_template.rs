//! Chat templates: the model's Jinja `chat_template`, rendered as transformers renders it
//! (`trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, Python's `tojson`, Python
//! string methods such as `.strip()` and `.startswith()`, `strftime_now`).

use minijinja::value::Value;
use minijinja::{Environment, ErrorKind};
use serde::Serialize;

use crate::{Error, Result};

/// ChatML, the template of the built-in tokenizer (and of Qwen without tools).
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Where a `{% generation %}` block opens in a render made with [`mark_generation`] (a Unicode
/// private-use character, which no record may hold).
pub const GENERATION_OPEN: char = '\u{E000}';
/// Where a `{% generation %}` block closes (see [`GENERATION_OPEN`]).
pub const GENERATION_CLOSE: char = '\u{E001}';

/// `template` with transformers' `{% generation %}` / `{% endgeneration %}` blocks (what an
/// assistant turn outputs, the tokens SFT learns) rendering as [`GENERATION_OPEN`] and
/// [`GENERATION_CLOSE`], their whitespace control kept; `None` when it has no such block.
pub fn mark_generation(template: &str) -> Option<String> {
    static TAG: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"\{%(-?)\s*(end)?generation\s*(-?)%\}")
            .unwrap_or_else(|_| unreachable!())
    });
    if !TAG.is_match(template) {
        return None;
    }
    Some(
        TAG.replace_all(template, |c: &regex::Captures<'_>| {
            let mark = if c.get(2).is_some() {
                GENERATION_CLOSE
            } else {
                GENERATION_OPEN
            };
            format!("{{{{{} \"{mark}\" {}}}}}", &c[1], &c[3])
        })
        .into_owned(),
    )
}

/// The training variant qscript uses for SFT in place of a known chat template that rewrites
/// earlier turns (Qwen3's drops their `<think>` blocks, so a conversation's rendering does not
/// extend its prefixes'): the same rendering with every turn kept and `{% generation %}` marking
/// what is learned, as TRL trains these models with `assistant_only_loss`. `None` for others.
pub fn training_variant(template: &str) -> Option<&'static str> {
    // blake3 of Qwen3's template as the Qwen3 checkpoints shipped it, and of its later revision.
    const QWEN3: [&str; 2] = [
        "45fdf00a05e3daa5751bcd1de40a0a8280bde6328765dfe3828f9dac093b584b",
        "72a1a5e64f5ff443c86b9332e82c85afd838c9e398b8e8f8bb38579d0e76d892",
    ];
    let h = blake3::hash(template.as_bytes()).to_hex();
    QWEN3
        .contains(&h.as_str())
        .then_some(include_str!("templates/qwen3_training.jinja"))
}

/// The most template instructions one render may run (minijinja's fuel): a real chat template
/// uses thousands per conversation; a hostile one with nested loops stops here, in bounded time
/// and memory, instead of running past Ctrl-C. `--max-template-steps` changes it.
static FUEL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(DEFAULT_FUEL);

/// The default of [`set_max_steps`].
pub const DEFAULT_FUEL: u64 = 50_000_000;

/// Sets the instruction limit of every render (0: none); call before the first render.
pub fn set_max_steps(n: u64) {
    FUEL.store(n, std::sync::atomic::Ordering::Relaxed);
}

/// The most bytes of text and values one render may build (its output, and strings such as one
/// doubled in a loop), beside the step limit: without it, 40 doublings of a string reach
/// gigabytes within the steps allowed. Set from `--max-record-size` (see [`set_max_bytes`]).
static MAX_BYTES: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(DEFAULT_MAX_BYTES);

/// The default of [`set_max_bytes`]: 64 MiB (16 times the default largest record).
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;

/// How many bytes a step weighs in minijinja's fuel (its `UNITS_PER_FUEL`): its fuel counts an
/// instruction as 64 units and a byte allocated or written as one.
const BYTES_PER_STEP: u64 = 64;

/// Sets the size limit of every render (0: none); call before the first render.
pub fn set_max_bytes(n: u64) {
    MAX_BYTES.store(n, std::sync::atomic::Ordering::Relaxed);
}

/// The fuel a render gets: the step limit, or less where the size limit is the tighter one
/// (minijinja has one budget for both). `(fuel, whether the size limit set it)`.
fn fuel() -> (u64, bool) {
    let steps = FUEL.load(std::sync::atomic::Ordering::Relaxed);
    let bytes = MAX_BYTES.load(std::sync::atomic::Ordering::Relaxed);
    let by_size = (bytes / BYTES_PER_STEP).max(1);
    match (steps, bytes) {
        (_, 0) => (steps, false),
        (0, _) => (by_size, true),
        _ if by_size < steps => (by_size, true),
        _ => (steps, false),
    }
}

/// Renders `template` with `context` (`messages`, `add_generation_prompt`, `bos_token`, ...).
/// Compiled templates are cached, so rendering thousands of records compiles each template once.
pub fn render(template: &str, context: &serde_json::Value) -> Result<String> {
    let env = compiled(template)?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| Error::Template(describe(&e)))?;
    tmpl.render(minijinja::value::Serde(context)).map_err(|e| {
        if e.kind() == ErrorKind::OutOfFuel {
            Error::Template(match fuel() {
                (steps, false) => format!(
                    "the chat template ran over {steps} steps; a template that needs more can be \
                     given them with `--max-template-steps N`"
                ),
                (steps, true) => format!(
                    "the chat template ran over its limit of {} of text and values ({steps} \
                     steps at most); `--max-record-size N` raises it to 16 times N, and \
                     `--max-template-steps N` bounds the steps",
                    crate::bytes::human(MAX_BYTES.load(std::sync::atomic::Ordering::Relaxed) as f64)
                ),
            })
        } else {
            Error::Template(describe(&e))
        }
    })
}

type Cache =
    std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<Environment<'static>>>>;

/// The most compiled templates kept: a run renders with a handful; a process that meets many
/// (a recipe making templates in a loop, a fuzzer) would otherwise grow without bound.
const CACHED_TEMPLATES: usize = 32;

static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();

fn compiled(template: &str) -> Result<std::sync::Arc<Environment<'static>>> {
    let cache = CACHE.get_or_init(Cache::default);
    if let Some(env) = cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(template)
    {
        return Ok(env.clone());
    }
    let mut env = Environment::new();
    let (fuel, _) = fuel();
    env.set_fuel((fuel > 0).then_some(fuel));
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| Error::Template(e.to_string()))?;
    env.set_syntax(syntax);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", |fmt: String| strftime_now(&fmt));
    env.add_filter("tojson", tojson);
    env.add_template_owned("chat", template.to_string())
        .map_err(|e| Error::Template(describe(&e)))?;
    let env = std::sync::Arc::new(env);
    let mut kept = cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if kept.len() >= CACHED_TEMPLATES {
        // Forgetting them all is as good as any order here: each costs one compile to rebuild.
        kept.clear();
    }
    kept.insert(template.to_string(), env.clone());
    Ok(env)
}

fn describe(e: &minijinja::Error) -> String {
    let mut msg = match e.detail() {
        Some(d) if e.kind() == ErrorKind::InvalidOperation => d.to_string(),
        _ => e.to_string(),
    };
    if let Some(line) = e.line() {
        msg.push_str(&format!(" (template line {line})"));
    }
    msg
}

/// The widest `tojson` indent (real templates use 2 or 4): the indent is written before every
/// line, outside the render's size limit until the text is done.
const MAX_INDENT: usize = 64;

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`: `", "` and `": "` separators
/// without indent, `","` and `": "` with it.
fn tojson(value: Value, kwargs: minijinja::value::Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    if let Some(n) = indent
        && n > MAX_INDENT
    {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("`tojson(indent={n})`: the indent is at most {MAX_INDENT}"),
        ));
    }
    let mut json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    if sort_keys.unwrap_or(false) {
        json.sort_all_objects();
    }
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&pad);
            json.serialize(&mut serde_json::Serializer::with_formatter(&mut out, fmt))
        }
        None => json.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out,
            PySeparators,
        )),
    };
    written.map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from_safe_string(
        String::from_utf8_lossy(&out).into_owned(),
    ))
}

struct PySeparators;

impl serde_json::ser::Formatter for PySeparators {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// `strftime_now(fmt)` for the directives chat templates use: `%d %m %Y %y %b %B %H %M %S %%`.
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let (y, m, d) = civil_from_days(days);
    let rem = secs % 86_400;
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('b') => out.push_str(&month[..3]),
            Some('B') => out.push_str(month),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chatml_and_python_json() {
        let ctx =
            json!({"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": true});
        assert_eq!(
            render(CHATML, &ctx).unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        let t = "{{ x | tojson }}|{{ x | tojson(indent=2) }}";
        let out = render(t, &json!({"x": {"b": [1, 2.5], "a": "é<\"/"}})).unwrap();
        assert_eq!(
            out,
            "{\"b\": [1, 2.5], \"a\": \"é<\\\"/\"}|{\n  \"b\": [\n    1,\n    2.5\n  ],\n  \"a\": \"é<\\\"/\"\n}"
        );
    }

    /// `tojson(indent=4000000000)` once allocated its 4 GB indent (an abort); an indent over
    /// the limit is an error naming the call.
    #[test]
    fn a_huge_tojson_indent_is_an_error() {
        let ctx = json!({"x": [1]});
        for n in ["4000000000", "65"] {
            let e = render(&format!("{{{{ x | tojson(indent={n}) }}}}"), &ctx).unwrap_err();
            assert!(
                e.to_string()
                    .contains(&format!("`tojson(indent={n})`: the indent is at most 64")),
                "{e}"
            );
        }
        let out = render("{{ x | tojson(indent=64) }}", &ctx).unwrap();
        assert_eq!(out, format!("[\n{}1\n]", " ".repeat(64)));
    }

    #[test]
    fn raise_exception_shows_its_message() {
        let e = render("{% if messages|length == 0 %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}", &json!({"messages": []}))
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("chat template: Conversation roles must alternate"),
            "{e}"
        );
    }

    #[test]
    fn the_compiled_templates_kept_are_bounded() {
        for i in 0..3 * CACHED_TEMPLATES {
            let out = render(&format!("{{{{ {i} }}}}"), &serde_json::json!({})).unwrap();
            assert_eq!(out, i.to_string());
        }
        let kept = CACHE
            .get()
            .map_or(0, |c| c.lock().map_or(usize::MAX, |c| c.len()));
        assert!(kept <= CACHED_TEMPLATES, "{kept} templates kept");
    }

    #[test]
    fn a_runaway_template_stops_at_its_step_limit() {
        let t = "{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}{% endfor %}";
        let e = render(t, &json!({})).unwrap_err().to_string();
        assert!(e.contains("--max-template-steps"), "{e}");
        let big = render("{{ 'ab' * 100000000 }}", &json!({}));
        assert!(
            big.is_err() || big.unwrap().len() < 1 << 20,
            "string repetition is bounded"
        );
    }

    #[test]
    fn a_string_doubled_in_a_loop_stops_at_the_size_limit() {
        let t = "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}";
        let e = render(t, &json!({})).unwrap_err().to_string();
        assert!(
            e.contains("over its limit of 64.00 MiB of text and values")
                && e.contains("--max-record-size"),
            "{e}"
        );
        // Macros passing a doubled string down, joined or formatted.
        for t in [
            "{% macro d(s, n) %}{% if n > 0 %}{{ d(s + s, n - 1) }}{% else %}{{ s|length }}{% endif %}{% endmacro %}{{ d('ab', 40) }}",
            "{% macro d(s, n) %}{% if n > 0 %}{{ d([s, s]|join, n - 1) }}{% else %}{{ s|length }}{% endif %}{% endmacro %}{{ d('ab', 40) }}",
        ] {
            let e = render(t, &json!({})).unwrap_err().to_string();
            assert!(e.contains("--max-record-size"), "{e}");
        }
    }

    /// Lists concatenated with themselves past minijinja's lazy depth (32) were materialized
    /// without charging fuel: 33 doublings hung the process (the patched minijinja in
    /// vendor/). Each runs out of its limit now, in bounded time.
    #[test]
    fn a_list_doubled_in_a_loop_stops_at_the_limit() {
        for t in [
            "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|length }}",
            "{% set ns = namespace(l=[1]) %}{% for i in range(31) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|sum }}",
            "{% set ns = namespace(l=(1,)) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|length }}",
            "{% set ns = namespace(l=[1]|map('string')) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|list|length }}",
            "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}{% for j in range(100) %}{% set ns.l = ns.l + [j] %}{% endfor %}{% endfor %}{{ ns.l|length }}",
        ] {
            let start = std::time::Instant::now();
            let e = render(t, &json!({})).unwrap_err().to_string();
            assert!(e.contains("--max-template-steps"), "{t}: {e}");
            assert!(start.elapsed().as_secs() < 30, "{t}: {:?}", start.elapsed());
        }
        // A real template's lists still concatenate.
        let t = "{% set ns = namespace(l=[]) %}{% for m in messages %}{% set ns.l = ns.l + [m.role] %}{% endfor %}{{ ns.l|join(',') }}";
        let msgs: Vec<_> = (0..100).map(|i| json!({"role": format!("r{i}")})).collect();
        let out = render(t, &json!({ "messages": msgs })).unwrap();
        assert!(out.starts_with("r0,r1,") && out.ends_with(",r99"), "{out}");
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_415), (2025, 11, 23));
        assert_eq!(strftime_now("%%").len(), 1);
    }
}
