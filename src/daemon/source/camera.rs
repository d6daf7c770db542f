//! Live capture from a microscope camera: format request, decoding to RGB, and reconnection
//! with backoff when the device goes away. The device sits behind `CameraDevice`, so tests
//! drive this logic with a scripted fake; `V4lCamera` (nokhwa, V4L2) and `GenicamCamera`
//! (Aravis: GigE Vision, USB3 Vision) are the real ones.

use std::time::{Duration, Instant};

use image::RgbImage;

use crate::core::imageio::{DecodeError, decode_rgb};
use crate::core::pixels::{self, Cfa};
use crate::daemon::source::{FrameSource, Pull, SourceNote};

/// Pixel formats a camera may deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PixelFormat {
    /// Motion JPEG: each frame a JPEG.
    Mjpeg,
    /// YUYV 4:2:2, two bytes a pixel.
    Yuyv,
    /// 8-bit grey.
    Grey,
    /// 16-bit grey, little-endian, with `bits` significant bits (GenICam Mono16; not a V4L2
    /// request).
    #[serde(skip_deserializing)]
    Grey16 { bits: u8 },
    /// Packed 8-bit RGB (GenICam RGB8).
    #[serde(skip_deserializing)]
    Rgb24,
    /// An 8-bit Bayer mosaic (GenICam BayerRG8, BayerBG8, BayerGB8, BayerGR8).
    #[serde(skip_deserializing)]
    Bayer8(Cfa),
}

/// Which camera to open.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum CameraSelector {
    Index(u32),
    /// The first device whose name contains this text.
    Name(String),
}

/// What the config asks of the camera.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CameraRequest {
    pub device: CameraSelector,
    pub width_px: u32,
    pub height_px: u32,
    pub fps: u32,
    pub format: PixelFormat,
}

/// One frame as the device hands it over.
#[derive(Debug, Clone)]
pub struct RawFrame {
    pub width: u32,
    pub height: u32,
    pub format: PixelFormat,
    pub data: Vec<u8>,
}

/// What went wrong with a device.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CameraError {
    #[error("camera {0} not found")]
    NotFound(String),
    #[error("camera disconnected: {0}")]
    Disconnected(String),
    #[error("camera cannot deliver the requested format: {0}")]
    Format(String),
    /// A frame arrived with parts missing (lost packets); it is counted and skipped.
    #[error("incomplete frame: {0}")]
    Incomplete(String),
}

/// A capture device: open it with a request, then read frames.
pub trait CameraDevice: Send {
    /// A name for logs.
    fn name(&self) -> String;
    /// Open (or reopen) the device; returns the format it will actually deliver.
    fn open(&mut self, req: &CameraRequest) -> Result<(u32, u32, PixelFormat), CameraError>;
    /// The next frame; blocks until the device delivers one.
    fn frame(&mut self) -> Result<RawFrame, CameraError>;
    fn close(&mut self);
    /// One line for the log: the device and what was asked of it.
    fn describe(&self, req: &CameraRequest) -> String {
        format!(
            "camera {} ({}x{} {:?} at {} frames/s requested)",
            self.name(),
            req.width_px,
            req.height_px,
            req.format,
            req.fps
        )
    }
}

/// Decode a raw frame to RGB.
pub fn decode(raw: &RawFrame) -> Result<RgbImage, DecodeError> {
    let (w, h) = (raw.width as usize, raw.height as usize);
    match raw.format {
        PixelFormat::Mjpeg => decode_rgb(&raw.data),
        PixelFormat::Grey => {
            if raw.data.len() < w * h {
                return Err(DecodeError::Invalid(format!(
                    "grey frame of {w}x{h} has {} bytes, needs {}",
                    raw.data.len(),
                    w * h
                )));
            }
            let rgb: Vec<u8> = raw.data[..w * h].iter().flat_map(|&v| [v, v, v]).collect();
            RgbImage::from_raw(raw.width, raw.height, rgb)
                .ok_or_else(|| DecodeError::Invalid("bad frame size".into()))
        }
        PixelFormat::Yuyv => {
            if w % 2 != 0 || raw.data.len() < w * h * 2 {
                return Err(DecodeError::Invalid(format!(
                    "YUYV frame of {w}x{h} has {} bytes, needs {}",
                    raw.data.len(),
                    w * h * 2
                )));
            }
            let mut rgb = Vec::with_capacity(w * h * 3);
            for q in raw.data[..w * h * 2].chunks_exact(4) {
                let (y0, u, y1, v) = (
                    q[0] as f32,
                    q[1] as f32 - 128.0,
                    q[2] as f32,
                    q[3] as f32 - 128.0,
                );
                for y in [y0, y1] {
                    // ITU-R BT.601, full range.
                    let r = y + 1.402 * v;
                    let g = y - 0.344_136 * u - 0.714_136 * v;
                    let b = y + 1.772 * u;
                    rgb.extend([r, g, b].map(|c| c.round().clamp(0.0, 255.0) as u8));
                }
            }
            RgbImage::from_raw(raw.width, raw.height, rgb)
                .ok_or_else(|| DecodeError::Invalid("bad frame size".into()))
        }
        PixelFormat::Grey16 { bits } => pixels::grey16_le(&raw.data, raw.width, raw.height, bits)
            .map_err(|e| DecodeError::Invalid(e.to_string())),
        PixelFormat::Rgb24 => pixels::rgb8(&raw.data, raw.width, raw.height)
            .map_err(|e| DecodeError::Invalid(e.to_string())),
        PixelFormat::Bayer8(cfa) => pixels::bayer8(&raw.data, raw.width, raw.height, cfa)
            .map_err(|e| DecodeError::Invalid(e.to_string())),
    }
}

/// Backoff between reconnection attempts.
const FIRST_RETRY: Duration = Duration::from_millis(250);
const LAST_RETRY: Duration = Duration::from_secs(10);
/// How long a `pull` waits before handing control back while the camera is away.
const IDLE_SLICE: Duration = Duration::from_millis(100);

/// A camera as a frame source.
pub struct CameraSource<D: CameraDevice> {
    device: D,
    request: CameraRequest,
    open: bool,
    retry_at: Instant,
    backoff: Duration,
    frames: u64,
    /// A note to hand over with the next pull.
    note: Option<SourceNote>,
}

impl<D: CameraDevice> CameraSource<D> {
    /// Open the camera now: a camera missing at start-up is an error, not a retry.
    pub fn open(mut device: D, request: CameraRequest) -> Result<Self, CameraError> {
        let (w, h, f) = device.open(&request)?;
        tracing::info!(
            camera = %device.name(),
            width = w,
            height = h,
            format = ?f,
            "camera opened"
        );
        Ok(Self {
            device,
            request,
            open: true,
            retry_at: Instant::now(),
            backoff: FIRST_RETRY,
            frames: 0,
            note: None,
        })
    }
}

impl<D: CameraDevice> FrameSource for CameraSource<D> {
    fn describe(&self) -> String {
        self.device.describe(&self.request)
    }

    fn live(&self) -> bool {
        true
    }

    fn pull(&mut self) -> Pull {
        if let Some(note) = self.note.take() {
            return Pull::Idle(Some(note));
        }
        if !self.open {
            let now = Instant::now();
            if now < self.retry_at {
                std::thread::sleep((self.retry_at - now).min(IDLE_SLICE));
                return Pull::Idle(None);
            }
            match self.device.open(&self.request) {
                Ok(_) => {
                    tracing::info!(camera = %self.device.name(), "camera back; capture resumes");
                    self.open = true;
                    self.backoff = FIRST_RETRY;
                    return Pull::Idle(Some(SourceNote::Reconnected));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "camera still away");
                    self.retry_at = Instant::now() + self.backoff;
                    self.backoff = (self.backoff * 2).min(LAST_RETRY);
                    return Pull::Idle(None);
                }
            }
        }
        match self.device.frame() {
            Ok(raw) => {
                self.frames += 1;
                let name = format!("camera-{:08}", self.frames);
                let t = Instant::now();
                match decode(&raw) {
                    Ok(image) => Pull::Frame {
                        name,
                        image: std::sync::Arc::new(image),
                        decode_ms: t.elapsed().as_secs_f32() * 1e3,
                    },
                    Err(e) => Pull::Unreadable {
                        name,
                        reason: e.to_string(),
                    },
                }
            }
            Err(CameraError::Incomplete(reason)) => {
                self.frames += 1;
                Pull::Incomplete {
                    name: format!("camera-{:08}", self.frames),
                    reason,
                }
            }
            Err(e) => {
                tracing::warn!(camera = %self.device.name(), error = %e, "camera lost; retrying with backoff");
                self.device.close();
                self.open = false;
                self.retry_at = Instant::now() + self.backoff;
                Pull::Idle(Some(SourceNote::Disconnected(e.to_string())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A device that plays a script: frames, errors, failed reopen attempts.
    struct Scripted {
        frames: VecDeque<Result<RawFrame, CameraError>>,
        reopen_failures: usize,
        opens: usize,
    }

    impl CameraDevice for Scripted {
        fn name(&self) -> String {
            "scripted".into()
        }
        fn open(&mut self, req: &CameraRequest) -> Result<(u32, u32, PixelFormat), CameraError> {
            self.opens += 1;
            if self.opens > 1 && self.reopen_failures > 0 {
                self.reopen_failures -= 1;
                return Err(CameraError::NotFound("scripted".into()));
            }
            Ok((req.width_px, req.height_px, req.format))
        }
        fn frame(&mut self) -> Result<RawFrame, CameraError> {
            self.frames
                .pop_front()
                .unwrap_or(Err(CameraError::Disconnected("script ended".into())))
        }
        fn close(&mut self) {}
    }

    fn grey(w: u32, h: u32, v: u8) -> RawFrame {
        RawFrame {
            width: w,
            height: h,
            format: PixelFormat::Grey,
            data: vec![v; (w * h) as usize],
        }
    }

    fn request() -> CameraRequest {
        CameraRequest {
            device: CameraSelector::Index(0),
            width_px: 4,
            height_px: 2,
            fps: 30,
            format: PixelFormat::Grey,
        }
    }

    #[test]
    fn decodes_grey_yuyv_and_refuses_short_buffers() {
        let img = decode(&grey(4, 2, 77)).unwrap();
        assert_eq!(img.get_pixel(3, 1).0, [77, 77, 77]);
        // Y=128, U=V=128 is mid grey.
        let yuyv = RawFrame {
            width: 2,
            height: 1,
            format: PixelFormat::Yuyv,
            data: vec![128, 128, 128, 128],
        };
        assert_eq!(decode(&yuyv).unwrap().get_pixel(1, 0).0, [128, 128, 128]);
        let short = RawFrame {
            data: vec![0; 3],
            ..grey(4, 2, 0)
        };
        assert!(decode(&short).unwrap_err().to_string().contains("needs 8"));
        // GenICam layouts: Mono16 (12 significant bits), RGB8, a Bayer mosaic.
        let mono16 = RawFrame {
            width: 1,
            height: 1,
            format: PixelFormat::Grey16 { bits: 12 },
            data: 4095u16.to_le_bytes().to_vec(),
        };
        assert_eq!(decode(&mono16).unwrap().get_pixel(0, 0).0, [255; 3]);
        let rgb = RawFrame {
            width: 1,
            height: 1,
            format: PixelFormat::Rgb24,
            data: vec![1, 2, 3],
        };
        assert_eq!(decode(&rgb).unwrap().get_pixel(0, 0).0, [1, 2, 3]);
        let bayer = RawFrame {
            width: 2,
            height: 2,
            format: PixelFormat::Bayer8(Cfa::Rg),
            data: vec![200, 100, 100, 50],
        };
        assert_eq!(decode(&bayer).unwrap().get_pixel(1, 1).0, [200, 100, 50]);
    }

    #[test]
    fn a_lost_camera_is_reported_retried_and_resumed() {
        let mut frames: VecDeque<_> = VecDeque::new();
        frames.push_back(Ok(grey(4, 2, 10)));
        frames.push_back(Err(CameraError::Disconnected("unplugged".into())));
        frames.push_back(Ok(grey(4, 2, 20)));
        frames.push_back(Err(CameraError::Incomplete("missing packets".into())));
        frames.push_back(Ok(RawFrame {
            data: vec![1],
            ..grey(4, 2, 0)
        }));
        let dev = Scripted {
            frames,
            reopen_failures: 2,
            opens: 0,
        };
        let mut src = CameraSource::open(dev, request()).unwrap();
        let mut log = Vec::new();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            match src.pull() {
                Pull::Frame { image, .. } => {
                    log.push(format!("frame {}", image.get_pixel(0, 0)[0]))
                }
                Pull::Unreadable { .. } => log.push("unreadable".into()),
                Pull::Incomplete { name, .. } => log.push(format!("incomplete {name}")),
                Pull::Idle(Some(SourceNote::Disconnected(_))) => log.push("lost".into()),
                Pull::Idle(Some(SourceNote::Reconnected)) => log.push("back".into()),
                Pull::Idle(None) => {}
                Pull::End => break,
            }
            if log.len() == 7 {
                break;
            }
        }
        assert_eq!(
            log,
            [
                "frame 10",
                "lost",
                "back",
                "frame 20",
                "incomplete camera-00000003",
                "unreadable",
                "lost"
            ],
            "{log:?}"
        );
        // The first reopen attempts failed, then the third open worked.
        assert_eq!(src.device.opens, 4);
    }

    #[test]
    fn a_camera_missing_at_start_is_an_error() {
        struct Missing;
        impl CameraDevice for Missing {
            fn name(&self) -> String {
                "missing".into()
            }
            fn open(&mut self, _: &CameraRequest) -> Result<(u32, u32, PixelFormat), CameraError> {
                Err(CameraError::NotFound("index 3".into()))
            }
            fn frame(&mut self) -> Result<RawFrame, CameraError> {
                Err(CameraError::Disconnected("never".into()))
            }
            fn close(&mut self) {}
        }
        assert!(matches!(
            CameraSource::open(Missing, request()),
            Err(CameraError::NotFound(_))
        ));
    }
}
