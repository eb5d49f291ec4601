//! pcgate: a caching sidecar gateway for the Partner Center billing API.
//!
//! Billing apps call pcgate on loopback instead of `https://api.partnercenter.microsoft.com`;
//! pcgate decides whether the call is allowed, and forwards it.
//!
//! A call's path, in the order it meets the modules; data flows one way, inward as request
//! extensions and outward as the response:
//! - [`server`]: the accept loop (HTTP/1.1 and HTTP/2 cleartext; head, idle and stall timers per
//!   connection; `Content-Length` + `Transfer-Encoding` refused; graceful shutdown).
//! - [`stack`]: the one place the whole request path is put together: [`stack::layers`] builds
//!   each layer once, and [`stack::Layers::lane`] stacks them into the service each lane serves.
//!   As the call enters it strips hop-by-hop headers, starts the call's [`deadline`] and marks
//!   the body as the caller's; then, outside to inside, the layers of [`layer`]:
//!   - [`layer::observe`]: request metrics ([`metrics`]) and the access log, from the [`call`]
//!     info the layers below fill in.
//!   - [`layer::tracking`]: MS-RequestId, MS-CorrelationId, MS-CV ([`cv`]); stamped on every
//!     answer, rescued ones included; malformed ids refused (400).
//!   - [`layer::rescue`]: every error becomes a Partner Center-shaped response; the status comes
//!     from the first error in the cause chain that knows its own ([`error`]).
//!   - [`layer::access`]: the `Host` rule ([`host`]), inbound keys, path normalisation and the
//!     route table ([`route`]); forwards only the request headers in [`headers`]; puts the
//!     matched route (with its token source) in the request's extensions.
//!   - [`layer::cache`]: fresh and stale answers from a [`layer::cache::Storage`] (moka first),
//!     decided by pure policy functions; on a miss one lock per key, so identical misses make one
//!     fetch, stored once, and the waiters re-read the store.
//!   - [`layer::coalesce`]: on uncached routes, identical in-flight calls share one fetch.
//!   - [`layer::retry`]: backoff with full jitter, Retry-After and a budget, within the deadline,
//!     which also bounds the body streamed back.
//!   - [`layer::credential`]: the token from the route's own [`token`] source; 401 → refresh,
//!     replay once.
//!   - [`layer::limit`]: one throttle budget: an upstream 429's `Retry-After` holds every later
//!     upstream call, and `upstream.rate_limit` makes calls wait for their slot (fleet-wide
//!     with `[shared]`); past the deadline, a 429 with `Retry-After`.
//! - [`upstream`]: the pooled rustls client that sends the call on and streams the answer back.
//!
//! Around them: [`config`] (figment: defaults, TOML, `PCGATE_` env, parsed once into types that
//! [`route`], [`upstream`] and [`token`] consume), [`admin`] (the admin port), [`body`] (the body
//! type), [`log`] (the JSON log lines), [`shutdown`] (one stop signal for every listener),
//! [`shared`] (the fleet tier's Redis handle: bounded operations, a breaker, locks, scripts,
//! pub/sub), and [`sandbox`] (a local stand-in for Partner Center; [`demo`] runs it with the
//! gateway).
//!
//! [`run`] is what `main` and the tests call; [`Gateway`] splits it into bind and serve so tests
//! can bind port 0 and learn the address.
#![forbid(unsafe_code)]

pub mod admin;
pub mod body;
pub mod call;
pub mod config;
pub mod cv;
pub mod deadline;
pub mod demo;
pub mod error;
pub mod headers;
pub mod host;
pub mod layer;
pub mod log;
pub mod metrics;
pub mod route;
pub mod sandbox;
pub mod server;
pub mod shared;
pub mod shutdown;
pub mod stack;
pub mod token;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpListener;

use crate::config::Config;
use crate::server::ServeOptions;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The config key that named it.
        key: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS client could not be built.
    #[error(transparent)]
    Tls(#[from] upstream::TlsError),
    /// A credential could not be set up (a secret file missing, say).
    #[error(transparent)]
    Credential(#[from] token::SetupError),
    /// The route table could not be built (a route names a credential that is not configured).
    #[error(transparent)]
    Route(#[from] route::RouteError),
    /// The shared tier's client could not be built.
    #[error(transparent)]
    Shared(#[from] shared::SetupError),
    /// `shared.key_file` could not be read or holds no key.
    #[error(transparent)]
    SharedKey(#[from] shared::tokens::KeyFileError),
    /// The config was not validated and does not hold (a config built in code, say).
    #[error(transparent)]
    Config(#[from] config::ConfigError),
}

/// A gateway whose listeners are bound and whose parts are built, ready to serve.
pub struct Gateway {
    config: Config,
    listener: TcpListener,
    admin: TcpListener,
    parts: stack::Parts,
}

impl Gateway {
    /// Builds the stack's parts and binds both listeners (port 0 picks a free port). Every
    /// start-up error (a secret file missing, a port taken) surfaces here, before serving.
    pub async fn bind(config: Config) -> Result<Gateway, StartError> {
        for warning in config.warnings() {
            tracing::warn!("{warning}");
        }
        let parts = parts(&config)?;
        let bind = |addr: SocketAddr, key: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, key, source })
        };
        let listener = bind(config.server.listen, "server.listen").await?;
        let admin = bind(config.server.admin_listen, "server.admin_listen").await?;
        Ok(Gateway {
            config,
            listener,
            admin,
            parts,
        })
    }
    /// The address billing apps call.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The token sources (tests and the demo look at them).
    pub fn tokens(&self) -> &token::TokenSources {
        &self.parts.tokens
    }

    /// Serves until `shutdown` resolves, then drains for at most `server.shutdown_grace`.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let (listen, admin_listen) = (self.local_addr(), self.admin_addr());
        let Gateway {
            config,
            listener,
            admin,
            parts,
        } = self;
        let tokens = parts.tokens.clone();
        let admin_state = admin::Admin {
            hosts: host::HostRule::new(&config.server.admin_hosts),
            credentials: parts.routes.credentials().into(),
            store: parts.store.clone(),
            cache: parts.cache.clone(),
            metrics: parts.metrics.clone(),
        };
        // Every layer once; each lane serves a copy of the stack of its own.
        let layers = stack::layers(parts);
        let admin_service = tower::service_fn(move |request| admin_state.clone().handle(request));

        let refreshers = tokens.spawn_refreshers();
        let shutdown = shutdown::Shutdown::on(shutdown);
        // Only the gateway's stack refuses a request framed two ways itself (`access`).
        let options = |name, service_refuses_framed_twice| ServeOptions {
            name,
            service_refuses_framed_twice,
            header_read_timeout: config.server.header_read_timeout,
            idle_timeout: config.server.idle_timeout,
            stall_timeout: config.upstream.deadline + config.server.idle_timeout,
            grace: config.server.shutdown_grace,
        };
        tracing::info!(
            %listen,
            admin = %admin_listen,
            upstream = %config.upstream.base_url,
            routes = config.routes.len(),
            "pcgate listening"
        );
        tokio::join!(
            server::serve_lanes(
                listener,
                || layers.lane(),
                options("gateway", true),
                server::default_lanes(),
                || shutdown.wait()
            ),
            server::serve(
                admin,
                admin_service,
                options("admin", false),
                shutdown.wait()
            ),
        );
        for refresher in refreshers {
            refresher.abort();
        }
        Ok(())
    }
}

/// Everything the request path is built from, prepared from `config` (token sources, route table,
/// metrics, the upstream client, the cache's store); [`Gateway::bind`] uses it, and so does the
/// micro benchmark, which puts an in-memory service in place of the upstream client.
pub fn parts(config: &Config) -> Result<stack::Parts, StartError> {
    let tls = upstream::tls_config(config.upstream.ca_file.as_deref())?;
    let metrics = std::sync::Arc::new(metrics::Metrics::new());
    let tokens = token::TokenSources::new(
        &config.credentials,
        tls.clone(),
        config.upstream.connect_timeout,
        metrics.clone(),
    )?;
    // Each route's credential is resolved to its source here, once.
    let routes = route::RouteTable::new(&config.routes, &tokens)?;
    let known: Vec<metrics::KnownRoute<'_>> = config
        .routes
        .iter()
        .map(|r| metrics::KnownRoute {
            name: r.name(),
            coalesced: r.coalesce,
        })
        .collect();
    let fetched: Vec<&str> = config
        .credentials
        .iter()
        .filter(|(_, c)| c.grant() != config::Grant::Static)
        .map(|(name, _)| name.as_str())
        .collect();
    metrics.prime(&known, &fetched);
    drop(known);
    let route_names: Vec<&str> = config.routes.iter().map(|r| r.name()).collect();
    let upstream = upstream::Upstream::new(&config.upstream, tls, &metrics, &route_names);
    let observe = layer::observe::ObserveLayer::new(&metrics, &route_names);
    let tracking = layer::tracking::TrackingSettings::new(&config.tracking)
        .map_err(config::ConfigError::Invalid)?;
    let retry = layer::retry::RetrySettings::new(&config.retry, config.upstream.deadline);
    let store = std::sync::Arc::new(layer::cache::MemoryStore::new(
        config.cache.max_bytes.as_u64(),
        config.cache.max_entry_bytes.as_u64(),
        &metrics,
    ));
    // The fleet tier: a handle that connects in the background, so a Redis that is down
    // now is no start-up error (DESIGN.md §6).
    let shared = match &config.shared {
        Some(shared) => Some(shared::Shared::connect(
            shared,
            config.upstream.ca_file.as_deref(),
            &metrics,
        )?),
        None => None,
    };
    // With the fleet tier, the cache's store is two-tiered: moka, then Redis.
    let cache: std::sync::Arc<dyn layer::cache::Storage> = match &shared {
        Some(shared) => std::sync::Arc::new(layer::cache::TieredStore::new(
            store.clone(),
            shared.clone(),
            store.max_entry_bytes(),
            // The owner's fetch includes its retries and throttle waits: all within the deadline.
            config.upstream.deadline,
        )),
        None => store.clone(),
    };
    let (forward_headers, key_headers) = config.header_lists()?;
    let cached_routes: Vec<String> = config
        .routes
        .iter()
        .filter(|r| r.cache_ttl.is_some())
        .map(|r| r.name().to_owned())
        .collect();
    let limit = layer::limit::LimitLayer::new(
        layer::limit::LimitSettings {
            rate: config.upstream.rate_limit,
            max_hold: config.retry.max_retry_after,
            deadline: config.upstream.deadline,
        },
        &metrics,
    );
    // With [shared] and shared.key_file, App+User refresh tokens rotate once for the fleet.
    if let (Some(handle), Some(key_file)) = (
        &shared,
        config.shared.as_ref().and_then(|s| s.key_file.as_deref()),
    ) {
        let key = shared::tokens::SealKey::read(key_file)?;
        let shares = shared::tokens::TokenShares::new(
            handle.clone(),
            key,
            shared::tokens::ShareMetrics::register(&metrics),
        );
        let sharing = tokens.share_refresh_tokens(&shares);
        if !sharing.is_empty() {
            tracing::info!(credentials = ?sharing, "refresh tokens are shared with the fleet");
        }
    }
    // With [shared], one hold and one rate for every sidecar of the namespace.
    let limit = match &shared {
        Some(shared) => limit.fleet(std::sync::Arc::new(shared::limit::FleetThrottle::new(
            shared.clone(),
        ))),
        None => limit,
    };
    let parts = stack::Parts {
        limit,
        cached_routes,
        observe,
        forward_headers,
        key_headers: key_headers.into(),
        store,
        cache,
        shared,
        retry,
        metrics,
        tracking,
        routes,
        keys: config.access.clients.clone(),
        hosts: host::HostRule::new(&config.server.admin_hosts),
        tokens,
        upstream,
    };
    Ok(parts)
}

/// Binds and serves until `shutdown` resolves: the whole gateway.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    Gateway::bind(config).await?.serve(shutdown).await
}
