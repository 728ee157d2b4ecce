//! The REPL's terminal side: reedline with the Rhai parser as validator, completion of functions,
//! modules and variables, highlighting, and a history file. Without a terminal, piped lines are
//! evaluated in order, entries spanning lines as the parser decides.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nu_ansi_term::{Color, Style};
use qscript_stdlib::docs::FnDoc;
use qscript_stdlib::repl::{self, Outcome};
use qscript_stdlib::{Failure, Session};
use reedline::{
    ColumnarMenu, Completer, CompletionResult, DefaultPrompt, DefaultPromptSegment, Emacs,
    FileBackedHistory, Highlighter, KeyCode, KeyModifiers, MenuBuilder, Reedline, ReedlineEvent,
    ReedlineMenu, Signal, Span, StyledText, Suggestion, ValidationResult, Validator,
    default_emacs_keybindings,
};
use rhai::Engine;

/// Prints an entry's outcome; returns false on `:quit`.
fn show(outcome: Outcome, had_error: &mut bool) -> bool {
    match outcome {
        Outcome::Output(s) if s.is_empty() => {}
        Outcome::Output(s) => println!("{s}"),
        Outcome::Error(e) => {
            *had_error |= e.failure == Failure::Script;
            eprintln!("{e}");
        }
        Outcome::Quit => return false,
    }
    true
}

/// Evaluates stdin line by line. Exit code 1 if any entry failed.
pub fn piped(session: &mut Session) -> anyhow::Result<ExitCode> {
    let mut buffer = String::new();
    let mut had_error = false;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        buffer.push_str(&line);
        buffer.push('\n');
        if !repl::is_complete(session.engine(), &buffer) {
            continue;
        }
        let entry = std::mem::take(&mut buffer);
        if !show(repl::handle(session, &entry), &mut had_error) {
            return Ok(code(had_error));
        }
    }
    if !buffer.trim().is_empty() {
        show(repl::handle(session, &buffer), &mut had_error);
    }
    Ok(code(had_error))
}

fn code(had_error: bool) -> ExitCode {
    if had_error {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Whether the REPL waits at its prompt, reedline reading the terminal. Reading a terminal that
/// hung up, reedline spins and never returns: a signal then, or a hung-up terminal, ends the REPL
/// from another thread.
pub static AT_PROMPT: AtomicBool = AtomicBool::new(false);

/// Ends the process while the REPL waits at its prompt (nothing is running): the terminal's mode
/// is put back first.
pub fn end_at_prompt(code: i32) -> ! {
    let _ = crossterm::terminal::disable_raw_mode();
    std::process::exit(code)
}

/// Whether stdin's terminal hung up (its other side was closed: a killed terminal window).
fn hung_up() -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let stdin = std::io::stdin();
    let mut fds = [PollFd::new(&stdin, PollFlags::IN)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(poll(&mut fds, Some(&now)), Ok(n) if n > 0)
        && fds[0]
            .revents()
            .intersects(PollFlags::HUP | PollFlags::ERR | PollFlags::NVAL)
}

/// Watches the terminal while the REPL waits at its prompt; a hang-up ends the process (exit
/// 129, as for SIGHUP).
fn watch_hang_up() {
    std::thread::spawn(|| {
        loop {
            std::thread::sleep(Duration::from_millis(100));
            if AT_PROMPT.load(Ordering::SeqCst) && hung_up() {
                end_at_prompt(129);
            }
        }
    });
}

/// The interactive REPL.
pub fn interactive(session: &mut Session) -> anyhow::Result<ExitCode> {
    session
        .context()
        .in_repl
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let names = Arc::new(Mutex::new(Names {
        functions: session.functions().to_vec(),
        variables: session.variable_types(),
    }));
    let mut keybindings = default_emacs_keybindings();
    keybindings.add_binding(
        KeyModifiers::NONE,
        KeyCode::Tab,
        ReedlineEvent::UntilFound(vec![
            ReedlineEvent::Menu("completion_menu".into()),
            ReedlineEvent::MenuNext,
        ]),
    );
    let mut editor = Reedline::create()
        .with_validator(Box::new(RhaiValidator(Engine::new())))
        .with_completer(Box::new(RhaiCompleter(names.clone())))
        .with_highlighter(Box::new(RhaiHighlighter))
        .with_menu(ReedlineMenu::EngineCompleter(Box::new(
            ColumnarMenu::default().with_name("completion_menu"),
        )))
        .with_edit_mode(Box::new(Emacs::new(keybindings)));
    match history() {
        Ok(h) => editor = editor.with_history(Box::new(h)),
        Err(e) => eprintln!("warning: history disabled: {e}"),
    }
    let prompt = DefaultPrompt::new(
        DefaultPromptSegment::Basic("qscript".into()),
        DefaultPromptSegment::Empty,
    );
    println!(
        "qscript {} — `:help` for help, Ctrl-D to quit",
        env!("CARGO_PKG_VERSION")
    );
    let mut had_error = false;
    watch_hang_up();
    loop {
        AT_PROMPT.store(true, Ordering::SeqCst);
        let read = editor.read_line(&prompt);
        AT_PROMPT.store(false, Ordering::SeqCst);
        match read? {
            Signal::Success(entry) => {
                if !show(repl::handle(session, &entry), &mut had_error) {
                    break;
                }
                let mut n = names.lock().unwrap_or_else(PoisonError::into_inner);
                n.variables = session.variable_types();
            }
            Signal::CtrlC => {}
            Signal::CtrlD | _ => break,
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn history_path() -> Option<PathBuf> {
    dirs::state_dir()
        .or_else(dirs::data_local_dir)
        .map(|d| d.join("qscript").join("history.txt"))
}

fn history() -> anyhow::Result<FileBackedHistory> {
    let path = history_path().ok_or_else(|| anyhow::anyhow!("no state directory"))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    Ok(FileBackedHistory::with_file(1000, path)?)
}

struct RhaiValidator(Engine);

impl Validator for RhaiValidator {
    fn validate(&self, line: &str) -> ValidationResult {
        if repl::is_complete(&self.0, line) {
            ValidationResult::Complete
        } else {
            ValidationResult::Incomplete
        }
    }
}

struct Names {
    functions: Vec<FnDoc>,
    variables: Vec<(String, String)>,
}

struct RhaiCompleter(Arc<Mutex<Names>>);

impl Completer for RhaiCompleter {
    fn complete(&mut self, line: &str, pos: usize) -> CompletionResult {
        let names = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (start, candidates) = repl::complete(&names.functions, &names.variables, line, pos);
        let suggestions: Vec<Suggestion> = candidates
            .into_iter()
            .map(|value| {
                let description = names
                    .functions
                    .iter()
                    .find(|f| f.name == value)
                    .map(|f| f.signature.clone());
                Suggestion {
                    append_whitespace: false,
                    description,
                    span: Span { start, end: pos },
                    value,
                    ..Suggestion::default()
                }
            })
            .collect();
        CompletionResult::fresh(suggestions)
    }
}

struct RhaiHighlighter;

const KEYWORDS: &[&str] = &[
    "let", "const", "fn", "if", "else", "while", "loop", "for", "in", "do", "until", "break",
    "continue", "return", "throw", "try", "catch", "import", "export", "as", "private", "switch",
    "true", "false", "this", "global",
];

impl Highlighter for RhaiHighlighter {
    fn highlight(&self, line: &str, _cursor: usize) -> StyledText {
        let mut out = StyledText::new();
        let chars: Vec<(usize, char)> = line.char_indices().collect();
        let mut i = 0;
        while i < chars.len() {
            let (start, c) = chars[i];
            let mut j = i + 1;
            let style = if c == '/' && chars.get(i + 1).is_some_and(|(_, n)| *n == '/') {
                while j < chars.len() && chars[j].1 != '\n' {
                    j += 1;
                }
                Style::new().fg(Color::DarkGray)
            } else if matches!(c, '"' | '`') {
                while j < chars.len() && chars[j].1 != c {
                    j += if chars[j].1 == '\\' { 2 } else { 1 };
                }
                j = (j + 1).min(chars.len());
                Style::new().fg(Color::Green)
            } else if c.is_ascii_digit() {
                while j < chars.len()
                    && (chars[j].1.is_ascii_alphanumeric() || matches!(chars[j].1, '.' | '_'))
                {
                    j += 1;
                }
                Style::new().fg(Color::Purple)
            } else if c.is_alphabetic() || c == '_' {
                while j < chars.len() && (chars[j].1.is_alphanumeric() || chars[j].1 == '_') {
                    j += 1;
                }
                let end = chars.get(j).map_or(line.len(), |(e, _)| *e);
                if KEYWORDS.contains(&&line[start..end]) {
                    Style::new().fg(Color::Blue).bold()
                } else if chars.get(j).is_some_and(|(_, n)| *n == '(' || *n == ':') {
                    Style::new().fg(Color::Cyan)
                } else {
                    Style::new()
                }
            } else {
                Style::new()
            };
            let end = chars.get(j).map_or(line.len(), |(e, _)| *e);
            out.push((style, line[start..end].to_string()));
            i = j;
        }
        out
    }
}
