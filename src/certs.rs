//! Certificate files of a cluster, as `shoal certs init` writes them and
//! nodes and clients read them.
//!
//! Layout of a certificate directory:
//! - `ca.pem`: the cluster CA certificate (every node and client needs it);
//! - `ca-key.pem`: the CA's private key (keep it off the nodes if you can);
//! - `node-<id>.pem`, `node-<id>-key.pem`: each node's certificate and key;
//! - `client-<name>.pem`, `client-<name>-key.pem`: each client's.

use std::path::Path;

use anyhow::{bail, Context, Result};
use shoal_net::certs::{ClusterCa, Identity};
use shoal_net::{NodeId, Peer};

/// File-name stem of a peer's certificate (`node-3`, `client-admin`).
pub fn stem(peer: &Peer) -> String {
    match peer {
        Peer::Node(id) => format!("node-{}", id.0),
        Peer::Client(name) => format!("client-{name}"),
    }
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

fn write_identity(dir: &Path, peer: &Peer, identity: &Identity) -> Result<()> {
    let stem = stem(peer);
    std::fs::write(dir.join(format!("{stem}.pem")), &identity.cert_pem)?;
    write_private(&dir.join(format!("{stem}-key.pem")), &identity.key_pem)
}

/// Creates a new CA in `dir` (which must not hold one already) and issues a
/// certificate for every node and client named.
pub fn init(dir: &Path, nodes: &[u64], clients: &[String]) -> Result<()> {
    if dir.join("ca.pem").exists() {
        bail!(
            "{} already holds a cluster CA (ca.pem); refusing to overwrite it",
            dir.display()
        );
    }
    if nodes.contains(&0) {
        bail!("node ids start at 1 (0 means \"nobody\" to Raft)");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = ClusterCa::generate()?;
    std::fs::write(dir.join("ca.pem"), ca.cert_pem())?;
    write_private(&dir.join("ca-key.pem"), &ca.key_pem())?;
    for &id in nodes {
        let peer = Peer::Node(NodeId(id));
        write_identity(dir, &peer, &ca.issue_node(NodeId(id))?)?;
    }
    for name in clients {
        let identity = ca
            .issue_client(name)
            .with_context(|| format!("client name {name:?}"))?;
        write_identity(dir, &Peer::Client(name.clone()), &identity)?;
    }
    Ok(())
}

/// Issues certificates for more nodes and clients with the CA in `dir`
/// (its `ca-key.pem`). Refuses to overwrite an existing certificate.
pub fn add(dir: &Path, nodes: &[u64], clients: &[String]) -> Result<()> {
    if nodes.contains(&0) {
        bail!("node ids start at 1 (0 means \"nobody\" to Raft)");
    }
    let key_path = dir.join("ca-key.pem");
    let key = std::fs::read_to_string(&key_path)
        .with_context(|| format!("reading the CA key {}", key_path.display()))?;
    let ca = ClusterCa::from_pem(&key)?;
    let peers = nodes
        .iter()
        .map(|&id| Peer::Node(NodeId(id)))
        .chain(clients.iter().map(|name| Peer::Client(name.clone())));
    for peer in peers {
        let cert = dir.join(format!("{}.pem", stem(&peer)));
        if cert.exists() {
            bail!("{} exists; refusing to overwrite it", cert.display());
        }
        let identity = match &peer {
            Peer::Node(id) => ca.issue_node(*id)?,
            Peer::Client(name) => ca
                .issue_client(name)
                .with_context(|| format!("client name {name:?}"))?,
        };
        write_identity(dir, &peer, &identity)?;
    }
    Ok(())
}

/// Loads `peer`'s identity (certificate, key, CA) from `dir`.
pub fn load(dir: &Path, peer: &Peer) -> Result<Identity> {
    let stem = stem(peer);
    let read = |name: String| {
        std::fs::read_to_string(dir.join(&name))
            .with_context(|| format!("reading {}", dir.join(&name).display()))
    };
    let identity = Identity {
        cert_pem: read(format!("{stem}.pem"))?,
        key_pem: read(format!("{stem}-key.pem"))?,
        ca_cert_pem: read("ca.pem".into())?,
    };
    match identity.peer() {
        Some(p) if &p == peer => Ok(identity),
        other => bail!("{stem}.pem names {other:?}, not {peer:?}"),
    }
}
