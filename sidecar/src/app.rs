//! Wires the sidecar together: the shared state, the listeners (TCP and,
//! when configured, a Unix socket) and the reload watcher. The one place that
//! spawns tasks and threads; nothing else in the crate does.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::server;
use crate::state::{Shared, StartError};

/// The policy directory to serve: the configured one, or — when the default
/// `policies` is not in the working directory — the example bundled with the
/// source tree, so `cargo run -- serve` works from anywhere in the checkout.
pub fn policy_dir(config: &Config) -> PathBuf {
    let dir = config.policies.dir.clone();
    if dir == std::path::Path::new("policies") && !dir.exists() {
        let bundled = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../policies"));
        if bundled.exists() {
            return bundled;
        }
    }
    dir
}

/// Runs the sidecar until the process is stopped (SIGINT or SIGTERM).
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let dir = policy_dir(&config);
    let _telemetry = crate::telemetry::init(&config.telemetry)?;
    let shared = Shared::new(config, dir.clone()).map_err(|e| match e {
        StartError::Policies(problems) => anyhow::anyhow!(
            "the policy directory `{}` does not load:\n{problems}",
            dir.display()
        ),
        other => anyhow::anyhow!("{other}"),
    })?;
    {
        let active = shared.active();
        tracing::info!(
            dir = %dir.display(),
            epoch = active.epoch,
            hash = %active.bundle.hash,
            policies = active.bundle.counts.policies,
            templates = active.bundle.counts.templates,
            entities = active.bundle.counts.entities,
            "policy set loaded"
        );
    }

    if shared.config.policies.watch {
        let watching = crate::reload::watch(Arc::clone(&shared));
        std::thread::Builder::new()
            .name("vigie-reload".into())
            .spawn(watching)
            .context("cannot start the reload thread")?;
    }

    if shared.config.audit.ledger.is_some() {
        let outbox = shared.log.outbox.clone();
        let key = Arc::clone(&shared.log.key);
        let id = shared.log.sidecar_id.clone();
        let config = shared.config.audit.clone();
        let stats = Arc::clone(&shared.log.shipper);
        std::thread::Builder::new()
            .name("vigie-shipper".into())
            .spawn(move || crate::audit::shipper::run(outbox, key, id, config, stats))
            .context("cannot start the shipper thread")?;
    }

    if shared.cache.l2_enabled() {
        let s = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("vigie-cache-trim".into())
            .spawn(move || loop {
                std::thread::sleep(s.cache.trim_interval());
                s.cache.trim(crate::cache::now_ms());
            })
            .context("cannot start the cache trimming thread")?;
    }

    // Bind every listener before announcing any, so that whoever waits for
    // the announcement finds them all accepting.
    let ext_authz = if shared.config.ext_authz.enabled {
        crate::extauthz::check_config(&shared.config.ext_authz, &shared)
            .map_err(|e| anyhow::anyhow!("bad ext_authz mapping:\n{e}"))?;
        let addr = shared.config.ext_authz.listen;
        Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (ext_authz)"))?,
        )
    } else {
        None
    };
    let listen = shared.config.server.listen;
    let tcp = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    #[cfg(unix)]
    let uds = match shared.config.server.unix_socket.clone() {
        None => None,
        Some(path) => {
            // A stale socket from an earlier run would make bind fail.
            if path.exists() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("cannot remove stale socket `{}`", path.display()))?;
            }
            let l = tokio::net::UnixListener::bind(&path)
                .with_context(|| format!("cannot listen on unix socket `{}`", path.display()))?;
            Some((l, path))
        }
    };
    #[cfg(unix)]
    if let Some((uds, path)) = uds {
        tracing::info!(path = %path.display(), "listening (HTTP over Unix socket)");
        tokio::spawn(accept_unix(uds, Arc::clone(&shared)));
    }
    if let Some(l) = ext_authz {
        tracing::info!(addr = %l.local_addr()?, "listening (ext_authz gRPC)");
        let s = Arc::clone(&shared);
        tokio::spawn(async move {
            if let Err(e) = crate::extauthz::serve(s, l).await {
                tracing::error!(error = %e, "the ext_authz server stopped");
            }
        });
    }
    tracing::info!(addr = %tcp.local_addr()?, "listening (HTTP)");
    tokio::spawn(accept_tcp(tcp, Arc::clone(&shared)));

    shutdown_signal().await;
    tracing::info!("shutting down");
    shared.cache.flush();
    Ok(())
}

/// Resolves on SIGTERM (never, where there is no such signal).
pub async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            term.recv().await;
            return;
        }
    }
    std::future::pending::<()>().await;
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

fn serve_connection<I>(io: I, shared: Arc<Shared>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let service = service_fn(move |req| server::handle(Arc::clone(&shared), req));
        if let Err(e) = auto::Builder::new(TokioExecutor::new())
            .serve_connection(io, service)
            .await
        {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    });
}

async fn accept_tcp(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                serve_connection(TokioIo::new(stream), Arc::clone(&shared));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(unix)]
async fn accept_unix(listener: tokio::net::UnixListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => serve_connection(TokioIo::new(stream), Arc::clone(&shared)),
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
