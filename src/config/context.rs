//! What every extractor needs besides its section: the file's text, so that an error names
//! the line and column of the value at fault, and its path, which errors name and relative
//! paths in the file start from.

use super::ConfigError;
use crate::upstream::NamedFile;
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::Spanned;

pub(crate) struct Ctx<'a> {
    pub(crate) text: &'a str,
    pub(crate) path: &'a Path,
}

impl Ctx<'_> {
    /// An error at `span`, or at no place when the problem is the file as a whole.
    pub(crate) fn error_at(
        &self,
        span: Option<Range<usize>>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.path.to_owned(),
            position: span.map(|s| line_column(self.text, s.start)),
            message: message.into(),
        }
    }

    pub(crate) fn error<T>(&self, value: &Spanned<T>, message: impl Into<String>) -> ConfigError {
        self.error_at(Some(value.span()), message)
    }

    /// The line `span` starts on, for messages that point back at an earlier entry.
    pub(crate) fn line(&self, span: &Range<usize>) -> usize {
        self.line_column(span.start).0
    }

    pub(crate) fn line_column(&self, offset: usize) -> (usize, usize) {
        line_column(self.text, offset)
    }

    /// A file named by `value`, relative to the configuration's folder, and where it was named.
    pub(crate) fn named_file(&self, value: &Spanned<String>) -> NamedFile {
        NamedFile {
            path: self.relative(value.get_ref()),
            at: line_column(self.text, value.span().start),
        }
    }

    /// Paths in the file are relative to the file's folder.
    pub(crate) fn relative(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            return p.to_owned();
        }
        self.path
            .parent()
            .map_or_else(|| p.to_owned(), |dir| dir.join(p))
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "[server]\nlisten = \"x\"\n";

    #[test]
    fn errors_name_the_file_and_the_place() {
        let ctx = Ctx {
            text: TEXT,
            path: Path::new("conf/gateway.toml"),
        };
        let value = Spanned::new(18..21, "x".to_owned());
        assert_eq!(
            ctx.error(&value, "bad").to_string(),
            "conf/gateway.toml:2:10: bad"
        );
        assert_eq!(
            ctx.error_at(None, "no routes").to_string(),
            "conf/gateway.toml: no routes"
        );
        assert_eq!(ctx.line(&(9..10)), 2);
    }

    #[test]
    fn paths_are_relative_to_the_file() {
        let ctx = Ctx {
            text: "",
            path: Path::new("/etc/gateway/gateway.toml"),
        };
        assert_eq!(ctx.relative("cert.pem"), Path::new("/etc/gateway/cert.pem"));
        assert_eq!(ctx.relative("/srv/key.pem"), Path::new("/srv/key.pem"));
        let bare = Ctx {
            text: "",
            path: Path::new(""),
        };
        assert_eq!(bare.relative("cert.pem"), Path::new("cert.pem"));
    }

    #[test]
    fn positions_count_lines_and_characters() {
        const LINES: &str = "a = 1\nvalue = \"x\"\n";
        assert_eq!(line_column(LINES, 0), (1, 1));
        assert_eq!(line_column(LINES, 14), (2, 9));
        assert_eq!(line_column("é\nx", 3), (2, 1));
        assert_eq!(line_column("éa", 2), (1, 2));
        assert_eq!(line_column(LINES, 10_000), (3, 1));
    }
}
