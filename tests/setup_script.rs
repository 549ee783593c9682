//! Goal: `scripts/setup.sh` decides what to install from what the package
//! manager says and from the file names bindgen really loads, and
//! `scripts/cargo.sh` names the one command to run when a build still fails
//! for want of libclang (issue 9: `make demo` on a fresh Debian machine,
//! where `libclang-cpp14` was mistaken for libclang).
//!
//! Every case runs bash against fixtures in a temporary directory: library
//! trees for `libclang_in_dir`, and a fake `dpkg-query` (plus `g++` and
//! `ccache` stubs, so the answer does not depend on this machine) first on
//! `PATH` for `missing_packages`. The functions come from
//! `SHOAL_SETUP_FUNCTIONS_ONLY=1 source scripts/setup.sh`, which installs
//! nothing.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Writes an executable shell script.
fn write_script(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}")).expect("write script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Runs `script` in bash after sourcing setup.sh's functions, with `bin`
/// (if any) first on PATH and LIBCLANG_PATH as given.
fn run_setup_functions(script: &str, bin: Option<&Path>, libclang_path: Option<&Path>) -> Output {
    let mut command = Command::new("bash");
    command
        .arg("-c")
        .arg(format!(
            "SHOAL_SETUP_FUNCTIONS_ONLY=1 source \"$0\"\n{script}"
        ))
        .arg(repo_file("scripts/setup.sh"))
        .env_remove("LIBCLANG_PATH");
    if let Some(bin) = bin {
        let path = std::env::var("PATH").unwrap_or_default();
        command.env("PATH", format!("{}:{path}", bin.display()));
    }
    if let Some(dir) = libclang_path {
        command.env("LIBCLANG_PATH", dir);
    }
    command.output().expect("run bash")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "bash failed: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// A directory holding empty files named `files`.
fn library_tree(files: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for file in files {
        std::fs::write(dir.path().join(file), b"").expect("fixture file");
    }
    dir
}

/// What `libclang_in_dir` says about a tree holding `files`.
fn libclang_found(files: &[&str]) -> bool {
    let tree = library_tree(files);
    let answer = stdout(&run_setup_functions(
        "if libclang_in_dir \"$LIBCLANG_PATH\"; then echo present; else echo missing; fi",
        None,
        Some(tree.path()),
    ));
    match answer.as_str() {
        "present" => true,
        "missing" => false,
        other => panic!("unexpected answer {other:?}"),
    }
}

#[test]
fn libclang_cpp_alone_is_not_libclang() {
    assert!(!libclang_found(&["libclang-cpp.so.14"]));
    assert!(!libclang_found(&[
        "libclang-cpp.so",
        "libclang-cpp.so.14.0.6"
    ]));
    assert!(!libclang_found(&[]));
}

#[test]
fn every_name_clang_sys_loads_counts() {
    assert!(libclang_found(&["libclang-14.so.1"]));
    assert!(libclang_found(&["libclang.so"]));
    assert!(libclang_found(&["libclang.so.1"]));
    assert!(libclang_found(&["libclang-14.so"]));
    assert!(libclang_found(&[
        "libclang-cpp.so.14",
        "libclang-14.so.14.0.6"
    ]));
}

#[test]
fn a_libclang_path_without_libclang_asks_for_the_packages() {
    let tree = library_tree(&["libclang-cpp.so.14"]);
    let bin = fake_bin(&[]);
    let missing = stdout(&run_setup_functions(
        "missing_packages",
        Some(bin.path()),
        Some(tree.path()),
    ));
    assert_eq!(sorted_words(&missing), ["clang", "libclang-dev"]);
}

/// A directory with a fake `dpkg-query` that reports `installed` as
/// "install ok installed" and every other package as unknown, and stubs
/// of `g++` and `ccache`.
fn fake_bin(installed: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    // Called as `dpkg-query -W -f='${Status}' PACKAGE`: the package is last.
    let mut script = String::from("for package; do :; done\ncase \"$package\" in\n");
    for package in installed {
        script += &format!("{package}) printf 'install ok installed' ;;\n");
    }
    script += "libclang-dev-removed) printf 'deinstall ok config-files' ;;\n";
    script += "*) echo \"dpkg-query: no packages found matching $package\" >&2; exit 1 ;;\n";
    script += "esac\n";
    write_script(&dir.path().join("dpkg-query"), &script);
    write_script(&dir.path().join("g++"), "exit 0\n");
    write_script(&dir.path().join("ccache"), "exit 0\n");
    dir
}

fn sorted_words(text: &str) -> Vec<&str> {
    let mut words: Vec<&str> = text.split_whitespace().collect();
    words.sort_unstable();
    words
}

fn missing_with_installed(installed: &[&str]) -> String {
    let bin = fake_bin(installed);
    stdout(&run_setup_functions(
        "missing_packages",
        Some(bin.path()),
        None,
    ))
}

#[test]
fn dpkg_with_only_libclang_cpp_installed_means_both_packages_missing() {
    let missing = missing_with_installed(&["libclang-cpp14"]);
    assert_eq!(sorted_words(&missing), ["clang", "libclang-dev"]);
}

#[test]
fn dpkg_with_both_packages_installed_means_nothing_missing() {
    assert_eq!(missing_with_installed(&["clang", "libclang-dev"]), "");
    let missing = missing_with_installed(&["clang"]);
    assert_eq!(sorted_words(&missing), ["libclang-dev"]);
}

#[test]
fn a_removed_but_not_purged_package_is_not_installed() {
    let bin = fake_bin(&[]);
    let answer = stdout(&run_setup_functions(
        "if package_installed libclang-dev-removed; then echo yes; else echo no; fi",
        Some(bin.path()),
        None,
    ));
    assert_eq!(answer, "no");
}

/// Runs `scripts/cargo.sh` with a fake `cargo` that writes `stderr` to its
/// stderr and exits with `code`.
fn run_cargo_wrapper(stderr: &str, code: i32) -> Output {
    let bin = tempfile::tempdir().expect("tempdir");
    let message = bin.path().join("stderr.txt");
    std::fs::write(&message, format!("{stderr}\n")).expect("write fixture");
    write_script(
        &bin.path().join("cargo"),
        &format!(
            "echo building\ncat '{}' >&2\nexit {code}\n",
            message.display()
        ),
    );
    let path = std::env::var("PATH").unwrap_or_default();
    Command::new(repo_file("scripts/cargo.sh"))
        .arg("build")
        .env("PATH", format!("{}:{path}", bin.path().display()))
        .output()
        .expect("run scripts/cargo.sh")
}

const INSTALL_HINT: &str = "run: sudo apt-get install -y clang libclang-dev";

#[test]
fn cargo_wrapper_names_the_install_command_when_bindgen_finds_no_libclang() {
    let output = run_cargo_wrapper(
        "thread 'main' panicked at bindgen: Unable to find libclang: \"couldn't find any valid shared libraries\"",
        101,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(101), "cargo's exit code is kept");
    assert!(stderr.contains("Unable to find libclang"), "{stderr}");
    assert!(stderr.contains(INSTALL_HINT), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "building");
}

#[test]
fn cargo_wrapper_adds_nothing_to_other_outcomes() {
    let failed = run_cargo_wrapper("error[E0308]: mismatched types", 101);
    assert_eq!(failed.status.code(), Some(101));
    assert!(!String::from_utf8_lossy(&failed.stderr).contains(INSTALL_HINT));
    // A success that merely mentions the phrase is still a success.
    let passed = run_cargo_wrapper("warning: Unable to find libclang (ignored)", 0);
    assert_eq!(passed.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&passed.stderr).contains(INSTALL_HINT));
}

#[test]
fn missing_rustup_components_are_named() {
    let bin = tempfile::tempdir().expect("tempdir");
    let listed = |components: &str| {
        write_script(
            &bin.path().join("rustup"),
            &format!("printf '{components}'\n"),
        );
        stdout(&run_setup_functions(
            "missing_rust_components",
            Some(bin.path()),
            None,
        ))
    };
    let triple = "x86_64-unknown-linux-gnu";
    assert_eq!(
        listed(&format!(
            "cargo-{triple}\\nrustc-{triple}\\nrust-std-{triple}\\n"
        )),
        "clippy rustfmt"
    );
    assert_eq!(
        listed(&format!(
            "cargo-{triple}\\nclippy-{triple}\\nrustfmt-{triple}\\n"
        )),
        ""
    );
}
