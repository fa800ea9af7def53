use agent_gateway::config::{GatewayConfig, Route};
use agent_gateway::upstream::UpstreamKind;
use agent_gateway::{backend, server};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

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
    /// Validate the configuration and print the resolved routing table.
    Check {
        /// The configuration file.
        #[arg(short, long, default_value = "gateway.toml")]
        config: PathBuf,
    },
    /// Start the reference local agent backend (partyserver contract, echo and broadcast).
    Backend {
        /// Address to listen on; port 0 picks a free one (the address is printed).
        #[arg(short, long, default_value = "127.0.0.1:8787")]
        listen: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match cli.command {
        Command::Run { config, upgrade } => match GatewayConfig::load(&config) {
            Ok(loaded) => server::run(loaded, upgrade),
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Check { config } => check(&config),
        Command::Backend { listen } => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(backend::serve(&listen)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: reference backend on {listen}: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn check(path: &Path) -> ExitCode {
    let config = match GatewayConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}: ok; listening on {}", path.display(), config.listen);
    println!();
    println!(
        "{:<16} {:<48} {:<44} UPSTREAM",
        "AGENT", "ACCEPTED SPELLINGS", "UPSTREAM PATH"
    );
    for route in &config.routes {
        print_route(route);
    }
    if let Some(fallback) = &config.fallback_upstream {
        println!(
            "{:<16} {:<48} {:<44} {}",
            "(fallback)",
            "paths outside every prefix",
            "(unchanged)",
            describe(fallback)
        );
    }
    ExitCode::SUCCESS
}

fn print_route(route: &Route) {
    let mut agents: Vec<_> = route.agents.values().collect();
    agents.sort_by(|a, b| a.name.cmp(&b.name));
    for agent in agents {
        let spellings = agent_gateway::agent_name::example_spellings(&agent.name).join(", ");
        let path = format!("{}/{}/{{instance}}", route.upstream_prefix, agent.slug);
        println!(
            "{:<16} {:<48} {:<44} {}",
            agent.name,
            format!(
                "{}/{{{spellings}}} (any case, '-' and '_' ignored)",
                route.prefix
            ),
            path,
            describe(&agent.upstream)
        );
    }
}

fn describe(upstream: &agent_gateway::upstream::Upstream) -> String {
    match &upstream.kind {
        UpstreamKind::Worker {
            address, host, tls, ..
        } => format!(
            "{} (worker {}://{address}, Host {host})",
            upstream.name,
            if *tls { "https" } else { "http" }
        ),
        UpstreamKind::Local { nodes } => format!(
            "{} (local, nodes {})",
            upstream.name,
            nodes
                .iter()
                .map(|n| n.address.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        ),
    }
}
