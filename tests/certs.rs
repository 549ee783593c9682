//! Goal: `shoal certs init` writes a CA and per-node and per-client
//! certificates that load back as the right identities, keeps private keys
//! private, and refuses to overwrite an existing CA.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use shoal_net::{NodeId, Peer};

#[test]
fn certs_init_writes_loadable_identities() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tls");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(["certs", "init", "--out"])
            .arg(&out)
            .args(["--nodes", "1,2,3"])
            .output()
            .unwrap()
    };
    let first = run();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    for id in 1..=3 {
        let identity = shoal::certs::load(&out, &Peer::Node(NodeId(id))).unwrap();
        assert_eq!(identity.peer(), Some(Peer::Node(NodeId(id))));
        let mode = std::fs::metadata(out.join(format!("node-{id}-key.pem")))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o077,
            0,
            "private keys are readable by their owner only"
        );
    }
    shoal::certs::load(&out, &Peer::Client("admin".into())).unwrap();
    // A certificate file under another peer's name is refused.
    std::fs::copy(out.join("node-2.pem"), out.join("node-1.pem")).unwrap();
    assert!(matches!(
        shoal::certs::load(&out, &Peer::Node(NodeId(1))),
        Err(shoal::certs::LoadError::WrongPeer {
            found: Some(Peer::Node(NodeId(2))),
            ..
        })
    ));
    let second = run();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("refusing to overwrite"));
}

/// Goal (issue 14, part 4): the CA's key is kept apart from what nodes
/// read, `add-node` / `add-client` issue more certificates with it later,
/// and `list` says what a directory holds.
#[test]
fn certs_keep_the_ca_key_apart_add_and_list() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tls");
    let shoal = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(args)
            .output()
            .unwrap()
    };
    let out_arg = out.to_str().unwrap();
    let init = shoal(&["certs", "init", "--out", out_arg, "--nodes", "1,2"]);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let ca_dir = dir.path().join("tls-ca");
    assert!(
        !out.join("ca-key.pem").exists(),
        "the CA key is not where nodes read"
    );
    assert!(ca_dir.join("ca-key.pem").exists());
    assert_eq!(
        std::fs::read(out.join("ca.pem")).unwrap(),
        std::fs::read(ca_dir.join("ca.pem")).unwrap()
    );
    let added = shoal(&["certs", "add-node", "--dir", out_arg, "3"]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let client = shoal(&["certs", "add-client", "--dir", out_arg, "app"]);
    assert!(
        client.status.success(),
        "{}",
        String::from_utf8_lossy(&client.stderr)
    );
    let node3 = shoal::certs::load(&out, &Peer::Node(NodeId(3))).unwrap();
    assert_eq!(node3.peer(), Some(Peer::Node(NodeId(3))));
    shoal::certs::load(&out, &Peer::Client("app".into())).unwrap();
    // Issued by the same CA: a node 1 and the new node 3 accept each other.
    let node1 = shoal::certs::load(&out, &Peer::Node(NodeId(1))).unwrap();
    assert_eq!(node1.ca_cert_pem, node3.ca_cert_pem);
    let again = shoal(&["certs", "add-node", "--dir", out_arg, "3"]);
    assert!(
        !again.status.success(),
        "an existing certificate is not overwritten"
    );
    let list = shoal(&["certs", "list", "--dir", out_arg]);
    assert!(list.status.success());
    let entries: Vec<shoal::certs::CertEntry> = String::from_utf8(list.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<(String, Option<String>, bool)> = entries
        .into_iter()
        .map(|e| (e.file, e.peer, e.key))
        .collect();
    let entry = |file: &str, peer: &str, key: bool| (file.to_string(), Some(peer.to_string()), key);
    assert_eq!(
        names,
        vec![
            entry("ca.pem", "ca", false),
            entry("client-admin.pem", "client-admin", true),
            entry("client-app.pem", "client-app", true),
            entry("client-client.pem", "client-client", true),
            entry("node-1.pem", "node-1", true),
            entry("node-2.pem", "node-2", true),
            entry("node-3.pem", "node-3", true),
        ]
    );
}
