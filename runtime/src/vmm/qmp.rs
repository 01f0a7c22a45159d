//! A minimal QMP client: greeting, capabilities negotiation, commands, replies.
//! Asynchronous events interleave with replies and are skipped.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Longest QMP line accepted; QEMU's replies to our commands are far shorter.
const MAX_LINE: usize = 1 << 20;

pub struct Qmp {
    stream: BufReader<UnixStream>,
}

impl Qmp {
    pub async fn connect(path: &Path, timeout: Duration) -> std::io::Result<Qmp> {
        let fut = async {
            let stream = UnixStream::connect(path).await?;
            let mut qmp = Qmp {
                stream: BufReader::new(stream),
            };
            let greeting = qmp.read_value().await?;
            if greeting.get("QMP").is_none() {
                return Err(std::io::Error::other("no QMP greeting"));
            }
            qmp.execute("qmp_capabilities", json!({})).await?;
            Ok(qmp)
        };
        tokio::time::timeout(timeout, fut).await.map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "QMP handshake timed out")
        })?
    }

    async fn read_value(&mut self) -> std::io::Result<Value> {
        let mut line = String::new();
        let n = (&mut self.stream)
            .take(MAX_LINE as u64)
            .read_line(&mut line)
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        serde_json::from_str(&line).map_err(std::io::Error::other)
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Value) -> std::io::Result<Value> {
        let mut msg = serde_json::to_vec(&json!({"execute": command, "arguments": arguments}))?;
        msg.push(b'\n');
        self.stream.get_mut().write_all(&msg).await?;
        loop {
            let v = self.read_value().await?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                let desc = e
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error");
                return Err(std::io::Error::other(format!("QMP {command}: {desc}")));
            }
            // An event ({"event": ...}): not ours, keep reading.
        }
    }
}
