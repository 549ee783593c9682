//! The JSON-lines protocol of `shoal client` (and the answers the one-shot
//! commands print): one request object per input line, one answer object
//! per output line, in order. README.md documents the schema.
//!
//! Keys and values are JSON strings (UTF-8; bytes that are not UTF-8 are
//! shown with U+FFFD). An answer is `{"ok":true,...}` or
//! `{"ok":false,"error":KIND,...}` where KIND is one of `not_found`,
//! `version_mismatch` (with `current`), `no_key`, `timeout` (the outcome is
//! unknown: the deadline passed while the operation was in flight; this is
//! the only answer that leaves a write's effect in doubt), `refused` (with
//! `detail`: the cluster rejected it, e.g. a key over the size limit; it had
//! no effect) and `bad_request` (with `detail`: the line was not a valid
//! request; nothing was sent).

use serde::Deserialize;
use serde_json::{json, Value};

use crate::cluster::{Client, ClientError};

/// One request line.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// `{"op":"get","key":K}`
    Get {
        /// The key.
        key: String,
    },
    /// `{"op":"put","key":K,"value":V}`, or with `"if_version":N` (0: only
    /// if absent).
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// Write only if the key is at this version.
        #[serde(default)]
        if_version: Option<u64>,
    },
    /// `{"op":"append","key":K,"value":V}`
    Append {
        /// The key.
        key: String,
        /// What to append.
        value: String,
    },
    /// `{"op":"del","key":K}` (`"delete"` is accepted too).
    #[serde(alias = "delete")]
    Del {
        /// The key.
        key: String,
    },
    /// `{"op":"batch","conditions":[{"key":K,"version":N}],"writes":[
    /// {"op":"put","key":K,"value":V},{"op":"del","key":K}]}`: every write
    /// if every key is at its version (0: absent), else nothing; keys of
    /// one shard. Both lists are optional.
    Batch {
        /// Versions keys must have.
        #[serde(default)]
        conditions: Vec<BatchCondition>,
        /// Writes, in order.
        #[serde(default)]
        writes: Vec<BatchWrite>,
    },
    /// `{"op":"scan","start":S,"end":E,"limit":N}`; all optional: `start`
    /// defaults to "", `end` to "" (no bound), `limit` to [`SCAN_LIMIT_DEFAULT`].
    Scan {
        /// First key (inclusive).
        #[serde(default)]
        start: String,
        /// End key (exclusive; empty: no bound).
        #[serde(default)]
        end: String,
        /// Most pairs returned.
        #[serde(default = "scan_limit_default")]
        limit: u64,
    },
}

/// A condition of a `batch` request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchCondition {
    /// The key.
    pub key: String,
    /// Its expected version (0: absent).
    pub version: u64,
}

/// A write of a `batch` request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum BatchWrite {
    /// `{"op":"put","key":K,"value":V}`
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// `{"op":"del","key":K}` (`"delete"` is accepted too).
    #[serde(alias = "delete")]
    Del {
        /// The key.
        key: String,
    },
}

/// Pairs a scan returns when the request names no `limit`.
pub const SCAN_LIMIT_DEFAULT: u64 = 1000;

fn scan_limit_default() -> u64 {
    SCAN_LIMIT_DEFAULT
}

/// Parses one request line; the error is the `bad_request` answer.
pub fn parse(line: &str) -> Result<Request, Value> {
    serde_json::from_str(line)
        .map_err(|e| json!({"ok": false, "error": "bad_request", "detail": e.to_string()}))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The answer for a failed operation.
pub fn error_answer(error: &ClientError) -> Value {
    match error {
        ClientError::NotFound => json!({"ok": false, "error": "not_found"}),
        ClientError::VersionMismatch { current } => {
            json!({"ok": false, "error": "version_mismatch", "current": current})
        }
        ClientError::NoKey => json!({"ok": false, "error": "no_key"}),
        // A write whose deadline passed in flight may or may not have
        // applied; a read that timed out had no effect but has no answer
        // either. Both are "timeout"; nothing else is.
        ClientError::Maybe | ClientError::Timeout => json!({"ok": false, "error": "timeout"}),
        ClientError::Refused(detail) => json!({"ok": false, "error": "refused", "detail": detail}),
        ClientError::ConditionFailed { index, current } => {
            json!({"ok": false, "error": "condition_failed", "index": index, "current": current})
        }
        other => json!({"ok": false, "error": "refused", "detail": other.to_string()}),
    }
}

/// Exit code of a one-shot command whose answer was not ok, when nothing
/// more specific applies (a version mismatch, no key, ...).
pub const EXIT_FAILED: i32 = 1;
/// Exit code for bad input: the request (or the command line: clap uses
/// 2 for usage errors too) was refused without effect.
pub const EXIT_BAD_INPUT: i32 = 2;
/// Exit code for a missing key.
pub const EXIT_NOT_FOUND: i32 = 3;
/// Exit code when the cluster did not answer in time (a write may or may
/// not have been applied) or no node answered.
pub const EXIT_UNAVAILABLE: i32 = 4;

/// The exit code of a one-shot command that printed `answer`: 0 when it is
/// ok, else by its `error` kind ([`EXIT_NOT_FOUND`], [`EXIT_UNAVAILABLE`],
/// [`EXIT_BAD_INPUT`], or [`EXIT_FAILED`]).
pub fn exit_code(answer: &Value) -> i32 {
    if answer["ok"] == true {
        return 0;
    }
    match answer["error"].as_str() {
        Some("not_found") => EXIT_NOT_FOUND,
        Some("timeout") => EXIT_UNAVAILABLE,
        Some("bad_request") | Some("refused") => EXIT_BAD_INPUT,
        _ => EXIT_FAILED,
    }
}

/// An answer as one line of JSON, with `ok` first and `error` second (then
/// the other fields in name order), as README.md shows them.
pub fn render(answer: &Value) -> String {
    let Value::Object(fields) = answer else {
        return answer.to_string();
    };
    let first = ["ok", "error"];
    let ordered = first
        .iter()
        .filter_map(|&name| fields.get(name).map(|v| (name, v)))
        .chain(
            fields
                .iter()
                .filter(|(k, _)| !first.contains(&k.as_str()))
                .map(|(k, v)| (k.as_str(), v)),
        );
    let parts: Vec<String> = ordered
        .map(|(k, v)| format!("{}:{v}", Value::from(k)))
        .collect();
    format!("{{{}}}", parts.join(","))
}

/// Runs `request` on `client` and returns its answer.
pub async fn execute(client: &Client, request: Request) -> Value {
    let result = match request {
        Request::Get { key } => client
            .get(key)
            .await
            .map(|v| json!({"ok": true, "value": text(&v.value), "version": v.version})),
        Request::Put {
            key,
            value,
            if_version: None,
        } => client
            .put(key, value)
            .await
            .map(|version| json!({"ok": true, "version": version})),
        Request::Put {
            key,
            value,
            if_version: Some(expected),
        } => client
            .put_if_version(key, value, expected)
            .await
            .map(|version| json!({"ok": true, "version": version})),
        Request::Append { key, value } => client
            .append(key, value)
            .await
            .map(|version| json!({"ok": true, "version": version})),
        Request::Del { key } => client
            .delete(key)
            .await
            .map(|existed| json!({"ok": true, "existed": existed})),
        Request::Batch { conditions, writes } => {
            let mut batch = shoal_shard::WriteBatch::new();
            for c in conditions {
                batch.check_version(c.key, c.version);
            }
            for w in writes {
                match w {
                    BatchWrite::Put { key, value } => batch.put(key, value),
                    BatchWrite::Del { key } => batch.delete(key),
                };
            }
            client
                .write(batch)
                .await
                .map(|versions| json!({"ok": true, "versions": versions}))
        }
        Request::Scan { start, end, limit } => client.scan(start, end, limit).await.map(|pairs| {
            let pairs: Vec<Value> = pairs
                .iter()
                .map(
                    |(k, v)| json!({"key": text(k), "value": text(&v.value), "version": v.version}),
                )
                .collect();
            json!({"ok": true, "pairs": pairs})
        }),
    };
    result.unwrap_or_else(|e| error_answer(&e))
}

#[cfg(test)]
mod tests {
    /// Goal: each failure kind exits with its own code, success with 0.
    #[test]
    fn exit_codes_by_error_kind() {
        use super::*;
        use serde_json::json;
        assert_eq!(exit_code(&json!({"ok": true})), 0);
        assert_eq!(
            exit_code(&json!({"ok": false, "error": "not_found"})),
            EXIT_NOT_FOUND
        );
        assert_eq!(
            exit_code(&json!({"ok": false, "error": "timeout"})),
            EXIT_UNAVAILABLE
        );
        assert_eq!(
            exit_code(&json!({"ok": false, "error": "bad_request"})),
            EXIT_BAD_INPUT
        );
        assert_eq!(
            exit_code(&json!({"ok": false, "error": "refused"})),
            EXIT_BAD_INPUT
        );
        assert_eq!(
            exit_code(&json!({"ok": false, "error": "version_mismatch"})),
            EXIT_FAILED
        );
    }

    use super::*;

    // Goal: the documented request forms parse, and malformed lines give a
    // bad_request answer rather than an error.
    #[test]
    fn parses_documented_requests() {
        assert_eq!(
            parse(r#"{"op":"get","key":"k"}"#),
            Ok(Request::Get { key: "k".into() })
        );
        assert_eq!(
            parse(r#"{"op":"put","key":"k","value":"w","if_version":3}"#),
            Ok(Request::Put {
                key: "k".into(),
                value: "w".into(),
                if_version: Some(3)
            })
        );
        assert_eq!(
            parse(r#"{"op":"del","key":"k"}"#),
            Ok(Request::Del { key: "k".into() })
        );
        assert_eq!(
            parse(r#"{"op":"scan","start":"a","end":"z","limit":10}"#),
            Ok(Request::Scan {
                start: "a".into(),
                end: "z".into(),
                limit: 10
            })
        );
        assert_eq!(
            parse(r#"{"op":"scan"}"#),
            Ok(Request::Scan {
                start: String::new(),
                end: String::new(),
                limit: SCAN_LIMIT_DEFAULT
            })
        );
        for bad in [
            "",
            "nope",
            r#"{"op":"get"}"#,
            r#"{"op":"frobnicate","key":"k"}"#,
            r#"{"op":"put","key":"k","value":1}"#,
        ] {
            let answer = parse(bad).expect_err(bad);
            assert_eq!(answer["error"], "bad_request", "{bad}");
        }
    }

    #[test]
    fn renders_ok_and_error_first() {
        assert_eq!(
            render(&json!({"version": 3, "value": "v", "ok": true})),
            r#"{"ok":true,"value":"v","version":3}"#
        );
        assert_eq!(
            render(&json!({"current": 2, "error": "version_mismatch", "ok": false})),
            r#"{"ok":false,"error":"version_mismatch","current":2}"#
        );
        assert_eq!(
            render(&json!({"ok": true, "pairs": [{"version": 1, "key": "k", "value": "v"}]})),
            r#"{"ok":true,"pairs":[{"key":"k","value":"v","version":1}]}"#
        );
    }
}
