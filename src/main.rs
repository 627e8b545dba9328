//! Temporary entry point of the `vm` branch (the lead's CLI replaces it): `fcdev image ...` only.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(name = "fcdev")]
struct Cli {
    /// Data directory.
    #[arg(long, env = "FCDEV_DATA_DIR", default_value = "/var/lib/fcdev")]
    data_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Build and snapshot prepared images.
    Image(fcdev::cli::image::ImageArgs),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Image(args) => fcdev::cli::image::run(args, &cli.data_dir),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
