//! The `orbmanager` binary: CLI -> config -> runtime -> app. anyhow lives only here.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use orbmanager::cli::{Cli, Command, ServeArgs, SimArgs};
use orbmanager::config::Config;
use orbmanager::sim::{self, SimConfig, Workload};

/// mimalloc instead of glibc malloc: the hot path allocates per message (payload, parsed point,
/// batch), and glibc's allocator took ~36% of the server's CPU at saturation (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long mimalloc keeps freed memory before returning it to the OS, in milliseconds. Its
/// default (1 s) returned memory the server reused moments later: at saturation ~0.2 pages per
/// message were returned (`madvise`), faulted back and zeroed, ~6% of the server's CPU
/// (BENCHMARKS.md). Ten seconds keeps the steady churn mapped and still gives memory back after
/// a spike. `MIMALLOC_PURGE_DELAY` (or its older name `MIMALLOC_RESET_DELAY`) in the
/// environment overrides it.
const ALLOCATOR_PURGE_DELAY_MS: std::ffi::c_long = 10_000;
/// `mi_option_purge_delay` in mimalloc 3's `mi_option_e` (libmimalloc-sys names no constant
/// for it); the test below checks that it reads mimalloc's documented default.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[allow(unsafe_code)] // the crate's one exception (Cargo.toml [lints])
fn tune_allocator() {
    if operator_set_purge_delay() {
        return;
    }
    // SAFETY: `mi_option_set` stores a plain integer and is not synchronised; `main` calls
    // this first, before the process starts any other thread.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, ALLOCATOR_PURGE_DELAY_MS) }
}

fn operator_set_purge_delay() -> bool {
    std::env::vars_os().any(|(k, _)| {
        k.to_str().is_some_and(|k| {
            k.eq_ignore_ascii_case("MIMALLOC_PURGE_DELAY") || k.eq_ignore_ascii_case("MIMALLOC_RESET_DELAY")
        })
    })
}

fn init_tracing(filter: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

fn load_config(args: &ServeArgs) -> anyhow::Result<Config> {
    let (config, warnings) = Config::load(args.config.as_deref(), std::env::vars(), &args.overrides())?;
    init_tracing(&config.log);
    for w in warnings {
        tracing::warn!("{w}");
    }
    Ok(config)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("orb-rt")
        .build()
        .context("starting the runtime")
}

fn sim_config(a: &SimArgs) -> anyhow::Result<SimConfig> {
    anyhow::ensure!(a.qos <= 1, "--qos must be 0 or 1");
    anyhow::ensure!(a.protocol == 4 || a.protocol == 5, "--protocol must be 4 (3.1.1) or 5");
    anyhow::ensure!(a.orbs > 0, "--orbs must be at least 1");
    anyhow::ensure!(
        a.gateway_children == 0 || (a.state_every == 0 && a.commands_per_s == 0.0),
        "--state-every and --commands-per-s need direct connections (no --gateway-children)"
    );
    anyhow::ensure!(
        a.commands_per_s == 0.0 || a.api_grpc.is_some(),
        "--commands-per-s needs --api-grpc (the gRPC address to create commands through)"
    );
    anyhow::ensure!(a.commands_per_s >= 0.0 && a.commands_per_s.is_finite(), "--commands-per-s must be >= 0");
    anyhow::ensure!(
        a.warmup_s == 0 || a.warmup_s < a.duration_s,
        "--warmup-s must be shorter than --duration-s (latencies are measured after the warm-up)"
    );
    let tokens = match &a.credentials {
        Some(p) => sim::read_credentials(p).map_err(anyhow::Error::msg)?,
        None => Default::default(),
    };
    Ok(SimConfig {
        addr: a.mqtt.clone(),
        orbs: a.orbs,
        interval_ms: a.interval_ms,
        qos: a.qos,
        duration_s: a.duration_s,
        tenant: a.tenant.clone(),
        prefix: a.prefix.clone(),
        protocol: a.protocol,
        connect_rate: a.connect_rate,
        tokens,
        anonymous: a.anonymous,
        workload: match a.workload.as_str() {
            "city" => Workload::City,
            _ => Workload::Synthetic { payload_bytes: a.payload_bytes },
        },
        inflight_max: 64,
        stream: a.stream_http.clone().map(|addr| (addr, a.stream_token.clone())),
        webhook: a.webhook_listen.clone().map(|addr| (addr, a.webhook_secret.clone())),
        gateway_children: a.gateway_children,
        state_every: a.state_every,
        commands_per_s: a.commands_per_s,
        api: a.api_grpc.clone().map(|addr| (addr, a.stream_token.clone())),
        warmup_s: a.warmup_s,
    })
}

/// Prints a CLI result (tables and JSON to stdout); errors go to stderr via `main`.
fn client_out(r: Result<String, orbmanager::client::ClientError>) -> anyhow::Result<()> {
    print!("{}", r?);
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let config = load_config(&args)?;
            runtime()?.block_on(orbmanager::app::serve(config))?;
        }
        Command::Demo(args) => {
            let config = load_config(&args.serve)?;
            runtime()?.block_on(orbmanager::demo::run(config, args.orbs, args.interval_ms))?;
        }
        Command::Tenants { conn, cmd } => client_out(runtime()?.block_on(orbmanager::client::tenants(&conn, &cmd)))?,
        Command::Tokens { conn, cmd } => client_out(runtime()?.block_on(orbmanager::client::tokens(&conn, &cmd)))?,
        Command::Orbs { conn, cmd } => client_out(runtime()?.block_on(orbmanager::client::orbs(&conn, &cmd)))?,
        Command::Telemetry { conn, cmd } => {
            client_out(runtime()?.block_on(orbmanager::client::telemetry(&conn, &cmd)))?
        }
        Command::Commands { conn, cmd } => client_out(runtime()?.block_on(orbmanager::client::commands(&conn, &cmd)))?,
        Command::Alerts { conn, cmd } => client_out(runtime()?.block_on(orbmanager::client::alerts(&conn, &cmd)))?,
        Command::Events { conn, cmd } => client_out(runtime()?.block_on(orbmanager::client::events(&conn, &cmd)))?,
        Command::Storage { conn, cmd } => client_out(runtime()?.block_on(orbmanager::client::storage(&conn, &cmd)))?,
        Command::Exports { conn, cmd } => client_out(runtime()?.block_on(orbmanager::client::exports(&conn, &cmd)))?,
        Command::Restore(args) => {
            let config = load_config(&args.serve)?;
            let report = runtime()?.block_on(orbmanager::app::restore(&config, args.checkpoint.as_deref()))?;
            println!("{report}");
        }
        Command::Sim(args) => {
            init_tracing(&std::env::var("ORBMANAGER_LOG").unwrap_or_else(|_| "warn".into()));
            let cfg = sim_config(&args)?;
            let summary = runtime()?.block_on(sim::run(cfg, None));
            let json = serde_json::to_string_pretty(&summary)?;
            if let Some(out) = &args.out {
                std::fs::write(out, &json).with_context(|| format!("writing {}", out.display()))?;
            }
            eprintln!("{}", summary.table());
            println!("{json}");
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    tune_allocator();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("orbmanager: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{ALLOCATOR_PURGE_DELAY_MS, MI_OPTION_PURGE_DELAY, tune_allocator};

    #[test]
    #[allow(unsafe_code)]
    fn the_allocator_keeps_freed_memory_for_the_purge_delay() {
        if super::operator_set_purge_delay() {
            return; // the operator's value wins; nothing of ours to check
        }
        // The harness runs other tests on other threads; none of them touches this option.
        // SAFETY: reads an integer option.
        let get = || unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        // mimalloc 3's default purge delay is 1,000 ms: a wrong option index reads something else.
        assert_eq!(get(), 1_000, "option {MI_OPTION_PURGE_DELAY} is not mimalloc's purge delay");
        tune_allocator();
        assert_eq!(get(), ALLOCATOR_PURGE_DELAY_MS);
    }
}
