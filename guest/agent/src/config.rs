//! Settings the host passes on the kernel command line as `burrow.<key>=<value>`.
//!
//! The command line is the one channel that exists before the agent can talk to the
//! host, so boot-time settings travel there (as kata's agent does). Unknown
//! `burrow.*` keys are ignored so that a newer host can boot an older agent.

/// Boot-time settings of the guest.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    /// `burrow.hostname`: the guest's host name.
    pub hostname: Option<String>,
}

impl GuestConfig {
    /// Reads `/proc/cmdline` (which must be mounted). A missing file gives defaults.
    pub fn from_proc() -> Self {
        match std::fs::read_to_string("/proc/cmdline") {
            Ok(line) => Self::parse(&line),
            Err(e) => {
                tracing::warn!("/proc/cmdline: {e}");
                GuestConfig::default()
            }
        }
    }

    /// Parses a kernel command line. Invalid values are logged and skipped, never
    /// fatal: PID 1 must come up whatever the host wrote.
    pub fn parse(cmdline: &str) -> Self {
        let mut config = GuestConfig::default();
        for word in split_cmdline(cmdline) {
            let Some(setting) = word.strip_prefix("burrow.") else {
                continue;
            };
            let (key, value) = setting.split_once('=').unwrap_or((setting, ""));
            match key {
                "hostname" => {
                    if valid_hostname(value) {
                        config.hostname = Some(value.to_string());
                    } else {
                        tracing::warn!("burrow.hostname: invalid host name ignored");
                    }
                }
                _ => tracing::debug!("unknown setting burrow.{key} ignored"),
            }
        }
        config
    }
}

/// Splits the command line into words the way the kernel does: on whitespace,
/// except inside double quotes, which are removed.
fn split_cmdline(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_quotes = false;
    let mut has_word = false;
    for c in line.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                has_word = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if has_word {
                    words.push(std::mem::take(&mut word));
                    has_word = false;
                }
            }
            c => {
                word.push(c);
                has_word = true;
            }
        }
    }
    if has_word {
        words.push(word);
    }
    words
}

/// A host name as `sethostname` and resolvers accept it: 1–64 bytes of letters,
/// digits, '-' and '.', not starting with '-' or '.'.
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['-', '.'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_hostname_and_ignores_the_rest() {
        let c = GuestConfig::parse(
            "console=ttyS0 quiet burrow.hostname=ws-1 burrow.future=x rdinit=/init\n",
        );
        assert_eq!(c.hostname.as_deref(), Some("ws-1"));
    }

    #[test]
    fn defaults_when_absent() {
        assert_eq!(GuestConfig::parse("console=ttyS0"), GuestConfig::default());
        assert_eq!(GuestConfig::parse(""), GuestConfig::default());
    }

    #[test]
    fn invalid_hostname_is_skipped() {
        assert_eq!(GuestConfig::parse("burrow.hostname=").hostname, None);
        assert_eq!(GuestConfig::parse("burrow.hostname").hostname, None);
        assert_eq!(GuestConfig::parse("burrow.hostname=a/b").hostname, None);
        assert_eq!(GuestConfig::parse("burrow.hostname=-x").hostname, None);
        let long = format!("burrow.hostname={}", "a".repeat(65));
        assert_eq!(GuestConfig::parse(&long).hostname, None);
    }

    #[test]
    fn last_value_wins() {
        let c = GuestConfig::parse("burrow.hostname=a burrow.hostname=b");
        assert_eq!(c.hostname.as_deref(), Some("b"));
    }

    #[test]
    fn quotes_group_words() {
        assert_eq!(
            split_cmdline(r#"a "b c" d="e f"  g"#),
            vec!["a", "b c", "d=e f", "g"]
        );
        let c = GuestConfig::parse(r#"x="y z" burrow.hostname="box""#);
        assert_eq!(c.hostname.as_deref(), Some("box"));
    }
}
