//! The real camera device: Video4Linux through nokhwa. Only this file talks to nokhwa; the
//! capture logic (decode, reconnect) is in `camera` and is tested with a scripted device.

use nokhwa::Camera;
use nokhwa::utils::{
    ApiBackend, CameraFormat, CameraIndex, FrameFormat, RequestedFormat, RequestedFormatType,
    Resolution,
};

use crate::daemon::source::camera::{
    CameraDevice, CameraError, CameraRequest, CameraSelector, PixelFormat, RawFrame,
};

/// A camera the system lists, with the formats it offers.
#[derive(Debug, Clone)]
pub struct Listed {
    pub index: String,
    pub name: String,
    pub formats: Vec<String>,
}

/// Every V4L2 capture device and its formats (`spermscope cameras`).
pub fn list() -> Result<Vec<Listed>, String> {
    let found = nokhwa::query(ApiBackend::Video4Linux).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for info in found {
        let index = info.index().clone();
        let formats = Camera::with_backend(
            index.clone(),
            RequestedFormat::new::<nokhwa::pixel_format::RgbFormat>(RequestedFormatType::None),
            ApiBackend::Video4Linux,
        )
        .and_then(|mut c| c.compatible_camera_formats())
        .map(|fs| {
            fs.iter()
                .map(|f| {
                    format!(
                        "{}x{} {:?} {} frames/s",
                        f.width(),
                        f.height(),
                        f.format(),
                        f.frame_rate()
                    )
                })
                .collect()
        })
        .unwrap_or_else(|e| vec![format!("(formats not readable: {e})")]);
        out.push(Listed {
            index: index.to_string(),
            name: info.human_name(),
            formats,
        });
    }
    Ok(out)
}

/// The V4L2 format of a request; the GenICam-only layouts have none.
fn fourcc(f: PixelFormat) -> Option<FrameFormat> {
    match f {
        PixelFormat::Mjpeg => Some(FrameFormat::MJPEG),
        PixelFormat::Yuyv => Some(FrameFormat::YUYV),
        PixelFormat::Grey => Some(FrameFormat::GRAY),
        PixelFormat::Grey16 { .. } | PixelFormat::Rgb24 | PixelFormat::Bayer8(_) => None,
    }
}

fn ours(f: FrameFormat) -> Option<PixelFormat> {
    match f {
        FrameFormat::MJPEG => Some(PixelFormat::Mjpeg),
        FrameFormat::YUYV => Some(PixelFormat::Yuyv),
        FrameFormat::GRAY => Some(PixelFormat::Grey),
        _ => None,
    }
}

/// What the capture thread is asked to do.
enum Cmd {
    Open(CameraRequest),
    Frame,
    Close,
}

/// What it answers.
enum Reply {
    Opened(Result<(u32, u32, PixelFormat), CameraError>),
    Frame(Result<RawFrame, CameraError>),
}

/// A V4L2 camera. nokhwa's camera cannot move between threads, so it lives on a capture
/// thread of its own and this handle talks to it over channels.
pub struct V4lCamera {
    selector: CameraSelector,
    cmd: Option<crossbeam_channel::Sender<Cmd>>,
    reply: crossbeam_channel::Receiver<Reply>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl V4lCamera {
    pub fn new(selector: CameraSelector) -> Self {
        let (cmd_tx, cmd_rx) = crossbeam_channel::bounded::<Cmd>(1);
        let (reply_tx, reply_rx) = crossbeam_channel::bounded::<Reply>(1);
        let sel = selector.clone();
        let thread = std::thread::Builder::new()
            .name("camera".into())
            .spawn(move || capture_thread(sel, cmd_rx, reply_tx))
            .ok();
        Self {
            selector,
            cmd: Some(cmd_tx),
            reply: reply_rx,
            thread,
        }
    }

    fn ask(&self, cmd: Cmd) -> Option<Reply> {
        self.cmd.as_ref()?.send(cmd).ok()?;
        self.reply.recv().ok()
    }
}

impl Drop for V4lCamera {
    fn drop(&mut self) {
        self.cmd = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn index_of(selector: &CameraSelector) -> Result<CameraIndex, CameraError> {
    match selector {
        CameraSelector::Index(i) => Ok(CameraIndex::Index(*i)),
        CameraSelector::Name(name) => nokhwa::query(ApiBackend::Video4Linux)
            .map_err(|e| CameraError::NotFound(format!("'{name}' ({e})")))?
            .into_iter()
            .find(|c| c.human_name().contains(name.as_str()))
            .map(|c| c.index().clone())
            .ok_or_else(|| CameraError::NotFound(format!("named '{name}'"))),
    }
}

fn open_camera(
    selector: &CameraSelector,
    req: &CameraRequest,
) -> Result<(Camera, (u32, u32, PixelFormat)), CameraError> {
    let index = index_of(selector)?;
    let want = fourcc(req.format)
        .ok_or_else(|| CameraError::Format(format!("{:?} is not a V4L2 format", req.format)))?;
    let format = CameraFormat::new(Resolution::new(req.width_px, req.height_px), want, req.fps);
    let formats = [want];
    let requested = RequestedFormat::with_formats(RequestedFormatType::Closest(format), &formats);
    let mut camera = Camera::with_backend(index.clone(), requested, ApiBackend::Video4Linux)
        .map_err(|e| CameraError::NotFound(format!("{index}: {e}")))?;
    camera
        .open_stream()
        .map_err(|e| CameraError::Disconnected(e.to_string()))?;
    let got = camera.camera_format();
    let pixel = ours(got.format())
        .ok_or_else(|| CameraError::Format(format!("device offers {:?}", got.format())))?;
    Ok((camera, (got.width(), got.height(), pixel)))
}

fn capture_thread(
    selector: CameraSelector,
    cmds: crossbeam_channel::Receiver<Cmd>,
    replies: crossbeam_channel::Sender<Reply>,
) {
    let mut camera: Option<Camera> = None;
    for cmd in cmds {
        let reply = match cmd {
            Cmd::Open(req) => {
                if let Some(mut c) = camera.take() {
                    let _ = c.stop_stream();
                }
                Reply::Opened(open_camera(&selector, &req).map(|(c, got)| {
                    camera = Some(c);
                    got
                }))
            }
            Cmd::Frame => Reply::Frame(match camera.as_mut() {
                None => Err(CameraError::Disconnected("not open".into())),
                Some(c) => read_frame(c),
            }),
            Cmd::Close => {
                if let Some(mut c) = camera.take() {
                    let _ = c.stop_stream();
                }
                continue;
            }
        };
        if replies.send(reply).is_err() {
            break;
        }
    }
    if let Some(mut c) = camera.take() {
        let _ = c.stop_stream();
    }
}

fn read_frame(camera: &mut Camera) -> Result<RawFrame, CameraError> {
    let buf = camera
        .frame()
        .map_err(|e| CameraError::Disconnected(e.to_string()))?;
    let format = ours(buf.source_frame_format())
        .ok_or_else(|| CameraError::Format(format!("frame in {:?}", buf.source_frame_format())))?;
    Ok(RawFrame {
        width: buf.resolution().width(),
        height: buf.resolution().height(),
        format,
        data: buf.buffer().to_vec(),
    })
}

impl CameraDevice for V4lCamera {
    fn name(&self) -> String {
        match &self.selector {
            CameraSelector::Index(i) => format!("/dev/video{i}"),
            CameraSelector::Name(n) => format!("'{n}'"),
        }
    }

    fn open(&mut self, req: &CameraRequest) -> Result<(u32, u32, PixelFormat), CameraError> {
        match self.ask(Cmd::Open(req.clone())) {
            Some(Reply::Opened(r)) => r,
            _ => Err(CameraError::NotFound("capture thread gone".into())),
        }
    }

    fn frame(&mut self) -> Result<RawFrame, CameraError> {
        match self.ask(Cmd::Frame) {
            Some(Reply::Frame(r)) => r,
            _ => Err(CameraError::Disconnected("capture thread gone".into())),
        }
    }

    fn close(&mut self) {
        if let Some(c) = &self.cmd {
            let _ = c.send(Cmd::Close);
        }
    }
}
