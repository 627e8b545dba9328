//! The `fcdev` binary: parse arguments, run, map errors to exit codes (README.md lists them).

use clap::Parser;

use fcdev::cli::{self, Cli, Command};

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info,fcdev=debug",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("FCDEV_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.verbose.max(match cli.command {
        Command::Server(_) => 1,
        _ => 0,
    }));
    let result = match cli.command {
        // The server and the test VM manage their own runtime (the server enters a network namespace first).
        #[cfg(feature = "server")]
        Command::Server(args) => cli::server::run(*args).map_err(cli::CliError::from),
        #[cfg(feature = "server")]
        Command::TestVm(args) => {
            fcdev::server::backend::process::run_test_vm(&args.name, &args.run_dir, &args.cmdline)
                .map_err(|e| cli::CliError::new(cli::ExitKind::Failure, e.to_string()))
        }
        #[cfg(feature = "server")]
        Command::GuestAgent(args) => fcdev::guest::main(&args.args)
            .map_err(|e| cli::CliError::new(cli::ExitKind::Failure, e)),
        _ => match tokio::runtime::Runtime::new() {
            Ok(rt) => rt.block_on(cli::run(cli)),
            Err(e) => Err(cli::CliError::new(
                cli::ExitKind::Failure,
                format!("cannot start the async runtime: {e}"),
            )),
        },
    };
    if let Err(err) = result {
        err.print();
        std::process::exit(err.kind.code());
    }
}
