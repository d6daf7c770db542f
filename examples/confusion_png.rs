//! Draws a metrics JSON's pooled cross-validation confusion matrix as the trainer does, for a
//! card whose cross-validation ran apart from its final model (`--no-final`, then the final
//! model alone): `cargo run --release --features train --example confusion_png -- METRICS.json
//! OUT.png TITLE`.

use std::path::Path;
use std::process::ExitCode;

use spermscope::offline::metrics::Scores;
use spermscope::offline::train::plot;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [metrics, out, title] = args.as_slice() else {
        eprintln!("usage: confusion_png METRICS.json OUT.png TITLE");
        return ExitCode::from(2);
    };
    let result = std::fs::read_to_string(metrics)
        .map_err(|e| format!("cannot read {metrics}: {e}"))
        .and_then(|text| {
            serde_json::from_str::<serde_json::Value>(&text).map_err(|e| format!("{metrics}: {e}"))
        })
        .and_then(|json| {
            let pooled = &json["cv"]["pooled"];
            let classes = serde_json::from_value::<Vec<String>>(pooled["classes"].clone());
            let confusion = serde_json::from_value::<Vec<Vec<usize>>>(pooled["confusion"].clone());
            match (classes, confusion) {
                (Ok(c), Ok(m)) => Ok(Scores::from_confusion(&c, m)),
                (Err(e), _) | (_, Err(e)) => Err(format!(
                    "{metrics}: no cross-validation to draw (cv.pooled): {e}"
                )),
            }
        })
        .and_then(|scores| {
            plot::confusion(
                &scores,
                &format!("{title} (cross-validation, pooled)"),
                Path::new(out),
            )
            .map_err(|e| format!("cannot draw {out}: {e}"))
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("confusion_png: {e}");
            ExitCode::FAILURE
        }
    }
}
