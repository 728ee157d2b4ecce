//! Errors crossing into scripts. Rust bindings raise `#{ kind, message }` maps, so a script can
//! `try { ... } catch (e) { if e.kind == "sandbox" { ... } }`; rhai adds the call-site position.

use rhai::{Dynamic, EvalAltResult, Map, Position};

/// A script-catchable error of `kind` with `message`.
pub fn script_error(kind: &str, message: impl Into<String>) -> Box<EvalAltResult> {
    let mut map = Map::new();
    map.insert("kind".into(), kind.into());
    map.insert("message".into(), Dynamic::from(message.into()));
    Box::new(EvalAltResult::ErrorRuntime(map.into(), Position::NONE))
}

/// Converts an engine error. `Cancelled` terminates the script instead of being catchable.
pub fn to_rhai(e: qscript_runtime::Error) -> Box<EvalAltResult> {
    match e {
        qscript_runtime::Error::Cancelled => Box::new(EvalAltResult::ErrorTerminated(
            "cancelled".into(),
            Position::NONE,
        )),
        other => script_error(other.kind(), other.to_string()),
    }
}

/// Like [`to_rhai`], positioned at the script's call site. Rhai fills in positions for plain
/// calls, but not for namespaced ones (`io::read_text(..)`), so bindings use this.
pub fn to_rhai_at(
    ctx: &rhai::NativeCallContext,
) -> impl Fn(qscript_runtime::Error) -> Box<EvalAltResult> + use<> {
    let pos = ctx.call_position();
    move |e| {
        let mut err = to_rhai(e);
        err.set_position(pos);
        err
    }
}

/// The `(kind, message)` of an error value raised by [`script_error`], if it is one.
pub fn kind_and_message(value: &Dynamic) -> Option<(String, String)> {
    let map = value.read_lock::<Map>()?;
    let kind = map.get("kind")?.clone().into_string().ok()?;
    let message = map.get("message")?.clone().into_string().ok()?;
    Some((kind, message))
}
