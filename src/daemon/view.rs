//! The live view a person at the microscope looks at: a page with the latest frame, each head
//! outlined in its class colour with its track id, and the running tally (cells, % normal
//! forms with its 95% interval, the 200-cell minimum). The publisher leaves its latest frame
//! here (an `Arc` of the image and a few numbers, no drawing); drawing and JPEG encoding happen
//! only when a browser asks, on the view's own thread.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use image::{Rgb, RgbImage};

use crate::core::draw::digits;
use crate::daemon::frame::Work;
use crate::daemon::publish::Record;
use crate::daemon::report::Report;
use crate::daemon::service::{Answer, HttpError, HttpServer};

/// One head as the view draws it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Mark {
    pub bbox: [u32; 4],
    pub track: Option<u64>,
    pub class: Option<String>,
    pub normal: Option<bool>,
}

/// The latest frame of a sample and its running report.
#[derive(Debug, Clone)]
struct Latest {
    seq: u64,
    name: String,
    image: Arc<RgbImage>,
    marks: Vec<Mark>,
    report: Report,
}

/// What the publisher shares with the view server: the latest frame, replaced on each frame.
#[derive(Debug, Default)]
pub struct View {
    latest: Mutex<Option<Latest>>,
}

impl View {
    /// Leave this frame (its detection records) and the report so far for the view.
    pub fn update(&self, w: &Work, detections: &[Record], report: Report) {
        let marks = detections
            .iter()
            .map(|r| Mark {
                bbox: r.bbox,
                track: r.track,
                class: r.class.clone(),
                normal: r.normal,
            })
            .collect();
        let latest = Latest {
            seq: w.frame.seq,
            name: w.frame.name.clone(),
            image: w.frame.image.clone(),
            marks,
            report,
        };
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(latest);
    }

    fn latest(&self) -> Option<Latest> {
        self.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The outline colour of a head: green normal, red abnormal, grey uncertain or not sperm,
/// yellow not classified.
fn colour(m: &Mark) -> Rgb<u8> {
    match (m.class.as_deref(), m.normal) {
        (None, _) => Rgb([230, 200, 0]),
        (Some(_), Some(true)) => Rgb([0, 200, 60]),
        (Some("uncertain" | "non-sperm"), _) => Rgb([150, 150, 150]),
        (Some(_), _) => Rgb([230, 30, 30]),
    }
}

/// The frame with each head outlined (3 px) and its track id written above it.
pub fn annotate(image: &RgbImage, marks: &[Mark]) -> RgbImage {
    let mut out = image.clone();
    let (w, h) = out.dimensions();
    for m in marks {
        let c = colour(m);
        let [x0, y0, x1, y1] = m.bbox;
        let (x0, y0) = (x0.saturating_sub(4), y0.saturating_sub(4));
        let (x1, y1) = ((x1 + 4).min(w - 1), (y1 + 4).min(h - 1));
        for t in 0..3 {
            for x in x0..=x1 {
                out.put_pixel(x, (y0 + t).min(h - 1), c);
                out.put_pixel(x, y1.saturating_sub(t), c);
            }
            for y in y0..=y1 {
                out.put_pixel((x0 + t).min(w - 1), y, c);
                out.put_pixel(x1.saturating_sub(t), y, c);
            }
        }
        if let Some(id) = m.track {
            digits(&mut out, &id.to_string(), x0, y0.saturating_sub(17), c);
        }
    }
    out
}

const PAGE: &str = include_str!("view.html");

/// Serve the page (`/`), the annotated frame (`/frame.jpg`) and the tally (`/tally.json`), each
/// with `?sample=ID` (default: the first pipeline's).
pub fn view_server(
    addr: SocketAddr,
    views: Vec<(String, Arc<View>)>,
) -> Result<HttpServer, HttpError> {
    HttpServer::start("live view", addr, move |url| answer(url, &views))
}

/// The answer to one request: status, content type, body.
fn answer(url: &str, views: &[(String, Arc<View>)]) -> Answer {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let wanted = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("sample="))
        .map(percent_decode);
    let view = match &wanted {
        Some(s) => views.iter().find(|(name, _)| name == s),
        None => views.first(),
    };
    let text = "text/plain; charset=utf-8";
    match (path, view) {
        ("/", _) => (200, "text/html; charset=utf-8", PAGE.as_bytes().to_vec()),
        (_, None) => (404, text, b"no such sample\n".to_vec()),
        ("/frame.jpg", Some((_, v))) => match v.latest() {
            None => (503, text, b"no frame yet\n".to_vec()),
            Some(l) => {
                let img = annotate(&l.image, &l.marks);
                let mut jpeg = Vec::new();
                let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 80);
                match img.write_with_encoder(enc) {
                    Ok(()) => (200, "image/jpeg", jpeg),
                    Err(e) => (500, text, e.to_string().into_bytes()),
                }
            }
        },
        ("/tally.json", Some((sample, v))) => {
            let body = match v.latest() {
                None => serde_json::json!({"sample": sample, "frame": null}),
                Some(l) => serde_json::json!({
                    "sample": sample,
                    "frame": {"seq": l.seq, "name": l.name},
                    "heads": l.marks,
                    "report": l.report,
                }),
            };
            (200, "application/json", body.to_string().into_bytes())
        }
        _ => (
            404,
            text,
            b"not found: try /, /frame.jpg or /tally.json\n".to_vec(),
        ),
    }
}

/// `%XX` escapes and `+` in a query value.
fn percent_decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push(h * 16 + l);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_outlined_in_their_class_colour_with_their_track_id() {
        let img = RgbImage::from_pixel(200, 120, Rgb([255, 255, 255]));
        let marks = vec![
            Mark {
                bbox: [40, 40, 70, 80],
                track: Some(12),
                class: Some("normal".into()),
                normal: Some(true),
            },
            Mark {
                bbox: [120, 40, 150, 80],
                track: Some(3),
                class: None,
                normal: None,
            },
        ];
        let out = annotate(&img, &marks);
        assert_eq!(*out.get_pixel(36, 60), Rgb([0, 200, 60]));
        assert_eq!(*out.get_pixel(116, 60), Rgb([230, 200, 0]));
        assert_eq!(*out.get_pixel(55, 60), Rgb([255, 255, 255]));
        // The digits "12" above the first head.
        let inked = (36..70)
            .flat_map(|x| (19..34).map(move |y| (x, y)))
            .filter(|&(x, y)| *out.get_pixel(x, y) == Rgb([0, 200, 60]))
            .count();
        assert!(inked > 40, "{inked}");
    }

    #[test]
    fn queries_pick_the_sample() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("100%"), "100%");
        let views = vec![("s 1".to_string(), Arc::new(View::default()))];
        assert_eq!(answer("/frame.jpg?sample=s%201", &views).0, 503);
        assert_eq!(answer("/frame.jpg?sample=other", &views).0, 404);
        let (code, kind, body) = answer("/tally.json", &views);
        assert_eq!((code, kind), (200, "application/json"));
        assert!(String::from_utf8(body).unwrap().contains("\"frame\":null"));
        assert_eq!(answer("/", &views).0, 200);
    }
}
