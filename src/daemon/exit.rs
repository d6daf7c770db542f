//! The daemon's exit statuses, in one place. Every error variant is matched by name, so a new
//! variant cannot slip into a status by default: 78 (sysexits EX_CONFIG) for what the
//! configuration names and a restart would not fix, 1 for the host (a camera that is not there
//! yet, a file system that refuses), which systemd may retry.

use crate::core::model::ModelError;
use crate::daemon::check::ConfigError;
use crate::daemon::classify::ClassifyError;
use crate::daemon::mqtt::MqttError;
use crate::daemon::pipeline::StartError;
use crate::daemon::publish::SinkError;
use crate::daemon::segment::VerifierError;
use crate::daemon::source::SourceError;
use crate::daemon::source::camera::CameraError;

/// sysexits EX_CONFIG: the configuration (or a model it names) cannot be used.
pub const CONFIG: u8 = 78;
/// Anything else: the host, a device, a file system.
pub const FAILURE: u8 = 1;

/// Every configuration problem is a config problem.
pub fn of_config(e: &ConfigError) -> u8 {
    match e {
        ConfigError::Read { .. } | ConfigError::Parse { .. } | ConfigError::Invalid { .. } => {
            CONFIG
        }
    }
}

/// The status for a pipeline that could not start.
pub fn of_start(e: &StartError) -> u8 {
    match e {
        StartError::Source(s) => of_source(s),
        StartError::Classifier(ClassifyError::Model(m)) => of_model(m),
        StartError::Classifier(ClassifyError::Unsuitable { .. }) => CONFIG,
        StartError::Verifier(VerifierError::Model(m)) => of_model(m),
        StartError::Verifier(VerifierError::NoHeadClass { .. }) => CONFIG,
        StartError::Sink(s) => of_sink(s),
    }
}

fn of_source(e: &SourceError) -> u8 {
    match e {
        SourceError::List(_) | SourceError::Montage { .. } => CONFIG,
        SourceError::Camera(c) => match c {
            // Not plugged in yet, or gone: systemd retries.
            CameraError::NotFound(_)
            | CameraError::Disconnected(_)
            | CameraError::Format(_)
            | CameraError::Incomplete(_) => FAILURE,
        },
    }
}

fn of_sink(e: &SinkError) -> u8 {
    match e {
        SinkError::File { .. } | SinkError::Bind { .. } => FAILURE,
        // Files the config names for the broker: fixing them is a config change.
        SinkError::Mqtt(MqttError::Credentials { .. } | MqttError::Tls { .. }) => CONFIG,
        SinkError::Mqtt(MqttError::Spawn(_)) => FAILURE,
    }
}

fn of_model(e: &ModelError) -> u8 {
    match e {
        ModelError::RuntimeNotFound
        | ModelError::RuntimeLoad { .. }
        | ModelError::Read { .. }
        | ModelError::Session { .. }
        | ModelError::NoMetadata { .. }
        | ModelError::BadSpec { .. }
        | ModelError::GraphMismatch { .. }
        | ModelError::Provider { .. } => CONFIG,
        ModelError::Run(_) => FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn config_problems_exit_78_and_host_problems_1() {
        let unsuitable = StartError::Classifier(ClassifyError::Unsuitable {
            model: PathBuf::from("m.onnx"),
            reason: "no normal class".into(),
        });
        assert_eq!(of_start(&unsuitable), CONFIG);
        let missing = StartError::Verifier(VerifierError::Model(ModelError::RuntimeNotFound));
        assert_eq!(of_start(&missing), CONFIG);
        let camera = StartError::Source(SourceError::Camera(CameraError::NotFound("0".into())));
        assert_eq!(of_start(&camera), FAILURE);
        let e = crate::daemon::check::invalid("a", "b");
        assert_eq!(of_config(&e), CONFIG);
    }
}
