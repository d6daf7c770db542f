//! The daemon's configuration file in two phases: the raw TOML (each section's struct lives with
//! the component that owns it, and checks itself without I/O), then the resolved settings,
//! split by how they may change: process-wide, restart-only, and reloadable. Start-up,
//! `validate` and reload all come through `RawConfig::load` and `resolve_all`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::core::model::RuntimeOptions;
use crate::daemon::check::{Base, invalid, positive};
use crate::daemon::classify::{ClassifySettings, RawClassify};
use crate::daemon::publish::{PublishSettings, RawPublish};
use crate::daemon::report::{RawReport, ReportOutput, ReportRules};
use crate::daemon::segment::{RawSegment, SegmentSettings, VerifierSettings};
use crate::daemon::service::{RawService, ServiceSettings};
use crate::daemon::source::{RawSource, SourceSettings};
use crate::daemon::track::{RawTrack, TrackSettings};

pub use crate::daemon::check::ConfigError;

/// The whole file as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub sample: RawSample,
    pub source: RawSource,
    pub segment: RawSegment,
    pub track: RawTrack,
    pub classify: RawClassify,
    pub publish: RawPublish,
    pub report: RawReport,
    pub pipeline: RawPipeline,
    pub service: RawService,
    /// Several microscopes on one host: each entry is its own pipeline with its own sample id,
    /// source, records and report; the other sections are shared. When any are listed, the
    /// top-level `[sample]` and `[source]` are not used.
    pub microscopes: Vec<RawMicroscope>,
}

/// One microscope of several.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMicroscope {
    /// Sample id of this microscope's records and report.
    pub sample: String,
    /// Its frame source (the keys of `[source]`).
    #[serde(default)]
    pub source: RawSource,
    /// Append its records to this JSON Lines file.
    pub records_file: Option<PathBuf>,
    /// Serve its records on this socket (`unix:`, or `tcp:` on loopback; see `[publish]`).
    pub socket: Option<String>,
    /// Write its sample report as JSON here.
    pub report_file: Option<PathBuf>,
    /// Write its run figures as JSON here.
    pub summary_file: Option<PathBuf>,
}

/// `[sample]`: the sample being analysed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSample {
    /// Sample id written into every record and the report.
    pub id: String,
}

impl Default for RawSample {
    fn default() -> Self {
        Self {
            id: "sample".into(),
        }
    }
}

/// `[pipeline]`: the wiring's own keys (queues between stages, status lines).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPipeline {
    /// Frames each channel between stages holds.
    pub queue_frames: usize,
    /// Seconds between status lines in the log.
    pub status_interval_secs: f32,
    /// Threads that find heads in frames side by side (each with its own head verifier); the
    /// frames stay in order. 1: one thread.
    pub workers: usize,
}

impl Default for RawPipeline {
    fn default() -> Self {
        Self {
            queue_frames: 4,
            status_interval_secs: 10.0,
            workers: 2,
        }
    }
}

/// The wiring's resolved settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PipelineSettings {
    pub queue_frames: usize,
    pub status_interval_secs: f32,
    pub workers: usize,
}

/// What one process shares across its pipelines: the service endpoints and the ONNX Runtime
/// library (loaded once).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProcessSettings {
    pub service: ServiceSettings,
    pub ort_dylib_path: Option<PathBuf>,
}

/// What a reload cannot change: the pipeline's shape, its source, head finding and sinks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RestartSettings {
    pub sample_id: String,
    pub source: SourceSettings,
    pub segment: SegmentSettings,
    pub verifier: Option<VerifierSettings>,
    pub track: TrackSettings,
    pub publish: PublishSettings,
    pub report: ReportOutput,
    pub pipeline: PipelineSettings,
}

/// What a reload applies between two batches: the classifier and how cells are judged.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReloadSettings {
    pub classify: ClassifySettings,
    pub report: ReportRules,
}

/// Everything one pipeline runs on, resolved from a `RawConfig`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settings {
    pub process: ProcessSettings,
    pub restart: RestartSettings,
    pub reload: ReloadSettings,
}

impl Settings {
    pub fn sample_id(&self) -> &str {
        &self.restart.sample_id
    }

    /// How models are loaded: the process's runtime library, the classifier's provider and
    /// threads (the verifier runs the same way).
    pub fn runtime(&self) -> RuntimeOptions {
        RuntimeOptions {
            ort_dylib_path: self.process.ort_dylib_path.clone(),
            provider: self.reload.classify.provider,
            threads: self.reload.classify.threads,
        }
    }

    /// The settings that differ in `new` but only take effect after a restart, named by their
    /// path (`restart.segment.min_area_px`); empty when a reload applies everything.
    pub fn restart_changes(&self, new: &Settings) -> Vec<String> {
        let mut out = Vec::new();
        if self.process != new.process {
            changed_keys(
                "process",
                &json(&self.process),
                &json(&new.process),
                &mut out,
            );
        }
        if self.restart != new.restart {
            changed_keys(
                "restart",
                &json(&self.restart),
                &json(&new.restart),
                &mut out,
            );
        }
        out
    }
}

fn json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// Dotted paths of the leaves that differ between two JSON values.
fn changed_keys(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let (va, vb) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                changed_keys(&format!("{prefix}.{k}"), va, vb, out);
            }
        }
        _ if a != b => out.push(prefix.to_string()),
        _ => {}
    }
}

impl RawConfig {
    /// Parse TOML text; unknown keys and wrong types are refused with their name.
    pub fn parse(text: &str, origin: &Path) -> Result<RawConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            reason: e.to_string().trim().replace('\n', " "),
        })
    }

    /// Read and parse a file.
    pub fn load(path: &Path) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, path)
    }

    /// One `Settings` per pipeline: the `[[microscopes]]` entries, or the single top-level
    /// source. Sample ids, record files, sockets and report files must not be shared. A
    /// replayed OME-TIFF stack's frame scale is read first (`RawSource::settle_scale`).
    pub fn resolve_all(&self, base: Option<&Path>) -> Result<Vec<Settings>, ConfigError> {
        if self.microscopes.is_empty() {
            let mut one = self.clone();
            one.source.settle_scale(Base(base));
            return Ok(vec![one.resolve(base)?]);
        }
        let mut out: Vec<Settings> = Vec::new();
        for m in &self.microscopes {
            let mut one = self.clone();
            one.microscopes.clear();
            one.sample.id = m.sample.clone();
            one.source = m.source.clone();
            one.source.settle_scale(Base(base));
            one.publish.file = m.records_file.clone();
            one.publish.socket = m.socket.clone();
            one.publish.stdout = false;
            one.report.file = m.report_file.clone();
            one.report.summary_file = m.summary_file.clone();
            let s = one.resolve(base)?;
            let a = &s.restart;
            let clash = out.iter().map(|o| &o.restart).any(|o| {
                o.sample_id == a.sample_id
                    || (o.publish.file.is_some() && o.publish.file == a.publish.file)
                    || (o.publish.socket.is_some() && o.publish.socket == a.publish.socket)
                    || (o.report.file.is_some() && o.report.file == a.report.file)
            });
            if clash {
                return Err(invalid(
                    "microscopes",
                    format!(
                        "microscope '{}' shares its sample id, records file, socket or report file with another",
                        m.sample
                    ),
                ));
            }
            out.push(s);
        }
        Ok(out)
    }

    /// These settings with a replay of `path` as the source (the embedded defaults name none):
    /// for tools that read frames themselves but need the rest of the settings.
    pub fn resolve_with_replay(&self, path: &Path) -> Result<Settings, ConfigError> {
        let mut raw = self.clone();
        raw.source
            .replay
            .path
            .get_or_insert_with(|| path.to_path_buf());
        raw.resolve(None)
    }

    /// Check every value; no I/O. `base` is the folder relative paths are taken from (the
    /// config file's folder); `None` for the embedded defaults.
    pub fn resolve(&self, base: Option<&Path>) -> Result<Settings, ConfigError> {
        let base = Base(base);
        let id = &self.sample.id;
        if id.trim().is_empty() {
            return Err(invalid("sample.id", "must not be empty"));
        }
        if id.chars().any(char::is_control) {
            return Err(invalid("sample.id", "must not hold control characters"));
        }
        let source = self.source.resolve(base)?;
        let (segment, verifier) = self.segment.resolve(source.um_per_px, base)?;
        let (classify, ort_dylib_path) = self.classify.resolve(base)?;
        let (report_output, report_rules) = self.report.resolve(base)?;
        let q = &self.pipeline;
        if q.queue_frames == 0 || q.queue_frames > 1024 {
            return Err(invalid("pipeline.queue_frames", "must lie in 1..=1024"));
        }
        positive("pipeline.status_interval_secs", q.status_interval_secs)?;
        if q.workers == 0 || q.workers > 64 {
            return Err(invalid("pipeline.workers", "must lie in 1..=64"));
        }
        Ok(Settings {
            process: ProcessSettings {
                service: self.service.resolve()?,
                ort_dylib_path,
            },
            restart: RestartSettings {
                sample_id: id.clone(),
                source,
                segment,
                verifier,
                track: self.track.resolve()?,
                publish: self.publish.resolve(base)?.for_sample(id)?,
                report: report_output,
                pipeline: PipelineSettings {
                    queue_frames: q.queue_frames,
                    status_interval_secs: q.status_interval_secs,
                    workers: q.workers,
                },
            },
            reload: ReloadSettings {
                classify,
                report: report_rules,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::source::Input;

    fn with_replay(extra: &str) -> String {
        format!("[source.replay]\npath = \"frames\"\n{extra}")
    }

    #[test]
    fn defaults_resolve_to_the_segmenter_defaults() {
        let raw = RawConfig::parse(&with_replay(""), Path::new("t.toml")).unwrap();
        let s = raw.resolve(Some(Path::new("/etc/x"))).unwrap();
        let d = SegmentSettings::default();
        let seg = &s.restart.segment;
        assert_eq!(seg.open_radius_px, d.open_radius_px);
        assert!((seg.min_area_px as i64 - d.min_area_px as i64).abs() <= 3);
        assert!((seg.max_area_px as i64 - d.max_area_px as i64).abs() <= 40);
        match &s.restart.source.input {
            Input::Replay { path, .. } => assert_eq!(path, Path::new("/etc/x/frames")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = RawConfig::parse("[segment]\nmin_area = 3\n", Path::new("t.toml")).unwrap_err();
        assert!(e.to_string().contains("min_area"), "{e}");
        let raw = RawConfig::parse(
            &with_replay("[classify]\nuncertain_below = 1.5\n"),
            Path::new("t.toml"),
        )
        .unwrap();
        let e = raw.resolve(None).unwrap_err();
        assert!(e.to_string().contains("classify.uncertain_below"), "{e}");
        let raw = RawConfig::parse(
            &with_replay("[publish]\nsocket = \"tcp:0.0.0.0\"\n"),
            Path::new("t.toml"),
        )
        .unwrap();
        let e = raw.resolve(None).unwrap_err();
        assert!(e.to_string().contains("publish.socket"), "{e}");
        let raw = RawConfig::parse("", Path::new("t.toml")).unwrap();
        let e = raw.resolve(None).unwrap_err();
        assert!(e.to_string().contains("source.replay.path"), "{e}");
    }

    #[test]
    fn example_config_parses_and_resolves() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
        let raw = RawConfig::load(&path).unwrap();
        raw.resolve(path.parent()).unwrap();
    }

    #[test]
    fn a_reload_names_exactly_the_keys_that_need_a_restart() {
        let parse = |extra: &str| {
            RawConfig::parse(&with_replay(extra), Path::new("t.toml"))
                .unwrap()
                .resolve(None)
                .unwrap()
        };
        let old = parse("");
        // Reloadable changes only.
        let new = parse("[classify]\nuncertain_below = 0.7\n[report]\nmin_cells = 300\n");
        assert!(old.restart_changes(&new).is_empty());
        assert_ne!(old.reload, new.reload);
        // Restart-only changes are named.
        let new = parse("[segment]\nmin_solidity = 0.7\n[service]\nstall_secs = 3\n");
        assert_eq!(
            old.restart_changes(&new),
            vec![
                "process.service.stall_secs".to_string(),
                "restart.segment.min_solidity".to_string()
            ]
        );
    }
}
