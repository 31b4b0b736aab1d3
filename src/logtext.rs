//! Client-supplied text (client ids, topics, user names) in log lines: control characters
//! escaped, so a client cannot forge log lines (a newline) or drive a terminal (escape
//! sequences) through the gateway's logs.

use std::fmt;

/// Displays its text with control characters escaped (`\n`, `\r`, `\t`, `\u{1b}` ...) and
/// backslashes doubled; everything else as is.
pub struct LogText<'a>(pub &'a str);

impl fmt::Display for LogText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.0.chars().any(|c| c.is_control() || c == '\\') {
            return f.write_str(self.0);
        }
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                c if c.is_control() => write!(f, "\\u{{{:x}}}", c as u32)?,
                c => fmt::Write::write_char(f, c)?,
            }
        }
        Ok(())
    }
}

impl fmt::Debug for LogText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::LogText;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(LogText("dev-1").to_string(), "dev-1");
        assert_eq!(
            LogText("a\nINFO fake line\r\u{1b}[31m\\").to_string(),
            "a\\nINFO fake line\\r\\u{1b}[31m\\\\"
        );
        assert_eq!(format!("{:?}", LogText("x\ty")), "\"x\\ty\"");
    }
}
