//! The request log behind `GET /__sandbox/requests`: counts per route and the last
//! [`RECENT_LIMIT`] requests with their headers exactly as received, so tests can see what
//! reached the upstream (which token, which ids). It lives only in memory and is served only on
//! the sandbox's own port; nothing here goes to the tracing log.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

/// How many requests `recent` keeps.
pub const RECENT_LIMIT: usize = 200;

/// The routes the sandbox tells apart, as named in `counts` and `recent[].route`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteName {
    /// `POST /{tenant}/oauth2/token`.
    Token,
    /// `GET /v1/invoices/summary`.
    Summary,
    /// `GET /v1/invoices/summaries`.
    Summaries,
    /// `GET /v1/invoices`.
    Invoices,
    /// `GET /v1/invoices/{id}`.
    Invoice,
    /// Line items, seek or index paged.
    LineItems,
    /// `GET /v1/invoices/{id}/documents/statement`.
    Statement,
    /// `GET /v1/invoices/{id}/receipts/{receiptId}/documents/statement`.
    Receipt,
    /// Anything else (answered 404).
    Other,
}

impl RouteName {
    /// Every route, in the order `counts` lists them.
    pub const ALL: [RouteName; 9] = [
        RouteName::Token,
        RouteName::Summary,
        RouteName::Summaries,
        RouteName::Invoices,
        RouteName::Invoice,
        RouteName::LineItems,
        RouteName::Statement,
        RouteName::Receipt,
        RouteName::Other,
    ];

    /// The name used in the log and in tracing events.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteName::Token => "token",
            RouteName::Summary => "summary",
            RouteName::Summaries => "summaries",
            RouteName::Invoices => "invoices",
            RouteName::Invoice => "invoice",
            RouteName::LineItems => "lineitems",
            RouteName::Statement => "statement",
            RouteName::Receipt => "receipt",
            RouteName::Other => "other",
        }
    }
}

/// One logged request.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path, as received.
    pub path: String,
    /// The raw query string, `""` when there is none.
    pub query: String,
    /// The route's name.
    pub route: &'static str,
    /// The status answered.
    pub status: u16,
    /// Headers by lowercased name; repeated headers joined with `", "`.
    pub headers: BTreeMap<String, String>,
    /// Token requests the endpoint accepted: how the app authenticated (`client_secret
    /// sha256:<12 hex>`, `client_assertion x5t#S256:<thumbprint> jti:<jti>`, `federated
    /// sha256:<12 hex>`); a fingerprint, never the secret or assertion.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// When it arrived, in Unix milliseconds (tests count calls per time window).
    pub at_ms: u64,
}

impl Record {
    /// A record of `request`'s line and headers; the status is filled in once answered.
    pub fn of<B>(request: &http::Request<B>, route: RouteName) -> Record {
        let mut headers: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in request.headers() {
            let value = String::from_utf8_lossy(value.as_bytes());
            headers
                .entry(name.as_str().to_owned())
                .and_modify(|joined| {
                    joined.push_str(", ");
                    joined.push_str(&value);
                })
                .or_insert_with(|| value.into_owned());
        }
        Record {
            method: request.method().as_str().to_owned(),
            path: request.uri().path().to_owned(),
            query: request.uri().query().unwrap_or_default().to_owned(),
            route: route.as_str(),
            status: 0,
            headers,
            client: None,
            at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }
}

/// Counts and recent requests since start or the last reset.
#[derive(Debug, Serialize)]
pub struct RequestLog {
    total: u64,
    counts: BTreeMap<&'static str, u64>,
    recent: VecDeque<Record>,
}

impl Default for RequestLog {
    fn default() -> RequestLog {
        RequestLog {
            total: 0,
            counts: RouteName::ALL
                .iter()
                .map(|route| (route.as_str(), 0))
                .collect(),
            recent: VecDeque::with_capacity(RECENT_LIMIT),
        }
    }
}

impl RequestLog {
    /// Adds one answered request.
    pub fn record(&mut self, record: Record) {
        self.total += 1;
        *self.counts.entry(record.route).or_default() += 1;
        if self.recent.len() == RECENT_LIMIT {
            self.recent.pop_front();
        }
        self.recent.push_back(record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_requests_and_counts_all() {
        let mut log = RequestLog::default();
        let request = http::Request::get("/v1/invoices?size=2")
            .header("authorization", "Bearer x")
            .header("x-a", "1")
            .header("x-a", "2")
            .body(())
            .unwrap();
        for status in 0..(RECENT_LIMIT as u16 + 5) {
            let mut record = Record::of(&request, RouteName::Invoices);
            record.status = status;
            log.record(record);
        }
        assert_eq!(log.total, RECENT_LIMIT as u64 + 5);
        assert_eq!(log.counts["invoices"], RECENT_LIMIT as u64 + 5);
        assert_eq!(log.counts["token"], 0);
        assert_eq!(log.recent.len(), RECENT_LIMIT);
        assert_eq!(log.recent[0].status, 5);
        assert_eq!(log.recent[0].query, "size=2");
        assert_eq!(log.recent[0].headers["x-a"], "1, 2");
        assert_eq!(log.recent[0].headers["authorization"], "Bearer x");
    }
}
