use super::*;
use crate::body;
use http::header;
use tower::{Layer, Service, ServiceExt};

/// Scripted upstream: answers each call with the next status (the last one repeats); a 429
/// carries `Retry-After: retry_after`. Records when each call came.
#[derive(Clone)]
struct Upstream {
    calls: Arc<Mutex<Vec<Instant>>>,
    script: Arc<Vec<u16>>,
    retry_after: &'static str,
}

impl Upstream {
    fn new(script: &[u16], retry_after: &'static str) -> Upstream {
        Upstream {
            calls: Arc::default(),
            script: Arc::new(script.to_vec()),
            retry_after,
        }
    }

    fn times(&self) -> Vec<Instant> {
        self.calls.lock().unwrap().clone()
    }
}

impl Service<Request> for Upstream {
    type Response = Response;
    type Error = BoxError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request) -> BoxFuture {
        let n = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(Instant::now());
            calls.len() - 1
        };
        let status = *self.script.get(n).or(self.script.last()).unwrap();
        let retry_after = self.retry_after;
        Box::pin(async move {
            let mut response = Response::new(body::empty());
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            if status == 429 {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, retry_after.parse().unwrap());
            }
            Ok(response)
        })
    }
}

fn settings(rate: Option<&str>) -> LimitSettings {
    LimitSettings {
        rate: rate.map(|r| RateLimit::parse(r).unwrap()),
        max_hold: Duration::from_secs(30),
        deadline: Duration::from_secs(10),
    }
}

fn request(deadline: Duration) -> Request {
    let mut request = Request::new(body::empty());
    request.extensions_mut().insert(Deadline::after(deadline));
    request
}

async fn call(service: &mut Limit<Upstream>, deadline: Duration) -> Result<Response, BoxError> {
    service.ready().await?.call(request(deadline)).await
}

fn throttled(outcome: Result<Response, BoxError>) -> Throttled {
    let error = outcome.expect_err("the call should be refused");
    error
        .downcast_ref::<Throttled>()
        .cloned()
        .unwrap_or_else(|| panic!("not Throttled: {error}"))
}

#[tokio::test(start_paused = true)]
async fn over_the_rate_calls_wait_for_their_slot_and_none_fails() {
    let upstream = Upstream::new(&[200], "1");
    let metrics = Metrics::new();
    let layer = LimitLayer::new(settings(Some("5/s")), &metrics);
    let started = Instant::now();
    let calls: Vec<_> = (0..12)
        .map(|_| {
            let mut service = layer.layer(upstream.clone());
            tokio::spawn(async move { call(&mut service, Duration::from_secs(10)).await })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }
    let mut offsets: Vec<Duration> = upstream.times().iter().map(|t| *t - started).collect();
    offsets.sort();
    // The burst of 5 at once, then one every 200 ms.
    let expected: Vec<Duration> = (0..12u64)
        .map(|i| Duration::from_millis(i.saturating_sub(4) * 200))
        .collect();
    assert_eq!(offsets, expected);
    let label = CauseLabel {
        cause: ThrottleCause::RateLimit,
    };
    let m = &layer.throttle.metrics;
    assert_eq!(m.waits.get_or_create(&label).get(), 7);
    assert_eq!(m.refused.get_or_create(&label).get(), 0);
    assert_eq!(
        m.slots
            .get_or_create(&ScopeLabel {
                scope: Scope::Local
            })
            .get(),
        12
    );
}

#[tokio::test(start_paused = true)]
async fn a_slot_past_the_deadline_is_a_429_at_once_and_is_not_spent() {
    let upstream = Upstream::new(&[200], "1");
    let layer = LimitLayer::new(settings(Some("1/s")), &Metrics::new());
    let mut service = layer.layer(upstream.clone());
    assert_eq!(
        call(&mut service, Duration::from_secs(5))
            .await
            .unwrap()
            .status(),
        200
    );
    let started = Instant::now();
    let refused = throttled(call(&mut service, Duration::from_millis(500)).await);
    assert_eq!(started.elapsed(), Duration::ZERO, "refused without waiting");
    assert_eq!(refused.cause, ThrottleCause::RateLimit);
    assert_eq!(refused.retry_after, Duration::from_secs(1));
    // Its answer: 429, Partner Center-shaped, Retry-After in whole seconds.
    let response = crate::layer::rescue::error_response(&refused);
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    // The refused call took no slot: a patient caller gets the very next one, 1 s after the first.
    assert_eq!(
        call(&mut service, Duration::from_secs(5))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    assert_eq!(upstream.times().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_429_with_retry_after_holds_every_later_call_until_it_passes() {
    let upstream = Upstream::new(&[429, 200], "3");
    let metrics = Metrics::new();
    let layer = LimitLayer::new(settings(None), &metrics);
    let mut first = layer.layer(upstream.clone());
    let started = Instant::now();
    assert_eq!(
        call(&mut first, Duration::from_secs(10))
            .await
            .unwrap()
            .status(),
        429,
        "the upstream's own answer goes back (retry decides whether to wait for it)"
    );
    // Three other calls come during the hold: none reaches the upstream before it passes.
    tokio::time::advance(Duration::from_secs(1)).await;
    let others: Vec<_> = (0..3)
        .map(|_| {
            let mut service = layer.layer(upstream.clone());
            tokio::spawn(async move { call(&mut service, Duration::from_secs(10)).await })
        })
        .collect();
    for other in others {
        assert_eq!(other.await.unwrap().unwrap().status(), 200);
    }
    let times = upstream.times();
    assert_eq!(times.len(), 4);
    for later in &times[1..] {
        assert_eq!(*later - started, Duration::from_secs(3), "{times:?}");
    }
    let m = &layer.throttle.metrics;
    let hold = CauseLabel {
        cause: ThrottleCause::Hold,
    };
    assert_eq!(m.waits.get_or_create(&hold).get(), 3);
    assert_eq!(
        m.holds
            .get_or_create(&OriginLabel {
                origin: HoldOrigin::Upstream
            })
            .get(),
        1
    );
    assert_eq!(m.held_seconds.get(), 3.0);
}

#[tokio::test(start_paused = true)]
async fn a_hold_past_the_deadline_is_a_429_at_once_and_a_long_retry_after_is_capped() {
    let upstream = Upstream::new(&[429, 200], "3600");
    let layer = LimitLayer::new(settings(None), &Metrics::new());
    let mut service = layer.layer(upstream.clone());
    assert_eq!(
        call(&mut service, Duration::from_secs(10))
            .await
            .unwrap()
            .status(),
        429
    );
    let started = Instant::now();
    let refused = throttled(call(&mut service, Duration::from_secs(10)).await);
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(refused.cause, ThrottleCause::Hold);
    // Held for retry.max_retry_after (30 s), not the hour the upstream asked for.
    assert_eq!(refused.retry_after, Duration::from_secs(30));
    assert_eq!(upstream.times().len(), 1, "nothing reached the upstream");
    let response = crate::layer::rescue::error_response(&refused);
    assert_eq!(response.headers()[header::RETRY_AFTER], "30");
    // A caller whose deadline reaches past the hold waits for it, then goes.
    tokio::time::advance(Duration::from_secs(25)).await;
    let started = Instant::now();
    assert_eq!(
        call(&mut service, Duration::from_secs(10))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(started.elapsed(), Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn a_429_without_retry_after_sets_no_hold() {
    let upstream = Upstream::new(&[429, 200], "soon");
    let layer = LimitLayer::new(settings(None), &Metrics::new());
    let mut service = layer.layer(upstream.clone());
    assert_eq!(
        call(&mut service, Duration::from_secs(10))
            .await
            .unwrap()
            .status(),
        429
    );
    let started = Instant::now();
    assert_eq!(
        call(&mut service, Duration::from_secs(10))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(started.elapsed(), Duration::ZERO);
}

/// A scripted fleet: its answers in order (`None`: it cannot answer), and the holds it was told.
struct FakeFleet {
    answers: Mutex<Vec<Option<FleetAnswer>>>,
    asked: Mutex<Vec<(Option<Gcra>, Duration)>>,
    holds: Mutex<Vec<Duration>>,
}

impl Fleet for FakeFleet {
    fn admit(
        &self,
        rate: Option<Gcra>,
        max_wait: Duration,
    ) -> FleetFuture<'_, Option<FleetAnswer>> {
        self.asked.lock().unwrap().push((rate, max_wait));
        let mut answers = self.answers.lock().unwrap();
        let answer = if answers.is_empty() {
            None
        } else {
            answers.remove(0)
        };
        Box::pin(async move { answer })
    }

    fn hold(&self, hold: Duration) -> FleetFuture<'_, Option<()>> {
        self.holds.lock().unwrap().push(hold);
        Box::pin(async { Some(()) })
    }
}

fn fake_fleet(answers: Vec<Option<FleetAnswer>>) -> Arc<FakeFleet> {
    Arc::new(FakeFleet {
        answers: Mutex::new(answers),
        asked: Mutex::default(),
        holds: Mutex::default(),
    })
}

#[tokio::test(start_paused = true)]
async fn the_fleet_decides_holds_and_slots_and_the_local_limiter_stands_in_when_it_cannot() {
    let fleet = fake_fleet(vec![
        // Another sidecar's hold: 2 s more.
        Some(FleetAnswer::Held(Duration::from_secs(2))),
        // Asked again after it: the slot is 300 ms away.
        Some(FleetAnswer::Go(Duration::from_millis(300))),
        // After waiting for the slot, the hold alone is asked once more: none.
        Some(FleetAnswer::Go(Duration::ZERO)),
        // Next call: the fleet's slot is past the deadline.
        Some(FleetAnswer::Refused(Duration::from_secs(9))),
        // Then the fleet cannot answer: the local limiter (1/s, fresh) lets it go at once.
        None,
    ]);
    let upstream = Upstream::new(&[200], "1");
    let layer = LimitLayer::new(settings(Some("1/s")), &Metrics::new()).fleet(fleet.clone());
    let mut service = layer.layer(upstream.clone());
    let started = Instant::now();
    assert_eq!(
        call(&mut service, Duration::from_secs(5))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(started.elapsed(), Duration::from_millis(2300));
    let refused = throttled(call(&mut service, Duration::from_secs(5)).await);
    assert_eq!(refused.cause, ThrottleCause::RateLimit);
    assert_eq!(refused.retry_after, Duration::from_secs(9));
    let started = Instant::now();
    assert_eq!(
        call(&mut service, Duration::from_secs(5))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(upstream.times().len(), 2);
    let asked = fleet.asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 5);
    let with_rate: Vec<bool> = asked.iter().map(|(rate, _)| rate.is_some()).collect();
    assert_eq!(with_rate, [true, true, false, true, true]);
    // Each question carries what the caller can still wait.
    assert_eq!(asked[0].1, Duration::from_secs(5));
    assert_eq!(asked[1].1, Duration::from_secs(3));
    assert_eq!(asked[2].1, Duration::from_millis(2700));
    let m = &layer.throttle.metrics;
    assert_eq!(
        m.holds
            .get_or_create(&OriginLabel {
                origin: HoldOrigin::Fleet
            })
            .get(),
        1
    );
    assert_eq!(
        m.slots
            .get_or_create(&ScopeLabel {
                scope: Scope::Fleet
            })
            .get(),
        1
    );
    assert_eq!(
        m.slots
            .get_or_create(&ScopeLabel {
                scope: Scope::Local
            })
            .get(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_fleet_hold_that_began_while_a_call_waited_for_its_slot_is_waited_out_too() {
    let fleet = fake_fleet(vec![
        Some(FleetAnswer::Go(Duration::from_secs(1))),
        // Meanwhile another sidecar was throttled for 2 s.
        Some(FleetAnswer::Held(Duration::from_secs(2))),
    ]);
    let upstream = Upstream::new(&[200], "1");
    let layer = LimitLayer::new(settings(Some("1/s")), &Metrics::new()).fleet(fleet.clone());
    let mut service = layer.layer(upstream.clone());
    let started = Instant::now();
    assert_eq!(
        call(&mut service, Duration::from_secs(5))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(upstream.times()[0] - started, Duration::from_secs(3));
}

/// A hold another process wrote (a stray key, a sidecar of another build) is capped by
/// `retry.max_retry_after` like a local one: it cannot stop the gateway for longer.
#[tokio::test(start_paused = true)]
async fn a_hold_learnt_from_the_fleet_is_capped_by_max_hold() {
    let fleet = fake_fleet(vec![
        // Without a rate the fleet is asked once a call: after the hold, the call goes.
        Some(FleetAnswer::Held(Duration::from_secs(3600))),
        Some(FleetAnswer::Held(Duration::from_secs(3600))),
    ]);
    let upstream = Upstream::new(&[200], "1");
    let layer = LimitLayer::new(settings(None), &Metrics::new()).fleet(fleet.clone());
    let mut service = layer.layer(upstream.clone());
    let started = Instant::now();
    assert_eq!(
        call(&mut service, Duration::from_secs(60))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(30),
        "held max_hold, not an hour"
    );
    // Past a shorter deadline: told to come back after at most max_hold.
    let refused = throttled(call(&mut service, Duration::from_secs(5)).await);
    assert_eq!(refused.cause, ThrottleCause::Hold);
    assert_eq!(refused.retry_after, Duration::from_secs(30));
}

#[tokio::test(start_paused = true)]
async fn an_upstream_429_is_told_to_the_fleet_and_without_a_rate_only_the_hold_is_asked() {
    let fleet = fake_fleet(vec![Some(FleetAnswer::Go(Duration::ZERO))]);
    let upstream = Upstream::new(&[429, 200], "4");
    let layer = LimitLayer::new(settings(None), &Metrics::new()).fleet(fleet.clone());
    let mut service = layer.layer(upstream.clone());
    assert_eq!(
        call(&mut service, Duration::from_secs(10))
            .await
            .unwrap()
            .status(),
        429
    );
    tokio::task::yield_now().await;
    assert_eq!(*fleet.holds.lock().unwrap(), [Duration::from_secs(4)]);
    assert_eq!(fleet.asked.lock().unwrap()[0].0, None, "no rate to ask for");
    // The local hold covers this process without asking the fleet.
    let started = Instant::now();
    assert_eq!(
        call(&mut service, Duration::from_secs(10))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(started.elapsed(), Duration::from_secs(4));
}

#[test]
fn every_series_is_exported_at_zero() {
    let metrics = Metrics::new();
    let _layer = LimitLayer::new(settings(Some("20/s")), &metrics);
    let text = metrics.encode();
    for series in [
        "pcgate_throttle_waits_total{cause=\"rate_limit\"} 0",
        "pcgate_throttle_waits_total{cause=\"hold\"} 0",
        "pcgate_throttle_wait_seconds_total{cause=\"hold\"} 0",
        "pcgate_throttle_refused_total{cause=\"rate_limit\"} 0",
        "pcgate_throttle_holds_total{origin=\"upstream\"} 0",
        "pcgate_throttle_holds_total{origin=\"fleet\"} 0",
        "pcgate_throttle_held_seconds_total 0",
        "pcgate_rate_limit_slots_total{scope=\"local\"} 0",
        "pcgate_rate_limit_slots_total{scope=\"fleet\"} 0",
    ] {
        assert!(text.contains(series), "{series} missing:\n{text}");
    }
}
