//! Invariant: a program that links `shoal` gets a library, not a command
//! line. Without the `cli` feature the dependency tree holds none of the
//! binary's crates, and the modules that are always compiled return typed
//! errors, never `anyhow` (ARCHITECTURE.md, "Errors"). This test runs
//! without the feature, so `make test` checks it too.

use std::path::Path;

/// Crates only the `shoal` binary and its tool modules may pull in.
const CLI_ONLY_CRATES: &[&str] = &[
    "anyhow",
    "clap",
    "h2",
    "http",
    "http-body-util",
    "hyper",
    "hyper-util",
    "indicatif",
    "metrics-exporter-prometheus",
    "metrics-util",
    "redb",
    "tracing-subscriber",
];

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
        "the library dependency check could not run under CI: {reason}"
    );
    eprintln!("SKIPPED library_tree_has_no_cli_crates: {reason} (this fails under CI=true)");
}

#[test]
fn library_tree_has_no_cli_crates() {
    // Offline: the lock file and the registry cache of any build of this
    // workspace are enough.
    let out = match std::process::Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "shoal",
            "-e",
            "normal",
            "--no-default-features",
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
    for line in tree.lines() {
        let name = line.split(' ').next().unwrap_or("");
        for bad in CLI_ONLY_CRATES {
            assert_ne!(name, *bad, "the library (no `cli`) depends on {bad}");
        }
    }
    // An empty listing would pass the loop above without checking anything.
    assert!(
        tree.lines().next().is_some_and(|l| l.starts_with("shoal ")),
        "`cargo tree` listed no shoal:\n{tree}"
    );
    assert!(
        tree.lines().any(|l| l.starts_with("shoal-shard ")),
        "`cargo tree` listed no dependencies:\n{tree}"
    );
}

/// The modules `src/lib.rs` declares without `#[cfg(feature = "cli")]`.
fn always_on_modules(lib: &str) -> Vec<String> {
    let mut modules = Vec::new();
    let mut gated = false;
    for line in lib.lines().map(str::trim) {
        if line == r#"#[cfg(feature = "cli")]"# {
            gated = true;
            continue;
        }
        if let Some(name) = line
            .strip_prefix("pub mod ")
            .and_then(|rest| rest.strip_suffix(';'))
        {
            if !gated {
                modules.push(name.to_string());
            }
        }
        gated = false;
    }
    modules
}

#[test]
fn always_on_modules_do_not_use_anyhow() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let modules = always_on_modules(&lib);
    for expected in ["certs", "cluster", "db"] {
        assert!(
            modules.iter().any(|m| m == expected),
            "{expected} is not an always-on module of lib.rs: {modules:?}"
        );
    }
    assert!(
        !modules.iter().any(|m| m == "bench"),
        "the parse of lib.rs missed the `cli` gates: {modules:?}"
    );
    for module in modules {
        let path = src.join(format!("{module}.rs"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        for bad in ["anyhow::", "use anyhow", "anyhow!"] {
            assert!(
                !text.contains(bad),
                "{} mentions {bad}: always-on modules return typed errors",
                path.display()
            );
        }
    }
}
