//! Global helpers every recipe may use.

#[allow(clippy::wildcard_imports)]
use rhai::plugin::*;

/// The global `assert` functions.
#[export_module]
pub mod core_module {
    use rhai::EvalAltResult;

    use crate::error::script_error;

    /// Stops the script with an error of kind `assertion` unless `condition` is true.
    ///
    /// ```rhai
    /// assert(1 + 1 == 2);
    /// ```
    #[rhai_fn(name = "assert", return_raw)]
    pub fn assert(condition: bool) -> Result<(), Box<EvalAltResult>> {
        if condition {
            Ok(())
        } else {
            Err(script_error("assertion", "assertion failed"))
        }
    }

    /// Stops the script with an error of kind `assertion` and `message` unless `condition` is
    /// true.
    ///
    /// ```rhai
    /// let steps = 10;
    /// assert(steps > 0, "max_steps must be positive");
    /// ```
    #[rhai_fn(name = "assert", return_raw)]
    pub fn assert_with(condition: bool, message: &str) -> Result<(), Box<EvalAltResult>> {
        if condition {
            Ok(())
        } else {
            Err(script_error(
                "assertion",
                format!("assertion failed: {message}"),
            ))
        }
    }
}
