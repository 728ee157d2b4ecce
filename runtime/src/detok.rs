//! Text from tokens as they are generated: a reply streamed by the REPL or the server is
//! decoded whole each time and shown in complete characters (a character split between tokens
//! decodes as U+FFFD until its next token comes), cut at the first stop string, and never shows
//! the start of a stop string before it is known not to be one.

/// The reply's text as tokens arrive: decoded whole each time (a character split between tokens
/// is held back until complete), cut at the first stop string, and never showing the start of a
/// stop string before it is known not to be one.
#[derive(Debug, Default)]
pub struct Detok {
    ids: Vec<u32>,
    shown: usize,
    stops: Vec<String>,
    /// Set when a stop string ended the text.
    pub stopped: bool,
}

impl Detok {
    /// Text ending at any of `stops`.
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            ..Self::default()
        }
    }

    /// Adds `id` and returns the text that is now final (maybe empty).
    pub fn push(
        &mut self,
        id: u32,
        decode: impl Fn(&[u32]) -> crate::Result<String>,
    ) -> crate::Result<String> {
        self.ids.push(id);
        let text = decode(&self.ids)?;
        let ready = text.trim_end_matches('\u{fffd}');
        if let Some(cut) = self
            .stops
            .iter()
            .filter_map(|s| ready.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            return Ok(self.take(ready, cut));
        }
        // Hold back the longest end of the text that a stop string starts with.
        let hold = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len().min(ready.len() + 1))
                    .rev()
                    .find(|&n| s.is_char_boundary(n) && ready.ends_with(&s[..n]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        Ok(self.take(ready, ready.len() - hold))
    }

    /// The rest of the text at the end (held-back stop prefixes included: they were not stops).
    pub fn finish(
        &mut self,
        decode: impl Fn(&[u32]) -> crate::Result<String>,
    ) -> crate::Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        let text = decode(&self.ids)?;
        Ok(self.take(&text, text.len()))
    }

    fn take(&mut self, text: &str, end: usize) -> String {
        if end <= self.shown || !text.is_char_boundary(end) || !text.is_char_boundary(self.shown) {
            return String::new();
        }
        let out = text[self.shown..end].to_string();
        self.shown = end;
        out
    }

    /// Tokens so far.
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::Detok;

    /// Decodes ids as the characters of a fixed text, `ids[k]` its k-th byte, so a character of
    /// several bytes is cut between tokens until its last byte comes.
    fn run(text: &str, stops: &[&str]) -> (Vec<String>, String, bool) {
        let bytes = text.as_bytes().to_vec();
        let decode = |ids: &[u32]| -> crate::Result<String> {
            let b: Vec<u8> = ids.iter().map(|&i| bytes[i as usize]).collect();
            Ok(String::from_utf8_lossy(&b).into_owned())
        };
        let mut d = Detok::new(stops.iter().map(|s| (*s).to_string()).collect());
        let mut parts = Vec::new();
        for i in 0..bytes.len() {
            parts.push(d.push(i as u32, decode).unwrap());
            if d.stopped {
                break;
            }
        }
        let rest = d.finish(decode).unwrap();
        (parts, rest, d.stopped)
    }

    #[test]
    fn whole_characters_and_stop_strings_only() {
        // "你" is three bytes: held back until complete.
        let (parts, rest, stopped) = run("ab你", &[]);
        assert_eq!(parts, ["a", "b", "", "", "你"]);
        assert_eq!((rest.as_str(), stopped), ("", false));
        // A stop string ends the text; its start is held back until it is known.
        let (parts, rest, stopped) = run("x END y", &["END"]);
        assert_eq!(parts.concat(), "x ");
        assert_eq!((rest.as_str(), stopped), ("", true));
        // A held-back prefix that never became a stop comes out at the end.
        let (parts, rest, _) = run("x EN", &["END"]);
        assert_eq!(parts.concat() + &rest, "x EN");
    }
}
