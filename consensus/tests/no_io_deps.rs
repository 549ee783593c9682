//! Invariant: the consensus core does no I/O and reads no clock. This test
//! fails the build if `consensus/Cargo.toml` gains an I/O dependency, or if
//! the crate's source mentions a clock or thread.

use std::path::Path;

const FORBIDDEN_DEPS: &[&str] = &[
    "tokio",
    "quinn",
    "rocksdb",
    "librocksdb-sys",
    "async-std",
    "mio",
    "shoal-engine",
    "shoal-net",
];
const FORBIDDEN_SOURCE: &[&str] = &[
    "Instant::now",
    "SystemTime",
    "std::time::Instant",
    "thread::spawn",
    "std::fs",
    "std::net",
    "thread_rng",
    "rand::rng()",
];

#[test]
fn cargo_toml_has_no_io_dependencies() {
    let toml =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    let mut section = String::new();
    for line in toml.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            section = line.to_string();
            continue;
        }
        if line.starts_with('#') || !section.contains("dependencies") {
            continue;
        }
        let name = line.split(['=', '.', ' ']).next().unwrap_or("").trim();
        for bad in FORBIDDEN_DEPS {
            assert_ne!(
                name, *bad,
                "consensus must not depend on {bad} (section {section})"
            );
        }
    }
}

#[test]
fn source_uses_no_clock_thread_or_global_rng() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            for bad in FORBIDDEN_SOURCE {
                assert!(!text.contains(bad), "{} mentions {bad}", path.display());
            }
            checked += 1;
        }
    }
    assert!(checked >= 5);
}

/// True when running under CI (`CI=true`, as `.ci/run` is started): checks
/// that cannot run there must fail rather than skip.
fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Skips (prints why) outside CI; fails under CI, where a skipped check
/// would be a check that silently never runs.
fn cannot_check(reason: &str) {
    assert!(
        !under_ci(),
        "the transitive dependency check could not run under CI: {reason}"
    );
    eprintln!("SKIPPED dependency_tree_has_no_io_crates: {reason} (this fails under CI=true)");
}

#[test]
fn dependency_tree_has_no_io_crates() {
    // `cargo tree` sees transitive dependencies too. Offline: the lock file
    // and the registry cache of any build of this workspace are enough.
    let out = match std::process::Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "shoal-consensus",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
    {
        Ok(out) => out,
        Err(e) => return cannot_check(&format!("cannot run {}: {e}", env!("CARGO"))),
    };
    if !out.status.success() {
        return cannot_check(&format!(
            "`cargo tree --offline` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let tree = String::from_utf8_lossy(&out.stdout);
    let mut crates = 0;
    for line in tree.lines() {
        let name = line.split(' ').next().unwrap_or("");
        for bad in FORBIDDEN_DEPS {
            assert_ne!(name, *bad, "consensus transitively depends on {bad}");
        }
        crates += 1;
    }
    // An empty listing would pass the loop above without checking anything.
    assert!(
        tree.lines()
            .next()
            .is_some_and(|l| l.starts_with("shoal-consensus ")),
        "`cargo tree` listed no shoal-consensus:\n{tree}"
    );
    assert!(crates > 1, "`cargo tree` listed no dependencies:\n{tree}");
}
