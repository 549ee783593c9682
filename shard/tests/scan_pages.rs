//! Goal (issue 10, item 7): a scan over more data than fits in one reply
//! frame succeeds. The node answers one page bounded by the engine's
//! `scan_bytes_max` (8 MiB, under the 16 MiB frame limit) with the key to
//! continue from, and `Client::scan` follows the pages. A scan used to
//! build its whole result (up to 10,000 pairs of up to 4 MiB) on the event
//! loop, and a reply over the frame limit was reset, so the client retried
//! on the next leader until its deadline and never succeeded.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{seed, Cluster};
use shoal_engine::config::SCAN_BYTES_MAX_DEFAULT;

const VALUES: u64 = 24;
const VALUE_BYTES: usize = 1 << 20;

#[tokio::test(start_paused = true)]
async fn a_scan_larger_than_a_frame_pages() {
    let mut c = Cluster::new(3, true, seed("a_scan_larger_than_a_frame_pages"));
    c.wait_for_leader(Duration::from_secs(10)).await;
    let client = c.client();
    for i in 0..VALUES {
        let value = Bytes::from(vec![i as u8; VALUE_BYTES]);
        client.put(format!("k{i:02}"), value).await.expect("put");
    }
    // One page: under the byte bound, with a continuation.
    let page = client.scan_page("k", "", 1000).await.expect("scan page");
    let page_bytes: u64 = page
        .pairs
        .iter()
        .map(|(k, v)| (k.len() + v.value.len()) as u64)
        .sum();
    assert!(!page.pairs.is_empty());
    assert!(
        page_bytes <= SCAN_BYTES_MAX_DEFAULT,
        "a page of {page_bytes} bytes"
    );
    assert!(
        (page.pairs.len() as u64) < VALUES,
        "one page held everything"
    );
    let next = page.next.clone().expect("a continuation");
    assert_eq!(next, format!("k{:02}", page.pairs.len()));
    // The whole range, in order, through the pages.
    let all = client.scan("k", "", 1000).await.expect("scan");
    assert_eq!(all.len() as u64, VALUES);
    for (i, (key, v)) in all.iter().enumerate() {
        assert_eq!(key, &format!("k{i:02}"));
        assert_eq!(v.value.len(), VALUE_BYTES);
        assert!(v.value.iter().all(|b| *b == i as u8));
    }
    // A limit below the range stops there, across pages too.
    assert_eq!(client.scan("k", "", 10).await.expect("scan").len(), 10);
    c.shutdown_all().await;
}
