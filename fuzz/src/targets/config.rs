//! `--config FILE` (YAML or JSON), read by the `qscript` binary's own reader: `cli/src/config.rs`
//! is compiled into this crate as it is (the binary has no library to call it from).

#[path = "../../../cli/src/config.rs"]
#[allow(dead_code, clippy::all, clippy::pedantic)]
mod cli_config;

use super::{Harness, Outcome, Scratch, Shape, Target};

/// The targets of this file.
pub(super) const TARGETS: &[&Target] = &[&CONFIG_YAML, &CONFIG_JSON];

/// A `--config` file named `file`.
struct ConfigFile {
    scratch: Scratch,
    file: &'static str,
}

impl Harness for ConfigFile {
    fn run(&mut self, input: &[u8]) -> Outcome {
        let p = self.scratch.put(self.file, input)?;
        cli_config::load(&p)?;
        Ok(())
    }
}

/// Params every config seed sets.
const SEED_YAML: &str = "model: ../shared/fixtures/models/stories260K/hf\nlearning_rate: 2.0e-4\nmax_steps: 10\nbf16: true\nlora_target: [q_proj, v_proj]\nbase: &b {r: 8, alpha: 16}\nlora: *b\nnote: |\n  multi\n  line\n";

/// A YAML `--config` file.
pub static CONFIG_YAML: Target = Target {
    name: "config_yaml",
    entry: "cli::config::load on a `.yaml` `--config` file",
    max_len: 64 << 10,
    shape: Shape::Plain,
    dict: &[
        ": ",
        "- ",
        "&a ",
        "*a",
        "[",
        "]",
        "{",
        "}",
        "---\n",
        "...\n",
        "!!str ",
        "!!binary ",
        "? ",
        "|\n",
        ">-\n",
        "<<: *a",
        "\"\\u0000\"",
        "'",
        "#",
        "\t",
        "~",
        ".nan",
        "-.inf",
        "0x7fffffffffffffff",
        "1e400",
        "\n  ",
    ],
    seeds: || vec![SEED_YAML.as_bytes().to_vec()],
    harness: || {
        Ok(Box::new(ConfigFile {
            scratch: Scratch::new()?,
            file: "run.yaml",
        }))
    },
};

/// A JSON `--config` file.
pub static CONFIG_JSON: Target = Target {
    name: "config_json",
    entry: "cli::config::load on a `.json` `--config` file",
    max_len: 64 << 10,
    shape: Shape::Json,
    dict: &[
        "\"learning_rate\"",
        "\"max_steps\"",
        "1e999",
        "\\u0000",
        "null",
    ],
    seeds: || {
        vec![
            br#"{"model": "m", "learning_rate": 2e-4, "max_steps": 10, "bf16": true, "targets": ["q_proj", "v_proj"], "lora": {"r": 8}}"#
                .to_vec(),
        ]
    },
    harness: || {
        Ok(Box::new(ConfigFile {
            scratch: Scratch::new()?,
            file: "run.json",
        }))
    },
};
