//! Log lines: `burrow-agent: <message>`, to the serial console the host captures
//! and, outside PID 1, to stderr.
//!
//! Lines are terse on purpose: under TCG every byte on the emulated UART costs
//! time. Nothing here logs environment variable values; callers must not either.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

/// Where log lines go.
#[derive(Clone)]
struct Sink {
    console: Option<Arc<File>>,
    stderr: bool,
}

impl Write for Sink {
    // Each event arrives as one buffer (the fmt layer formats a whole line first), so
    // lines from different threads do not interleave. Errors are dropped: a log
    // line that cannot be written must not take the agent down.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(console) = &self.console {
            let _ = (&**console).write_all(buf);
        }
        if self.stderr {
            let _ = io::stderr().write_all(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Sink {
    type Writer = Sink;

    fn make_writer(&'a self) -> Sink {
        self.clone()
    }
}

/// `burrow-agent: [level: ]message key=value`; the level only when not INFO.
struct Terse;

impl<S, N> FormatEvent<S, N> for Terse
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "burrow-agent: ")?;
        let level = *event.metadata().level();
        if level != Level::INFO {
            write!(writer, "{}: ", level.as_str().to_ascii_lowercase())?;
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Installs the global logger. `console`: write to /dev/console (the guest's serial
/// port); `stderr`: write to standard error as well.
pub fn init(console: bool, stderr: bool, verbose: bool) {
    let console = if console {
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open("/dev/console")
            .ok()
            .map(Arc::new)
    } else {
        None
    };
    // Without a console (e.g. /dev not there yet) stderr is the next best place:
    // as PID 1 it is the console the kernel opened for init.
    let stderr = stderr || console.is_none();
    let level = if verbose { Level::DEBUG } else { Level::INFO };
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .event_format(Terse)
        .with_writer(Sink { console, stderr })
        .try_init();
}
