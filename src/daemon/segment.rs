//! Full-field head finding: every head in a stained microscope frame, with the same stain
//! levels and the same measurement as the crop path in `pose`, plus area and shape filters and
//! a flag for heads cut by the frame border.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use image::{GrayImage, Luma, RgbImage};
use serde::{Deserialize, Serialize};

use crate::core::model::{Model, ModelError, RuntimeOptions, softmax};
use crate::core::morphometry::{self, HeadSize};
use crate::core::pose::{self, Contrast, HeadRegion, StainMap, Thresholded};
use crate::core::regions;
use crate::daemon::check::{Base, ConfigError, bundled, invalid, positive, within};
use crate::daemon::frame::{Cell, Unclassified};
use crate::daemon::share::in_two;
use crate::daemon::source::DEFAULT_UM_PER_PX;

/// Head verifier the embedded defaults use, relative to the project root.
pub const DEFAULT_VERIFIER: &str = "models/head-verifier.onnx";

/// `[segment]`: full-field head finding.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSegment {
    /// `dark` for stained preparations (heads darker than the background), `any` for
    /// unstained, grayscale or phase-contrast input.
    pub contrast: Contrast,
    /// Smallest head area accepted, µm².
    pub min_head_area_um2: f32,
    /// Largest head area accepted, µm².
    pub max_head_area_um2: f32,
    /// Radius of the opening that separates heads from midpieces and tails, µm.
    pub open_radius_um: f32,
    /// Largest length/width ratio of a head.
    pub max_elongation: f32,
    /// Smallest area / convex hull share; below it a region is flagged as touching heads.
    pub min_solidity: f32,
    /// How far past Otsu's level (as a share of the stain span) a head's darker fifth must be.
    pub nucleus_margin: f32,
    /// Touching heads are split where their region narrows to at most this share of the
    /// smaller head's half width (a watershed of the distance to the region's edge); each
    /// piece must then pass the filters as a head, and is published as touching (counted, not
    /// classified). 0 turns splitting off.
    pub split_neck_ratio: f32,
    /// Heads that overlap too much to leave a neck are cut apart between the two deepest
    /// notches of their region's outline (a region larger than most in the frame and not
    /// convex); each piece must then pass the filters as a head, and is published as touching.
    pub split_overlapping: bool,
    /// Give every candidate a second look with a learned head verifier, which rejects round
    /// cells, bacteria, debris and merged pairs.
    pub verify: bool,
    /// Verifier model (a `head` / `not_head` classifier from spermscope-train); relative paths
    /// are taken from the config file's folder. Unset: the bundled head verifier.
    pub verifier_model: Option<PathBuf>,
    /// Candidates with a lower head probability than this are rejected.
    pub verifier_min_prob: f32,
}

impl Default for RawSegment {
    fn default() -> Self {
        let px = SegmentSettings::default();
        let um = DEFAULT_UM_PER_PX;
        Self {
            contrast: px.contrast,
            min_head_area_um2: round2(px.min_area_px as f32 * um * um),
            max_head_area_um2: round2(px.max_area_px as f32 * um * um),
            open_radius_um: round2(px.open_radius_px as f32 * um),
            max_elongation: px.max_elongation,
            min_solidity: px.min_solidity,
            nucleus_margin: px.nucleus_margin,
            split_neck_ratio: px.split_neck_ratio,
            split_overlapping: px.split_overlapping,
            verify: true,
            verifier_model: None,
            verifier_min_prob: 0.2,
        }
    }
}

fn round2(v: f32) -> f32 {
    (v * 100.0).round() / 100.0
}

/// The head verifier to load, when verification is on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerifierSettings {
    pub model: PathBuf,
    /// Candidates below this head probability are rejected.
    pub min_prob: f32,
}

impl RawSegment {
    /// Check every value (no I/O); areas and radii become pixels at the frame scale `um_per_px`.
    pub fn resolve(
        &self,
        um_per_px: f32,
        base: Base<'_>,
    ) -> Result<(SegmentSettings, Option<VerifierSettings>), ConfigError> {
        positive("segment.min_head_area_um2", self.min_head_area_um2)?;
        positive("segment.max_head_area_um2", self.max_head_area_um2)?;
        if self.max_head_area_um2 <= self.min_head_area_um2 {
            return Err(invalid(
                "segment.max_head_area_um2",
                "must be larger than segment.min_head_area_um2",
            ));
        }
        if !(self.open_radius_um.is_finite() && self.open_radius_um >= 0.0) {
            return Err(invalid("segment.open_radius_um", "must be 0 or more"));
        }
        let open_px = (self.open_radius_um / um_per_px).round();
        if open_px > 60.0 {
            return Err(invalid(
                "segment.open_radius_um",
                format!("is {open_px} px at source.um_per_px = {um_per_px}; at most 60 px"),
            ));
        }
        if !(self.max_elongation.is_finite() && self.max_elongation >= 1.0) {
            return Err(invalid("segment.max_elongation", "must be 1 or more"));
        }
        within("segment.min_solidity", self.min_solidity, 0.0, 1.0)?;
        within("segment.nucleus_margin", self.nucleus_margin, -1.0, 2.0)?;
        within("segment.split_neck_ratio", self.split_neck_ratio, 0.0, 1.0)?;
        within(
            "segment.verifier_min_prob",
            self.verifier_min_prob,
            0.0,
            1.0,
        )?;
        let px2 = um_per_px * um_per_px;
        let settings = SegmentSettings {
            contrast: self.contrast,
            min_area_px: (self.min_head_area_um2 / px2).round().max(1.0) as usize,
            max_area_px: (self.max_head_area_um2 / px2).round() as usize,
            open_radius_px: open_px as u8,
            max_elongation: self.max_elongation,
            min_solidity: self.min_solidity,
            nucleus_margin: self.nucleus_margin,
            split_neck_ratio: self.split_neck_ratio,
            split_overlapping: self.split_overlapping,
        };
        let verifier = self.verify.then(|| VerifierSettings {
            model: match &self.verifier_model {
                Some(p) => base.path(p),
                None => bundled(DEFAULT_VERIFIER),
            },
            min_prob: self.verifier_min_prob,
        });
        Ok((settings, verifier))
    }
}

/// Settings of the classical segmenter, in pixels of the frame.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SegmentSettings {
    pub contrast: Contrast,
    /// Smallest and largest head area accepted.
    pub min_area_px: usize,
    pub max_area_px: usize,
    /// Radius of the opening that removes tails and midpieces.
    pub open_radius_px: u8,
    /// Largest length/width ratio of a head.
    pub max_elongation: f32,
    /// Smallest area/convex-hull share; below it the region is taken as touching heads.
    pub min_solidity: f32,
    /// How far above Otsu's level (as a share of Otsu's level above background) the darkest
    /// fifth of a head's pixels must reach.
    pub nucleus_margin: f32,
    /// Split a region where it narrows to this share of the smaller part's half width; 0: never.
    pub split_neck_ratio: f32,
    /// Cut a large region with notches in its outline between its two deepest notches
    /// (heads that overlap too much to leave a neck).
    pub split_overlapping: bool,
}

impl Default for SegmentSettings {
    fn default() -> Self {
        Self {
            contrast: Contrast::Dark,
            min_area_px: 600,
            max_area_px: 16000,
            open_radius_px: 5,
            max_elongation: 3.5,
            min_solidity: 0.8,
            nucleus_margin: 0.6,
            split_neck_ratio: 0.8,
            split_overlapping: true,
        }
    }
}

/// A head found in a frame.
#[derive(Debug, Clone)]
pub struct FoundHead {
    pub head: HeadRegion,
    /// `[x0, y0, x1, y1]` inclusive pixel bounds.
    pub bbox: [u32; 4],
    /// The head touches the frame border: reported, not classified.
    pub at_edge: bool,
    /// Area / convex hull area.
    pub solidity: f32,
    /// The region looks like two or more touching heads.
    pub touching: bool,
    /// Set when this head is a piece of a region split at a neck into several heads.
    pub split: Option<SplitPiece>,
}

/// A head cut from a region that split at a neck into several heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitPiece {
    /// Which region of the frame the piece came from (its sibling pieces share it).
    pub region: usize,
    /// The piece measured as touching on its own (low solidity).
    pub touching_alone: bool,
}

/// Find every head in a frame, in raster order of their first pixel.
pub fn find_heads(frame: &RgbImage, s: &SegmentSettings) -> Vec<FoundHead> {
    find_heads_on(&StainMap::new(frame, s.contrast), s)
}

/// `find_heads` on the frame's stain map, made with `s.contrast`.
pub fn find_heads_on(stain: &StainMap, s: &SegmentSettings) -> Vec<FoundHead> {
    let (w, h) = stain.map.dimensions();
    if w < 16 || h < 16 {
        return Vec::new();
    }
    let t = Thresholded::from_smoothed(Arc::clone(&stain.smoothed));
    let mut regions =
        regions::opened_regions(&t.stain, t.head_level, s.open_radius_px, s.min_area_px);
    regions.retain(|px| px.len() >= s.min_area_px);
    let heads = Heads {
        t: &t,
        s,
        w,
        h,
        overlap_min_area: overlap_min_area(&regions, s),
    };
    let regions: Vec<_> = regions.into_iter().enumerate().collect();
    in_two(&regions, |(region, px)| heads.of_region(*region, px))
        .into_iter()
        .flatten()
        .collect()
}

/// Share of the frame's median region area from which a region may be overlapping heads (most
/// regions are one head). This, `OVERLAP_MAX_SOLIDITY` and `NOTCH_DEPTH_SHARE` were chosen on
/// held-out `sperm-parsing/train` frames as recorded and crowded fields made from them, by the
/// smaller of precision and recall over both (`models/head-verifier.md`).
const OVERLAP_AREA_SHARE: f32 = 1.1;

/// Solidity from which a region that passes as one head is taken as one (not overlapping heads).
const OVERLAP_MAX_SOLIDITY: f32 = 0.95;

/// Smallest depth of a notch between overlapping heads, as a share of the square root of the
/// region's area (at least `regions::MIN_NECK_DEPTH_PX`).
const NOTCH_DEPTH_SHARE: f32 = 0.05;

/// The smallest region that may be overlapping heads: `OVERLAP_AREA_SHARE` of the frame's
/// median region; `usize::MAX` when that split is off.
fn overlap_min_area(regions: &[Vec<(u32, u32)>], s: &SegmentSettings) -> usize {
    if !s.split_overlapping || regions.is_empty() {
        return usize::MAX;
    }
    let mut areas: Vec<usize> = regions.iter().map(Vec::len).collect();
    let mid = areas.len() / 2;
    let (_, &mut median, _) = areas.select_nth_unstable(mid);
    (median as f32 * OVERLAP_AREA_SHARE) as usize
}

/// Head finding's view of one frame: its thresholds, the settings and sizes.
struct Heads<'a> {
    t: &'a Thresholded,
    s: &'a SegmentSettings,
    w: u32,
    h: u32,
    overlap_min_area: usize,
}

impl Heads<'_> {
    /// The heads one region (number `region` of the frame's) holds: none, one, or the pieces
    /// it splits into at its necks or its notches.
    fn of_region(&self, region: usize, px: &[(u32, u32)]) -> Vec<FoundHead> {
        if let Some(pieces) = self.split_at_necks(px) {
            return pieces_of(region, pieces).collect();
        }
        if px.len() > self.s.max_area_px {
            return Vec::new();
        }
        let measured = self.measure(px);
        // Heads that overlap too much to leave a neck: a large region with notches in its
        // outline.
        if self.may_overlap(px.len(), measured.as_ref())
            && let Some(pieces) = self.split_at_concavities(px)
        {
            return pieces_of(region, pieces).collect();
        }
        // A region that fails as a head, or looks like several (low solidity), may be one
        // head with its midpiece.
        match measured {
            Some(f) if !f.touching => vec![f],
            measured => one_wide_head(px, self.t, self.s, self.w, self.h)
                .or(measured)
                .into_iter()
                .collect(),
        }
    }

    fn measure(&self, px: &[(u32, u32)]) -> Option<FoundHead> {
        measure_region(px, self.t, self.s, self.w, self.h)
    }

    /// A region of `area` px measured as `measured` may be overlapping heads: it is large for
    /// a head and, when it passes as one, not convex.
    fn may_overlap(&self, area: usize, measured: Option<&FoundHead>) -> bool {
        area >= self.overlap_min_area && measured.is_none_or(|f| f.solidity < OVERLAP_MAX_SOLIDITY)
    }

    /// The heads a region splits into at its necks, when at least two pieces pass the filters
    /// as heads; a piece that may itself be overlapping heads is cut at its concavities.
    fn split_at_necks(&self, px: &[(u32, u32)]) -> Option<Vec<FoundHead>> {
        let pieces = regions::split_at_necks(px, self.s.split_neck_ratio, self.s.min_area_px)?;
        let mut heads = Vec::with_capacity(pieces.len());
        for p in pieces.iter().filter(|p| p.len() <= self.s.max_area_px) {
            let Some(f) = self.measure(p) else {
                continue;
            };
            match self
                .may_overlap(p.len(), Some(&f))
                .then(|| self.split_at_concavities(p))
            {
                Some(Some(cut)) => heads.extend(cut),
                _ => heads.push(f),
            }
        }
        (heads.len() > 1).then_some(heads)
    }

    /// The two heads a region of overlapping heads is cut into between its two deepest
    /// notches (`regions::split_at_concavities`), when both pass the filters as heads.
    fn split_at_concavities(&self, px: &[(u32, u32)]) -> Option<Vec<FoundHead>> {
        let depth = (NOTCH_DEPTH_SHARE * (px.len() as f32).sqrt()).max(regions::MIN_NECK_DEPTH_PX);
        let pieces = regions::split_at_concavities(px, depth, self.s.min_area_px)?;
        let heads: Vec<FoundHead> = pieces.iter().filter_map(|p| self.measure(p)).collect();
        (heads.len() == 2).then_some(heads)
    }
}

/// Touching heads, each passing the filters on its own: found and counted, but flagged
/// touching, so not classified. A neighbour in view misleads the tail search (on val, the
/// split heads' median angle error is 38°, against 3.5° for the rest), and overlapping cells
/// are not assessed for morphology. When the verifier rejects every other piece, the one left
/// is a lone head (`settle_split_pieces`).
fn pieces_of(region: usize, heads: Vec<FoundHead>) -> impl Iterator<Item = FoundHead> {
    heads.into_iter().map(move |f| FoundHead {
        touching: true,
        split: Some(SplitPiece {
            region,
            touching_alone: f.touching,
        }),
        ..f
    })
}

/// Share of a region's largest inscribed radius below which a part is not taken as head
/// (`one_wide_head`): a head is 2.5-3.5 µm wide (WHO 6th edition), a midpiece about 1 µm.
const HEAD_CORE_SHARE: f32 = 0.6;

/// A region that fails as a head (too elongated) or looks like several (low solidity) may be
/// one head with its midpiece, where the stain and the optics make the midpiece wider than the
/// field's opening takes off (SMIDS): open it again with a disc of `HEAD_CORE_SHARE` of its
/// largest inscribed radius, and when exactly one part is left and it passes as one head on
/// its own, that is the head. Regions split at a neck are left as they are: on the
/// `sperm-parsing` fields this took the narrower of two touching heads for a midpiece.
fn one_wide_head(
    px: &[(u32, u32)],
    t: &Thresholded,
    s: &SegmentSettings,
    w: u32,
    h: u32,
) -> Option<FoundHead> {
    let parts = regions::wide_parts(px, HEAD_CORE_SHARE, s.min_area_px);
    let [part] = parts.as_slice() else {
        return None;
    };
    measure_region(part, t, s, w, h).filter(|f| !f.touching)
}

/// Filter one opened region (nucleus, elongation) and measure it as a head.
fn measure_region(
    px: &[(u32, u32)],
    t: &Thresholded,
    s: &SegmentSettings,
    w: u32,
    h: u32,
) -> Option<FoundHead> {
    // A head holds a dark nucleus: its darker pixels pass Otsu's level. Pale round cells and
    // debris only pass the lower head level.
    let mut vals: Vec<u8> = px
        .iter()
        .map(|&(x, y)| t.stain.get_pixel(x, y)[0])
        .collect();
    let at = (vals.len() - 1) * 4 / 5;
    let (_, &mut q80, _) = vals.select_nth_unstable(at);
    if (q80 as f32) < t.otsu as f32 + s.nucleus_margin * t.span {
        return None;
    }
    let (x0, y0, x1, y1) = px
        .iter()
        .fold((u32::MAX, u32::MAX, 0, 0), |(a, b, c, d), &(x, y)| {
            (a.min(x), b.min(y), c.max(x), d.max(y))
        });
    let at_edge = x0 == 0 || y0 == 0 || x1 == w - 1 || y1 == h - 1;
    // Measure in a local window (head plus room for the tail search), exactly as a crop.
    let side = (x1 - x0).max(y1 - y0) as f32;
    let m = (side * 1.3) as u32 + 4;
    let (lx0, ly0) = (x0.saturating_sub(m), y0.saturating_sub(m));
    let (lx1, ly1) = ((x1 + m).min(w - 1), (y1 + m).min(h - 1));
    let (lw, lh) = (lx1 - lx0 + 1, ly1 - ly0 + 1);
    let mut local = GrayImage::new(lw, lh);
    for &(x, y) in px {
        local.put_pixel(x - lx0, y - ly0, Luma([255]));
    }
    pose::fill_holes(&mut local);
    let mut head = pose::measure(&local, &t.stain, t.tail_level, (lx0, ly0));
    head.shift(lx0, ly0);
    if head.major_px / head.minor_px.max(1.0) > s.max_elongation {
        return None;
    }
    let solidity = morphometry::solidity(&head);
    Some(FoundHead {
        touching: solidity < s.min_solidity,
        head,
        bbox: [x0, y0, x1, y1],
        at_edge,
        solidity,
        split: None,
    })
}

/// After the verifier's look: a piece of a split region whose sibling pieces were all rejected
/// (a stained midpiece or debris cut off at a neck, not another head) is a lone head, touching
/// only when it measures so on its own.
pub fn settle_split_pieces(found: &mut [FoundHead]) {
    for i in 0..found.len() {
        let Some(piece) = found[i].split else {
            continue;
        };
        let siblings = found
            .iter()
            .filter(|f| f.split.is_some_and(|p| p.region == piece.region))
            .count();
        if siblings == 1 {
            found[i].touching = piece.touching_alone;
            found[i].split = None;
        }
    }
}

/// Class a verifier model must have: the candidate is one sperm head.
pub const HEAD_CLASS: &str = "head";

/// A learned second look at each candidate the classical segmenter finds: a small classifier
/// (trained by `spermscope-train` on `sperm-parsing/train` candidates) that keeps heads and
/// rejects round cells, bacteria, debris and merged pairs.
pub struct Verifier {
    model: Model,
    head_index: usize,
    min_prob: f32,
}

/// Why a head verifier cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(
        "model {path} is not a head verifier: it needs a '{HEAD_CLASS}' class, and has {classes:?}"
    )]
    NoHeadClass { path: PathBuf, classes: Vec<String> },
}

impl Verifier {
    /// Load the verifier the settings name (start-up and tools share this).
    pub fn load(s: &VerifierSettings, runtime: &RuntimeOptions) -> Result<Verifier, VerifierError> {
        Verifier::new(Model::load(&s.model, runtime)?, s.min_prob)
    }

    /// Wrap a loaded model; it must have a `head` class.
    pub fn new(model: Model, min_prob: f32) -> Result<Verifier, VerifierError> {
        let head_index = model
            .spec
            .classes
            .iter()
            .position(|c| c == HEAD_CLASS)
            .ok_or_else(|| VerifierError::NoHeadClass {
                path: model.path.clone(),
                classes: model.spec.classes.clone(),
            })?;
        Ok(Verifier {
            model,
            head_index,
            min_prob,
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Keep the candidates the model takes for heads (probability at least `min_prob`) and
    /// return how many were rejected; a split piece left without siblings is settled as a lone
    /// head (`settle_split_pieces`). On an error the candidates are left as they were.
    pub fn retain(
        &mut self,
        frame: &RgbImage,
        stain: Option<&StainMap>,
        found: &mut Vec<FoundHead>,
        um_per_px: f32,
    ) -> Result<usize, ModelError> {
        if found.is_empty() {
            return Ok(0);
        }
        let pre = self.model.preprocessor();
        let inputs = in_two(found, |f| {
            let mut p = pre.head_in(frame, stain, &f.head, Some(um_per_px));
            p.head = None;
            p
        });
        let temperature = self.model.spec.temperature;
        let logits = self.model.logits(&inputs)?;
        let mut keep = logits.iter().map(|l| {
            softmax(l, temperature)
                .get(self.head_index)
                .is_some_and(|&p| p >= self.min_prob)
        });
        let before = found.len();
        found.retain(|_| keep.next().unwrap_or(false));
        settle_split_pieces(found);
        Ok(before - found.len())
    }
}

/// What head finding gave for one frame: the cells, how many candidates the verifier
/// rejected (or why it could not look at them), and the frame's stain map for the stages after.
pub struct Segmented {
    pub cells: Vec<Cell>,
    pub stain: Arc<StainMap>,
    pub rejected: usize,
    pub verifier_error: Option<ModelError>,
}

/// The segment stage's work on one frame: classical head finding, the verifier's second look,
/// and one `Cell` per head kept (at the edge or touching: published but not classified).
pub fn segment_frame(
    frame: &RgbImage,
    settings: &SegmentSettings,
    verifier: Option<&mut Verifier>,
    um_per_px: f32,
) -> Segmented {
    let stain = StainMap::new(frame, settings.contrast);
    let mut found = find_heads_on(&stain, settings);
    let (mut rejected, mut verifier_error) = (0, None);
    if let Some(v) = verifier {
        match v.retain(frame, Some(&stain), &mut found, um_per_px) {
            Ok(n) => rejected = n,
            Err(e) => verifier_error = Some(e),
        }
    }
    let cells = found
        .into_iter()
        .enumerate()
        .map(|(index, f)| Cell {
            index,
            track: None,
            angle_deg: f.head.angle_deg(),
            centroid: f.head.centroid,
            bbox: f.bbox,
            unclassified: if f.at_edge {
                Some(Unclassified::AtEdge)
            } else if f.touching {
                Some(Unclassified::Touching)
            } else {
                None
            },
            size: HeadSize::default(),
            head: Some(f.head),
            prepared: None,
            verdict: None,
            dropped: None,
        })
        .collect();
    Segmented {
        cells,
        stain: Arc::new(stain),
        rejected,
        verifier_error,
    }
}

/// Detections matched against an instance mask (0 background, 1..n one id per true head): a
/// detection counts when its centroid lies inside a true head and their IoU is at least 0.5,
/// each true head matched at most once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaskMatch {
    pub true_heads: usize,
    pub found: usize,
    pub matched: usize,
}

impl MaskMatch {
    pub fn score(found: &[FoundHead], truth: &GrayImage) -> MaskMatch {
        let (flags, true_heads) = Self::flags(found, truth);
        MaskMatch {
            true_heads,
            found: found.len(),
            matched: flags.iter().filter(|&&m| m).count(),
        }
    }

    /// Whether each detection matches a true head (in order, each head at most once), and the
    /// number of true heads.
    pub fn flags(found: &[FoundHead], truth: &GrayImage) -> (Vec<bool>, usize) {
        let mut area: HashMap<u8, usize> = HashMap::new();
        for p in truth.pixels() {
            if p[0] > 0 {
                *area.entry(p[0]).or_default() += 1;
            }
        }
        let mut used = HashSet::new();
        let flags = found
            .iter()
            .map(|d| {
                let (cx, cy) = (d.head.centroid.0 as u32, d.head.centroid.1 as u32);
                let id = truth.get_pixel(cx, cy)[0];
                let Some(&true_area) = area.get(&id) else {
                    return false;
                };
                let inter = d
                    .head
                    .pixels
                    .iter()
                    .filter(|&&(x, y)| truth.get_pixel(x, y)[0] == id)
                    .count();
                let iou = inter as f64 / (d.head.area_px() + true_area - inter) as f64;
                iou >= 0.5 && used.insert(id)
            })
            .collect();
        (flags, area.len())
    }

    pub fn add(&mut self, other: MaskMatch) {
        self.true_heads += other.true_heads;
        self.found += other.found;
        self.matched += other.matched;
    }

    pub fn precision(&self) -> f64 {
        self.matched as f64 / self.found.max(1) as f64
    }

    pub fn recall(&self) -> f64 {
        self.matched as f64 / self.true_heads.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::testing::{synthetic_field, synthetic_sperm};

    #[test]
    fn heads_in_a_field_are_found_measured_and_flagged_at_the_edge() {
        let at = [(150, 150, 30.0), (420, 200, 200.0), (260, 360, 100.0)];
        let mut field = synthetic_field(640, 480, &at);
        // A head cut by the left border.
        let crop = synthetic_sperm(131, 0.0);
        image::imageops::overlay(&mut field, &crop, -60, 220);
        let found = find_heads(&field, &SegmentSettings::default());
        assert_eq!(
            found.len(),
            4,
            "{:?}",
            found.iter().map(|f| f.bbox).collect::<Vec<_>>()
        );
        let inner: Vec<&FoundHead> = found.iter().filter(|f| !f.at_edge).collect();
        assert_eq!(inner.len(), 3);
        for (x, y, deg) in at {
            let f = inner
                .iter()
                .find(|f| (f.head.centroid.0 - x as f32).hypot(f.head.centroid.1 - y as f32) < 3.0)
                .unwrap_or_else(|| panic!("no head near {x},{y}"));
            let err = (f.head.angle_deg() - deg + 540.0).rem_euclid(360.0) - 180.0;
            assert!(
                err.abs() < 5.0,
                "head at {x},{y}: angle {}",
                f.head.angle_deg()
            );
            assert!(!f.touching);
        }
        // Heads too small for the area filter are not found.
        let tight = SegmentSettings {
            min_area_px: 2000,
            ..SegmentSettings::default()
        };
        assert!(find_heads(&field, &tight).is_empty());
        // Cells: one per head, the edge one not to be classified.
        let seg = segment_frame(&field, &SegmentSettings::default(), None, 0.05);
        assert_eq!(seg.cells.len(), 4);
        let edge = seg
            .cells
            .iter()
            .filter(|c| c.unclassified == Some(Unclassified::AtEdge));
        assert_eq!(edge.count(), 1);
    }

    #[test]
    fn touching_heads_are_split_into_two_heads() {
        // Two heads side by side, their outlines overlapping by 2 px across the short axis.
        let mut field = RgbImage::from_pixel(300, 200, image::Rgb([225, 215, 220]));
        for cy in [88.0f32, 112.0] {
            for (x, y, p) in field.enumerate_pixels_mut() {
                let (a, b) = (x as f32 - 150.0, y as f32 - cy);
                if (a / 20.0).powi(2) + (b / 13.0).powi(2) <= 1.0 {
                    let v = if a < 0.0 { 120 } else { 70 };
                    *p = image::Rgb([v, v / 2, v]);
                }
            }
        }
        let s = SegmentSettings::default();
        let found = find_heads(&field, &s);
        assert_eq!(
            found.len(),
            2,
            "{:?}",
            found.iter().map(|f| f.bbox).collect::<Vec<_>>()
        );
        for (f, cy) in found.iter().zip([88.0, 112.0]) {
            assert!(
                (f.head.centroid.1 - cy).abs() < 2.0,
                "{:?}",
                f.head.centroid
            );
            assert!(
                (f.head.centroid.0 - 150.0).abs() < 2.0,
                "{:?}",
                f.head.centroid
            );
            assert!(f.touching, "split heads are flagged, not classified");
        }
        // Both kept by the verifier: still touching. One rejected: the other is a lone head.
        let mut both = found.clone();
        settle_split_pieces(&mut both);
        assert!(both.iter().all(|f| f.touching && f.split.is_some()));
        let mut one = vec![found[1].clone()];
        settle_split_pieces(&mut one);
        assert!(!one[0].touching && one[0].split.is_none());
        // A piece that measures as touching on its own stays touching.
        let mut low = found[1].clone();
        low.split = low.split.map(|p| SplitPiece {
            touching_alone: true,
            ..p
        });
        let mut one = vec![low];
        settle_split_pieces(&mut one);
        assert!(one[0].touching);
        // Without splitting they are one region.
        let off = SegmentSettings {
            split_neck_ratio: 0.0,
            ..s
        };
        assert_eq!(find_heads(&field, &off).len(), 1);
        let raw = RawSegment {
            split_neck_ratio: 1.5,
            ..RawSegment::default()
        };
        let e = raw.resolve(0.053, Base(None)).unwrap_err().to_string();
        assert!(e.contains("segment.split_neck_ratio"), "{e}");
    }

    #[test]
    fn overlapping_heads_are_cut_apart_between_their_notches() {
        // Three lone heads, and two overlapping by 4 px of their 26 px width: no neck deep enough.
        let mut field = RgbImage::from_pixel(400, 300, image::Rgb([225, 215, 220]));
        let heads = [
            (80.0, 60.0),
            (200.0, 60.0),
            (320.0, 60.0),
            (200.0, 186.0),
            (200.0, 208.0),
        ];
        for (i, &(cx, cy)) in heads.iter().enumerate() {
            for (x, y, p) in field.enumerate_pixels_mut() {
                let (a, b) = (x as f32 - cx, y as f32 - cy);
                if (a / 22.0).powi(2) + (b / 13.0).powi(2) <= 1.0 {
                    let v = if i == 4 { 60 } else { 100 };
                    *p = image::Rgb([v, v / 2, v]);
                }
            }
        }
        let centres = |found: &[FoundHead]| -> Vec<(i32, i32)> {
            found
                .iter()
                .map(|f| {
                    (
                        f.head.centroid.0.round() as i32,
                        f.head.centroid.1.round() as i32,
                    )
                })
                .collect()
        };
        let s = SegmentSettings::default();
        let found = find_heads(&field, &s);
        assert_eq!(found.len(), 5, "{:?}", centres(&found));
        let pair: Vec<&FoundHead> = found.iter().filter(|f| f.head.centroid.1 > 120.0).collect();
        assert_eq!(pair.len(), 2, "{:?}", centres(&found));
        for (f, cy) in pair.iter().zip([186.0, 208.0]) {
            assert!(
                (f.head.centroid.0 - 200.0).abs() < 2.0,
                "{:?}",
                f.head.centroid
            );
            assert!(
                (f.head.centroid.1 - cy).abs() < 5.0,
                "{:?}",
                f.head.centroid
            );
            assert!(
                f.touching && f.split.is_some(),
                "pieces are flagged touching"
            );
        }
        assert_eq!(
            pair[0].split.map(|p| p.region),
            pair[1].split.map(|p| p.region)
        );
        // The neck split alone leaves them one region; with this off too, one head.
        let off = SegmentSettings {
            split_overlapping: false,
            ..s
        };
        let found = find_heads(&field, &off);
        assert_eq!(found.len(), 4, "{:?}", centres(&found));
    }

    #[test]
    fn a_head_with_a_thick_stained_midpiece_is_one_head() {
        // A head (46 x 32 px across) with a midpiece 13 px wide and 110 px long, as dark as the
        // head: wider than the field's opening (radius 5 px) takes off, so the region is head
        // and midpiece together, too elongated to pass as a head.
        let mut field = RgbImage::from_pixel(320, 240, image::Rgb([225, 215, 220]));
        for (x, y, p) in field.enumerate_pixels_mut() {
            let (a, b) = (x as f32 - 90.0, y as f32 - 120.0);
            let head = (a / 23.0).powi(2) + (b / 16.0).powi(2) <= 1.0;
            let midpiece = (15.0..125.0).contains(&a) && b.abs() <= 6.0;
            if head || midpiece {
                *p = image::Rgb([70, 35, 70]);
            }
        }
        let s = SegmentSettings::default();
        let found = find_heads(&field, &s);
        let [f] = found.as_slice() else {
            panic!("{:?}", found.iter().map(|f| f.bbox).collect::<Vec<_>>());
        };
        assert!(!f.touching && !f.at_edge);
        assert!(
            (f.head.centroid.0 - 90.0).abs() < 4.0 && (f.head.centroid.1 - 120.0).abs() < 2.0,
            "{:?}",
            f.head.centroid
        );
        // The midpiece is not part of the head.
        assert!(f.bbox[2] < 125, "{:?}", f.bbox);
        // Two heads side by side are still two heads (the trim keeps both: as wide as each other).
        let mut pair = RgbImage::from_pixel(320, 240, image::Rgb([225, 215, 220]));
        for (x, y, p) in pair.enumerate_pixels_mut() {
            for cx in [120.0f32, 160.0] {
                let (a, b) = (x as f32 - cx, y as f32 - 120.0);
                if (a / 22.0).powi(2) + (b / 13.0).powi(2) <= 1.0 {
                    *p = image::Rgb([70, 35, 70]);
                }
            }
        }
        assert_eq!(find_heads(&pair, &s).len(), 2);
    }

    #[test]
    fn config_in_micrometres_becomes_pixels_and_bad_values_name_their_key() {
        let raw = RawSegment::default();
        let (s, v) = raw.resolve(0.1, Base(None)).unwrap();
        // 0.1 µm/px: about a third of the default pixel areas at 0.053 µm/px.
        assert!((s.min_area_px as f32 - 600.0 * 0.053f32.powi(2) / 0.01).abs() < 2.0);
        assert!(v.is_some());
        let bad = RawSegment {
            max_head_area_um2: 0.5,
            ..RawSegment::default()
        };
        let e = bad.resolve(0.1, Base(None)).unwrap_err().to_string();
        assert!(e.contains("segment.max_head_area_um2"), "{e}");
        let e = raw.resolve(0.001, Base(None)).unwrap_err().to_string();
        assert!(e.contains("segment.open_radius_um"), "{e}");
    }
}
