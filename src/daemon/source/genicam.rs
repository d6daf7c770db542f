//! GenICam cameras (GigE Vision, USB3 Vision: Basler, FLIR, Allied Vision, IDS...) through
//! Aravis, behind the same `CameraDevice` trait as V4L2, so decoding, incomplete-frame counting
//! and reconnection with backoff are `camera`'s. Only this file talks to Aravis. `[source.genicam]`
//! lives here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use aravis::glib::prelude::Cast;
use aravis::prelude::*;
use aravis::{BufferStatus, Camera, GvStreamPacketResend, Stream};
use serde::{Deserialize, Serialize};

use crate::core::pixels::Cfa;
use crate::daemon::check::{ConfigError, invalid, positive};
use crate::daemon::source::camera::{
    CameraDevice, CameraError, CameraRequest, CameraSelector, PixelFormat, RawFrame,
};

/// The pixel formats read, by their GenICam names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GenicamFormat {
    Mono8,
    Mono16,
    #[serde(rename = "RGB8")]
    Rgb8,
    #[serde(rename = "BayerRG8")]
    BayerRg8,
    #[serde(rename = "BayerBG8")]
    BayerBg8,
    #[serde(rename = "BayerGB8")]
    BayerGb8,
    #[serde(rename = "BayerGR8")]
    BayerGr8,
}

impl GenicamFormat {
    /// The name the camera's `PixelFormat` feature takes.
    pub fn genicam_name(self) -> &'static str {
        match self {
            GenicamFormat::Mono8 => "Mono8",
            GenicamFormat::Mono16 => "Mono16",
            GenicamFormat::Rgb8 => "RGB8",
            GenicamFormat::BayerRg8 => "BayerRG8",
            GenicamFormat::BayerBg8 => "BayerBG8",
            GenicamFormat::BayerGb8 => "BayerGB8",
            GenicamFormat::BayerGr8 => "BayerGR8",
        }
    }
}

/// `[source.genicam]`: a GenICam camera through Aravis.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawGenicam {
    /// Which camera: its serial number, its device id or its address as `spermscope cameras`
    /// lists them. Unset: the first camera found.
    pub camera: Option<String>,
    /// `Mono8`, `Mono16`, `RGB8`, `BayerRG8`, `BayerBG8`, `BayerGB8` or `BayerGR8`. Unset: the
    /// camera's current format (one of these).
    pub pixel_format: Option<GenicamFormat>,
    /// Bits of a `Mono16` sample that carry data (12 for a 12-bit sensor); the top 8 of them
    /// become the frame.
    pub significant_bits: u8,
    /// Exposure time, µs (auto exposure is turned off). Unset: as the camera is.
    pub exposure_us: Option<f64>,
    /// Gain, dB (auto gain is turned off). Unset: as the camera is.
    pub gain_db: Option<f64>,
    /// Frame rate. Unset: as the camera is.
    pub fps: Option<f64>,
    /// Region of interest `[x, y, width, height]` in sensor pixels. Unset: as the camera is.
    pub roi: Option<[u32; 4]>,
    /// Ask a GigE Vision camera to resend lost packets before a frame is given up as incomplete.
    pub packet_resend: bool,
    /// Seconds without a frame after which the camera counts as lost and is reopened (with
    /// backoff) until it answers again.
    pub frame_timeout_secs: f32,
    /// Frame buffers handed to the stream.
    pub buffers: usize,
}

impl Default for RawGenicam {
    fn default() -> Self {
        Self {
            camera: None,
            pixel_format: None,
            significant_bits: 16,
            exposure_us: None,
            gain_db: None,
            fps: None,
            roi: None,
            packet_resend: true,
            frame_timeout_secs: 3.0,
            buffers: 8,
        }
    }
}

/// The camera's resolved settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenicamSettings {
    pub camera: Option<String>,
    pub pixel_format: Option<GenicamFormat>,
    pub significant_bits: u8,
    pub exposure_us: Option<f64>,
    pub gain_db: Option<f64>,
    pub fps: Option<f64>,
    pub roi: Option<[u32; 4]>,
    pub packet_resend: bool,
    pub frame_timeout_secs: f32,
    pub buffers: usize,
}

impl RawGenicam {
    /// Check every value (no I/O).
    pub fn resolve(&self) -> Result<GenicamSettings, ConfigError> {
        if self.camera.as_deref().is_some_and(|c| c.trim().is_empty()) {
            return Err(invalid("source.genicam.camera", "must not be empty"));
        }
        if !(8..=16).contains(&self.significant_bits) {
            return Err(invalid(
                "source.genicam.significant_bits",
                "must lie in 8..=16",
            ));
        }
        if let Some(e) = self.exposure_us {
            positive("source.genicam.exposure_us", e as f32)?;
        }
        if self.gain_db.is_some_and(|g| !g.is_finite()) {
            return Err(invalid("source.genicam.gain_db", "must be a number"));
        }
        if let Some(f) = self.fps {
            positive("source.genicam.fps", f as f32)?;
        }
        if let Some([_, _, w, h]) = self.roi
            && (w < 16 || h < 16)
        {
            return Err(invalid(
                "source.genicam.roi",
                "width and height must be at least 16 px",
            ));
        }
        positive("source.genicam.frame_timeout_secs", self.frame_timeout_secs)?;
        if !(2..=256).contains(&self.buffers) {
            return Err(invalid("source.genicam.buffers", "must lie in 2..=256"));
        }
        Ok(GenicamSettings {
            camera: self.camera.clone(),
            pixel_format: self.pixel_format,
            significant_bits: self.significant_bits,
            exposure_us: self.exposure_us,
            gain_db: self.gain_db,
            fps: self.fps,
            roi: self.roi,
            packet_resend: self.packet_resend,
            frame_timeout_secs: self.frame_timeout_secs,
            buffers: self.buffers,
        })
    }
}

impl GenicamSettings {
    /// The request `CameraSource` keeps (for the log): size 0 means as the camera is.
    pub fn request(&self) -> CameraRequest {
        let [_, _, w, h] = self.roi.unwrap_or([0; 4]);
        CameraRequest {
            device: match &self.camera {
                Some(c) => CameraSelector::Name(c.clone()),
                None => CameraSelector::Index(0),
            },
            width_px: w,
            height_px: h,
            fps: self.fps.map_or(0, |f| f.round() as u32),
            format: match self.pixel_format {
                Some(f) => ours_of(f, self.significant_bits),
                None => PixelFormat::Grey,
            },
        }
    }
}

fn ours_of(f: GenicamFormat, bits: u8) -> PixelFormat {
    match f {
        GenicamFormat::Mono8 => PixelFormat::Grey,
        GenicamFormat::Mono16 => PixelFormat::Grey16 { bits },
        GenicamFormat::Rgb8 => PixelFormat::Rgb24,
        GenicamFormat::BayerRg8 => PixelFormat::Bayer8(Cfa::Rg),
        GenicamFormat::BayerBg8 => PixelFormat::Bayer8(Cfa::Bg),
        GenicamFormat::BayerGb8 => PixelFormat::Bayer8(Cfa::Gb),
        GenicamFormat::BayerGr8 => PixelFormat::Bayer8(Cfa::Gr),
    }
}

/// Our layout of an Aravis pixel format, when it is one we read.
fn ours(f: aravis::PixelFormat, bits: u8) -> Option<PixelFormat> {
    use aravis::PixelFormat as A;
    let g = match f {
        A::MONO_8 => GenicamFormat::Mono8,
        A::MONO_16 => GenicamFormat::Mono16,
        A::RGB_8_PACKED => GenicamFormat::Rgb8,
        A::BAYER_RG_8 => GenicamFormat::BayerRg8,
        A::BAYER_BG_8 => GenicamFormat::BayerBg8,
        A::BAYER_GB_8 => GenicamFormat::BayerGb8,
        A::BAYER_GR_8 => GenicamFormat::BayerGr8,
        _ => return None,
    };
    Some(ours_of(g, bits))
}

/// How long one wait for a buffer lasts before the loss checks run again.
const POP_SLICE_US: u64 = 100_000;

/// A GenICam camera: the Aravis camera and stream while open.
pub struct GenicamCamera {
    settings: GenicamSettings,
    open: Option<(Camera, Stream)>,
    /// Set by Aravis when the control channel is lost (no heartbeat answer).
    control_lost: Arc<AtomicBool>,
    /// The layout frames are decoded from (fixed while open).
    format: PixelFormat,
}

impl GenicamCamera {
    pub fn new(settings: GenicamSettings) -> Self {
        Self {
            settings,
            open: None,
            control_lost: Arc::new(AtomicBool::new(false)),
            format: PixelFormat::Grey,
        }
    }

    fn configure(&self, camera: &Camera) -> Result<(), aravis::glib::Error> {
        let s = &self.settings;
        if let Some(f) = s.pixel_format {
            camera.set_pixel_format_from_string(f.genicam_name())?;
        }
        if let Some([x, y, w, h]) = s.roi {
            camera.set_region(x as i32, y as i32, w as i32, h as i32)?;
        }
        if let Some(f) = s.fps {
            camera.set_frame_rate(f)?;
        }
        if let Some(e) = s.exposure_us {
            // Not every camera has auto exposure; a fixed time is what was asked for.
            let _ = camera.set_exposure_time_auto(aravis::Auto::Off);
            camera.set_exposure_time(e)?;
        }
        if let Some(g) = s.gain_db {
            let _ = camera.set_gain_auto(aravis::Auto::Off);
            camera.set_gain(g)?;
        }
        Ok(())
    }

    fn start(&mut self) -> Result<(u32, u32, PixelFormat), CameraError> {
        let name = self.name();
        let id = match &self.settings.camera {
            Some(wanted) => Some(find(wanted)?),
            None => None,
        };
        let camera = Camera::new(id.as_deref())
            .map_err(|e| CameraError::NotFound(format!("{name} ({e})")))?;
        self.configure(&camera)
            .map_err(|e| CameraError::Format(format!("{name}: {e}")))?;
        let fmt = camera
            .pixel_format()
            .map_err(|e| CameraError::Disconnected(e.to_string()))?;
        let format = ours(fmt, self.settings.significant_bits).ok_or_else(|| {
            CameraError::Format(format!(
                "{name} delivers pixel format 0x{:08x}; set source.genicam.pixel_format",
                fmt.raw()
            ))
        })?;
        let (_, _, w, h) = camera
            .region()
            .map_err(|e| CameraError::Disconnected(e.to_string()))?;
        let payload = camera
            .payload()
            .map_err(|e| CameraError::Disconnected(e.to_string()))?;
        let stream = camera
            .create_stream()
            .map_err(|e| CameraError::Disconnected(format!("{name}: no stream: {e}")))?;
        if let Some(gv) = stream.downcast_ref::<aravis::GvStream>() {
            gv.set_packet_resend(if self.settings.packet_resend {
                GvStreamPacketResend::Always
            } else {
                GvStreamPacketResend::Never
            });
        }
        for _ in 0..self.settings.buffers {
            stream.push_buffer(aravis::Buffer::new_allocate(payload as usize));
        }
        self.control_lost.store(false, Ordering::SeqCst);
        if let Some(device) = camera.device() {
            let lost = self.control_lost.clone();
            device.connect_control_lost(move |_| lost.store(true, Ordering::SeqCst));
        }
        camera
            .start_acquisition()
            .map_err(|e| CameraError::Disconnected(format!("{name}: {e}")))?;
        self.format = format;
        self.open = Some((camera, stream));
        Ok((w.max(0) as u32, h.max(0) as u32, format))
    }
}

impl CameraDevice for GenicamCamera {
    fn name(&self) -> String {
        match &self.settings.camera {
            Some(c) => format!("GenICam '{c}'"),
            None => "GenICam (first found)".into(),
        }
    }

    fn describe(&self, _req: &CameraRequest) -> String {
        let s = &self.settings;
        let or_camera = |v: Option<String>| v.unwrap_or_else(|| "as set on the camera".into());
        format!(
            "{}: pixel format {}, region {}, {} frames/s, exposure {}, gain {}",
            self.name(),
            or_camera(s.pixel_format.map(|f| f.genicam_name().to_string())),
            or_camera(s.roi.map(|[x, y, w, h]| format!("{w}x{h} at ({x}, {y})"))),
            or_camera(s.fps.map(|f| f.to_string())),
            or_camera(s.exposure_us.map(|e| format!("{e} µs"))),
            or_camera(s.gain_db.map(|g| format!("{g} dB"))),
        )
    }

    fn open(&mut self, _req: &CameraRequest) -> Result<(u32, u32, PixelFormat), CameraError> {
        self.close();
        self.start()
    }

    fn frame(&mut self) -> Result<RawFrame, CameraError> {
        let timeout = Duration::from_secs_f32(self.settings.frame_timeout_secs);
        let deadline = Instant::now() + timeout;
        let Some((_, stream)) = &self.open else {
            return Err(CameraError::Disconnected("not open".into()));
        };
        loop {
            if self.control_lost.load(Ordering::SeqCst) {
                return Err(CameraError::Disconnected("control channel lost".into()));
            }
            let Some(buffer) = stream.timeout_pop_buffer(POP_SLICE_US) else {
                if Instant::now() >= deadline {
                    return Err(CameraError::Disconnected(format!(
                        "no frame for {:.1} s",
                        timeout.as_secs_f32()
                    )));
                }
                continue;
            };
            let status = buffer.status();
            let frame = if status == BufferStatus::Success {
                let fmt = buffer.image_pixel_format();
                match ours(fmt, self.settings.significant_bits) {
                    Some(format) => Ok(RawFrame {
                        width: buffer.image_width().max(0) as u32,
                        height: buffer.image_height().max(0) as u32,
                        format,
                        data: buffer.image_data(),
                    }),
                    None => Err(CameraError::Incomplete(format!(
                        "pixel format 0x{:08x} is not read",
                        fmt.raw()
                    ))),
                }
            } else {
                Err(CameraError::Incomplete(format!("{status:?}")))
            };
            // The buffer goes back to the stream for the next frame.
            stream.push_buffer(buffer);
            return frame;
        }
    }

    fn close(&mut self) {
        if let Some((camera, _stream)) = self.open.take() {
            let _ = camera.stop_acquisition();
        }
    }
}

impl Drop for GenicamCamera {
    fn drop(&mut self) {
        self.close();
    }
}

/// A GenICam camera as discovery finds it, with what it offers when it can be opened.
#[derive(Debug, Clone)]
pub struct Listed {
    pub id: String,
    pub vendor: String,
    pub model: String,
    pub protocol: String,
    pub address: String,
    /// What the camera says when opened, or why it could not be.
    pub details: Result<Details, String>,
}

/// A camera's serial number, sensor size and pixel formats.
#[derive(Debug, Clone)]
pub struct Details {
    pub serial: String,
    pub sensor: (i32, i32),
    pub formats: Vec<String>,
}

/// Aravis's device list is global state: one token for the process, one user at a time.
fn aravis() -> Option<&'static Mutex<aravis::Aravis>> {
    static TOKEN: OnceLock<Option<Mutex<aravis::Aravis>>> = OnceLock::new();
    TOKEN
        .get_or_init(|| aravis::Aravis::initialize().ok().map(Mutex::new))
        .as_ref()
}

/// What discovery finds: id, vendor, model, protocol, address, physical id.
type Found = [String; 6];

/// Discover the cameras (a broadcast on every network interface for GigE Vision).
fn discover() -> Vec<Found> {
    let Some(token) = aravis() else {
        return Vec::new();
    };
    let text = |c: &std::ffi::CString| c.to_string_lossy().into_owned();
    let token = token.lock().unwrap_or_else(|p| p.into_inner());
    token
        .get_device_list()
        .iter()
        .map(|d| {
            [
                text(&d.id),
                text(&d.vendor),
                text(&d.model),
                text(&d.protocol),
                text(&d.address),
                text(&d.physical_id),
            ]
        })
        .collect()
}

/// The device id of the camera `wanted` names: its id, address or physical id exactly, its
/// serial number (ids end in `-SERIAL`), or else the first whose id contains the text.
fn find(wanted: &str) -> Result<String, CameraError> {
    let found = discover();
    let exact = found.iter().find(|[id, _, _, _, address, physical]| {
        id == wanted
            || address == wanted
            || physical == wanted
            || id.ends_with(&format!("-{wanted}"))
    });
    exact
        .or_else(|| found.iter().find(|d| d[0].contains(wanted)))
        .map(|d| d[0].clone())
        .ok_or_else(|| {
            CameraError::NotFound(format!(
                "GenICam '{wanted}' (discovery found {})",
                if found.is_empty() {
                    "no camera".to_string()
                } else {
                    found
                        .iter()
                        .map(|d| d[0].as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ))
        })
}

/// Every GenICam camera discovery finds (`spermscope cameras`). Discovery broadcasts on
/// every network interface.
pub fn list() -> Result<Vec<Listed>, String> {
    if aravis().is_none() {
        return Err("Aravis could not be initialised".into());
    }
    Ok(discover()
        .into_iter()
        .map(|[id, vendor, model, protocol, address, _]| Listed {
            details: details(&id),
            id,
            vendor,
            model,
            protocol,
            address,
        })
        .collect())
}

fn details(id: &str) -> Result<Details, String> {
    let camera = Camera::new(Some(id)).map_err(|e| e.to_string())?;
    let serial = camera
        .device_serial_number()
        .map(|s| s.to_string())
        .map_err(|e| e.to_string())?;
    let sensor = camera.sensor_size().map_err(|e| e.to_string())?;
    let formats = camera
        .dup_available_pixel_formats_as_strings()
        .map_err(|e| e.to_string())?
        .iter()
        .map(|f| f.to_string())
        .collect();
    Ok(Details {
        serial,
        sensor,
        formats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked_and_formats_map_to_layouts() {
        let raw: RawGenicam = toml::from_str(
            "camera = \"GV01\"\npixel_format = \"BayerRG8\"\nroi = [0, 0, 256, 128]\nfps = 10.0\n",
        )
        .unwrap();
        let s = raw.resolve().unwrap();
        let req = s.request();
        assert_eq!((req.width_px, req.height_px, req.fps), (256, 128, 10));
        assert_eq!(req.format, PixelFormat::Bayer8(Cfa::Rg));
        assert_eq!(
            ours(aravis::PixelFormat::MONO_16, 12),
            Some(PixelFormat::Grey16 { bits: 12 })
        );
        assert_eq!(ours(aravis::PixelFormat::YUV_422_PACKED, 16), None);
        for (bad, key) in [
            ("significant_bits = 20", "significant_bits"),
            ("roi = [0, 0, 4, 4]", "roi"),
            ("buffers = 1", "buffers"),
            ("camera = \" \"", "camera"),
            ("frame_timeout_secs = 0", "frame_timeout_secs"),
        ] {
            let raw: RawGenicam = toml::from_str(bad).unwrap();
            let e = raw.resolve().unwrap_err().to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
        assert!(toml::from_str::<RawGenicam>("pixel_format = \"YUV422\"").is_err());
    }
}
