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
