//! `ratelimit-service`: parse flags, build the store, serve until SIGTERM / Ctrl-C.

use std::sync::Arc;

use clap::Parser;
use ratelimit_service::clock::Clock;
use ratelimit_service::settings::Cli;
use ratelimit_service::{app, server, spawn_sweeper};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let settings = match Cli::parse().settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ratelimit-service: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&settings.log).unwrap_or_else(|_| "info".into()),
        )
        .init();
    let listener = match tokio::net::TcpListener::bind(settings.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "ratelimit-service: cannot listen on {}: {e}",
                settings.listen
            );
            return std::process::ExitCode::from(1);
        }
    };
    let clock = match settings.manual_clock_ms {
        Some(start) => {
            tracing::warn!("counting on a manual clock (--manual-clock): for tests only");
            Clock::manual(start)
        }
        None => Clock::System,
    };
    let state = Arc::new(app(&settings, clock));
    spawn_sweeper(&state);
    if let Some(ledger) = state.limiter().spend_ledger() {
        ledger.spawn();
        tracing::info!("keeping spend in the ledger (--ledger)");
    }
    if let Some(hook) = &settings.alert_webhook {
        tracing::info!(
            "posting alerts to {} ({} attempts, {})",
            hook.origin(),
            hook.attempts,
            if hook.secret.is_some() {
                "signed"
            } else {
                "unsigned"
            }
        );
    }
    tracing::info!(
        "listening on {} (store: {}, {} service-owned rule(s), {} windows)",
        listener
            .local_addr()
            .map_or_else(|_| settings.listen.to_string(), |a| a.to_string()),
        state.limiter().store().name(),
        state.limiter().rules().len(),
        if settings.sliding { "sliding" } else { "fixed" }
    );
    server::serve(
        listener,
        state.clone(),
        settings.connections,
        shutdown_signal(),
    )
    .await;
    // What waits for the ledger is written before the process ends (bounded by its timeout).
    if let Some(ledger) = state.limiter().spend_ledger() {
        if let Err(e) = ledger.flush().await {
            tracing::error!("{e}: spend not yet written is lost");
        }
    }
    tracing::info!("stopped");
    std::process::ExitCode::SUCCESS
}

/// Resolves on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
