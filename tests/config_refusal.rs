//! A bad config or an unusable model stops `spermscope` before any frame is read, with exit
//! status 78 and a message naming what was wrong; good configs validate with exit 0.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_spermscope"))
}

/// Run `validate` and `run` on a config; both must refuse it with 78 and name `needle`.
fn refused(dir: &Path, toml: &str, needle: &str) {
    let cfg = dir.join("c.toml");
    std::fs::write(&cfg, toml).unwrap();
    for cmd in ["validate", "run"] {
        let out = bin().arg(cmd).arg("--config").arg(&cfg).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{cmd}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{cmd}: '{needle}' not in: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{cmd} published something");
    }
}

fn frames() -> String {
    common::dataset("sperm-parsing/val/frames")
        .display()
        .to_string()
}

#[test]
fn bad_configs_and_models_exit_78_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = format!("[source.replay]\npath = \"{}\"\n", frames());
    refused(d, &format!("{src}[segment]\nmin_area = 5\n"), "min_area");
    refused(
        d,
        &format!("{src}[classify]\nmax_batch = 0\n"),
        "classify.max_batch",
    );
    refused(
        d,
        &format!("{src}[source]\num_per_px = -1\n"),
        "source.um_per_px",
    );
    refused(
        d,
        &format!("{src}[classify]\nprovider = \"tpu\"\n"),
        "provider",
    );
    refused(d, "[source]\nkind = \"replay\"\n", "source.replay.path");
    refused(
        d,
        &format!("{src}[publish]\nsocket = \"tcp:10.0.0.1\"\n"),
        "publish.socket",
    );
    refused(
        d,
        "[source.replay]\npath = \"/nonexistent/frames\"\n",
        "/nonexistent/frames",
    );
    refused(
        d,
        &format!("{src}[classify]\nmodel = \"missing.onnx\"\n"),
        "missing.onnx",
    );
    std::fs::write(d.join("junk.onnx"), b"not a model at all").unwrap();
    refused(
        d,
        &format!("{src}[classify]\nmodel = \"junk.onnx\"\n"),
        "junk.onnx",
    );
    refused(
        d,
        &format!("{src}[report]\nnormal_class = \"perfect\"\n"),
        "perfect",
    );
    let out = bin()
        .arg("run")
        .arg("--config")
        .arg(d.join("absent.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    // The replay command refuses bad flags' configs the same way.
    let out = bin()
        .args(["replay", "/nonexistent/frames"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
}

#[test]
fn good_configs_validate() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
    let out = common::run_ok(bin().arg("validate").arg("--config").arg(&example));
    assert!(String::from_utf8_lossy(&out.stdout).contains("smids-3class"));
    let scale_warning = "does not name the pixel scale of its training images";
    assert!(!String::from_utf8_lossy(&out.stderr).contains(scale_warning));

    // A model whose spec does not say its training scale validates, with a warning that says
    // so, until classify.model_um_per_px gives it.
    let dir = tempfile::tempdir().unwrap();
    let mhsma = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/mhsma-head.onnx");
    for (extra, warned) in [("", true), ("model_um_per_px = 0.1\n", false)] {
        let cfg = dir.path().join("mhsma.toml");
        std::fs::write(
            &cfg,
            format!(
                "[source.replay]\npath = \"{}\"\n[classify]\nmodel = \"{}\"\n{extra}",
                common::dataset("sperm-parsing/val/frames").display(),
                mhsma.display()
            ),
        )
        .unwrap();
        let out = common::run_ok(bin().arg("validate").arg("--config").arg(&cfg));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.contains(scale_warning), warned, "{extra}: {err}");
        if warned {
            assert!(
                err.contains("WARN") && err.contains("classify.model_um_per_px"),
                "{err}"
            );
        }
    }
}
