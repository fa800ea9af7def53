use agent_gateway::config::GatewayConfig;
use agent_gateway::routing::table::RoutingTable;
use agent_gateway::runtime::server;
use agent_gateway::secrets::SecretStore;
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// mimalloc rather than glibc's malloc: a proxied HTTP request makes about a hundred small
/// allocations, and glibc spent a quarter of the gateway's instructions on them
/// (bench/results/PROFILE.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Edge reverse proxy for AI agents behind /agents/{agent}/{instance} WebSocket URLs.
#[derive(Parser)]
#[command(name = "agent-gateway", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the gateway.
    Run {
        /// The configuration file.
        #[arg(short, long, default_value = "gateway.toml")]
        config: PathBuf,
        /// Take the listening sockets over from a running gateway (Pingora's upgrade).
        #[arg(short, long)]
        upgrade: bool,
    },
    /// Validate the configuration, print the resolved routing table, the state of the
    /// secrets each route needs (names only) and each agent's authentication policy. Fails
    /// when a required secret is missing or a policy cannot let anyone through.
    Check {
        /// The configuration file.
        #[arg(short, long, default_value = "gateway.toml")]
        config: PathBuf,
        /// Report missing secrets and unusable policies without failing.
        #[arg(long)]
        warn_secrets: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, upgrade } => match GatewayConfig::load(&config) {
            Ok(loaded) => {
                agent_gateway::telemetry::logging::init(&loaded.log.level, loaded.log.json);
                server::run(loaded, config, upgrade);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Check {
            config,
            warn_secrets,
        } => {
            agent_gateway::telemetry::logging::init("warn", false);
            check(&config, warn_secrets)
        }
    }
}

fn check(path: &Path, warn_secrets: bool) -> ExitCode {
    let config = match GatewayConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let table = RoutingTable::of(&config, &SecretStore::read(&config));
    let mut out = std::io::stdout().lock();
    let written = writeln!(out, "{}: ok", path.display()).and_then(|()| table.write_text(&mut out));
    if written.is_err() {
        // The reader went away (`check | head`): nothing more to say.
        return ExitCode::SUCCESS;
    }
    let missing = table.missing_secrets();
    if missing > 0 && !warn_secrets {
        eprintln!("error: {missing} required secret(s) missing (see above); --warn-secrets reports without failing");
        return ExitCode::FAILURE;
    }
    let unusable = table.unusable_policies();
    for why in unusable {
        eprintln!("{}: {why}", if warn_secrets { "warning" } else { "error" });
    }
    if !unusable.is_empty() && !warn_secrets {
        eprintln!("error: {} authentication policy(ies) cannot let anyone through; their agents answer 503", unusable.len());
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
