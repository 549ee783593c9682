//! A client of a running Shoal cluster: connect with a client certificate,
//! write from many tasks at once (the client keeps a session per write in
//! flight, so every write still applies exactly once), apply an atomic
//! conditional batch, read linearizably and page through a scan.
//!
//! Run against a cluster (README, "Running a cluster"):
//! `SHOAL_CLUSTER=1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003
//! SHOAL_TLS=./tls cargo run --example cluster_client`
//! (`scripts/cluster-example.sh` starts a 3-node cluster on loopback and
//! runs this; `make test` does).

use shoal::cluster::{parse_members, Client};
use shoal::{ClientError, WriteBatch};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let members = parse_members(&std::env::var("SHOAL_CLUSTER")?)?;
    let tls = std::path::PathBuf::from(std::env::var("SHOAL_TLS")?);
    let client = Client::connect(&members, &tls)?;

    // 64 writes in flight at once from one client (and its clones).
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64 {
        let client = client.clone();
        tasks.spawn(async move { client.put(format!("example/{i:02}"), format!("v{i}")).await });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }

    // An atomic compare-and-write of two keys (one shard: on a sharded
    // cluster, keys of several shards are refused with `CrossShard`).
    let current = match client.get("example/counter").await {
        Ok(v) => v.version,
        Err(ClientError::NotFound) => 0,
        Err(e) => return Err(e.into()),
    };
    let mut batch = WriteBatch::new();
    batch
        .check_version("example/counter", current)
        .put("example/counter", (current + 1).to_string())
        .put("example/last-writer", "cluster_client example");
    let versions = client.write(batch).await?;
    println!("batch applied: versions {versions:?}");

    let mut scanner = client.scanner("example/", "example0");
    let mut count = 0;
    while let Some((key, value)) = scanner.next().await? {
        count += 1;
        if count <= 3 {
            println!(
                "{} = {}",
                String::from_utf8_lossy(&key),
                String::from_utf8_lossy(&value.value)
            );
        }
    }
    println!("{count} keys under example/");
    assert!(count >= 66, "64 puts, the counter and the last writer");
    client.close().await;
    Ok(())
}
