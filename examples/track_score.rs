//! Scores the tracker on the `svia-sequence` video (45 unstained low-magnification frames of
//! swimming sperm): the daemon's head finding and tracking run frame by frame, and the tracks
//! are judged against `boxes.csv`. The boxes carry no identities, so the true trajectories are
//! made by linking each frame's sperm boxes to the next frame's (minimum total centroid
//! distance, at most 12 px); an id switch is a change of track id along a true trajectory.
//!
//!   cargo run --release --example track_score [-- SVIA_DIR UM_PER_PX]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use pathfinding::kuhn_munkres::kuhn_munkres_min;
use pathfinding::matrix::Matrix;
use spermscope::core::imageio;
use spermscope::core::pose::Contrast;
use spermscope::core::register::Registrar;
use spermscope::daemon::check::Base;
use spermscope::daemon::segment::{RawSegment, segment_frame};
use spermscope::daemon::track::{RawTrack, Tracker};

type Box4 = [f32; 4];

fn centre(b: &Box4) -> (f32, f32) {
    ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0)
}

/// Minimum-total-distance pairs (a, b) no farther apart than `gate`.
fn pairs(a: &[(f32, f32)], b: &[(f32, f32)], gate: f32) -> Vec<(usize, usize)> {
    if a.is_empty() || b.is_empty() {
        return Vec::new();
    }
    let t = a.len() > b.len();
    let (r, c) = if t { (b, a) } else { (a, b) };
    let far = (gate * 100.0) as i64 * 4 + 1;
    let cost = |i: usize, j: usize| {
        let d = (r[i].0 - c[j].0).hypot(r[i].1 - c[j].1);
        if d <= gate { (d * 100.0) as i64 } else { far }
    };
    let mut m = Matrix::new(r.len(), c.len(), 0i64);
    for i in 0..r.len() {
        for j in 0..c.len() {
            m[(i, j)] = cost(i, j);
        }
    }
    let (_, to) = kuhn_munkres_min(&m);
    to.iter()
        .enumerate()
        .filter(|&(i, &j)| cost(i, j) < far)
        .map(|(i, &j)| if t { (j, i) } else { (i, j) })
        .collect()
}

/// The sperm boxes (label `S`) of each frame.
fn read_truth(root: &std::path::Path) -> std::io::Result<BTreeMap<String, Vec<Box4>>> {
    let text = std::fs::read_to_string(root.join("boxes.csv"))?;
    let mut truth: BTreeMap<String, Vec<Box4>> = BTreeMap::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() == 6 && f[1] == "S" {
            let n = |i: usize| f[i].parse::<f32>().unwrap_or(0.0);
            truth
                .entry(f[0].to_string())
                .or_default()
                .push([n(2), n(3), n(4), n(5)]);
        }
    }
    Ok(truth)
}

/// True trajectories, built frame by frame by linking each box to the last frame's.
#[derive(Default)]
struct Trajectories {
    next: usize,
    last: Vec<(f32, f32)>,
    last_ids: Vec<usize>,
}

impl Trajectories {
    /// The trajectory of each of this frame's box centres.
    fn link(&mut self, gt: &[(f32, f32)]) -> Vec<usize> {
        let mut ids = vec![usize::MAX; gt.len()];
        for (p, g) in pairs(&self.last, gt, 12.0) {
            ids[g] = self.last_ids[p];
        }
        for t in ids.iter_mut().filter(|t| **t == usize::MAX) {
            *t = self.next;
            self.next += 1;
        }
        self.last = gt.to_vec();
        self.last_ids = ids.clone();
        ids
    }
}

/// What the run measured.
#[derive(Default)]
struct Tally {
    found: usize,
    matched: usize,
    boxes: usize,
    /// Track ids along each true trajectory, frame by frame.
    along: BTreeMap<usize, Vec<u64>>,
    /// Frames per track.
    lengths: BTreeMap<u64, usize>,
}

fn print(t: &Tally, frames: usize, um: f32, trajectories: usize) {
    let switches: usize = t
        .along
        .values()
        .map(|ids| ids.windows(2).filter(|w| w[0] != w[1]).count())
        .sum();
    let followed = t.along.values().filter(|ids| ids.len() >= 2).count();
    let kept = t
        .along
        .values()
        .filter(|ids| ids.len() >= 2 && ids.iter().collect::<BTreeSet<_>>().len() == 1)
        .count();
    let mut len: Vec<usize> = t.lengths.values().copied().collect();
    len.sort_unstable();
    let q = |p: f64| {
        len.get(((len.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or(0)
    };
    println!(
        "svia-sequence: {frames} frames at {um} µm/px; {} true sperm boxes, {trajectories} true trajectories",
        t.boxes
    );
    println!(
        "head finding: {} detections, {} on a true box (precision {:.3}, recall {:.3})",
        t.found,
        t.matched,
        t.matched as f64 / t.found.max(1) as f64,
        t.matched as f64 / t.boxes.max(1) as f64
    );
    println!(
        "tracks: {}, frames per track: median {}, quartiles {}-{}, longest {}; {} tracks of 10+ frames",
        len.len(),
        q(0.5),
        q(0.25),
        q(0.75),
        q(1.0),
        len.iter().filter(|&&l| l >= 10).count()
    );
    println!(
        "identity: {switches} id switches along {followed} true trajectories matched in 2+ frames; {kept} kept one id throughout"
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let root = PathBuf::from(
        args.get(1)
            .map_or("../shared/datasets/svia-sequence", String::as_str),
    );
    let um: f32 = args.get(2).map_or(Ok(0.3), |s| s.parse())?;
    let truth = read_truth(&root)?;
    let segment = RawSegment {
        contrast: Contrast::Any,
        verify: false,
        ..RawSegment::default()
    };
    let (seg, _) = segment.resolve(um, Base(None))?;
    let mut tracker = Tracker::new(&RawTrack::default().resolve()?, um);
    let registrar = Registrar::default();
    let mut previous = None;
    let mut trajectories = Trajectories::default();
    let mut t = Tally::default();
    let frames = imageio::list_files(&root.join("frames"))?;
    for (k, path) in frames.iter().enumerate() {
        let img = imageio::load_rgb(path)?;
        let spectrum = registrar.spectrum(&img);
        let motion = previous.as_ref().map(|p| registrar.motion(p, &spectrum));
        previous = Some(spectrum);
        let mut cells = segment_frame(&img, &seg, None, um).cells;
        tracker.step(k as u64 + 1, &mut cells, motion);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let gt: Vec<(f32, f32)> = truth
            .get(&name)
            .map_or(Vec::new(), |b| b.iter().map(centre).collect());
        let traj = trajectories.link(&gt);
        // Detections against the true boxes (centroid within 8 px of the box centre).
        let det: Vec<(f32, f32)> = cells.iter().map(|c| c.centroid).collect();
        for c in &cells {
            *t.lengths.entry(c.track.unwrap_or(0)).or_default() += 1;
        }
        let m = pairs(&gt, &det, 8.0);
        t.found += det.len();
        t.matched += m.len();
        t.boxes += gt.len();
        for (g, d) in m {
            if let Some(id) = cells[d].track {
                t.along.entry(traj[g]).or_default().push(id);
            }
        }
    }
    print(&t, frames.len(), um, trajectories.next);
    Ok(())
}
