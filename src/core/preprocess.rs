//! The one path from a crop to a model's inputs (upright window, channels, normalisation,
//! standardised morphometrics). The trainer, the evaluator and the daemon all call it.

use std::sync::Arc;

use image::{GrayImage, RgbImage};

use crate::core::morphometry;
use crate::core::pose::{self, Cut, HeadRegion, Jitter, StainMap};
use crate::core::spec::{FEATURES_WITH_FLAG, ModelSpec, PoseMode};

/// A crop made ready for a model.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// `channels * size * size` values, channel-major, normalised.
    pub pixels: Vec<f32>,
    /// Standardised features (empty when the model takes none).
    pub features: Vec<f32>,
    /// The head found in the crop, if any.
    pub head: Option<HeadRegion>,
}

/// Where the window goes in a crop and the raw (unstandardised) features of its head.
#[derive(Debug, Clone)]
pub struct Located {
    pub cut: Cut,
    /// Head-found flag then the shape features (empty when the model takes none).
    pub raw_features: Vec<f32>,
    pub head: Option<HeadRegion>,
}

/// How much larger than the model's window a training crop is, about: SMIDS crops are 150-205 px
/// around a 140 px window, HuSHeM crops 131 px around a 96 px window.
pub const CROP_CONTEXT: f32 = 1.3;

/// One model's way from an image to its inputs, built from the model's spec. It owns the cut
/// (window, pose mode, scale), the morphometric features, normalisation and test-time mirror
/// fusion; the daemon (field heads), the evaluator and the trainer (crops) all go through it,
/// so no model is ever fed numbers other than those it was trained with.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    spec: Arc<ModelSpec>,
}

impl Preprocessor {
    pub fn new(spec: Arc<ModelSpec>) -> Self {
        Self { spec }
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Find the head in a crop and decide the cut. A crop with no recognisable head (debris,
    /// a blank field) is cut at its centre without rotation and flagged in the features, the
    /// same way in training and in serving.
    pub fn locate(&self, crop: &RgbImage) -> Located {
        let centre = (crop.width() as f32 / 2.0, crop.height() as f32 / 2.0);
        let stain = pose::stain_map(crop, self.spec.crop.contrast);
        self.locate_in(&stain, None, None, centre, self.spec.crop.window_px)
    }

    /// The one locating step, on the stain map of the image (`pose::stain_map` with the spec's
    /// contrast), which serves the head search and the features; `smoothed`, when given, is
    /// that map smoothed as the head search smooths it (cut out of the frame's). `hint` is the segmenter's
    /// head when the crop was cut around a field head: the crop path's own head is used only
    /// when it is that head. `centre` is the crop's nominal centre (where `PoseMode::Centre`
    /// cuts), `window` the side of the window in this image's pixels.
    fn locate_in(
        &self,
        stain: &GrayImage,
        smoothed: Option<GrayImage>,
        hint: Option<HeadRegion>,
        centre: (f32, f32),
        window: f32,
    ) -> Located {
        let found = match smoothed {
            Some(s) => pose::find_head_in_smoothed(s),
            None => pose::find_head_in_stain(stain),
        }
        .ok();
        let head = match hint {
            Some(h) => Some(found.filter(|f| same_head(f, &h)).unwrap_or(h)),
            None => found,
        };
        let cut = match (&head, self.spec.crop.pose) {
            (Some(h), PoseMode::Upright) => Cut::upright(h, window),
            (Some(h), PoseMode::Head) => Cut::unrotated(h.centroid, window),
            _ => Cut::unrotated(centre, window),
        };
        let raw_features = match (&self.spec.features, &head) {
            (None, _) => Vec::new(),
            (Some(_), Some(h)) => {
                let mut f = vec![1.0];
                f.extend(morphometry::shape_features(stain, h, window));
                f
            }
            (Some(_), None) => vec![0.0; FEATURES_WITH_FLAG],
        };
        Located {
            cut,
            raw_features,
            head,
        }
    }

    /// Crop → model inputs, with no augmentation: the serving path for crops.
    pub fn crop(&self, crop: &RgbImage) -> Prepared {
        self.crop_window(crop).0
    }

    /// `crop`, also returning the upright window the pixels were taken from (pictures).
    pub fn crop_window(&self, crop: &RgbImage) -> (Prepared, RgbImage) {
        let loc = self.locate(crop);
        let window = self.window(crop, &loc, &Jitter::default());
        let prepared = self.finish(&window, &loc);
        (prepared, window)
    }

    /// The window a located image gives, geometrically jittered when training.
    pub fn window(&self, img: &RgbImage, loc: &Located, jitter: &Jitter) -> RgbImage {
        pose::cut_window(img, &loc.cut, self.spec.input.size_px, jitter)
    }

    /// A window (possibly augmented further by the trainer) and its located head → inputs.
    pub fn finish(&self, window: &RgbImage, loc: &Located) -> Prepared {
        Prepared {
            pixels: to_tensor(window, &self.spec),
            features: standardise(&loc.raw_features, &self.spec),
            head: loc.head.clone(),
        }
    }

    /// A full-field head (found by the daemon's segmentation) → model inputs. `um_per_px` is
    /// the scale of `frame`; the window is resized so the head appears at the training scale.
    ///
    /// The head is looked at as the training crops showed it: a crop-sized patch of the frame
    /// centred on it goes through the crop path's `locate_in`, so a head in a field and the
    /// same head in a crop give the model the same inputs. The returned head is in frame
    /// coordinates.
    pub fn head(&self, frame: &RgbImage, head: &HeadRegion, um_per_px: Option<f32>) -> Prepared {
        self.head_in(frame, None, head, um_per_px)
    }

    /// `head`, cutting the patch's stain map out of the frame's `stain` where that gives the
    /// same map (see `StainMap::cut`) rather than making it again.
    pub fn head_in(
        &self,
        frame: &RgbImage,
        stain: Option<&StainMap>,
        head: &HeadRegion,
        um_per_px: Option<f32>,
    ) -> Prepared {
        let (patch, loc, (ox, oy)) = self.locate_head(frame, stain, head, um_per_px);
        let mut prepared = self.finish(&self.window(&patch, &loc, &Jitter::default()), &loc);
        if let Some(h) = prepared.head.as_mut() {
            h.shift(ox, oy);
        }
        prepared
    }

    /// The upright window of a field head as the model sees it, at `out_px` a side (the
    /// model's input size gives its pixels; a larger size is for a person to look at).
    pub fn head_window(
        &self,
        frame: &RgbImage,
        head: &HeadRegion,
        um_per_px: Option<f32>,
        out_px: u32,
    ) -> RgbImage {
        let (patch, loc, _) = self.locate_head(frame, None, head, um_per_px);
        pose::cut_window(&patch, &loc.cut, out_px, &Jitter::default())
    }

    /// The crop-sized patch around a field head, the head located in it, and the patch's
    /// offset in the frame.
    fn locate_head(
        &self,
        frame: &RgbImage,
        stain: Option<&StainMap>,
        head: &HeadRegion,
        um_per_px: Option<f32>,
    ) -> (RgbImage, Located, (u32, u32)) {
        let window = self.spec.crop.window_px * self.scale(um_per_px);
        let (patch, local, offset) = head_patch(frame, head, window * CROP_CONTEXT);
        let contrast = self.spec.crop.contrast;
        let (w, h) = patch.dimensions();
        let cut = stain.and_then(|s| {
            let raw = s.cut(contrast, offset.0, offset.1, w, h)?;
            let smoothed = s.cut_smoothed(offset.0, offset.1, &raw);
            Some((raw, smoothed))
        });
        let (patch_stain, smoothed) = match cut {
            Some((raw, smoothed)) => (raw, Some(smoothed)),
            None => (pose::stain_map(&patch, contrast), None),
        };
        let centre = local.centroid;
        let loc = self.locate_in(&patch_stain, smoothed, Some(local), centre, window);
        (patch, loc, offset)
    }

    /// Frame pixels per training pixel: the training scale over the frame's, when both are
    /// known.
    fn scale(&self, um_per_px: Option<f32>) -> f32 {
        match (self.spec.crop.um_per_px, um_per_px) {
            (Some(train), Some(here)) if here > 0.0 => train / here,
            _ => 1.0,
        }
    }

    /// The pixel batches the network runs on for one batch of inputs: the pixels, then (with
    /// test-time mirror fusion) their left-right mirror image. `fuse` joins the outputs.
    pub fn views(&self, pixels: Vec<f32>) -> Vec<Vec<f32>> {
        if self.spec.test_time_mirror {
            let mirrored = mirror_tensor(&pixels, self.spec.input.size_px);
            vec![pixels, mirrored]
        } else {
            vec![pixels]
        }
    }

    /// The logits of the views of one batch, fused into one set (their mean).
    pub fn fuse(outputs: Vec<Vec<f32>>) -> Vec<f32> {
        let n = outputs.len().max(1) as f32;
        let mut it = outputs.into_iter();
        let mut sum = it.next().unwrap_or_default();
        for o in it {
            for (a, b) in sum.iter_mut().zip(o) {
                *a += b;
            }
        }
        if n > 1.0 {
            for a in &mut sum {
                *a /= n;
            }
        }
        sum
    }
}

/// The crop path found the segmenter's head, not a neighbour: close centroids, similar size.
fn same_head(found: &HeadRegion, seg: &HeadRegion) -> bool {
    let d = (found.centroid.0 - seg.centroid.0).hypot(found.centroid.1 - seg.centroid.1);
    let ratio = found.area_px() as f32 / seg.area_px().max(1) as f32;
    d <= 0.25 * seg.major_px.max(4.0) && (0.5..=2.0).contains(&ratio)
}

/// A square patch of about `side` px of the frame centred on the head (cut at the frame's
/// border, and grown to hold the whole head), the head in the patch's coordinates, and the
/// patch's offset in the frame.
pub fn head_patch(
    frame: &RgbImage,
    head: &HeadRegion,
    side: f32,
) -> (RgbImage, HeadRegion, (u32, u32)) {
    let (w, h) = frame.dimensions();
    let half = (side / 2.0).max(1.0);
    let (cx, cy) = head.centroid;
    let (bx0, by0, bx1, by1) = head
        .pixels
        .iter()
        .fold((u32::MAX, u32::MAX, 0, 0), |(a, b, c, d), &(x, y)| {
            (a.min(x), b.min(y), c.max(x), d.max(y))
        });
    let x0 = ((cx - half).max(0.0) as u32).min(bx0);
    let y0 = ((cy - half).max(0.0) as u32).min(by0);
    let x1 = ((cx + half) as u32).max(bx1).min(w.saturating_sub(1));
    let y1 = ((cy + half) as u32).max(by1).min(h.saturating_sub(1));
    let patch = pose::copy_rect(frame, x0, y0, x1 + 1 - x0, y1 + 1 - y0);
    let local = HeadRegion {
        pixels: head.pixels.iter().map(|&(x, y)| (x - x0, y - y0)).collect(),
        centroid: (cx - x0 as f32, cy - y0 as f32),
        tail_dir: head.tail_dir,
        major_px: head.major_px,
        minor_px: head.minor_px,
        polarity: head.polarity,
    };
    (patch, local, (x0, y0))
}

/// Standardise raw features with the spec's mean/std (empty when the model takes none).
pub fn standardise(raw: &[f32], spec: &ModelSpec) -> Vec<f32> {
    match &spec.features {
        None => Vec::new(),
        Some(f) => raw
            .iter()
            .zip(f.mean.iter().zip(&f.std))
            .map(|(v, (m, s))| ((v - m) / s).clamp(-8.0, 8.0))
            .collect(),
    }
}

/// The left-right mirror image of a channel-major square tensor (test-time fusion).
pub fn mirror_tensor(pixels: &[f32], size_px: u32) -> Vec<f32> {
    let s = size_px as usize;
    let mut out = pixels.to_vec();
    for row in out.chunks_mut(s) {
        row.reverse();
    }
    debug_assert_eq!(pixels.len() % (s * s).max(1), 0);
    out
}

/// An upright window (already `size_px` square) → normalised channel-major values.
pub fn to_tensor(window: &RgbImage, spec: &ModelSpec) -> Vec<f32> {
    let n = (window.width() * window.height()) as usize;
    let c = spec.input.channels as usize;
    let mut out = vec![0f32; c * n];
    for (i, p) in window.pixels().enumerate() {
        if c == 1 {
            let l = (0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32) / 255.0;
            out[i] = (l - spec.input.mean[0]) / spec.input.std[0];
        } else {
            for ch in 0..3 {
                out[ch * n + i] = (p[ch] as f32 / 255.0 - spec.input.mean[ch]) / spec.input.std[ch];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::spec::tests::example;
    use image::Rgb;

    #[test]
    fn tensor_layout_and_normalisation() {
        let spec = example();
        let mut img = RgbImage::from_pixel(32, 32, Rgb([255, 0, 128]));
        img.put_pixel(1, 0, Rgb([0, 255, 0]));
        let t = to_tensor(&img, &spec);
        assert_eq!(t.len(), 3 * 32 * 32);
        assert!((t[0] - 2.0).abs() < 1e-6); // (1 - 0.5) / 0.25
        assert!((t[1] + 2.0).abs() < 1e-6); // pixel 1, red 0
        assert!((t[1024] + 2.0).abs() < 1e-6); // green plane, pixel 0
        assert!((t[1025] - 2.0).abs() < 1e-6);
        let mut grey = spec.clone();
        grey.input.channels = 1;
        grey.input.mean = vec![0.0];
        grey.input.std = vec![1.0];
        assert_eq!(to_tensor(&img, &grey).len(), 1024);
        let m = mirror_tensor(&t, 32);
        assert_eq!(m[31], t[0]);
        assert_eq!(m[1024 + 30], t[1025]);
        assert_eq!(mirror_tensor(&m, 32), t);
    }

    #[test]
    fn crop_without_head_is_centred_and_flagged() {
        let mut spec = example();
        spec.features = Some(crate::core::spec::FeatureSpec {
            set: morphometry::FEATURE_SET.into(),
            count: FEATURES_WITH_FLAG,
            mean: vec![0.0; FEATURES_WITH_FLAG],
            std: vec![1.0; FEATURES_WITH_FLAG],
        });
        let blank = RgbImage::from_pixel(50, 70, Rgb([200, 200, 200]));
        let p = Preprocessor::new(Arc::new(spec)).crop(&blank);
        assert!(p.head.is_none());
        assert_eq!(p.features.len(), FEATURES_WITH_FLAG);
        assert!(p.features.iter().all(|v| *v == 0.0));
        assert_eq!(p.pixels.len(), 3 * 32 * 32);
    }
}
