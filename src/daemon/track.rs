//! One sperm, one count: each head is followed across frames so that a cell seen in many
//! frames (a camera watching one field, a swimming sperm in a video) is one cell in the report.
//!
//! The track stage gives every head a `track` id. Heads are associated with tracks by a
//! minimum-cost assignment (Hungarian, `pathfinding`) on the distance between each track's
//! predicted position and the head, within `track.max_jump_um`. The prediction is the track's
//! last position moved by its own velocity (constant-velocity, SORT-style, for motile cells) and
//! by the frame's global shift (stage drift: the median displacement of a first, looser
//! assignment, used only when most of its pairs agree). A track unseen for more than
//! `track.max_missed_frames` frames ends; when the stage moves to a new field (almost nothing
//! matches) every track ends at once. A track's head is classified in at most
//! `track.classify_max_per_track` frames.
//!
//! At the publisher, `Votes` collects each track's detections and, when the track ends, fuses
//! them into one cell record: the mean of the classified frames' calibrated probabilities, the
//! model's uncertain threshold on it, and the median morphometry.

use std::collections::HashMap;

use pathfinding::kuhn_munkres::kuhn_munkres_min;
use pathfinding::matrix::Matrix;
use serde::{Deserialize, Serialize};

use crate::core::calibration::top;
use crate::core::register::Motion;
use crate::daemon::check::{ConfigError, invalid, positive, within};
use crate::daemon::classify::UNCERTAIN;
use crate::daemon::frame::{Cell, ModelRef, Unclassified};
use crate::daemon::publish::{Morphometry, Record, RecordKind};

/// A track id: unique within a sample, counted from 1.
pub type TrackId = u64;

/// `[track]`: following cells across frames.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTrack {
    /// Follow cells across frames. Off: every detection is its own cell (independent still
    /// fields; a replay of such fields gives one track per head either way).
    pub enabled: bool,
    /// A track ends after this many frames in a row without its cell (a missed detection or a
    /// dropped live frame shorter than this does not split it).
    pub max_missed_frames: u32,
    /// Farthest a head may be from its track's predicted position, µm.
    pub max_jump_um: f32,
    /// Classify a cell in at most this many frames; its later detections are published
    /// unclassified (`unclassified = "track_complete"`). 0: every frame.
    pub classify_max_per_track: u32,
    /// Below this height of the frames' phase-correlation peak (1: the same field shifted,
    /// near 0: unrelated images) the stage has moved to a new field: every track ends.
    pub min_field_correlation: f32,
}

impl Default for RawTrack {
    fn default() -> Self {
        Self {
            enabled: true,
            max_missed_frames: 3,
            max_jump_um: 8.0,
            classify_max_per_track: 5,
            min_field_correlation: 0.3,
        }
    }
}

/// The tracker's resolved settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrackSettings {
    pub enabled: bool,
    pub max_missed_frames: u32,
    pub max_jump_um: f32,
    pub classify_max_per_track: u32,
    pub min_field_correlation: f32,
}

impl RawTrack {
    /// Check every value (no I/O).
    pub fn resolve(&self) -> Result<TrackSettings, ConfigError> {
        positive("track.max_jump_um", self.max_jump_um)?;
        within(
            "track.min_field_correlation",
            self.min_field_correlation,
            0.0,
            1.0,
        )?;
        if self.max_missed_frames > 10_000 {
            return Err(invalid("track.max_missed_frames", "must be at most 10000"));
        }
        Ok(TrackSettings {
            enabled: self.enabled,
            max_missed_frames: self.max_missed_frames,
            max_jump_um: self.max_jump_um,
            classify_max_per_track: self.classify_max_per_track,
            min_field_correlation: self.min_field_correlation,
        })
    }
}

/// One followed cell.
#[derive(Debug, Clone)]
struct Track {
    id: TrackId,
    /// Last position, px, moved with the field's global shift since.
    pos: (f32, f32),
    /// Own motion, px per frame.
    vel: (f32, f32),
    last_seq: u64,
    /// The tracker's frame count when last seen (frames dropped before tracking do not count
    /// as missed).
    last_seen: u64,
    /// Detections sent for classification.
    classified: u32,
}

impl Track {
    fn predicted(&self, seq: u64) -> (f32, f32) {
        let dt = seq.saturating_sub(self.last_seq).max(1) as f32;
        (self.pos.0 + self.vel.0 * dt, self.pos.1 + self.vel.1 * dt)
    }
}

/// What tracking did at one frame.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Step {
    /// Tracks that ended at this frame.
    pub ended: Vec<TrackId>,
    /// The field changed: every earlier track ended.
    pub field_change: bool,
    /// The global shift applied to the tracks, px.
    pub shift: (f32, f32),
    /// Detections not sent for classification because their track had enough.
    pub skipped: usize,
}

/// Follows the cells of one sample.
#[derive(Debug)]
pub struct Tracker {
    s: TrackSettings,
    gate_px: f32,
    next_id: TrackId,
    live: Vec<Track>,
    /// Frames tracked so far.
    frames: u64,
}

impl Tracker {
    pub fn new(s: &TrackSettings, um_per_px: f32) -> Self {
        Self {
            s: s.clone(),
            gate_px: s.max_jump_um / um_per_px.max(1e-6),
            next_id: 1,
            live: Vec::new(),
            frames: 0,
        }
    }

    /// Whether cells are followed at all (`track.enabled`).
    pub fn enabled(&self) -> bool {
        self.s.enabled
    }

    /// Tracks alive now.
    pub fn active(&self) -> usize {
        self.live.len()
    }

    /// Tracks started so far: the physical cells seen.
    pub fn started(&self) -> u64 {
        self.next_id - 1
    }

    /// End every track (the source ended or the pipeline stops).
    pub fn end_all(&mut self) -> Vec<TrackId> {
        self.live.drain(..).map(|t| t.id).collect()
    }

    /// Give each head of frame `seq` its track, and say which tracks ended. `motion` is how
    /// the frame lies on the previous one (image registration), when known: a low correlation
    /// peak is a new field, and its shift moves every track.
    pub fn step(&mut self, seq: u64, cells: &mut [Cell], motion: Option<Motion>) -> Step {
        let mut step = Step::default();
        self.frames += 1;
        if !self.s.enabled {
            for c in cells.iter_mut() {
                let id = self.new_track(c, seq);
                step.ended.push(id);
            }
            self.live.clear();
            return step;
        }
        if motion.is_some_and(|m| m.peak < self.s.min_field_correlation) {
            step.field_change = true;
            step.ended = self.end_all();
            for c in cells.iter_mut() {
                self.new_track(c, seq);
            }
        } else {
            let points: Vec<(f32, f32)> = cells.iter().map(|c| c.centroid).collect();
            let coarse = motion.map_or((0.0, 0.0), |m| m.shift);
            let predicted: Vec<(f32, f32)> = self
                .live
                .iter()
                .map(|t| {
                    let p = t.predicted(seq);
                    (p.0 + coarse.0, p.1 + coarse.1)
                })
                .collect();
            // Without registration the heads alone say how the field moved (a loose first
            // look); with it they refine its coarse shift.
            let loose = if motion.is_some() { 1.0 } else { 3.0 };
            let fine = global_shift(&predicted, &points, loose * self.gate_px, self.gate_px);
            step.shift = (coarse.0 + fine.0, coarse.1 + fine.1);
            let shifted: Vec<(f32, f32)> = predicted
                .iter()
                .map(|p| (p.0 + fine.0, p.1 + fine.1))
                .collect();
            let pairs = assign(&shifted, &points, self.gate_px);
            self.follow(seq, cells, &pairs, step.shift, &mut step.ended);
        }
        step.skipped = self.budget(cells);
        step
    }

    /// Move matched tracks to their heads, age the others (ending those unseen too long),
    /// and start a track for each head left over.
    fn follow(
        &mut self,
        seq: u64,
        cells: &mut [Cell],
        pairs: &[(usize, usize)],
        shift: (f32, f32),
        ended: &mut Vec<TrackId>,
    ) {
        let mut matched_cell = vec![None; cells.len()];
        for &(t, c) in pairs {
            matched_cell[c] = Some(t);
        }
        let mut alive = vec![false; self.live.len()];
        for (c, t) in matched_cell.iter().enumerate() {
            let Some(t) = *t else { continue };
            let tr = &mut self.live[t];
            let dt = seq.saturating_sub(tr.last_seq).max(1) as f32;
            let (x, y) = cells[c].centroid;
            let moved = ((x - tr.pos.0 - shift.0) / dt, (y - tr.pos.1 - shift.1) / dt);
            // A light smoothing of the own motion (an alpha filter).
            tr.vel = (
                0.5 * tr.vel.0 + 0.5 * moved.0,
                0.5 * tr.vel.1 + 0.5 * moved.1,
            );
            tr.pos = (x, y);
            tr.last_seq = seq;
            tr.last_seen = self.frames;
            alive[t] = true;
            cells[c].track = Some(tr.id);
        }
        let max_missed = u64::from(self.s.max_missed_frames);
        let mut kept = Vec::with_capacity(self.live.len());
        for (i, mut t) in std::mem::take(&mut self.live).into_iter().enumerate() {
            if alive[i] {
                kept.push(t);
            } else if self.frames - t.last_seen > max_missed {
                ended.push(t.id);
            } else {
                t.pos = (t.pos.0 + shift.0, t.pos.1 + shift.1);
                kept.push(t);
            }
        }
        self.live = kept;
        for (c, m) in matched_cell.iter().enumerate() {
            if m.is_none() {
                self.new_track(&mut cells[c], seq);
            }
        }
    }

    fn new_track(&mut self, c: &mut Cell, seq: u64) -> TrackId {
        let id = self.next_id;
        self.next_id += 1;
        self.live.push(Track {
            id,
            pos: c.centroid,
            vel: (0.0, 0.0),
            last_seq: seq,
            last_seen: self.frames,
            classified: 0,
        });
        c.track = Some(id);
        id
    }

    /// Keep each track's classifications within `classify_max_per_track`; returns how many
    /// heads were left unclassified for it.
    fn budget(&mut self, cells: &mut [Cell]) -> usize {
        let max = self.s.classify_max_per_track;
        let mut skipped = 0;
        for c in cells.iter_mut().filter(|c| c.unclassified.is_none()) {
            let Some(t) = self.live.iter_mut().find(|t| Some(t.id) == c.track) else {
                continue;
            };
            if max > 0 && t.classified >= max {
                c.unclassified = Some(Unclassified::TrackComplete);
                skipped += 1;
            } else {
                t.classified += 1;
            }
        }
        skipped
    }
}

/// Minimum-total-distance pairs (track, head) within `gate` px.
fn assign(tracks: &[(f32, f32)], heads: &[(f32, f32)], gate: f32) -> Vec<(usize, usize)> {
    if tracks.is_empty() || heads.is_empty() {
        return Vec::new();
    }
    // Distances in hundredths of a pixel; pairs beyond the gate cost more than any within.
    let too_far = (gate * 100.0) as i64 * 4 + 1;
    let cost = |t: usize, h: usize| {
        let (a, b) = (tracks[t], heads[h]);
        let d = (a.0 - b.0).hypot(a.1 - b.1);
        if d.is_finite() && d <= gate {
            (d * 100.0) as i64
        } else {
            too_far
        }
    };
    // The solver wants no more rows than columns.
    let transpose = tracks.len() > heads.len();
    let (rows, cols) = if transpose {
        (heads.len(), tracks.len())
    } else {
        (tracks.len(), heads.len())
    };
    let mut m = Matrix::new(rows, cols, 0i64);
    for r in 0..rows {
        for c in 0..cols {
            m[(r, c)] = if transpose { cost(c, r) } else { cost(r, c) };
        }
    }
    let (_, to) = kuhn_munkres_min(&m);
    to.iter()
        .enumerate()
        .map(|(r, &c)| if transpose { (c, r) } else { (r, c) })
        .filter(|&(t, h)| cost(t, h) < too_far)
        .collect()
}

/// The field's shift since the last frame: the median displacement of an assignment within
/// `reach`, when at least three pairs exist and most of them agree with it (within a quarter
/// `gate`); else none. Stage drift moves every head alike; swimming cells do not agree on one
/// displacement.
fn global_shift(tracks: &[(f32, f32)], heads: &[(f32, f32)], reach: f32, gate: f32) -> (f32, f32) {
    let pairs = assign(tracks, heads, reach);
    if pairs.len() < 3 {
        return (0.0, 0.0);
    }
    let d: Vec<(f32, f32)> = pairs
        .iter()
        .map(|&(t, h)| (heads[h].0 - tracks[t].0, heads[h].1 - tracks[t].1))
        .collect();
    let median = |mut v: Vec<f32>| {
        v.sort_by(f32::total_cmp);
        v[v.len() / 2]
    };
    let m = (
        median(d.iter().map(|p| p.0).collect()),
        median(d.iter().map(|p| p.1).collect()),
    );
    let tol = (gate / 4.0).max(2.0);
    let agree = d
        .iter()
        .filter(|p| (p.0 - m.0).hypot(p.1 - m.1) <= tol)
        .count();
    if agree * 10 >= pairs.len() * 6 {
        m
    } else {
        (0.0, 0.0)
    }
}

/// One track's detections as the publisher saw them.
#[derive(Debug, Clone)]
struct Seen {
    frames: u32,
    first_seq: u64,
    last: Record,
    /// The model whose probabilities are summed (a reload mid-track starts the sum again).
    model: Option<ModelRef>,
    probs_sum: Vec<f64>,
    classified: u32,
    sizes: Vec<Morphometry>,
    any_in_view: bool,
    any_apart: bool,
}

/// Collects each track's detections at the publisher and fuses them into one cell record when
/// the track ends.
#[derive(Debug, Default)]
pub struct Votes {
    open: HashMap<TrackId, Seen>,
}

impl Votes {
    /// Tracks with detections not yet fused, in id order.
    pub fn open_tracks(&self) -> Vec<TrackId> {
        let mut ids: Vec<TrackId> = self.open.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Count one published detection record of a track; `model` classified its frame.
    pub fn observe(&mut self, r: &Record, model: Option<&ModelRef>) {
        let Some(id) = r.track else { return };
        let s = self.open.entry(id).or_insert_with(|| Seen {
            frames: 0,
            first_seq: r.frame.seq,
            last: r.clone(),
            model: None,
            probs_sum: Vec::new(),
            classified: 0,
            sizes: Vec::new(),
            any_in_view: false,
            any_apart: false,
        });
        s.frames += 1;
        s.last = r.clone();
        if !r.at_edge {
            s.any_in_view = true;
            s.sizes.push(r.morphometry.clone());
            s.any_apart |= !r.touching;
        }
        let (Some(probs), Some(m)) = (&r.probs, model) else {
            return;
        };
        if s.model.as_ref().map(|x| &x.id) != Some(&m.id) {
            s.model = Some(m.clone());
            s.probs_sum = vec![0.0; m.classes.len()];
            s.classified = 0;
        }
        for (k, class) in m.classes.iter().enumerate() {
            s.probs_sum[k] += f64::from(probs.get(class).copied().unwrap_or(0.0));
        }
        s.classified += 1;
    }

    /// The cell record of an ended track (none when it had no detection).
    pub fn finish(&mut self, id: TrackId) -> Option<Record> {
        let s = self.open.remove(&id)?;
        let mut r = s.last;
        r.kind = RecordKind::Cell;
        r.frames_seen = Some(s.frames);
        r.first_seq = Some(s.first_seq);
        r.classified_frames = Some(s.classified);
        r.at_edge = !s.any_in_view;
        r.touching = s.any_in_view && !s.any_apart;
        r.unclassified = None;
        if let Some(m) = median_size(&s.sizes) {
            r.morphometry = m;
        }
        match (&s.model, s.classified) {
            (Some(m), n) if n > 0 => {
                let mean: Vec<f32> = s
                    .probs_sum
                    .iter()
                    .map(|v| (v / f64::from(n)) as f32)
                    .collect();
                let (best, confidence) = top(&mean);
                let class = m.classes.get(best).cloned().unwrap_or_default();
                let sure = confidence >= m.uncertain_below;
                r.normal = Some(sure && m.normal_class.as_deref() == Some(class.as_str()));
                r.class = Some(if sure { class } else { UNCERTAIN.to_string() });
                r.confidence = Some(confidence);
                r.probs = Some(m.classes.iter().cloned().zip(mean).collect());
                r.model = Some(m.id.clone());
            }
            _ => {
                r.class = None;
                r.normal = None;
                r.confidence = None;
                r.probs = None;
                r.model = None;
            }
        }
        Some(r)
    }
}

/// The median of each size over a cell's detections in view.
fn median_size(sizes: &[Morphometry]) -> Option<Morphometry> {
    if sizes.is_empty() {
        return None;
    }
    let med = |f: fn(&Morphometry) -> f32| {
        let mut v: Vec<f32> = sizes.iter().map(f).collect();
        v.sort_by(f32::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    };
    Some(Morphometry {
        head_length_um: med(|m| m.head_length_um),
        head_width_um: med(|m| m.head_width_um),
        head_area_um2: med(|m| m.head_area_um2),
        head_perimeter_um: med(|m| m.head_perimeter_um),
        ellipticity: med(|m| m.ellipticity),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::ModelId;
    use crate::core::morphometry::HeadSize;
    use crate::daemon::publish::FrameRef;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn cell(index: usize, (x, y): (f32, f32)) -> Cell {
        Cell {
            index,
            track: None,
            head: None,
            bbox: [0, 0, 0, 0],
            centroid: (x, y),
            angle_deg: 0.0,
            size: HeadSize::default(),
            unclassified: None,
            prepared: None,
            verdict: None,
            dropped: None,
        }
    }

    fn settings() -> TrackSettings {
        RawTrack::default().resolve().unwrap()
    }

    /// 0.05 µm/px: an 8 µm gate is 160 px.
    const UM: f32 = 0.05;

    #[test]
    fn a_drifting_static_field_keeps_every_id() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let heads: Vec<(f32, f32)> = (0..8)
            .map(|_| {
                (
                    rng.random_range(100.0..1100.0),
                    rng.random_range(100.0..900.0),
                )
            })
            .collect();
        let mut t = Tracker::new(&settings(), UM);
        let mut ids: Vec<Option<u64>> = vec![None; heads.len()];
        for seq in 1..=12u64 {
            // Stage drift of (7, -4) px a frame, and half a pixel of measurement noise.
            let k = seq as f32;
            let mut cells: Vec<Cell> = heads
                .iter()
                .enumerate()
                .map(|(i, &(x, y))| {
                    let n = (rng.random_range(-0.5..0.5), rng.random_range(-0.5..0.5));
                    cell(i, (x + 7.0 * k + n.0, y - 4.0 * k + n.1))
                })
                .collect();
            let step = t.step(seq, &mut cells, None);
            assert!(step.ended.is_empty() && !step.field_change, "frame {seq}");
            for (i, c) in cells.iter().enumerate() {
                assert!(
                    ids[i].is_none() || ids[i] == c.track,
                    "head {i} frame {seq}"
                );
                ids[i] = c.track;
            }
            if seq > 2 {
                assert!((step.shift.0 - 7.0).abs() < 1.0 && (step.shift.1 + 4.0).abs() < 1.0);
            }
        }
        assert_eq!(t.started(), 8);
        assert_eq!(t.end_all().len(), 8);
    }

    #[test]
    fn swimming_cells_keep_their_ids_through_a_missed_frame() {
        // Five cells at different constant velocities; cell 2 is missed in frames 6 and 7.
        let start = [
            (100.0, 100.0),
            (600.0, 150.0),
            (300.0, 500.0),
            (800.0, 700.0),
            (500.0, 400.0),
        ];
        let vel = [
            (9.0, 2.0),
            (-8.0, 6.0),
            (3.0, -9.0),
            (-5.0, -7.0),
            (0.0, 0.0),
        ];
        let mut t = Tracker::new(&settings(), UM);
        let mut ids = [None; 5];
        for seq in 1..=30u64 {
            let k = seq as f32;
            let mut cells: Vec<Cell> = (0..5)
                .filter(|&i| !(i == 2 && (6..=7).contains(&seq)))
                .map(|i| cell(i, (start[i].0 + vel[i].0 * k, start[i].1 + vel[i].1 * k)))
                .collect();
            let step = t.step(seq, &mut cells, None);
            assert!(step.ended.is_empty(), "frame {seq}: {step:?}");
            for c in &cells {
                let i = c.index;
                assert!(
                    ids[i].is_none() || ids[i] == c.track,
                    "cell {i} frame {seq}"
                );
                ids[i] = c.track;
            }
        }
        assert_eq!(t.started(), 5);
    }

    #[test]
    fn a_long_gap_ends_a_track_and_a_new_field_ends_them_all() {
        let mut t = Tracker::new(&settings(), UM);
        let a = [(100.0, 100.0), (700.0, 300.0), (400.0, 800.0)];
        let mut cells: Vec<Cell> = a.iter().enumerate().map(|(i, &p)| cell(i, p)).collect();
        t.step(1, &mut cells, None);
        // Head 0 vanishes for more than 3 frames.
        for seq in 2..=5 {
            let mut cells: Vec<Cell> = a[1..]
                .iter()
                .enumerate()
                .map(|(i, &p)| cell(i, p))
                .collect();
            let same = Motion {
                shift: (0.0, 0.0),
                peak: 0.8,
            };
            let step = t.step(seq, &mut cells, Some(same));
            assert_eq!(
                step.ended,
                if seq == 5 { vec![1] } else { vec![] },
                "frame {seq}"
            );
        }
        // A new field: the frames no longer correlate.
        let b = [(1000.0, 100.0), (200.0, 500.0), (900.0, 900.0)];
        let mut cells: Vec<Cell> = b.iter().enumerate().map(|(i, &p)| cell(i, p)).collect();
        let other = Motion {
            shift: (3.0, 40.0),
            peak: 0.02,
        };
        let step = t.step(6, &mut cells, Some(other));
        assert!(step.field_change);
        assert_eq!(step.ended, vec![2, 3]);
        assert_eq!(
            cells.iter().map(|c| c.track).collect::<Vec<_>>(),
            vec![Some(4), Some(5), Some(6)]
        );
    }

    #[test]
    fn classification_stops_after_the_budget_and_tracking_off_ends_each_detection() {
        let s = TrackSettings {
            classify_max_per_track: 2,
            ..settings()
        };
        let mut t = Tracker::new(&s, UM);
        let mut skipped = 0;
        for seq in 1..=5 {
            let mut cells = vec![cell(0, (300.0, 300.0))];
            skipped += t.step(seq, &mut cells, None).skipped;
            let want = (seq > 2).then_some(Unclassified::TrackComplete);
            assert_eq!(cells[0].unclassified, want, "frame {seq}");
        }
        assert_eq!(skipped, 3);
        let off = TrackSettings {
            enabled: false,
            ..settings()
        };
        let mut t = Tracker::new(&off, UM);
        for seq in 1..=3 {
            let mut cells = vec![cell(0, (300.0, 300.0)), cell(1, (500.0, 300.0))];
            let step = t.step(seq, &mut cells, None);
            assert_eq!(step.ended.len(), 2);
            assert_eq!(t.active(), 0);
        }
        assert_eq!(t.started(), 6);
    }

    fn model(name: &str) -> ModelRef {
        ModelRef {
            id: ModelId {
                name: name.into(),
                sha256: "0".into(),
            },
            classes: vec!["normal".into(), "abnormal".into()],
            normal_class: Some("normal".into()),
            uncertain_below: 0.6,
        }
    }

    fn detection(track: u64, seq: u64, probs: Option<[f32; 2]>, length: f32) -> Record {
        let classes = ["normal", "abnormal"];
        Record {
            sample: "s".into(),
            kind: RecordKind::Detection,
            track: Some(track),
            frame: FrameRef {
                seq,
                name: format!("f{seq}"),
            },
            timestamp: String::new(),
            cell: 0,
            bbox: [0; 4],
            at_edge: false,
            touching: false,
            centroid: [0.0; 2],
            angle_deg: 0.0,
            morphometry: Morphometry {
                head_length_um: length,
                head_width_um: 3.0,
                head_area_um2: 10.0,
                head_perimeter_um: 12.0,
                ellipticity: 1.5,
            },
            class: probs.map(|p| if p[0] >= p[1] { "normal" } else { "abnormal" }.into()),
            unclassified: None,
            normal: probs.map(|p| p[0] >= p[1]),
            confidence: probs.map(|p| p[0].max(p[1])),
            probs: probs.map(|p| classes.iter().map(|c| c.to_string()).zip(p).collect()),
            model: probs.map(|_| model("m").id),
            latency_ms: 1.0,
            frames_seen: None,
            first_seq: None,
            classified_frames: None,
        }
    }

    #[test]
    fn a_cell_is_the_mean_of_its_classified_frames() {
        let m = model("m");
        let mut v = Votes::default();
        v.observe(&detection(7, 3, Some([0.9, 0.1]), 4.0), Some(&m));
        v.observe(&detection(7, 4, Some([0.4, 0.6]), 5.0), Some(&m));
        v.observe(&detection(7, 5, Some([0.8, 0.2]), 4.4), Some(&m));
        v.observe(&detection(7, 6, None, 9.0), Some(&m));
        v.observe(&detection(8, 6, Some([0.5, 0.5]), 4.0), Some(&m));
        assert_eq!(v.open_tracks(), vec![7, 8]);
        let c = v.finish(7).unwrap();
        assert_eq!(c.kind, RecordKind::Cell);
        assert_eq!(
            (c.frames_seen, c.first_seq, c.classified_frames),
            (Some(4), Some(3), Some(3))
        );
        assert_eq!(c.frame.seq, 6);
        assert_eq!(c.class.as_deref(), Some("normal"));
        assert_eq!(c.normal, Some(true));
        assert!((c.confidence.unwrap() - 0.7).abs() < 1e-6);
        assert!((c.probs.as_ref().unwrap()["abnormal"] - 0.3).abs() < 1e-6);
        // Median of 4.0, 5.0, 4.4, 9.0.
        assert!((c.morphometry.head_length_um - 4.7).abs() < 1e-6);
        // A 0.5/0.5 vote is below the threshold.
        let c = v.finish(8).unwrap();
        assert_eq!(c.class.as_deref(), Some(UNCERTAIN));
        assert_eq!(c.normal, Some(false));
        assert!(v.finish(8).is_none());
        // A reload mid-track: only the new model's frames are fused.
        let m2 = model("m2");
        v.observe(&detection(9, 1, Some([0.1, 0.9]), 4.0), Some(&m));
        v.observe(&detection(9, 2, Some([0.9, 0.1]), 4.0), Some(&m2));
        let c = v.finish(9).unwrap();
        assert_eq!(
            (c.class.as_deref(), c.classified_frames),
            (Some("normal"), Some(1))
        );
        assert_eq!(c.model.unwrap().name, "m2");
    }
}
