//! `Retry-After` given as an HTTP date: the next attempt waits until then instead of the
//! scheduled delay.

use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use crate::harness::*;

const T: Duration = Duration::from_secs(30);

/// The wall-clock time at which the receiver got `r`.
fn wall_time(r: &Received) -> SystemTime {
    SystemTime::now() - Instant::now().duration_since(r.at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_with_a_retry_after_date_delays_the_retry_until_that_date() {
    let rx = Receiver::start().await;
    let c = Courier::with_endpoint("app", &rx.url("/hook"), "").await;
    // The schedule would retry 100 ms later; the date says about 8 s (HTTP dates have whole
    // seconds, so 7 to 8 s from now: room for a slow first attempt on a loaded machine).
    let when = SystemTime::now() + Duration::from_secs(8);
    let date = httpdate::fmt_http_date(when);
    let when = httpdate::parse_http_date(&date).unwrap();
    rx.script([Reply::status(503).header("retry-after", &date)]);
    let r = c.send(json!({"event_type": "t", "payload": {}})).await;
    let dlv = r["deliveries"][0]["id"].as_str().unwrap().to_string();

    let d = c.wait_status(&dlv, "delivered", T).await;
    let got = rx.received();
    assert_eq!(got.len(), 2, "one 503, then the retry");
    assert_eq!(got[0].header("webhook-id"), got[1].header("webhook-id"));
    // The first attempt came well before the date (or the test would prove nothing).
    assert!(
        wall_time(&got[0]) + Duration::from_secs(1) < when,
        "the first attempt was late: {:?}",
        got[0].at
    );
    // Not before the date (a little slack for the millisecond clocks either side).
    let retried = wall_time(&got[1]);
    assert!(
        retried + Duration::from_millis(100) >= when,
        "retried {:?} before the Retry-After date",
        when.duration_since(retried).unwrap_or_default()
    );
    assert!(
        got[1].at.duration_since(got[0].at) >= Duration::from_millis(900),
        "waited only {:?}, the schedule's 100 ms",
        got[1].at.duration_since(got[0].at)
    );
    // The 503 still counts as an attempt.
    assert_eq!(d["attempt_count"], 2, "{d:#}");
    assert_eq!(d["attempts"][0]["status_code"], 503, "{d:#}");
    c.stop().await;
}
