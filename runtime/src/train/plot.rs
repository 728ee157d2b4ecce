//! The run's plot, `loss.png` and `loss.svg` in the output dir: training loss and eval loss over
//! steps on top, learning rate (left axis) and gradient norm (right axis) below, each with axes,
//! ticks, labels and a legend (plotters, with the DejaVu Sans font built in so a machine without
//! fonts draws the same). The data is the run's whole log history, so a resumed run's plot covers
//! the steps before the resume too. A preference run (DPO, KTO) adds a third panel: the reward
//! accuracy (left axis) and the mean reward margin (right axis), as TRL logs them.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::{Error, Result};

/// The series a plot draws, from the log records (`step` with `loss`, `eval_loss`,
/// `learning_rate`, `grad_norm`).
#[derive(Debug, Default, PartialEq)]
pub struct Series {
    /// Training loss per logged step.
    pub loss: Vec<(f64, f64)>,
    /// Eval loss per evaluation.
    pub eval_loss: Vec<(f64, f64)>,
    /// Learning rate per logged step.
    pub learning_rate: Vec<(f64, f64)>,
    /// Gradient norm per logged step.
    pub grad_norm: Vec<(f64, f64)>,
    /// Preference runs: `rewards/accuracies` per logged step.
    pub accuracies: Vec<(f64, f64)>,
    /// Preference runs: `rewards/margins` per logged step.
    pub margins: Vec<(f64, f64)>,
}

impl Series {
    /// The series of `log` (records in order; later records of a step replace earlier ones).
    pub fn of(log: &[serde_json::Value]) -> Self {
        let mut s = Series::default();
        for r in log {
            let Some(step) = r.get("step").and_then(serde_json::Value::as_f64) else {
                continue;
            };
            let push = |key: &str, out: &mut Vec<(f64, f64)>| {
                if let Some(v) = r.get(key).and_then(serde_json::Value::as_f64)
                    && v.is_finite()
                {
                    out.retain(|p| p.0 != step);
                    out.push((step, v));
                }
            };
            push("loss", &mut s.loss);
            push("eval_loss", &mut s.eval_loss);
            push("learning_rate", &mut s.learning_rate);
            push("grad_norm", &mut s.grad_norm);
            push("rewards/accuracies", &mut s.accuracies);
            push("rewards/margins", &mut s.margins);
        }
        s
    }
}

fn font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The font is valid TrueType: registering it cannot fail.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

const SIZE: (u32, u32) = (900, 620);
const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const GREEN: RGBColor = RGBColor(44, 160, 44);
const RED: RGBColor = RGBColor(214, 39, 40);

fn range(points: &[&[(f64, f64)]]) -> (f64, f64) {
    let (lo, hi) = points
        .iter()
        .flat_map(|p| p.iter())
        .fold((f64::MAX, f64::MIN), |(lo, hi), p| {
            (lo.min(p.1), hi.max(p.1))
        });
    if lo > hi {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(hi.abs() * 1e-3).max(1e-12);
    (lo - pad, hi + pad)
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    s: &Series,
) -> std::result::Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |x: &dyn std::fmt::Display| x.to_string();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let steps = s
        .loss
        .iter()
        .chain(&s.eval_loss)
        .chain(&s.learning_rate)
        .map(|p| p.0)
        .fold(1.0f64, f64::max);
    let pref = !s.accuracies.is_empty() || !s.margins.is_empty();
    let (top, rest) = root.split_vertically(SIZE.1 * if pref { 9 } else { 11 } / 20);
    let (bottom, third) = if pref {
        let (a, b) = rest.split_vertically(SIZE.1 * 11 / 40);
        (a, Some(b))
    } else {
        (rest, None)
    };
    let (lo, hi) = range(&[&s.loss, &s.eval_loss]);
    let mut c = ChartBuilder::on(&top)
        .caption("loss", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..steps, lo..hi)
        .map_err(|x| e(&x))?;
    c.configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|x| e(&x))?;
    c.draw_series(LineSeries::new(
        s.loss.iter().copied(),
        BLUE.stroke_width(2),
    ))
    .map_err(|x| e(&x))?
    .label("train loss")
    .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLUE.stroke_width(2)));
    if !s.eval_loss.is_empty() {
        c.draw_series(LineSeries::new(
            s.eval_loss.iter().copied(),
            ORANGE.stroke_width(2),
        ))
        .map_err(|x| e(&x))?
        .label("eval loss")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], ORANGE.stroke_width(2)));
        c.draw_series(
            s.eval_loss
                .iter()
                .map(|&p| Circle::new(p, 3, ORANGE.filled())),
        )
        .map_err(|x| e(&x))?;
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    let (llo, lhi) = range(&[&s.learning_rate]);
    let (glo, ghi) = range(&[&s.grad_norm]);
    let mut c = ChartBuilder::on(&bottom)
        .caption("learning rate and gradient norm", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .right_y_label_area_size(64)
        .build_cartesian_2d(0f64..steps, llo.max(0.0)..lhi)
        .map_err(|x| e(&x))?
        .set_secondary_coord(0f64..steps, glo.max(0.0)..ghi);
    c.configure_mesh()
        .x_desc("step")
        .y_desc("learning rate")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.1e}"))
        .draw()
        .map_err(|x| e(&x))?;
    c.configure_secondary_axes()
        .y_desc("gradient norm")
        .draw()
        .map_err(|x| e(&x))?;
    c.draw_series(LineSeries::new(
        s.learning_rate.iter().copied(),
        GREEN.stroke_width(2),
    ))
    .map_err(|x| e(&x))?
    .label("learning rate")
    .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], GREEN.stroke_width(2)));
    c.draw_secondary_series(LineSeries::new(
        s.grad_norm.iter().copied(),
        RED.stroke_width(1),
    ))
    .map_err(|x| e(&x))?
    .label("gradient norm (right)")
    .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], RED.stroke_width(1)));
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    if let Some(area) = third {
        let (mlo, mhi) = range(&[&s.margins]);
        let mut c = ChartBuilder::on(&area)
            .caption("preference rewards", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .right_y_label_area_size(64)
            .build_cartesian_2d(0f64..steps, 0f64..1.0)
            .map_err(|x| e(&x))?
            .set_secondary_coord(0f64..steps, mlo..mhi);
        c.configure_mesh()
            .x_desc("step")
            .y_desc("reward accuracy")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .draw()
            .map_err(|x| e(&x))?;
        c.configure_secondary_axes()
            .y_desc("reward margin")
            .draw()
            .map_err(|x| e(&x))?;
        c.draw_series(LineSeries::new(
            s.accuracies.iter().copied(),
            BLUE.stroke_width(2),
        ))
        .map_err(|x| e(&x))?
        .label("reward accuracy")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLUE.stroke_width(2)));
        c.draw_secondary_series(LineSeries::new(
            s.margins.iter().copied(),
            ORANGE.stroke_width(2),
        ))
        .map_err(|x| e(&x))?
        .label("reward margin (right)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], ORANGE.stroke_width(2)));
        c.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))
}

/// Writes `loss.svg` and `loss.png` into `dir` from the run's `log` (each file atomically).
pub fn write(dir: &Path, log: &[serde_json::Value]) -> Result<()> {
    font();
    let s = Series::of(log);
    let fail = |p: &Path, m: String| Error::InvalidArgument(format!("`{}`: {m}", p.display()));
    let svg_path = dir.join("loss.svg");
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        draw(&root, &s).map_err(|m| fail(&svg_path, m))?;
    }
    crate::sandbox::write_atomic(&svg_path, svg.as_bytes())?;
    let png_path = dir.join("loss.png");
    let mut rgb = vec![0u8; SIZE.0 as usize * SIZE.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area();
        draw(&root, &s).map_err(|m| fail(&png_path, m))?;
    }
    crate::sandbox::write_atomic_with(&png_path, &mut |w| {
        use image::ImageEncoder as _;
        image::codecs::png::PngEncoder::new(w)
            .write_image(&rgb, SIZE.0, SIZE.1, image::ColorType::Rgb8)
            .map_err(std::io::Error::other)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_plot_has_every_series_axes_and_a_legend() {
        let log: Vec<serde_json::Value> = (1..=20)
            .map(|i| {
                serde_json::json!({"step": i, "loss": 3.0 / f64::from(i), "learning_rate": 1e-3 * f64::from(i) / 20.0, "grad_norm": 1.0 + f64::from(i % 3)})
            })
            .chain([serde_json::json!({"step": 10, "eval_loss": 0.5}), serde_json::json!({"step": 20, "eval_loss": 0.3})])
            .collect();
        let s = Series::of(&log);
        assert_eq!(
            (s.loss.len(), s.eval_loss.len(), s.grad_norm.len()),
            (20, 2, 20)
        );
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &log).unwrap();
        let svg = std::fs::read_to_string(dir.path().join("loss.svg")).unwrap();
        for text in [
            "train loss",
            "eval loss",
            "learning rate",
            "gradient norm (right)",
            "step",
        ] {
            assert!(svg.contains(text), "`{text}` in the SVG");
        }
        let png = std::fs::read(dir.path().join("loss.png")).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        assert!(png.len() > 10_000, "a drawn image, {} bytes", png.len());
        assert!(
            !svg.contains("reward accuracy"),
            "no preference panel for SFT"
        );
        // A preference run's rewards get their panel.
        let pref: Vec<serde_json::Value> = (1..=10)
            .map(|i| serde_json::json!({"step": i, "loss": 0.7, "learning_rate": 1e-4, "grad_norm": 1.0, "rewards/accuracies": f64::from(i) / 10.0, "rewards/margins": 0.1 * f64::from(i)}))
            .collect();
        write(dir.path(), &pref).unwrap();
        let svg = std::fs::read_to_string(dir.path().join("loss.svg")).unwrap();
        for text in [
            "preference rewards",
            "reward accuracy",
            "reward margin (right)",
        ] {
            assert!(svg.contains(text), "`{text}` in the SVG");
        }
    }
}
