//! The application a MapReduce job runs: the [`MapReduceApp`] trait an
//! embedded user implements, the built-in apps selectable by name
//! ([`app_by_name`]: word count, inverted index, grep), and
//! [`run_sequential`], the reference every distributed run must match (the
//! lab's `mrsequential`).
//!
//! **Contract:** `map` and `reduce` are deterministic functions of their
//! input. The coordinator relies on it: any finished attempt of a task is
//! valid output, so a backup or a re-run may replace another attempt's
//! output without changing the job's result.

use std::collections::BTreeMap;

/// A MapReduce application: what a job computes.
///
/// Both functions must be deterministic (see the module docs) and must not
/// depend on which worker runs them or how often. A panic is a failed
/// attempt: the runtime reports it and the task is retried, up to
/// [`JobConfig::attempts_max`](super::JobConfig::attempts_max) times.
///
/// Keys and values are bytes, as stored in Shoal. The output of `reduce` for
/// an intermediate key `k` is stored under `output_prefix ++ k` (see
/// [`JobSpec`](super::JobSpec)).
pub trait MapReduceApp: Send + Sync {
    /// Maps one input pair (a key of the input range and its value) to any
    /// number of intermediate pairs, passed to `emit` in any order.
    fn map(&self, key: &[u8], value: &[u8], emit: &mut dyn FnMut(&[u8], &[u8]));

    /// Reduces every value emitted for intermediate `key` to the output
    /// value. `values` yields them in no promised order (an app that needs
    /// one sorts them, as [`Indexer`] does) and is never empty.
    fn reduce(&self, key: &[u8], values: &mut dyn Iterator<Item = &[u8]>) -> Vec<u8>;

    /// Whether [`Self::combine`] is a combiner (the MapReduce paper's
    /// §4.3). Default: no.
    fn has_combiner(&self) -> bool {
        false
    }

    /// The combiner, called on the map side only when
    /// [`Self::has_combiner`]: merges values a map task emitted for `key`
    /// (the ones combined so far and the next) into one, to shrink its
    /// runs. It must keep `reduce(k, [combine(k, vs)] ++ rest) ==
    /// reduce(k, vs ++ rest)`, as summing counts does. The default panics:
    /// an app without a combiner is never asked.
    fn combine(&self, key: &[u8], values: &mut dyn Iterator<Item = &[u8]>) -> Vec<u8> {
        let _ = values;
        panic!(
            "combine called for key {:?} on an app without a combiner",
            key.escape_ascii().to_string()
        )
    }
}

/// Sums values written as decimal integers (a value that is not one
/// counts as 0).
fn sum_decimal(values: &mut dyn Iterator<Item = &[u8]>) -> u64 {
    values
        .map(|v| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// The built-in app called `name`, or `None` if there is none.
///
/// - `"wc"`: [`WordCount`].
/// - `"indexer"`: [`Indexer`].
/// - `"grep:PATTERN"`: [`Grep`] for the bytes of `PATTERN` (everything after
///   the first `:`, so the pattern may itself contain `:`). A CLI passes its
///   app argument through unchanged: `shoal mapreduce --app 'grep:needle'`.
///   A bare `"grep"` is `None`: grep needs a pattern.
pub fn app_by_name(name: &str) -> Option<Box<dyn MapReduceApp>> {
    match name.split_once(':') {
        Some(("grep", pattern)) => Some(Box::new(Grep::new(pattern))),
        Some(_) => None,
        None => match name {
            "wc" => Some(Box::new(WordCount)),
            "indexer" => Some(Box::new(Indexer)),
            _ => None,
        },
    }
}

/// The words of `text`: maximal runs of ASCII letters, in order.
fn words(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    text.split(|byte| !byte.is_ascii_alphabetic())
        .filter(|word| !word.is_empty())
}

/// Word count, as the lab's `wc`: map emits `(word, "1")` for every word of
/// the value (words are maximal runs of ASCII letters, case kept); reduce
/// outputs the sum of the values in decimal (the number of values, as the
/// lab's, since map emits ones), which lets the combiner pre-sum a map
/// task's counts.
#[derive(Debug, Clone, Copy, Default)]
pub struct WordCount;

impl MapReduceApp for WordCount {
    fn map(&self, _key: &[u8], value: &[u8], emit: &mut dyn FnMut(&[u8], &[u8])) {
        for word in words(value) {
            emit(word, b"1");
        }
    }

    fn reduce(&self, _key: &[u8], values: &mut dyn Iterator<Item = &[u8]>) -> Vec<u8> {
        sum_decimal(values).to_string().into_bytes()
    }

    fn has_combiner(&self) -> bool {
        true
    }

    fn combine(&self, _key: &[u8], values: &mut dyn Iterator<Item = &[u8]>) -> Vec<u8> {
        sum_decimal(values).to_string().into_bytes()
    }
}

/// Inverted index, as the lab's `indexer`: for each word (as in
/// [`WordCount`]) of a document, map emits `(word, document)` once, the
/// document being the input key; reduce outputs `"N doc1,doc2"`: the number
/// of distinct documents, a space, and the documents sorted bytewise,
/// without duplicates, joined by `,`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Indexer;

impl MapReduceApp for Indexer {
    fn map(&self, key: &[u8], value: &[u8], emit: &mut dyn FnMut(&[u8], &[u8])) {
        let distinct: std::collections::BTreeSet<&[u8]> = words(value).collect();
        for word in distinct {
            emit(word, key);
        }
    }

    fn reduce(&self, _key: &[u8], values: &mut dyn Iterator<Item = &[u8]>) -> Vec<u8> {
        let mut documents: Vec<&[u8]> = values.collect();
        documents.sort_unstable();
        documents.dedup();
        let mut out = format!("{} ", documents.len()).into_bytes();
        out.extend_from_slice(&documents.join(&b","[..]));
        out
    }
}

/// Grep for a fixed byte string (not a regular expression): for each line
/// of a value (split at `\n`) containing the pattern, map emits
/// `(input key, "LINE:TEXT")` with `LINE` the line's 1-based number; reduce
/// outputs the matching lines of that key sorted by number, each as
/// `LINE:TEXT`, joined by `\n`. An empty pattern matches every line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grep {
    pattern: Vec<u8>,
}

impl Grep {
    /// Grep for `pattern`. From a CLI, `app_by_name("grep:PATTERN")`.
    pub fn new(pattern: impl Into<Vec<u8>>) -> Self {
        Self {
            pattern: pattern.into(),
        }
    }

    fn matches(&self, line: &[u8]) -> bool {
        self.pattern.is_empty()
            || line
                .windows(self.pattern.len())
                .any(|window| window == self.pattern)
    }
}

impl MapReduceApp for Grep {
    fn map(&self, key: &[u8], value: &[u8], emit: &mut dyn FnMut(&[u8], &[u8])) {
        for (index, line) in value.split(|&byte| byte == b'\n').enumerate() {
            if self.matches(line) {
                let mut numbered = format!("{}:", index + 1).into_bytes();
                numbered.extend_from_slice(line);
                emit(key, &numbered);
            }
        }
    }

    fn reduce(&self, _key: &[u8], values: &mut dyn Iterator<Item = &[u8]>) -> Vec<u8> {
        // Lines of one key come from one map call, so numbers are distinct;
        // sorting makes the output independent of the values' order.
        let line_number = |line: &[u8]| -> u64 {
            let digits = line.split(|&byte| byte == b':').next().unwrap_or_default();
            std::str::from_utf8(digits)
                .ok()
                .and_then(|digits| digits.parse().ok())
                .unwrap_or(u64::MAX)
        };
        let mut lines: Vec<&[u8]> = values.collect();
        lines.sort_by(|a, b| line_number(a).cmp(&line_number(b)).then(a.cmp(b)));
        lines.join(&b"\n"[..])
    }
}

/// Runs `app` over `inputs` in one thread, in memory: every map, then one
/// reduce per intermediate key (values in emission order). The reference
/// output a distributed run must equal, keyed by intermediate key.
pub fn run_sequential<K, V>(
    app: &dyn MapReduceApp,
    inputs: impl IntoIterator<Item = (K, V)>,
) -> BTreeMap<Vec<u8>, Vec<u8>>
where
    K: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    let mut intermediate: BTreeMap<Vec<u8>, Vec<Vec<u8>>> = BTreeMap::new();
    for (key, value) in inputs {
        app.map(key.as_ref(), value.as_ref(), &mut |k, v| {
            intermediate.entry(k.to_vec()).or_default().push(v.to_vec());
        });
    }
    intermediate
        .into_iter()
        .map(|(key, values)| {
            let output = app.reduce(&key, &mut values.iter().map(Vec::as_slice));
            (key, output)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    //! Goal: the built-in apps produce the lab's outputs, checked against
    //! outputs computed by hand.

    use super::*;

    fn output(pairs: &[(&str, &str)]) -> BTreeMap<Vec<u8>, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    /// Goal: words are maximal runs of ASCII letters (digits, punctuation,
    /// non-ASCII bytes split them; case is kept), counted across inputs.
    #[test]
    fn wc_counts_runs_of_letters() {
        let app = app_by_name("wc").unwrap();
        let inputs = [
            ("a.txt", "The cat, the hat; THE end."),
            ("b.txt", "cat2cat don't caf\u{e9}"),
        ];
        let got = run_sequential(app.as_ref(), inputs);
        let want = output(&[
            ("THE", "1"),
            ("The", "1"),
            ("caf", "1"),
            ("cat", "3"),
            ("don", "1"),
            ("end", "1"),
            ("hat", "1"),
            ("t", "1"),
            ("the", "1"),
        ]);
        assert_eq!(got, want);
    }

    /// Goal: the indexer names each document once per word, sorted, with
    /// the count of distinct documents.
    #[test]
    fn indexer_two_documents() {
        let app = app_by_name("indexer").unwrap();
        let inputs = [("doc2", "b a b"), ("doc1", "a c a")];
        let got = run_sequential(app.as_ref(), inputs);
        let want = output(&[("a", "2 doc1,doc2"), ("b", "1 doc2"), ("c", "1 doc1")]);
        assert_eq!(got, want);
    }

    /// Goal: the indexer's reduce sorts and dedups its values itself: it may
    /// rely neither on their order nor on each document appearing once.
    #[test]
    fn indexer_reduce_sorts_and_dedups() {
        let values: [&[u8]; 4] = [b"z", b"a", b"z", b"m"];
        let out = Indexer.reduce(b"w", &mut values.into_iter());
        assert_eq!(out, b"3 a,m,z");
    }

    /// Goal: grep keeps matching lines per input key with their numbers, in
    /// line order; the pattern comes after the first `:` of the app name.
    #[test]
    fn grep_by_name_keeps_numbered_matching_lines() {
        assert!(app_by_name("grep").is_none(), "grep needs a pattern");
        assert!(app_by_name("nope").is_none());
        assert!(app_by_name("wc:x").is_none());
        let app = app_by_name("grep:a:b").unwrap();
        let inputs = [("k1", "xa:by\nno\na:b\n"), ("k2", "nothing"), ("k3", "a:b")];
        let got = run_sequential(app.as_ref(), inputs);
        let want = output(&[("k1", "1:xa:by\n3:a:b"), ("k3", "1:a:b")]);
        assert_eq!(got, want);
    }

    /// Goal: grep's reduce orders lines by number, not bytewise ("10" after
    /// "9"), whatever order the values arrive in.
    #[test]
    fn grep_reduce_orders_by_line_number() {
        let values: [&[u8]; 3] = [b"10:x", b"9:x", b"1:x"];
        assert_eq!(
            Grep::new("x").reduce(b"k", &mut values.into_iter()),
            b"1:x\n9:x\n10:x"
        );
    }

    /// Goal: `run_sequential` groups every value of a key into one reduce
    /// and keeps keys sorted; no input gives no output.
    #[test]
    fn run_sequential_groups_values_by_key() {
        struct Echo;
        impl MapReduceApp for Echo {
            fn map(&self, key: &[u8], value: &[u8], emit: &mut dyn FnMut(&[u8], &[u8])) {
                emit(value, key);
            }
            fn reduce(&self, _key: &[u8], values: &mut dyn Iterator<Item = &[u8]>) -> Vec<u8> {
                values.collect::<Vec<_>>().join(&b"+"[..])
            }
        }
        let got = run_sequential(&Echo, [("1", "b"), ("2", "a"), ("3", "b")]);
        assert_eq!(got, output(&[("a", "2"), ("b", "1+3")]));
        let none: [(&str, &str); 0] = [];
        assert!(run_sequential(&Echo, none).is_empty());
    }
}
