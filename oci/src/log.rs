//! `--log` and `--log-format`: where runc writes its log, and how. containerd's
//! runc shim passes `--log <bundle>/log.json --log-format json` and, when a call
//! fails, quotes the `msg` of the last `"level":"error"` line it finds there.

use std::io::Write;
use std::path::PathBuf;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

impl Format {
    pub fn parse(s: Option<&str>) -> Result<Format, crate::error::Error> {
        match s {
            None | Some("text") => Ok(Format::Text),
            Some("json") => Ok(Format::Json),
            Some(other) => Err(crate::error::Error::invalid(
                "--log-format",
                format!("{other:?} is not one of text, json"),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Json => "json",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Log {
    pub path: Option<PathBuf>,
    pub format: Format,
    pub debug: bool,
}

impl Log {
    pub fn error(&self, msg: &str) {
        self.line("error", msg);
    }

    /// Something that failed without failing the call (a poststart or
    /// poststop hook): in the log, and on stderr as runc writes it.
    pub fn warn(&self, msg: &str) {
        eprintln!("burrow-runtime: warning: {msg}");
        self.line("warning", msg);
    }

    /// Written only with `--debug`.
    pub fn debug(&self, msg: &str) {
        if self.debug {
            self.line("debug", msg);
        }
    }

    /// Appends one line; a log that cannot be written loses the line (the error
    /// is on stderr too, and a failing log must not change the call's outcome).
    fn line(&self, level: &str, msg: &str) {
        let Some(path) = &self.path else { return };
        let line = format_line(self.format, level, msg, &now());
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

/// Now, RFC 3339 with nanoseconds, as runc's timestamps.
pub fn now() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// One log line: logrus's JSON or text formatter, as runc writes them.
pub fn format_line(format: Format, level: &str, msg: &str, time: &str) -> String {
    match format {
        Format::Json => {
            let v = serde_json::json!({"level": level, "msg": msg, "time": time});
            format!("{v}\n")
        }
        Format::Text => format!("time={} level={level} msg={}\n", quote(time), quote(msg)),
    }
}

fn quote(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_what_containerd_reads() {
        let j = format_line(Format::Json, "error", "no \"x\"", "2026-01-01T00:00:00Z");
        let v: serde_json::Value = serde_json::from_str(j.trim_end()).expect("json");
        assert_eq!(v["level"], "error");
        assert_eq!(v["msg"], "no \"x\"");
        assert!(j.ends_with('\n') && j.lines().count() == 1);
        let t = format_line(Format::Text, "error", "a\nb", "T");
        assert_eq!(t, "time=\"T\" level=error msg=\"a\\nb\"\n");
        assert!(Format::parse(Some("xml")).is_err());
        assert_eq!(Format::parse(None).expect("default"), Format::Text);
    }
}
