//! The Prometheus metrics of the contract (DESIGN.md §1), in one registry. Labels come only from
//! bounded sets: route names from the config, status classes, outcome enums.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// `Content-Type` of [`Metrics::encode_openmetrics`]'s output.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of [`Metrics::encode`]'s output (the classic format promtool checks).
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Latency buckets: 1 ms doubling to about 32 s.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// `{route, status}`: a call's route and status class (`2xx`...`5xx`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    /// Route name, or `none` when no route matched.
    pub route: Arc<str>,
    /// `2xx`, `4xx`, ...
    pub status: &'static str,
}

/// `{route}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// Route name.
    pub route: Arc<str>,
}

/// `{route, outcome}` for an upstream attempt.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// Route name.
    pub route: Arc<str>,
    /// `2xx`...`5xx`, or `connect_error`, `timeout`, `error`.
    pub outcome: &'static str,
}

/// `{route, result}` for a cache lookup.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// Route name.
    pub route: Arc<str>,
    /// `hit`, `miss`, `stale`, `bypass`.
    pub result: &'static str,
}

/// `{credential, result}` for a token refresh.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    /// Credential name.
    pub credential: String,
    /// `ok` or `error`.
    pub result: &'static str,
}

/// `{credential}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CredentialLabel {
    /// Credential name.
    pub credential: String,
}

/// `{version}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Every metric pcgate exports; shared as `Arc<Metrics>`.
pub struct Metrics {
    registry: std::sync::Mutex<Registry>,
    /// `pcgate_coalesced_requests_total{route}`: calls answered by another call's upstream fetch.
    pub coalesced: Family<RouteLabel, Counter>,
    /// `pcgate_token_refreshes_total{credential,result}`.
    pub token_refreshes: Family<TokenLabels, Counter>,
    /// `pcgate_token_expiry_timestamp_seconds{credential}`.
    pub token_expiry: Family<CredentialLabel, Gauge>,
    /// `pcgate_token_store_failures_total{credential}`: rotated refresh tokens not written to
    /// `refresh_token_file` (each failed attempt, retries included).
    pub token_store_failures: Family<CredentialLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Metrics {
        let mut root = Registry::default();
        // The process metrics keep their standard unprefixed names.
        root.register_collector(Box::new(ProcessCollector));
        let registry = root.sub_registry_with_prefix("pcgate");
        let m = Metrics {
            coalesced: Family::default(),
            token_refreshes: Family::default(),
            token_expiry: Family::default(),
            token_store_failures: Family::default(),
            registry: Default::default(),
        };
        let r = registry;
        r.register(
            "coalesced_requests",
            "Calls answered by another identical call's upstream fetch",
            m.coalesced.clone(),
        );
        r.register(
            "token_refreshes",
            "Token requests to the identity endpoint, by credential and result",
            m.token_refreshes.clone(),
        );
        r.register(
            "token_expiry_timestamp_seconds",
            "When the credential's current token expires (Unix seconds)",
            m.token_expiry.clone(),
        );
        r.register(
            "token_store_failures",
            "Failed writes of a rotated refresh token to refresh_token_file, by credential",
            m.token_store_failures.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        r.register("build_info", "pcgate's version", build_info);
        Metrics {
            registry: std::sync::Mutex::new(root),
            ..m
        }
    }

    /// Registers `metric` as `pcgate_<name>`: the layers that own a family register it themselves
    /// (and export its known label sets at zero, like [`Metrics::prime`]).
    pub fn register(
        &self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        let mut registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        registry.register(format!("pcgate_{name}"), help, metric);
    }

    /// The OpenMetrics text exposition (what a Prometheus server asks for first).
    pub fn encode_openmetrics(&self) -> String {
        let mut text = String::with_capacity(8 * 1024);
        // Writing to a String cannot fail.
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }

    /// The classic Prometheus text format (0.0.4), for everything else (curl, promtool).
    pub fn encode(&self) -> String {
        to_prometheus_text(&self.encode_openmetrics())
    }
}

/// Rewrites OpenMetrics text as Prometheus text 0.0.4: a counter family's `HELP` and `TYPE` name
/// its `_total` series, and there is no `# EOF`. Everything else is the same in both.
fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        if line.starts_with("# HELP ") {
            help = Some(line);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "unknown" => (name.to_owned(), "untyped"),
                other => (name.to_owned(), other),
            };
            if let Some(text) = help.take().and_then(|h| h.strip_prefix("# HELP ")) {
                let text = text.split_once(' ').map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// `process_cpu_seconds_total`, `process_resident_memory_bytes` and `process_open_fds`, read
/// from `/proc/self` at each scrape (Linux; elsewhere they are left out).
#[derive(Debug)]
struct ProcessCollector;

/// Clock ticks per second in `/proc/self/stat` (USER_HZ, fixed at 100 in Linux's user ABI).
const USER_HZ: f64 = 100.0;

impl ProcessCollector {
    fn cpu_seconds() -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name (field 2) may hold spaces; the fields after its `)` are fixed.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let (utime, stime): (f64, f64) =
            (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
        Some((utime + stime) / USER_HZ)
    }

    fn resident_bytes() -> Option<i64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    fn open_fds() -> Option<i64> {
        Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as i64)
    }
}

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> std::fmt::Result {
        use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        fn one(
            encoder: &mut DescriptorEncoder,
            name: &str,
            help: &str,
            metric: impl EncodeMetric,
        ) -> std::fmt::Result {
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
        }
        if let Some(cpu) = Self::cpu_seconds() {
            one(
                &mut encoder,
                "process_cpu_seconds",
                "User and system CPU time spent",
                ConstCounter::new(cpu),
            )?;
        }
        if let Some(bytes) = Self::resident_bytes() {
            one(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory",
                ConstGauge::new(bytes),
            )?;
        }
        if let Some(fds) = Self::open_fds() {
            one(
                &mut encoder,
                "process_open_fds",
                "Open file descriptors",
                ConstGauge::new(fds),
            )?;
        }
        Ok(())
    }
}

/// Status classes a call or an attempt can end in.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// Upstream attempt outcomes besides a status class.
pub const TRANSPORT_OUTCOMES: [&str; 3] = ["connect_error", "timeout", "error"];
/// Cache lookup results.
pub const CACHE_RESULTS: [&str; 4] = ["hit", "miss", "stale", "bypass"];
/// Token refresh results.
const REFRESH_RESULTS: [&str; 2] = ["ok", "error"];

/// A route as the metrics see it, for [`Metrics::prime`].
pub struct KnownRoute<'a> {
    /// Its name (the `route` label).
    pub name: &'a str,
    /// It coalesces identical calls.
    pub coalesced: bool,
}

impl Metrics {
    /// Exports every known label combination of the families kept here at zero, so dashboards
    /// and absence-based alerts see each series from start rather than after its first event
    /// (Prometheus' instrumentation guidance); the layers that register their own families do
    /// the same for theirs. `credentials` are those whose tokens are fetched (not `static`). The
    /// token expiry gauge is left out: a zero there would claim an expired token.
    pub fn prime(&self, routes: &[KnownRoute<'_>], credentials: &[&str]) {
        for route in routes {
            let name: Arc<str> = Arc::from(route.name);
            let label = RouteLabel {
                route: name.clone(),
            };
            if route.coalesced {
                let _ = self.coalesced.get_or_create(&label);
            }
        }
        for credential in credentials {
            for result in REFRESH_RESULTS {
                let _ = self.token_refreshes.get_or_create(&TokenLabels {
                    credential: (*credential).to_owned(),
                    result,
                });
            }
        }
    }
}

/// `2xx`, `3xx`, `4xx` or `5xx` (`1xx` too, for completeness).
pub fn status_class(status: http::StatusCode) -> &'static str {
    STATUS_CLASSES[status_class_index(status)]
}

/// [`status_class`]'s index in [`STATUS_CLASSES`].
pub fn status_class_index(status: http::StatusCode) -> usize {
    match status.as_u16() {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// Each route's series, as handles taken from their families once at start (a handle shares the
/// series it came from), so a call counts itself without hashing its labels or taking a family's
/// lock.
#[derive(Clone)]
pub struct PerRoute<T>(Vec<(Arc<str>, T)>);

impl<T> Default for PerRoute<T> {
    /// No route's series.
    fn default() -> Self {
        PerRoute(Vec::new())
    }
}

impl<T> PerRoute<T> {
    /// The series `take` makes for each of `routes`.
    pub fn new<'a>(
        routes: impl IntoIterator<Item = &'a str>,
        mut take: impl FnMut(&Arc<str>) -> T,
    ) -> Self {
        PerRoute(
            routes
                .into_iter()
                .map(|route| {
                    let name = Arc::from(route);
                    let series = take(&name);
                    (name, series)
                })
                .collect(),
        )
    }

    /// The series of `route`, if it is one of those made at start.
    pub fn get(&self, route: &str) -> Option<&T> {
        self.0
            .iter()
            .find(|(name, _)| &**name == route)
            .map(|(_, series)| series)
    }
}
