//! Issue 14 on uncached routes: an answer shared by coalescing keeps the upstream's `Age` (plus
//! the time it waited here), and its cookies go only to the caller whose request fetched it.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn a_coalesced_answer_keeps_its_age_and_only_the_fetching_caller_gets_its_cookie() {
    let origin = origin(|_| async {
        // Slow enough that the second caller joins the first one's fetch.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let mut response = text(200, "{\"items\":[]}");
        let headers = response.headers_mut();
        headers.insert("age", "30".parse().unwrap());
        headers.insert(
            "set-cookie",
            "session=for-the-fetching-caller".parse().unwrap(),
        );
        response
    })
    .await;
    let mut config = invoices_config(&origin.base_url());
    config.routes[0].coalesce = true;
    let gateway = start_config(config).await;
    let url = gateway.url("/v1/invoices?size=1");
    let first = tokio::spawn({
        let url = url.clone();
        async move { client().get(url).send().await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = client().get(&url).send().await.unwrap();
    let first = first.await.unwrap();
    assert_eq!(
        origin.requests().len(),
        1,
        "the two calls were not coalesced"
    );
    let mut cookies = 0;
    for response in [&first, &second] {
        assert_eq!(response.status(), 200);
        let age: u64 = response.headers()["age"].to_str().unwrap().parse().unwrap();
        assert!(
            (30..40).contains(&age),
            "Age {age}: the upstream's 30 s were lost"
        );
        cookies += response.headers().get_all("set-cookie").iter().count();
    }
    assert_eq!(cookies, 1, "the cookie went to both callers, or to neither");
    assert_eq!(
        first.headers()["set-cookie"],
        "session=for-the-fetching-caller",
        "the caller whose request fetched the answer keeps its cookie"
    );
}
