use agent_gateway::config::{GatewayConfig, Route};
use agent_gateway::runtime::server;
use agent_gateway::upstream::UpstreamKind;
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
    /// Validate the configuration, print the resolved routing table and the state of the
    /// secrets each route needs (names only). Fails when a required secret is missing.
    Check {
        /// The configuration file.
        #[arg(short, long, default_value = "gateway.toml")]
        config: PathBuf,
        /// Report missing secrets without failing.
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
    let mut out = std::io::stdout().lock();
    let missing = match print_table(&mut out, path, &config) {
        Ok(missing) => missing,
        // The reader went away (`check | head`): nothing more to say.
        Err(_) => return ExitCode::SUCCESS,
    };
    if missing > 0 && !warn_secrets {
        eprintln!("error: {missing} required secret(s) missing (see above); --warn-secrets reports without failing");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Prints the routing table; returns how many required secrets the gateway lacks.
fn print_table(
    out: &mut impl Write,
    path: &Path,
    config: &GatewayConfig,
) -> std::io::Result<usize> {
    writeln!(out, "{}: ok", path.display())?;
    writeln!(
        out,
        "listen {}, admin {}",
        config.listen, config.admin_listen
    )?;
    if let Some(tls) = &config.tls {
        writeln!(out, "tls {}", tls.listen)?;
    }
    let mut missing = 0;
    for route in &config.routes {
        missing += print_route(out, config, route)?;
    }
    if let Some(fallback) = &config.fallback_upstream {
        writeln!(out)?;
        writeln!(
            out,
            "paths outside every prefix: {} (path unchanged)",
            describe(fallback)
        )?;
    }
    Ok(missing)
}

/// Prints a route's agents and the secrets they need (names only); returns how many of those
/// secrets the gateway should hold and does not.
fn print_route(
    out: &mut impl Write,
    config: &GatewayConfig,
    route: &Route,
) -> std::io::Result<usize> {
    writeln!(out)?;
    writeln!(
        out,
        "route {} ({}, default instance {:?}{})",
        route.name,
        route.prefix,
        route.default_instance,
        if route.cors.is_some() {
            ", CORS policy"
        } else {
            ""
        }
    )?;
    let mut agents: Vec<_> = route.agents.values().collect();
    agents.sort_by(|a, b| a.name.cmp(&b.name));
    let mut missing = 0;
    for agent in agents {
        let spellings =
            agent_gateway::routing::agent_name::example_spellings(&agent.name).join("|");
        writeln!(out, "  {}", agent.name)?;
        writeln!(
            out,
            "    accepts   {}/{{{spellings}}}/{{instance}}  (any case; '-' and '_' ignored)",
            route.prefix
        )?;
        writeln!(
            out,
            "    upstream  {}/{}/{{instance}} on {}",
            route.upstream_prefix,
            agent.slug,
            describe(&agent.upstream)
        )?;
        for secret in &agent.required_secrets {
            let source = config.secrets.get(secret).map(|s| &s.source);
            let state = if !agent.upstream.is_local() {
                format!(
                    "kept by the Worker ({})",
                    agent.upstream.secret_hint(secret, None)
                )
            } else if config
                .secrets
                .get(secret)
                .is_some_and(|s| s.value.is_some())
            {
                format!(
                    "present ({})",
                    source.map_or_else(String::new, |s| s.describe())
                )
            } else {
                missing += 1;
                format!("MISSING: {}", agent.upstream.secret_hint(secret, source))
            };
            writeln!(out, "    secret    {secret}: {state}")?;
        }
    }
    Ok(missing)
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
