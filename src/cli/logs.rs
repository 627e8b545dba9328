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
}

pub async fn run(args: LogsArgs, ctx: Context) -> Result<(), CliError> {
    let (profile, client) = ctx.client()?;
    let cluster = args.name.unwrap_or(profile.cluster);
    let path = format!(
        "/clusters/{cluster}/vms/{}/console?lines={}&follow={}",
        args.vm, args.lines, args.follow
    );
    let mut stdout = std::io::stdout();
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
