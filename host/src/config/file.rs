//! The config file of a multi-pipeline host: TOML, with sources, embedders and sinks defined
//! once under a name and referenced by pipelines.
//!
//! ```toml
//! [sources.app]
//! dsn = "postgresql://pgstream:${PG_PASSWORD}@db/app"
//!
//! [embedders.minilm]
//! kind = "minilm"
//!
//! [sinks.vectors]
//! kind = "pgvector"
//!
//! [[pipeline]]
//! name = "tenant_a"
//! source = "app"
//! tables = ["tenant_a.documents"]
//! plugin = "tenant_a.wasm"
//! embedder = "minilm"
//! sink = "vectors"
//! collection = "tenant_a.documents_embeddings"
//! ```
//!
//! Unknown keys are errors that name the key and its line. Secrets (DSNs, API keys) may hold
//! `${ENV_VAR}`, replaced when the file is read; a secret's value is never printed, so errors
//! point at its line without quoting it. Relative paths (plugins, embedding caches) are taken
//! from the file's folder. Everything that can be checked without connecting anywhere is
//! checked at once, and every problem is reported, not just the first.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{
    EmbedderSpec, PipelineSpec, PipelineSpecOf, ProcessSettings, Secret, SinkSpec, SourceSpec,
};
use crate::replication::SourceConfig;

/// The pipelines of a config file, with their shared blocks resolved.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    /// Settings every pipeline shares.
    pub settings: ProcessSettings,
    /// The pipelines, in file order.
    pub pipelines: Vec<PipelineSpec>,
}

/// One problem found in a config file: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// `FILE:LINE`, or `FILE: pipeline NAME` when it concerns a whole pipeline.
    pub location: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// Why a config file cannot be used: every problem found.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    /// The problems, in file order.
    pub problems: Vec<ConfigProblem>,
}

/// A pipeline as written in the file: its source, embedder and sink by name.
type PipelineEntry = PipelineSpecOf<String, Option<String>, Option<String>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    settings: ProcessSettings,
    #[serde(default)]
    sources: BTreeMap<String, SourceSpec>,
    #[serde(default)]
    embedders: BTreeMap<String, EmbedderSpec>,
    #[serde(default)]
    sinks: BTreeMap<String, SinkSpec>,
    #[serde(default)]
    pipeline: Vec<PipelineEntry>,
}

impl ConfigFile {
    /// Reads and checks the file at `path`, taking `${VAR}`s from the process environment.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError {
            problems: vec![ConfigProblem {
                location: path.display().to_string(),
                message: format!("cannot read the config file: {error}"),
            }],
        })?;
        ConfigFile::parse(
            &text,
            &path.display().to_string(),
            &folder_of(path),
            |name| std::env::var(name).ok(),
        )
    }

    /// Parses and checks `text`; `origin` names it in problems, relative paths are taken
    /// from `folder`, and `env` answers `${VAR}`s.
    pub fn parse(
        text: &str,
        origin: &str,
        folder: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<ConfigFile, ConfigError> {
        let raw: RawFile = toml::from_str(text).map_err(|error| ConfigError {
            problems: vec![ConfigProblem {
                location: match error.span() {
                    Some(span) => format!("{origin}:{}", line_of(text, span.start)),
                    None => origin.to_owned(),
                },
                // The message alone: toml's full report quotes the line, which may hold a
                // secret.
                message: error.message().trim().to_owned(),
            }],
        })?;
        let mut problems = Vec::new();
        let mut problem =
            |location: String, message: String| problems.push(ConfigProblem { location, message });
        if raw.pipeline.is_empty() {
            problem(
                origin.to_owned(),
                "no pipeline: add at least one [[pipeline]] table".into(),
            );
        }
        let mut pipelines = Vec::new();
        for entry in raw.pipeline {
            let at = format!("{origin}: pipeline {}", entry.name);
            let Some(source) = raw.sources.get(&entry.source) else {
                problem(
                    at,
                    format!(
                        "source {:?} is not defined; add a [sources.{}] table with its dsn",
                        entry.source, entry.source
                    ),
                );
                continue;
            };
            let source = match source.dsn.interpolate(&env) {
                Ok(dsn) => SourceSpec { dsn },
                Err(message) => {
                    problem(at, format!("sources.{}.dsn: {message}", entry.source));
                    continue;
                }
            };
            // Its errors never quote the password.
            if let Err(error) = SourceConfig::from_dsn(source.dsn.expose()) {
                problem(at, format!("sources.{}.dsn: {error}", entry.source));
                continue;
            }
            let embedder = shared_block(
                &raw.embedders,
                entry.embedder.as_deref(),
                "embedder",
                |spec| spec.interpolate(&env),
            );
            let sink = shared_block(&raw.sinks, entry.sink.as_deref(), "sink", |spec| {
                spec.interpolate(&env)
            });
            let (embedder, sink) = match (embedder, sink) {
                (Ok(embedder), Ok(sink)) => (embedder, sink),
                (embedder, sink) => {
                    for message in [embedder.err(), sink.err()].into_iter().flatten() {
                        problem(at.clone(), message);
                    }
                    continue;
                }
            };
            let mut spec = entry.with_parts(source, embedder, sink);
            if let Some(dsn) = &spec.dead_letter_dsn {
                match dsn.interpolate(&env) {
                    Ok(dsn) => spec.dead_letter_dsn = Some(dsn),
                    Err(message) => {
                        problem(at, format!("dead_letter_dsn: {message}"));
                        continue;
                    }
                }
            }
            spec.plugin = folder.join(&spec.plugin);
            if let Some(cache) = &mut spec.embed_cache {
                cache.path = folder.join(&cache.path);
            }
            for spec_problem in spec.validate() {
                problem(at.clone(), spec_problem.to_string());
            }
            pipelines.push(spec);
        }
        for message in conflicts(&pipelines) {
            problem(origin.to_owned(), message);
        }
        if problems.is_empty() {
            Ok(ConfigFile {
                settings: raw.settings,
                pipelines,
            })
        } else {
            Err(ConfigError { problems })
        }
    }
}

/// Pairs of pipelines that would step on each other: one name, one slot on one database, or
/// one namespace of one sink.
fn conflicts(pipelines: &[PipelineSpec]) -> Vec<String> {
    let mut messages = Vec::new();
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut slots: HashMap<(String, &str), &str> = HashMap::new();
    let mut namespaces: HashMap<String, &str> = HashMap::new();
    for spec in pipelines {
        if names.insert(&spec.name, 0).is_some() {
            messages.push(format!(
                "two pipelines are named {:?}; names must be unique",
                spec.name
            ));
        }
        // Where the slot lives: the server and database, without the credentials.
        let database = SourceConfig::from_dsn(spec.source.dsn.expose())
            .map(|config| config.display())
            .unwrap_or_default();
        if let Some(other) = slots.insert((database.clone(), spec.slot_name()), &spec.name) {
            messages.push(format!(
                "pipelines {other:?} and {:?} both use slot {:?} on {database}; a slot can feed \
                 one pipeline only: set `slot` (and `publication`) on one of them",
                spec.name,
                spec.slot_name()
            ));
        }
        let Ok(namespace) = spec.namespace() else {
            continue;
        };
        // A pgvector sink without its own DSN writes to the source database.
        let namespace = match &spec.sink {
            SinkSpec::Pgvector { dsn: None, .. } => format!("{namespace} on {database}"),
            SinkSpec::Pgvector { dsn: Some(dsn), .. } => {
                let sink_database = SourceConfig::from_dsn(dsn.expose())
                    .map(|config| config.display())
                    .unwrap_or_default();
                format!("{namespace} on {sink_database}")
            }
            _ => namespace,
        };
        if let Some(other) = namespaces.insert(namespace.clone(), &spec.name) {
            messages.push(format!(
                "pipelines {other:?} and {:?} both write {namespace}; give each its own \
                 `collection`",
                spec.name
            ));
        }
    }
    messages
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&byte| byte == b'\n')
        .count()
        + 1
}

impl Secret {
    /// The secret with every `${VAR}` replaced by `env(VAR)`. The error names the variable,
    /// never the secret.
    pub fn interpolate(&self, env: impl Fn(&str) -> Option<String>) -> Result<Secret, String> {
        let mut out = String::with_capacity(self.0.len());
        let mut rest = self.0.as_str();
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                return Err("a `${` is not closed by `}`".into());
            };
            let name = &after[..end];
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_')
            {
                return Err(format!(
                    "`${{{name}}}` is not an environment variable name (letters, digits, _)"
                ));
            }
            match env(name) {
                Some(value) => out.push_str(&value),
                None => return Err(format!("environment variable {name} is not set")),
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(Secret(out))
    }
}

impl EmbedderSpec {
    fn interpolate(&self, env: impl Fn(&str) -> Option<String>) -> Result<EmbedderSpec, String> {
        let mut spec = self.clone();
        if let EmbedderSpec::Openai {
            api_key: Some(key), ..
        } = &mut spec
        {
            *key = key
                .interpolate(env)
                .map_err(|error| format!("api_key: {error}"))?;
        }
        Ok(spec)
    }
}

impl SinkSpec {
    fn interpolate(&self, env: impl Fn(&str) -> Option<String>) -> Result<SinkSpec, String> {
        let mut spec = self.clone();
        match &mut spec {
            SinkSpec::Webhook {
                secret: Some(secret),
                ..
            } => {
                *secret = secret
                    .interpolate(env)
                    .map_err(|error| format!("secret: {error}"))?;
            }
            SinkSpec::Pgvector { dsn: Some(dsn), .. } => {
                *dsn = dsn
                    .interpolate(env)
                    .map_err(|error| format!("dsn: {error}"))?;
            }
            SinkSpec::Qdrant {
                api_key: Some(key), ..
            } => {
                *key = key
                    .interpolate(env)
                    .map_err(|error| format!("api_key: {error}"))?;
            }
            _ => {}
        }
        Ok(spec)
    }
}

/// The shared `kind` block (`[embedders.NAME]`, `[sinks.NAME]`) a pipeline names, its secrets
/// read by `interpolate`; the default when the pipeline names none.
fn shared_block<T: Default>(
    blocks: &BTreeMap<String, T>,
    name: Option<&str>,
    kind: &str,
    interpolate: impl Fn(&T) -> Result<T, String>,
) -> Result<T, String> {
    let Some(name) = name else {
        return Ok(T::default());
    };
    let Some(block) = blocks.get(name) else {
        return Err(format!(
            "{kind} {name:?} is not defined; add a [{kind}s.{name}] table"
        ));
    };
    interpolate(block).map_err(|message| format!("{kind}s.{name}.{message}"))
}

/// Where relative paths in a file at `path` are taken from.
pub fn folder_of(path: &Path) -> PathBuf {
    path.parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "PG_PASSWORD" => Some("s3cr3t".into()),
            "QDRANT_KEY" => Some("qk".into()),
            _ => None,
        }
    }

    fn parse(text: &str) -> Result<ConfigFile, ConfigError> {
        ConfigFile::parse(text, "pgstream.toml", Path::new("/etc/pgstream"), env)
    }

    const TWO_TENANTS: &str = r#"
[sources.app]
dsn = "postgresql://pgstream:${PG_PASSWORD}@db/app"

[embedders.minilm]
kind = "minilm"
threads = 2

[sinks.qdrant]
kind = "qdrant"
url = "http://qdrant:6334"
api_key = "${QDRANT_KEY}"

[[pipeline]]
name = "tenant_a"
source = "app"
tables = ["tenant_a.documents"]
plugin = "a.wasm"
embedder = "minilm"
sink = "qdrant"
collection = "tenant_a"
batch_size = 200

[[pipeline]]
name = "tenant_b"
source = "app"
tables = ["tenant_b.documents"]
plugin = "/plugins/b.wasm"
collection = "tenant_b.embeddings"
"#;

    #[test]
    fn shared_blocks_are_resolved_into_each_pipeline() {
        let file = parse(TWO_TENANTS).unwrap();
        let [a, b] = &file.pipelines[..] else {
            panic!("two pipelines expected");
        };
        assert_eq!(a.source.dsn.expose(), "postgresql://pgstream:s3cr3t@db/app");
        assert_eq!(a.plugin, Path::new("/etc/pgstream/a.wasm"));
        assert_eq!(a.batch_size, 200);
        assert_eq!(
            a.embedder,
            EmbedderSpec::Minilm {
                model_dir: None,
                threads: Some(2)
            }
        );
        let SinkSpec::Qdrant { api_key, url, .. } = &a.sink else {
            panic!("qdrant sink expected");
        };
        assert_eq!(url, "http://qdrant:6334");
        assert_eq!(api_key.as_ref().map(Secret::expose), Some("qk"));
        // Defaults: the command line's.
        assert_eq!(b.plugin, Path::new("/plugins/b.wasm"));
        assert_eq!(b.batch_size, 1000);
        assert_eq!(b.embedder, EmbedderSpec::default());
        assert_eq!(b.sink, SinkSpec::default());
        assert_eq!(b.slot_name(), "tenant_b");
    }

    #[test]
    fn backfill_is_set_per_pipeline_and_per_table() {
        let text = TWO_TENANTS.replace(
            "tables = [\"tenant_a.documents\"]",
            "tables = [\"tenant_a.documents\", \"tenant_a.audit\"]\nbackfill_tables = { \"tenant_a.audit\" = \"skip\" }",
        ).replace(
            "tables = [\"tenant_b.documents\"]",
            "tables = [\"tenant_b.documents\"]\nbackfill = \"skip\"",
        );
        let file = parse(&text).unwrap();
        let names = |spec: &crate::config::PipelineSpec| -> Vec<String> {
            spec.initial_backfill_tables()
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(names(&file.pipelines[0]), ["tenant_a.documents"]);
        assert!(names(&file.pipelines[1]).is_empty());

        let text = TWO_TENANTS.replace(
            "tables = [\"tenant_b.documents\"]",
            "tables = [\"tenant_b.documents\"]\nbackfill_tables = { \"tenant_b.other\" = \"skip\" }",
        );
        let error = parse(&text).unwrap_err().to_string();
        assert!(
            error.contains("backfill_tables") && error.contains("tenant_b.other is not one of"),
            "{error}"
        );
    }

    #[test]
    fn on_failure_and_the_dead_letter_database_are_set_per_pipeline() {
        use crate::dead_letter::OnFailure;
        let text = TWO_TENANTS.replace(
            "tables = [\"tenant_a.documents\"]",
            "tables = [\"tenant_a.documents\"]\non_failure = \"dead-letter\"\n\
             dead_letter_dsn = \"postgresql://dlq:${PG_PASSWORD}@dlq/letters\"",
        );
        let file = parse(&text).unwrap();
        let (a, b) = (&file.pipelines[0], &file.pipelines[1]);
        assert_eq!(a.on_failure, OnFailure::DeadLetter);
        assert!(a.dead_letter_dsn.as_ref().is_some_and(|dsn| {
            dsn.expose().starts_with("postgresql://dlq:") && !dsn.expose().contains('$')
        }));
        assert_eq!(b.on_failure, OnFailure::Stop, "the default");
        assert!(b.dead_letter_dsn.is_none());

        let text = TWO_TENANTS.replace(
            "tables = [\"tenant_a.documents\"]",
            "tables = [\"tenant_a.documents\"]\non_failure = \"skip\"",
        );
        let error = parse(&text).unwrap_err().to_string();
        assert!(
            error.contains("skip") && error.contains("dead-letter"),
            "{error}"
        );
    }

    #[test]
    fn an_unknown_key_is_named_with_its_line_and_no_secret_is_quoted() {
        let text = TWO_TENANTS.replace("batch_size = 200", "batch_sise = 200");
        let error = parse(&text).unwrap_err();
        let [problem] = &error.problems[..] else {
            panic!("one problem expected: {error}");
        };
        let line = text
            .lines()
            .position(|line| line.starts_with("batch_sise"))
            .unwrap()
            + 1;
        assert_eq!(problem.location, format!("pgstream.toml:{line}"));
        assert!(problem.message.contains("batch_sise"), "{problem}");

        let text = TWO_TENANTS
            .replace("dsn = ", "dns = ")
            .replace("${PG_PASSWORD}", "hunter2");
        let error = parse(&text).unwrap_err().to_string();
        assert!(error.contains("pgstream.toml:3"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn every_problem_is_listed() {
        let text = format!(
            "{TWO_TENANTS}
[[pipeline]]
name = \"tenant_a\"
source = \"nowhere\"
tables = [\"x\"]
plugin = \"x.wasm\"

[[pipeline]]
name = \"Tenant-C\"
source = \"app\"
tables = [\"tenant_b.documents\"]
plugin = \"c.wasm\"
collection = \"tenant_b.embeddings\"
batch_size = 0
sink = \"missing\"

[[pipeline]]
name = \"tenant_d\"
source = \"app\"
slot = \"tenant_a\"
tables = [\"tenant_d.documents\"]
plugin = \"d.wasm\"
collection = \"tenant_b.embeddings\"
"
        );
        let error = parse(&text).unwrap_err();
        let messages: Vec<String> = error.problems.iter().map(ToString::to_string).collect();
        let has = |needle: &str| messages.iter().any(|message| message.contains(needle));
        assert!(has("source \"nowhere\" is not defined"), "{messages:#?}");
        assert!(has("sink \"missing\" is not defined"), "{messages:#?}");
        assert!(has("both use slot \"tenant_a\""), "{messages:#?}");
        assert!(
            has("\"tenant_b\" and \"tenant_d\" both write pgvector tenant_b.embeddings"),
            "{messages:#?}"
        );
        assert_eq!(messages.len(), 4, "{messages:#?}");

        let text = TWO_TENANTS.replace("batch_size = 200", "batch_size = 0\nslot = \"Bad-Slot\"");
        let error = parse(&text).unwrap_err().to_string();
        assert!(
            error.contains("pipeline tenant_a: batch_size: must be at least 1"),
            "{error}"
        );
        assert!(
            error.contains("pipeline tenant_a: slot: invalid replication slot name \"Bad-Slot\""),
            "{error}"
        );
    }

    #[test]
    fn a_missing_environment_variable_is_named_and_the_secret_is_not() {
        let text = TWO_TENANTS.replace("${PG_PASSWORD}", "${PG_PASSWORD_TYPO}");
        let error = parse(&text).unwrap_err().to_string();
        assert!(
            error.contains("sources.app.dsn: environment variable PG_PASSWORD_TYPO is not set"),
            "{error}"
        );
    }

    #[test]
    fn interpolation_replaces_every_variable_and_refuses_bad_ones() {
        let secret = Secret::new("a${PG_PASSWORD}b${QDRANT_KEY}");
        assert_eq!(secret.interpolate(env).unwrap().expose(), "as3cr3tbqk");
        assert!(Secret::new("${PG_PASSWORD").interpolate(env).is_err());
        assert!(Secret::new("${}").interpolate(env).is_err());
        assert_eq!(
            Secret::new("plain").interpolate(env).unwrap().expose(),
            "plain"
        );
    }
}
