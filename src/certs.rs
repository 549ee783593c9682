//! Certificate files of a cluster, as `shoal certs init` writes them and
//! nodes and clients read them.
//!
//! Layout of a certificate directory:
//! - `ca.pem`: the cluster CA certificate (every node and client needs it);
//! - `ca-key.pem`: the CA's private key, only needed to issue certificates:
//!   `shoal certs init --ca-dir` (by default `<out>-ca`) keeps it, with a
//!   copy of `ca.pem`, in a directory of its own that never goes to a node;
//! - `node-<id>.pem`, `node-<id>-key.pem`: each node's certificate and key;
//! - `client-<name>.pem`, `client-<name>-key.pem`: each client's.

use std::path::{Path, PathBuf};

use shoal_net::certs::{ClusterCa, Identity};
use shoal_net::{CertError, NodeId, Peer};

/// Why [`load`] could not read a peer's identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// A file of the identity could not be read.
    #[error("reading {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
    /// The certificate names another peer than the one asked for (or
    /// none Shoal knows).
    #[error("{} names {found:?}, not {expected:?}", path.display())]
    WrongPeer {
        /// The certificate file.
        path: PathBuf,
        /// The peer asked for.
        expected: Peer,
        /// The peer the certificate names, if any.
        found: Option<Peer>,
    },
}

/// Why [`init`] or [`add`] could not issue certificates. Files written
/// before the failure stay.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// [`init`] found a CA in the directory already.
    #[error("{} already holds a cluster CA (ca.pem); refusing to overwrite it", dir.display())]
    CaExists {
        /// The certificate directory.
        dir: PathBuf,
    },
    /// [`add`] found the certificate it was to write already there.
    #[error("{} exists; refusing to overwrite it", path.display())]
    CertificateExists {
        /// The certificate file.
        path: PathBuf,
    },
    /// Node id 0 was asked for: it means "nobody" to Raft.
    #[error("node ids start at 1 (0 means \"nobody\" to Raft)")]
    NodeIdZero,
    /// A file or the directory could not be read, created or written.
    #[error("{action} {}", path.display())]
    Io {
        /// What was being done: `reading`, `writing`, `creating`.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
    /// The CA could not be generated or read from `ca-key.pem`.
    #[error("the cluster CA")]
    Ca(#[source] CertError),
    /// A certificate could not be issued (e.g. a client name that cannot
    /// be a DNS name).
    #[error("issuing a certificate for {peer:?}")]
    Issue {
        /// Whose certificate.
        peer: Peer,
        /// Why rcgen or the name check refused.
        #[source]
        source: CertError,
    },
}

impl IssueError {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> IssueError {
        let path = path.to_path_buf();
        move |source| IssueError::Io {
            action,
            path,
            source,
        }
    }
}

/// File-name stem of a peer's certificate (`node-3`, `client-admin`).
pub fn stem(peer: &Peer) -> String {
    match peer {
        Peer::Node(id) => format!("node-{}", id.0),
        Peer::Client(name) => format!("client-{name}"),
    }
}

fn write_public(path: &Path, contents: &str) -> Result<(), IssueError> {
    std::fs::write(path, contents).map_err(IssueError::io("writing", path))
}

fn write_private(path: &Path, contents: &str) -> Result<(), IssueError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .map_err(IssueError::io("writing", path))
}

fn write_identity(dir: &Path, peer: &Peer, identity: &Identity) -> Result<(), IssueError> {
    let stem = stem(peer);
    write_public(&dir.join(format!("{stem}.pem")), &identity.cert_pem)?;
    write_private(&dir.join(format!("{stem}-key.pem")), &identity.key_pem)
}

fn issue(ca: &ClusterCa, peer: &Peer) -> Result<Identity, IssueError> {
    match peer {
        Peer::Node(id) => ca.issue_node(*id),
        Peer::Client(name) => ca.issue_client(name),
    }
    .map_err(|source| IssueError::Issue {
        peer: peer.clone(),
        source,
    })
}

fn peers(nodes: &[u64], clients: &[String]) -> Result<Vec<Peer>, IssueError> {
    if nodes.contains(&0) {
        return Err(IssueError::NodeIdZero);
    }
    Ok(nodes
        .iter()
        .map(|&id| Peer::Node(NodeId(id)))
        .chain(clients.iter().map(|name| Peer::Client(name.clone())))
        .collect())
}

/// Creates a new CA in `dir` (which must not hold one already) and issues a
/// certificate for every node and client named; the CA's key stays in
/// `dir` (tests and demos; see [`init_with_ca_dir`]).
pub fn init(dir: &Path, nodes: &[u64], clients: &[String]) -> Result<(), IssueError> {
    init_with_ca_dir(dir, dir, nodes, clients)
}

/// [`init`] with the CA's key (and a copy of `ca.pem`) in `ca_dir`, apart
/// from the certificates nodes and clients read in `dir`.
pub fn init_with_ca_dir(
    dir: &Path,
    ca_dir: &Path,
    nodes: &[u64],
    clients: &[String],
) -> Result<(), IssueError> {
    for d in [dir, ca_dir] {
        if d.join("ca.pem").exists() {
            return Err(IssueError::CaExists {
                dir: d.to_path_buf(),
            });
        }
    }
    let peers = peers(nodes, clients)?;
    std::fs::create_dir_all(dir).map_err(IssueError::io("creating", dir))?;
    std::fs::create_dir_all(ca_dir).map_err(IssueError::io("creating", ca_dir))?;
    let ca = ClusterCa::generate().map_err(IssueError::Ca)?;
    write_private(&ca_dir.join("ca-key.pem"), &ca.key_pem())?;
    write_public(&ca_dir.join("ca.pem"), &ca.cert_pem())?;
    write_public(&dir.join("ca.pem"), &ca.cert_pem())?;
    for peer in &peers {
        write_identity(dir, peer, &issue(&ca, peer)?)?;
    }
    Ok(())
}

/// Issues certificates for more nodes and clients with the CA in `dir`
/// (its `ca-key.pem`). Refuses to overwrite an existing certificate.
pub fn add(dir: &Path, nodes: &[u64], clients: &[String]) -> Result<(), IssueError> {
    add_with_ca_dir(dir, dir, nodes, clients)
}

/// [`add`] with the CA's key read from `ca_dir`; the certificates go to
/// `dir`.
pub fn add_with_ca_dir(
    dir: &Path,
    ca_dir: &Path,
    nodes: &[u64],
    clients: &[String],
) -> Result<(), IssueError> {
    let peers = peers(nodes, clients)?;
    let key_path = ca_dir.join("ca-key.pem");
    let key = std::fs::read_to_string(&key_path).map_err(IssueError::io("reading", &key_path))?;
    let ca = ClusterCa::from_pem(&key).map_err(IssueError::Ca)?;
    for peer in &peers {
        let path = dir.join(format!("{}.pem", stem(peer)));
        if path.exists() {
            return Err(IssueError::CertificateExists { path });
        }
        write_identity(dir, peer, &issue(&ca, peer)?)?;
    }
    Ok(())
}

/// One certificate of a directory, as `shoal certs list` prints it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CertEntry {
    /// The certificate file's name.
    pub file: String,
    /// Whom it names (`node-3`, `client-admin`; `ca` for the CA; None:
    /// no cluster name).
    pub peer: Option<String>,
    /// Whether its private key is in the directory too (for `ca.pem`:
    /// `ca-key.pem`, which should not be in a directory nodes read).
    pub key: bool,
}

/// The certificates in `dir`, by file name.
pub fn list(dir: &Path) -> Result<Vec<CertEntry>, LoadError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LoadError::Read { path, source }
    };
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(read_err(dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".pem") && !n.ends_with("-key.pem"))
        .collect();
    names.sort();
    let mut out = Vec::new();
    for file in names {
        let path = dir.join(&file);
        let pem = std::fs::read_to_string(&path).map_err(read_err(&path))?;
        let stem_of_file = file.trim_end_matches(".pem");
        let peer = if file == "ca.pem" {
            Some("ca".to_string())
        } else {
            shoal_net::certs::peer_from_cert_pem(&pem).map(|p| stem(&p))
        };
        out.push(CertEntry {
            key: dir.join(format!("{stem_of_file}-key.pem")).exists(),
            file,
            peer,
        });
    }
    Ok(out)
}

/// Loads `peer`'s identity (certificate, key, CA) from `dir`.
pub fn load(dir: &Path, peer: &Peer) -> Result<Identity, LoadError> {
    let stem = stem(peer);
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| LoadError::Read { path, source })
    };
    let cert = format!("{stem}.pem");
    let identity = Identity {
        cert_pem: read(&cert)?,
        key_pem: read(&format!("{stem}-key.pem"))?,
        ca_cert_pem: read("ca.pem")?,
    };
    match identity.peer() {
        Some(p) if &p == peer => Ok(identity),
        found => Err(LoadError::WrongPeer {
            path: dir.join(cert),
            expected: peer.clone(),
            found,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_is_its_own_variant() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        assert!(matches!(
            init(&tls, &[1, 0], &[]),
            Err(IssueError::NodeIdZero)
        ));
        assert!(!tls.exists(), "a refused init writes nothing");
        init(&tls, &[1], &["client".into()]).unwrap();
        assert!(matches!(
            init(&tls, &[2], &[]),
            Err(IssueError::CaExists { .. })
        ));
        assert!(matches!(
            add(&tls, &[1], &[]),
            Err(IssueError::CertificateExists { path }) if path.ends_with("node-1.pem")
        ));
        assert!(matches!(
            add(&tls, &[], &["Not A DNS name".into()]),
            Err(IssueError::Issue {
                peer: Peer::Client(_),
                ..
            })
        ));
        add(&tls, &[2], &[]).unwrap();
        load(&tls, &Peer::Node(NodeId(2))).unwrap();
        assert!(matches!(
            load(&tls, &Peer::Node(NodeId(3))),
            Err(LoadError::Read { path, .. }) if path.ends_with("node-3.pem")
        ));
        assert!(matches!(
            add(&dir.path().join("none"), &[3], &[]),
            Err(IssueError::Io {
                action: "reading",
                ..
            })
        ));
    }
}
