//! `fcdev logs VM [-f] [--lines N]`: a VM's console log (its serial console: the boot, kernel messages, the
//! guest agent's lines), and with `-f` what it prints next, through the server's API.

use std::io::Write;

use crate::cli::{CliError, Context};

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// The VM (`n1`, `f1`, …; `fcdev status` lists them).
    pub vm: String,
    /// Keep printing what the console prints next (Ctrl-C to stop).
    #[arg(short, long)]
    pub follow: bool,
    /// How many of the last lines to print first (at most 10000).
    #[arg(short = 'n', long, default_value_t = 100)]
    pub lines: usize,
    /// The cluster (default: the profile's cluster, `dev`).
    #[arg(long)]
    pub name: Option<String>,
    /// One JSON object per line (`{"vm":"n1","line":"…"}`), as lines come.
    #[arg(long)]
    pub json: bool,
}

/// Complete console lines as JSON objects; the bytes after the last newline wait for the next chunk.
struct JsonLines {
    vm: String,
    pending: Vec<u8>,
}

impl JsonLines {
    fn feed(&mut self, chunk: &[u8], out: &mut impl Write) -> std::io::Result<()> {
        self.pending.extend_from_slice(chunk);
        while let Some(i) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=i).collect();
            self.emit(&line[..i], out)?;
        }
        out.flush()
    }

    fn emit(&self, line: &[u8], out: &mut impl Write) -> std::io::Result<()> {
        let text = String::from_utf8_lossy(line);
        let obj = serde_json::json!({ "vm": self.vm, "line": text.trim_end_matches('\r') });
        writeln!(out, "{obj}")
    }
}

pub async fn run(args: LogsArgs, ctx: Context) -> Result<(), CliError> {
    let (profile, client) = ctx.client()?;
    let cluster = args.name.unwrap_or(profile.cluster);
    let path = format!(
        "/clusters/{cluster}/vms/{}/console?lines={}&follow={}",
        args.vm, args.lines, args.follow
    );
    let mut stdout = std::io::stdout();
    if args.json {
        let mut lines = JsonLines {
            vm: args.vm.clone(),
            pending: Vec::new(),
        };
        client
            .stream_bytes(&path, |chunk| lines.feed(chunk, &mut stdout).is_ok())
            .await?;
        if !lines.pending.is_empty() {
            let _ = lines.emit(&lines.pending, &mut stdout);
        }
        return Ok(());
    }
    let mut last = b'\n';
    client
        .stream_bytes(&path, |chunk| {
            if let Some(b) = chunk.last() {
                last = *b;
            }
            // A closed stdout (`| head`) ends it.
            stdout.write_all(chunk).and_then(|_| stdout.flush()).is_ok()
        })
        .await?;
    // A console's last line often has no newline yet (a prompt): end the output cleanly.
    if last != b'\n' {
        let _ = writeln!(stdout);
    }
    Ok(())
}
