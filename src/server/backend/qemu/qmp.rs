//! A minimal synchronous QMP client (JSON lines over the VM's unix socket).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("QMP i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP protocol: {0}")]
    Protocol(String),
    #[error("QMP command `{command}` failed: {message}")]
    Command { command: String, message: String },
}

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connect, retrying until `deadline` (qemu creates the socket a moment after it starts), and negotiate.
    pub fn connect(path: &Path, wait: Duration) -> Result<Qmp, QmpError> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(source) => {
                    if start.elapsed() >= wait {
                        return Err(QmpError::Connect {
                            path: path.display().to_string(),
                            source,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        let writer = stream.try_clone()?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "unexpected greeting {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line)?;
        if n == 0 {
            return Err(QmpError::Protocol("connection closed".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| QmpError::Protocol(format!("bad JSON {line:?}: {e}")))
    }

    /// Run a command and return its `return` value; events received meanwhile are skipped.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let msg = json!({"execute": command, "arguments": arguments});
        let mut text = msg.to_string();
        text.push('\n');
        self.writer.write_all(text.as_bytes())?;
        loop {
            let reply = self.read_message()?;
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    message: err
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown error")
                        .to_string(),
                });
            }
            // An asynchronous event: ignore.
        }
    }

    /// `query-status` → e.g. `running`, `inmigrate`, `paused`, `postmigrate`.
    pub fn status(&mut self) -> Result<String, QmpError> {
        let v = self.execute("query-status", json!({}))?;
        Ok(v.get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string())
    }

    /// Enable or disable one migration capability.
    pub fn set_capability(&mut self, name: &str, state: bool) -> Result<(), QmpError> {
        self.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": name, "state": state}]}),
        )
        .map(|_| ())
    }

    /// `query-migrate` status (`active`, `completed`, `failed`, …) and error description.
    pub fn migrate_status(&mut self) -> Result<(String, Option<String>), QmpError> {
        let v = self.execute("query-migrate", json!({}))?;
        let status = v
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("none")
            .to_string();
        let err = v
            .get("error-desc")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok((status, err))
    }
}
