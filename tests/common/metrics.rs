//! The admin port's `/metrics`, scraped and parsed.

use std::collections::HashMap;

use super::{client, TestGateway};

/// `name{labels}` → value, from the Prometheus text format.
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// One scrape of the admin port's `/metrics` (a 200 in the Prometheus text format): the text
/// and its samples by full series name.
pub async fn scrape(gateway: &TestGateway) -> (String, HashMap<String, f64>) {
    let response = client()
        .get(format!("http://{}/metrics", gateway.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = response.text().await.unwrap();
    let values = parse_metrics(&text);
    (text, values)
}

/// One sample of the admin port's `/metrics`, by its full series name (`name{labels}`).
pub async fn metric(gateway: &TestGateway, series: &str) -> Option<f64> {
    scrape(gateway).await.1.get(series).copied()
}
