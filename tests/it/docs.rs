//! The documentation cannot drift from the code: every YAML block of README.md and docs/
//! passes `mqgate check` (an unknown or renamed key, a bad value, a rule that names a missing
//! broker all fail it), and docs/operations.md lists exactly the metric families a running
//! gateway serves.
//!
//! A block is a fence opened with ```` ```yaml ```` (or `yml`), at any indent. A block that is
//! deliberately not a whole config (a fragment showing one section) is marked by the line
//! `<!-- partial -->` as the last non-blank line before its fence; it must still be valid
//! YAML. A `${env:NAME}` in a block is given a 32-character value for its check.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The marker that exempts the next YAML block from `mqgate check`.
const PARTIAL: &str = "<!-- partial -->";

/// One YAML block of a Markdown file.
#[derive(Debug)]
struct Block {
    /// 1-based line of the block's first YAML line in its file.
    line: usize,
    /// The YAML, de-indented to the fence's indent.
    text: String,
    /// Marked `<!-- partial -->`.
    partial: bool,
}

/// The YAML blocks of `markdown`.
fn yaml_blocks(markdown: &str) -> Vec<Block> {
    let lines: Vec<&str> = markdown.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let trimmed = lines[i].trim_start();
        let indent = lines[i].len() - trimmed.len();
        let Some(lang) = trimmed.strip_prefix("```") else {
            i += 1;
            continue;
        };
        let end = (i + 1..lines.len())
            .find(|&j| lines[j].trim_start().starts_with("```"))
            .unwrap_or(lines.len());
        if matches!(lang.trim(), "yaml" | "yml") {
            let partial = lines[..i].iter().rev().find(|l| !l.trim().is_empty()).map(|l| l.trim())
                == Some(PARTIAL);
            let text = lines[i + 1..end]
                .iter()
                .map(|l| {
                    if l.len() >= indent && l[..indent].trim().is_empty() {
                        &l[indent..]
                    } else {
                        l.trim_start()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            blocks.push(Block { line: i + 2, text: text + "\n", partial });
        }
        i = end + 1;
    }
    blocks
}

/// The `${env:NAME}` names in `text`.
fn env_names(text: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("${env:") {
        rest = &rest[at + "${env:".len()..];
        match rest.find('}') {
            Some(end) => names.push(&rest[..end]),
            None => break,
        }
    }
    names
}

/// Checks each block of `markdown` (named `name` in messages) in `dir`; returns the failures
/// and how many blocks `mqgate check` ran on.
fn check_markdown(name: &str, markdown: &str, dir: &Path) -> (Vec<String>, usize) {
    let mut failures = Vec::new();
    let mut checked = 0;
    for block in yaml_blocks(markdown) {
        let at = format!("{name}:{}", block.line);
        if let Err(e) = serde_saphyr::from_str::<serde_json::Value>(&block.text) {
            failures.push(format!("{at}: not YAML: {e}"));
            continue;
        }
        if block.partial {
            continue;
        }
        let file = dir.join(format!("{}-{}.yaml", name.replace('/', "_"), block.line));
        std::fs::write(&file, &block.text).expect("write block");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mqgate"));
        cmd.args(["check", "--config"]).arg(&file);
        for var in env_names(&block.text) {
            cmd.env(var, "doc-config-check-0123456789abcdef");
        }
        let out = cmd.output().expect("run mqgate check");
        checked += 1;
        if !out.status.success() {
            // Errors are file:LINE:column within the block: shift them to the Markdown file.
            let stderr = String::from_utf8_lossy(&out.stderr);
            let prefix = format!("{}:", file.display());
            for err in stderr.lines() {
                let shifted = err
                    .strip_prefix(&prefix)
                    .and_then(|rest| rest.split_once(':'))
                    .and_then(|(l, rest)| Some((l.parse::<usize>().ok()?, rest)))
                    .map(|(l, rest)| format!("{name}:{}:{rest}", block.line + l.max(1) - 1))
                    .unwrap_or_else(|| format!("{at}: {err}"));
                failures.push(shifted);
            }
        }
    }
    (failures, checked)
}

fn markdown_files() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    let mut dirs = vec![root.join("docs")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read docs/") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_yaml_block_in_the_docs_passes_mqgate_check() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut failures, mut checked, mut partial) = (Vec::new(), 0, 0);
    for file in markdown_files() {
        let name = file.strip_prefix(&root).unwrap().display().to_string();
        let text = std::fs::read_to_string(&file).expect("read markdown");
        partial += yaml_blocks(&text).iter().filter(|b| b.partial).count();
        let (f, n) = check_markdown(&name, &text, dir.path());
        failures.extend(f);
        checked += n;
    }
    assert!(failures.is_empty(), "doc config blocks that fail:\n{}", failures.join("\n"));
    // Not vacuous: most blocks are whole configs (README's example, configuration.md's, ...).
    assert!(checked >= 8, "only {checked} blocks checked ({partial} partial)");
    assert!(checked > partial, "{checked} checked, {partial} partial");
}

#[test]
fn a_doc_block_with_an_unknown_key_fails_and_a_marked_partial_one_is_skipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let doc = "# Doc\n\nText.\n\n```yaml\nmqtt:\n  listen: \"127.0.0.1:1883\"\n  lisen: 3\n```\n";
    let (failures, checked) = check_markdown("doc.md", doc, dir.path());
    assert_eq!(checked, 1);
    // The key's line in the Markdown file: line 8.
    assert!(
        failures.len() == 1
            && failures[0].starts_with("doc.md:8:")
            && failures[0].contains("lisen"),
        "{failures:?}"
    );

    // Indented (in a list item), with a secret from the environment: passes.
    let doc = "- item:\n\n  ```yaml\n  mqtt:\n    listen: \"127.0.0.1:1883\"\n  admin:\n    listen: \"0.0.0.0:9090\"\n    token: \"${env:DOC_TOKEN}\"\n  ```\n";
    let (failures, checked) = check_markdown("list.md", doc, dir.path());
    assert_eq!((failures.len(), checked), (0, 1), "{failures:?}");

    // A fragment marked partial is not checked by mqgate, but must be YAML.
    let doc = "<!-- partial -->\n```yaml\nhttp:\n  api: { url: \"https://x\" }\n```\n";
    let (failures, checked) = check_markdown("p.md", doc, dir.path());
    assert_eq!((failures.len(), checked), (0, 0), "{failures:?}");
    let doc = "<!-- partial -->\n\n```yaml\nhttp: [unclosed\n```\n";
    let (failures, _) = check_markdown("p.md", doc, dir.path());
    assert!(failures.len() == 1 && failures[0].contains("not YAML"), "{failures:?}");
    // The same fragment unmarked fails (no mqtt: section).
    let doc = "```yaml\nhttp:\n  api: { url: \"https://x\" }\n```\n";
    let (failures, checked) = check_markdown("p.md", doc, dir.path());
    assert_eq!(checked, 1);
    assert!(!failures.is_empty(), "a fragment passed as a whole config");
    // Other languages are not YAML blocks.
    assert!(yaml_blocks("```sh\nmqgate check\n```\n```json\n{}\n```\n").is_empty());
}

/// The metric family names registered in `src/` (`registry.register("name", ...)`, and the
/// store's collector, `encode_descriptor("name", ...)`), without the `mqgate_` prefix.
fn registered_families() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut dirs = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src/") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else { continue };
            for call in ["registry.register(", "encode_descriptor("] {
                for (at, _) in text.match_indices(call) {
                    let rest = text[at + call.len()..].trim_start();
                    if let Some(lit) = rest.strip_prefix('"') {
                        names.insert(lit[..lit.find('"').expect("closed literal")].to_owned());
                    }
                }
            }
        }
    }
    names
}

/// docs/operations.md "Metrics" lists every family registered in the code (a renamed or new
/// metric fails this), counters with `_total` as a running gateway serves them.
#[tokio::test]
async fn operations_md_lists_every_metric_family() {
    let doc = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md"),
    )
    .expect("read docs/operations.md");
    let section = doc.split("\n## Metrics\n").nth(1).expect("a Metrics section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let listed: BTreeSet<String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `mqgate_"))
        .filter_map(|l| l.split_once('`').map(|(name, _)| name.to_owned()))
        .collect();
    let registered = registered_families();
    assert!(registered.len() > 40, "few families found in src/: {registered:?}");
    let base = |name: &String| name.strip_suffix("_total").unwrap_or(name).to_owned();
    let listed_base: BTreeSet<String> = listed.iter().map(base).collect();
    let missing: Vec<&String> = registered.difference(&listed_base).collect();
    let unknown: Vec<&String> = listed_base.difference(&registered).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "docs/operations.md \"Metrics\": not listed {missing:?}; listed but not registered {unknown:?}"
    );

    // The suffixes as served: a gateway with a store serves its families with series.
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\nstore:\n  path: \"{}\"\n",
        dir.path().display()
    );
    let app = crate::support::gateway(&yaml).await;
    let text = crate::support::metrics(&app).await;
    app.stop().await;
    let served: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE mqgate_"))
        .filter_map(|l| {
            let (name, kind) = l.split_once(' ')?;
            Some(if kind == "counter" { format!("{name}_total") } else { name.to_owned() })
        })
        .collect();
    assert!(served.len() >= 15, "few families served: {served:?}");
    for name in served {
        assert!(listed.contains(&name), "served as mqgate_{name}, listed otherwise");
    }
}

/// docs/configuration.md names every key the config accepts: for each section, an unknown key
/// makes the parser list the section's keys, and each must appear in the page as `` `key` ``
/// or as a part of a dotted one (`` `tls.cert` ``, `` `retry.attempts` ``, `` `bind[].exchange` ``).
#[test]
fn configuration_md_names_every_key() {
    let doc = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md"),
    )
    .expect("read docs/configuration.md");
    let m = "mqtt:\n  listen: \"127.0.0.1:1883\"\n";
    let rule = format!("{m}rules:\n  - name: r\n    from: a\n");
    let source = format!("{m}sources:\n  - name: s\n");
    let sections = [
        ("top level", "zz: 1\n".to_owned()),
        ("mqtt", "mqtt:\n  zz: 1\n".to_owned()),
        ("mqtt.listeners", format!("{m}  listeners:\n    - zz: 1\n")),
        (
            "mqtt.listeners.tls",
            format!("{m}  listeners:\n    - kind: tls\n      tls:\n        zz: 1\n"),
        ),
        ("admin", format!("{m}admin:\n  zz: 1\n")),
        ("store", format!("{m}store:\n  zz: 1\n")),
        ("cluster", format!("{m}cluster:\n  zz: 1\n")),
        ("mqttsn", format!("{m}mqttsn:\n  zz: 1\n")),
        ("amqp", format!("{m}amqp:\n  r:\n    zz: 1\n")),
        ("amqp.tls", format!("{m}amqp:\n  r:\n    tls:\n      zz: 1\n")),
        ("http", format!("{m}http:\n  a:\n    zz: 1\n")),
        ("http.tls", format!("{m}http:\n  a:\n    tls:\n      zz: 1\n")),
        ("bridges", format!("{m}bridges:\n  b:\n    zz: 1\n")),
        ("kafka", format!("{m}kafka:\n  k:\n    zz: 1\n")),
        ("zmq", format!("{m}zmq:\n  z:\n    zz: 1\n")),
        ("kafka.sasl", format!("{m}kafka:\n  k:\n    sasl:\n      zz: 1\n")),
        ("rules", format!("{rule}    zz: 1\n")),
        ("spool", format!("{rule}    spool:\n      zz: 1\n")),
        ("targets", format!("{rule}    to:\n      - zz: {{}}\n")),
        ("- amqp:", format!("{rule}    to:\n      - amqp:\n          zz: 1\n")),
        ("- http:", format!("{rule}    to:\n      - http:\n          zz: 1\n")),
        (
            "- http: retry",
            format!("{rule}    to:\n      - http:\n          retry:\n            zz: 1\n"),
        ),
        (
            "- http: batch",
            format!("{rule}    to:\n      - http:\n          batch:\n            zz: 1\n"),
        ),
        ("- mqtt:", format!("{rule}    to:\n      - mqtt:\n          zz: 1\n")),
        ("- kafka:", format!("{rule}    to:\n      - kafka:\n          zz: 1\n")),
        ("- zmq:", format!("{rule}    to:\n      - zmq:\n          zz: 1\n")),
        ("sources", format!("{source}    zz: 1\n")),
        ("sources.declare", format!("{source}    declare:\n      zz: 1\n")),
        ("sources.bind", format!("{source}    bind:\n      - zz: 1\n")),
        ("users", format!("{m}users:\n  - zz: 1\n")),
        ("acl", format!("{m}acl:\n  - zz: 1\n")),
    ];
    let mut undocumented = Vec::new();
    for (section, yaml) in sections {
        let err = mqgate::config::Config::parse(Path::new("k.yaml"), &yaml)
            .expect_err("an unknown key")
            .to_string();
        let expected = err
            .split_once("expected ")
            .map(|(_, keys)| keys.trim_start_matches("one of "))
            .unwrap_or_else(|| panic!("{section}: no key list in {err:?}"));
        let keys: Vec<&str> = expected
            .split(", ")
            .flat_map(|k| k.split(" or "))
            .map(|k| k.trim().trim_matches('`'))
            .filter(|k| !k.is_empty())
            .collect();
        assert!(!keys.is_empty(), "{section}: {err}");
        for key in keys {
            let named =
                [format!("`{key}`"), format!(".{key}`"), format!("`{key}."), format!("`{key}[].")];
            if !named.iter().any(|n| doc.contains(n)) {
                undocumented.push(format!("{section}: {key}"));
            }
        }
    }
    assert!(undocumented.is_empty(), "not in docs/configuration.md: {undocumented:?}");
}
