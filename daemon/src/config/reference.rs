//! The config reference: hostcryptd.toml(5) and docs/config.md, rendered
//! from the JSON schema (`schemars`) of the section types, so every key's
//! text is the `///` comment on its field, and its type, default and
//! example come from the same place as the parser's (`schema.rs` for the
//! shapes serde cannot tell). Nothing here is written by hand per key;
//! the tests below fail when a key lacks its text or example, when an
//! example or default is not what the parser takes, when the example
//! config uses a key no section has, and when the committed pages differ
//! from these renderings.
//!
//! `hostcryptd --print-config-reference man|markdown` prints the pages;
//! `scripts/gen-docs` rewrites the committed copies.

use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde_json::Value;

use super::{DaemonConfig, KekConfig, NbdConfig, VolumeConfig};

/// One table of the file, as the reference lists it.
#[derive(Debug, Clone)]
pub struct Section {
    /// How the table is written: `[daemon]`, `[kek.NAME]`, `[[volume]]`.
    pub title: String,
    /// The section type's own doc comment.
    pub intro: String,
    pub keys: Vec<Key>,
}

/// One key of a section.
#[derive(Debug, Clone)]
pub struct Key {
    pub name: String,
    /// The field's doc comment.
    pub description: String,
    /// What the value is: `string`, `duration`, `one of ...`.
    pub kind: String,
    /// For a key with a fixed set of values: each value and its doc comment.
    pub values: Vec<(String, String)>,
    /// Absent from the file is an error.
    pub required: bool,
    /// The default as TOML, when the key has one.
    pub default: Option<String>,
    /// Example values as TOML.
    pub examples: Vec<String>,
}

/// The schema of `T` with every subschema inlined (no `$ref` to follow).
pub fn schema_of<T: JsonSchema>() -> Value {
    SchemaSettings::draft2020_12()
        .with(|s| s.inline_subschemas = true)
        .into_generator()
        .into_root_schema_for::<T>()
        .to_value()
}

/// Every section, in the order the reference shows them.
pub fn sections() -> Vec<Section> {
    let mut out = vec![
        section("[daemon]", &schema_of::<DaemonConfig>()),
        section("[nbd]", &schema_of::<NbdConfig>()),
    ];
    let kek = schema_of::<KekConfig>();
    let variants = kek
        .get("oneOf")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let providers: Vec<(String, String)> = variants
        .iter()
        .map(|v| (provider_of(v), text(v, "description")))
        .collect();
    out.push(Section {
        title: "[kek.NAME]".into(),
        intro: text(&kek, "description"),
        keys: vec![Key {
            name: "provider".into(),
            description: "Where the key lives; the other keys of the table depend on it \
                          (the sections below)."
                .into(),
            kind: kind_of(&Value::Null, &providers),
            values: providers.clone(),
            required: true,
            default: None,
            examples: vec![toml_literal(&Value::from("vault")).unwrap_or_default()],
        }],
    });
    for variant in &variants {
        let provider = provider_of(variant);
        let mut s = section(
            &format!("[kek.NAME] with provider = \"{provider}\""),
            variant,
        );
        s.keys.retain(|k| k.name != "provider");
        out.push(s);
    }
    out.push(section("[[volume]]", &schema_of::<VolumeConfig>()));
    out
}

fn provider_of(variant: &Value) -> String {
    variant
        .pointer("/properties/provider/const")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string()
}

fn text(schema: &Value, field: &str) -> String {
    schema
        .get(field)
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

fn section(title: &str, schema: &Value) -> Section {
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let keys = schema
        .get("properties")
        .and_then(Value::as_object)
        .map(|props| {
            props
                .iter()
                .map(|(name, prop)| key(name, prop, required.contains(&name.as_str())))
                .collect()
        })
        .unwrap_or_default();
    Section {
        title: title.into(),
        intro: text(schema, "description"),
        keys,
    }
}

fn key(name: &str, prop: &Value, required: bool) -> Key {
    let values = values_of(prop);
    Key {
        name: name.into(),
        description: text(prop, "description"),
        kind: kind_of(prop, &values),
        values,
        required,
        default: prop.get("default").and_then(toml_literal),
        examples: prop
            .get("examples")
            .and_then(Value::as_array)
            .map(|e| e.iter().filter_map(toml_literal).collect())
            .unwrap_or_default(),
    }
}

/// The alternatives of a schema that are not `null` (an `Option` adds one).
fn alternatives(schema: &Value) -> Vec<&Value> {
    ["oneOf", "anyOf"]
        .iter()
        .filter_map(|k| schema.get(*k).and_then(Value::as_array))
        .flatten()
        .filter(|alt| !is_null(alt))
        .collect()
}

fn is_null(schema: &Value) -> bool {
    schema.get("type").and_then(Value::as_str) == Some("null")
        || schema.get("const").is_some_and(Value::is_null)
}

/// A key's fixed values (an enum's variants) with their doc comments.
fn values_of(schema: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(c) = schema.get("const").and_then(Value::as_str) {
        out.push((c.to_string(), text(schema, "description")));
    }
    for v in schema
        .get("enum")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(v) = v.as_str() {
            out.push((v.to_string(), String::new()));
        }
    }
    for alt in alternatives(schema) {
        out.extend(values_of(alt));
    }
    out
}

fn kind_of(schema: &Value, values: &[(String, String)]) -> String {
    if !values.is_empty() {
        let names: Vec<String> = values.iter().map(|(v, _)| format!("`{v}`")).collect();
        return format!("one of {}", names.join(", "));
    }
    if let [only] = alternatives(schema).as_slice() {
        return kind_of(only, &[]);
    }
    let types: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    let format = schema.get("format").and_then(Value::as_str);
    let names: Vec<String> = types
        .iter()
        .filter(|t| **t != "null")
        .map(|t| match (*t, format) {
            ("string", Some("duration")) => "duration (`\"30s\"`, `\"5m\"`, `\"500ms\"`)".into(),
            ("string", Some("size")) => "size (`\"512M\"`, `\"8G\"`, or bytes)".into(),
            ("array", _) => format!(
                "array of {}",
                schema
                    .get("items")
                    .map_or("values".into(), |i| kind_of(i, &values_of(i)) + "s")
            ),
            (t, _) => t.to_string(),
        })
        .collect();
    if names.is_empty() {
        "value".into()
    } else {
        names.join(" or ")
    }
}

/// A JSON value as TOML; `None` for `null` (an optional key's absence).
pub fn toml_literal(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(serde_json::to_string(s).unwrap_or_default()),
        Value::Array(items) => Some(format!(
            "[{}]",
            items
                .iter()
                .filter_map(toml_literal)
                .collect::<Vec<_>>()
                .join(", ")
        )),
        other => Some(other.to_string()),
    }
}

/// The first lines of both renderings: what the file is and where it lives.
const OVERVIEW: &str = "hostcryptd reads one TOML file, by default \
`/etc/hostcrypt/hostcryptd.toml` (`hostcryptd --config FILE`; `hostcrypt` reads the same \
file). Unknown keys and bad values are errors that name the key and the line; \
`hostcryptd --config FILE --check` validates the file and that every KEK wraps and unwraps \
a key, `--check --offline` the file and local files alone. A `[server]` section, the form \
before `[daemon]` and `[nbd]` existed, still works with a warning; `--check` prints the two \
sections to put in its place. The annotated example installed as \
`/etc/hostcrypt/hostcryptd.toml` (in the source tree `systemd/hostcryptd.toml`) shows a \
complete file.";

/// Paragraphs of a doc comment, each joined into one line.
fn paragraphs(text: &str) -> Vec<String> {
    text.split("\n\n")
        .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|p| !p.is_empty())
        .collect()
}

/// docs/config.md.
pub fn markdown() -> String {
    let mut out = String::from(
        "# hostcryptd.toml: the configuration reference\n\n\
         <!-- Generated from the doc comments of daemon/src/config/ and the KEK\n\
         providers by `hostcryptd --print-config-reference markdown`\n\
         (scripts/gen-docs). Do not edit: change the comments and regenerate;\n\
         a unit test fails while this copy differs. -->\n\n",
    );
    out.push_str(&paragraphs(OVERVIEW).join("\n\n"));
    out.push_str("\n\nThe same reference is the man page `hostcryptd.toml(5)`.\n");
    for s in sections() {
        out.push_str(&format!("\n## `{}`\n\n", s.title));
        for p in paragraphs(&s.intro) {
            out.push_str(&p);
            out.push_str("\n\n");
        }
        for k in &s.keys {
            out.push_str(&format!("### `{}`\n\n", k.name));
            for p in paragraphs(&k.description) {
                out.push_str(&p);
                out.push_str("\n\n");
            }
            out.push_str(&format!("- Type: {}\n", k.kind));
            for (value, doc) in &k.values {
                let doc = paragraphs(doc).join(" ");
                if doc.is_empty() {
                    out.push_str(&format!("  - `{value}`\n"));
                } else {
                    out.push_str(&format!("  - `{value}`: {doc}\n"));
                }
            }
            match (&k.default, k.required) {
                (Some(d), _) => out.push_str(&format!("- Default: `{d}`\n")),
                (None, true) => out.push_str("- Required\n"),
                (None, false) => out.push_str("- Optional (no default)\n"),
            }
            for e in &k.examples {
                out.push_str(&format!("- Example: `{} = {e}`\n", k.name));
            }
            out.push('\n');
        }
    }
    out.trim_end().to_string() + "\n"
}

/// Roff text: backslashes and leading dots escaped, hyphens as minus
/// signs, `code` in bold.
fn roff(text: &str) -> String {
    let mut out = String::new();
    let mut bold = false;
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\e"),
            '-' => out.push_str("\\-"),
            '`' => {
                out.push_str(if bold { "\\fR" } else { "\\fB" });
                bold = !bold;
            }
            c => out.push(c),
        }
    }
    if bold {
        out.push_str("\\fR");
    }
    if out.starts_with('.') || out.starts_with('\'') {
        out.insert_str(0, "\\&");
    }
    out
}

/// hostcryptd.toml(5).
pub fn man_page() -> String {
    let version = env!("CARGO_PKG_VERSION");
    let mut out = format!(
        ".\\\" Generated from the doc comments of daemon/src/config/ by\n\
         .\\\" `hostcryptd --print-config-reference man` (scripts/gen-docs); do not edit.\n\
         .TH HOSTCRYPTD.TOML 5 \"\" \"hostcryptd {version}\" \"hostcrypt\"\n\
         .SH NAME\n\
         hostcryptd.toml \\- configuration file of hostcryptd(8)\n\
         .SH SYNOPSIS\n\
         /etc/hostcrypt/hostcryptd.toml\n\
         .SH DESCRIPTION\n"
    );
    for p in paragraphs(OVERVIEW) {
        out.push_str(&roff(&p));
        out.push_str("\n.PP\n");
    }
    out.push_str(
        "Each key below shows its type, its default (or whether it is required) and an example.\n",
    );
    for s in sections() {
        out.push_str(&format!(
            ".SH \"{}\"\n",
            roff(&s.title).replace('"', "\\(dq")
        ));
        for p in paragraphs(&s.intro) {
            out.push_str(&roff(&p));
            out.push_str("\n.PP\n");
        }
        for k in &s.keys {
            out.push_str(&format!(".TP\n.B {}\n", roff(&k.name)));
            let mut first = true;
            for p in paragraphs(&k.description) {
                if !first {
                    out.push_str(".IP\n");
                }
                first = false;
                out.push_str(&roff(&p));
                out.push('\n');
            }
            out.push_str(&format!(".IP\nType: {}\n", roff(&k.kind)));
            for (value, doc) in &k.values {
                let doc = paragraphs(doc).join(" ");
                out.push_str(".br\n");
                if doc.is_empty() {
                    out.push_str(&format!("\\(bu \\fB{}\\fR\n", roff(value)));
                } else {
                    out.push_str(&format!("\\(bu \\fB{}\\fR: {}\n", roff(value), roff(&doc)));
                }
            }
            out.push_str(".br\n");
            match (&k.default, k.required) {
                (Some(d), _) => out.push_str(&format!("Default: {}\n", roff(d))),
                (None, true) => out.push_str("Required.\n"),
                (None, false) => out.push_str("Optional (no default).\n"),
            }
            for e in &k.examples {
                out.push_str(&format!(".br\nExample: {} = {}\n", roff(&k.name), roff(e)));
            }
        }
    }
    out.push_str(
        ".SH FILES\n\
         .TP\n\
         /etc/hostcrypt/hostcryptd.toml\n\
         The configuration (a conffile of the Debian package).\n\
         .SH SEE ALSO\n\
         hostcryptd(8), hostcrypt(8)\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::config::{Config, ConfigError};

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    #[test]
    fn every_key_has_a_description_a_type_and_an_example() {
        let mut missing = Vec::new();
        for s in sections() {
            if s.intro.trim().is_empty() {
                missing.push(format!("{}: no doc comment on the section type", s.title));
            }
            for k in &s.keys {
                let at = format!("{} {}", s.title, k.name);
                if k.description.trim().is_empty() {
                    missing.push(format!("{at}: no `///` doc comment"));
                }
                if k.examples.is_empty() {
                    missing.push(format!(
                        "{at}: no example (#[schemars(extend(\"examples\" = [..]))])"
                    ));
                }
                if k.kind == "value" {
                    missing.push(format!("{at}: no type in the schema"));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "undocumented keys:\n{}",
            missing.join("\n")
        );
        let names = |title: &str| -> Vec<String> {
            sections()
                .into_iter()
                .find(|s| s.title == title)
                .unwrap()
                .keys
                .into_iter()
                .map(|k| k.name)
                .collect()
        };
        let mut daemon_keys: Vec<String> = crate::config::DAEMON_KEYS
            .iter()
            .map(|k| k.to_string())
            .collect();
        daemon_keys.sort();
        assert_eq!(
            names("[daemon]"),
            daemon_keys,
            "daemon::KEYS is out of step"
        );
        assert!(names("[nbd]").contains(&"reply_memory".to_string()));
        assert!(names("[[volume]]").contains(&"backing".to_string()));
        for provider in ["local", "vault", "pkcs11", "azure"] {
            let title = format!("[kek.NAME] with provider = \"{provider}\"");
            assert!(!names(&title).is_empty(), "{title}");
        }
    }

    /// Tables of a small valid config, each a list of `key = value` lines.
    struct Tables {
        daemon: Vec<(String, String)>,
        nbd: Vec<(String, String)>,
        kek: Vec<(String, String)>,
        volume: Vec<(String, String)>,
    }

    fn set(table: &mut Vec<(String, String)>, key: &str, value: &str) {
        match table.iter_mut().find(|(k, _)| k == key) {
            Some(line) => line.1 = value.to_string(),
            None => table.push((key.to_string(), value.to_string())),
        }
    }

    fn lines(table: &[(String, String)]) -> String {
        table.iter().map(|(k, v)| format!("{k} = {v}\n")).collect()
    }

    impl Tables {
        /// A valid config; a provider section's tests add a `[kek.test]`
        /// table with its required keys set to their examples.
        fn new(provider: Option<&Section>) -> Tables {
            let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
            let kek = provider
                .map(|s| {
                    let mut t = vec![pair("provider", &format!("{:?}", provider_name(s)))];
                    for k in s.keys.iter().filter(|k| k.required) {
                        t.push(pair(&k.name, &k.examples[0]));
                    }
                    t
                })
                .unwrap_or_default();
            Tables {
                daemon: vec![],
                nbd: vec![pair("unix", "\"/run/hostcrypt/nbd.sock\"")],
                kek,
                volume: vec![
                    pair("name", "\"cache0\""),
                    pair("backing", "\"/var/lib/hostcrypt/cache0.img\""),
                    pair("role", "\"cache\""),
                    pair("kek", "\"main\""),
                ],
            }
        }

        fn table(&mut self, title: &str) -> &mut Vec<(String, String)> {
            match title {
                "[daemon]" => &mut self.daemon,
                "[nbd]" => &mut self.nbd,
                "[[volume]]" => &mut self.volume,
                _ => &mut self.kek,
            }
        }

        fn text(&self) -> String {
            let mut text = format!(
                "[daemon]\n{}\n[nbd]\n{}\n",
                lines(&self.daemon),
                lines(&self.nbd)
            );
            if !self.kek.is_empty() {
                text.push_str(&format!("[kek.test]\n{}\n", lines(&self.kek)));
            }
            text.push_str(
                "[kek.main]\nprovider = \"local\"\npath = \"/etc/hostcrypt/kek.key\"\n\n",
            );
            // The volume last, so that a key added at its end moves no
            // other key's span.
            text + &format!("[[volume]]\n{}", lines(&self.volume))
        }
    }

    fn provider_name(s: &Section) -> &str {
        s.title
            .split('"')
            .nth(1)
            .expect("a provider section names its provider")
    }

    /// The parsed section a key of `title` lands in, for comparisons.
    fn parsed_section(c: &Config, title: &str) -> String {
        match title {
            "[daemon]" => format!("{:?}", c.daemon),
            "[nbd]" => format!("{:?}", c.nbd),
            "[[volume]]" => format!("{:?}", c.volumes[0]),
            _ => format!("{:?}", c.kek.get("test")),
        }
    }

    #[test]
    fn examples_parse_and_defaults_are_what_the_parser_assumes() {
        let parse = |text: &str| Config::parse(text, Path::new("reference.toml"));
        for s in sections() {
            if s.title == "[kek.NAME]" {
                // `provider` itself: each provider section below sets it.
                continue;
            }
            let provider = s.title.starts_with("[kek.").then_some(&s);
            let base_text = Tables::new(provider).text();
            let base = parse(&base_text)
                .unwrap_or_else(|e| panic!("{}: the base config: {e}\n{base_text}", s.title));
            for k in &s.keys {
                for example in &k.examples {
                    let mut t = Tables::new(provider);
                    set(t.table(&s.title), &k.name, example);
                    let text = t.text();
                    // Other checks (a TCP address beyond loopback, a KEK
                    // not defined) may refuse the combination; the value
                    // itself must be one the parser takes.
                    if let Err(e @ ConfigError::Parse { .. }) = parse(&text) {
                        panic!("{} {} = {example}: {e}\n{text}", s.title, k.name);
                    }
                }
                if let Some(default) = &k.default {
                    let mut t = Tables::new(provider);
                    set(t.table(&s.title), &k.name, default);
                    let text = t.text();
                    let c = parse(&text)
                        .unwrap_or_else(|e| panic!("{} {} = {default}: {e}", s.title, k.name));
                    assert_eq!(
                        parsed_section(&c, &s.title),
                        parsed_section(&base, &s.title),
                        "{} {}: the documented default {default} is not the parser's",
                        s.title,
                        k.name
                    );
                }
            }
        }
    }

    #[test]
    fn the_example_config_uses_only_keys_the_reference_documents() {
        let text = std::fs::read_to_string(repo().join("systemd/hostcryptd.toml")).unwrap();
        let all = sections();
        let keys_of = |title: &str| -> Vec<String> {
            all.iter()
                .filter(|s| s.title == title)
                .flat_map(|s| s.keys.iter().map(|k| k.name.clone()))
                .collect()
        };
        let mut title = String::new();
        let mut checked = 0;
        for (n, line) in text.lines().enumerate() {
            // Commented-out keys and tables count as much as set ones.
            let line = line.trim_start().trim_start_matches('#').trim();
            if line.starts_with('[') && line.ends_with(']') && !line.contains(' ') {
                let header = line.trim_start_matches('[');
                let name = header.split(']').next().unwrap_or("");
                title = match name.split('.').next().unwrap_or("") {
                    "kek" => "[kek.NAME]".into(),
                    "volume" => "[[volume]]".into(),
                    other => format!("[{other}]"),
                };
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let key = key.trim();
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                continue;
            }
            if title == "[kek.NAME]" && key == "provider" {
                let provider = value.split('"').nth(1).unwrap_or("");
                title = format!("[kek.NAME] with provider = \"{provider}\"");
                continue;
            }
            assert!(
                keys_of(&title).iter().any(|k| k == key),
                "systemd/hostcryptd.toml line {}: {key} is not a key of {title}",
                n + 1
            );
            checked += 1;
        }
        assert!(
            checked > 40,
            "only {checked} keys found in the example config"
        );
    }

    #[test]
    fn committed_pages_match_the_doc_comments() {
        for (path, fresh) in [
            ("docs/config.md", markdown()),
            ("docs/man/hostcryptd.toml.5", man_page()),
        ] {
            let committed = std::fs::read_to_string(repo().join(path)).unwrap_or_default();
            assert!(
                committed == fresh,
                "{path} differs from the doc comments it is generated from: run scripts/gen-docs"
            );
        }
    }
}
