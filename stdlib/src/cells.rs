//! Notebook cells: lines starting with `// %%` split a recipe (the percent format of Jupytext and
//! VS Code). Text after the marker is the cell's title.

/// One cell of a recipe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cell {
    /// Position in the file, from 0.
    pub index: usize,
    /// The title after `// %%`, if any.
    pub title: Option<String>,
    /// 1-based line of the cell's first line (its marker, if it has one).
    pub start_line: usize,
    /// The cell's text, marker included.
    pub text: String,
}

impl Cell {
    /// The text to compile: the cell padded with empty lines so positions in errors are the
    /// positions in the file.
    pub fn padded_source(&self) -> String {
        let mut s = "\n".repeat(self.start_line.saturating_sub(1));
        s.push_str(&self.text);
        s
    }

    /// `cell 2 "train"`, or `cell 2` without a title.
    pub fn label(&self) -> String {
        match &self.title {
            Some(t) => format!("cell {} \"{t}\"", self.index + 1),
            None => format!("cell {}", self.index + 1),
        }
    }
}

/// The top-level `import "x" as y;` statements of `text`, on one line (what later cells see).
pub fn imports(text: &str) -> String {
    static IMPORT: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r#"(?m)^\s*import\s+"[^"\n]*"\s+as\s+[A-Za-z_][A-Za-z0-9_]*\s*;"#)
            .unwrap_or_else(|_| unreachable!())
    });
    let mut out = String::new();
    for m in IMPORT.find_iter(text) {
        out.push_str(m.as_str().trim());
        out.push(' ');
    }
    out
}

/// Splits `source` into cells. Text before the first marker is a cell of its own unless it is
/// blank; a file without markers is one cell.
pub fn split(source: &str) -> Vec<Cell> {
    let mut cells: Vec<Cell> = Vec::new();
    let mut current = Cell {
        index: 0,
        title: None,
        start_line: 1,
        text: String::new(),
    };
    for (i, line) in source.split_inclusive('\n').enumerate() {
        if let Some(rest) = line.trim_start().strip_prefix("// %%") {
            if !(cells.is_empty() && current.text.trim().is_empty()) {
                cells.push(current);
            }
            let title = rest.trim().trim_start_matches("[markdown]").trim();
            current = Cell {
                index: cells.len(),
                title: (!title.is_empty()).then(|| title.to_string()),
                start_line: i + 1,
                text: String::new(),
            };
        }
        current.text.push_str(line);
    }
    cells.push(current);
    cells
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_on_markers_with_titles() {
        let src = "let a = 1;\n// %% load\nlet b = 2;\n\n// %%\nlet c = 3;\n";
        let cells = split(src);
        assert_eq!(cells.len(), 3);
        assert_eq!(cells[0].title, None);
        assert_eq!(cells[1].title.as_deref(), Some("load"));
        assert_eq!(cells[1].start_line, 2);
        assert_eq!(cells[2].start_line, 5);
        assert_eq!(cells[2].text, "// %%\nlet c = 3;\n");
        assert_eq!(cells[1].label(), "cell 2 \"load\"");
        let joined: String = cells.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(joined, src);
    }

    #[test]
    fn blank_preamble_is_dropped_and_padding_keeps_lines() {
        let cells = split("\n// %% a\nx\n// %% b\ny");
        assert_eq!(cells.len(), 2);
        assert_eq!(cells[1].padded_source(), "\n\n\n// %% b\ny");
        assert_eq!(split("").len(), 1);
        assert_eq!(split("let x = 1;").len(), 1);
    }
}
