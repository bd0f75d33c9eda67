//! Loss curves drawn as SVG and PNG (plotters), one or more named series on shared axes: measured-often
//! series as lines (raw ones faint, with a smoothed line over them), measured-rarely ones
//! (validation) as markers, so no line suggests values between measurements; optionally the
//! learning rate on a second axis.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::model::error::ModelError;

/// One line: a name and (step, loss) points.
pub struct Series<'a> {
    /// Legend name.
    pub name: &'a str,
    /// Points.
    pub points: &'a [(f64, f64)],
}

/// How a series is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// A line.
    Line,
    /// A thin, light line (raw values under their smoothed curve).
    Faint,
    /// Markers only, no line between them.
    Markers,
}

/// A series with its style.
pub struct Styled<'a> {
    /// The series.
    pub series: Series<'a>,
    /// How to draw it.
    pub style: Style,
}

/// An exponential moving average of `points` (factor `beta`), bias-corrected as Adam's moments
/// are, so the first steps are not pulled toward zero.
pub fn smoothed(points: &[(f64, f64)], beta: f64) -> Vec<(f64, f64)> {
    let mut avg = 0.0;
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, y))| {
            avg = beta * avg + (1.0 - beta) * y;
            (x, avg / (1.0 - beta.powi(i as i32 + 1)))
        })
        .collect()
}

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

/// Register the embedded DejaVu Sans as plotters' `sans-serif` (the PNG needs a font file; the
/// SVG names the font and leaves it to the viewer).
fn register_font() -> Result<(), String> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .map_err(|_| "the embedded DejaVu Sans font does not load".to_string())
    })
    .clone()
}

/// Draw `series` in their styles, and `lr` (step, learning rate) on a second axis, into an SVG
/// file at `path` and a PNG beside it (same name, `.png`); each is written to a temp name, then
/// renamed.
pub fn draw_styled(
    path: &Path,
    title: &str,
    y_label: &str,
    series: &[Styled<'_>],
    lr: Option<&[(f64, f64)]>,
) -> Result<(), ModelError> {
    let all = series.iter().flat_map(|s| s.series.points.iter());
    let (mut x1, mut y0, mut y1) = (1f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in all {
        if y.is_finite() {
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    if !y0.is_finite() {
        return Err(ModelError::invalid(
            path.display().to_string(),
            "no finite loss to plot",
        ));
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let plot = Plot {
        title,
        y_label,
        series,
        lr,
        x1,
        y: (y0 - pad)..(y1 + pad),
    };
    // Text is measured with this font in both images.
    register_font().map_err(|e| ModelError::invalid(path.display().to_string(), e))?;
    let size = (800, 480);
    let png = path.with_extension("png");
    let svg_tmp = path.with_extension("svg.tmp");
    // The bitmap backend picks its encoder by the file's extension.
    let png_tmp = path.with_extension("tmp.png");
    let drawn = plot
        .render(SVGBackend::new(&svg_tmp, size).into_drawing_area())
        .map_err(|e| ModelError::invalid(path.display().to_string(), e))
        .and_then(|()| {
            plot.render(BitMapBackend::new(&png_tmp, size).into_drawing_area())
                .map_err(|e| ModelError::invalid(png.display().to_string(), e))
        })
        .and_then(|()| std::fs::rename(&svg_tmp, path).map_err(|e| ModelError::io(path, e)))
        .and_then(|()| std::fs::rename(&png_tmp, &png).map_err(|e| ModelError::io(&png, e)));
    if drawn.is_err() {
        let _ = std::fs::remove_file(&svg_tmp);
        let _ = std::fs::remove_file(&png_tmp);
    }
    drawn
}

/// What one figure shows, drawn the same on any backend.
struct Plot<'a> {
    title: &'a str,
    y_label: &'a str,
    series: &'a [Styled<'a>],
    lr: Option<&'a [(f64, f64)]>,
    x1: f64,
    y: std::ops::Range<f64>,
}

impl Plot<'_> {
    fn render<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> Result<(), String> {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
        root.fill(&WHITE).map_err(e)?;
        let lr_max = self
            .lr
            .and_then(|p| p.iter().map(|&(_, v)| v).reduce(f64::max))
            .filter(|&m| m > 0.0 && m.is_finite());
        let mut chart = ChartBuilder::on(&root)
            .caption(self.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .right_y_label_area_size(if lr_max.is_some() { 64 } else { 0 })
            .build_cartesian_2d(0f64..self.x1, self.y.clone())
            .map_err(e)?
            .set_secondary_coord(0f64..self.x1, 0f64..lr_max.unwrap_or(1.0) * 1.05);
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(self.y_label)
            .draw()
            .map_err(e)?;
        let mut color_of = 0;
        for s in self.series {
            // A faint series shares the colour of the smoothed line drawn after it.
            let color = COLORS[color_of % COLORS.len()];
            if s.style != Style::Faint {
                color_of += 1;
            }
            let points = s.series.points.iter().copied();
            let drawn = match s.style {
                Style::Line => chart.draw_series(LineSeries::new(points, color.stroke_width(2))),
                Style::Faint => chart.draw_series(LineSeries::new(points, color.mix(0.3))),
                Style::Markers => {
                    chart.draw_series(points.map(move |p| Circle::new(p, 4, color.filled())))
                }
            }
            .map_err(e)?;
            match s.style {
                Style::Markers => {
                    drawn
                        .label(s.series.name)
                        .legend(move |(x, y)| Circle::new((x + 9, y), 4, color.filled()));
                }
                Style::Line => {
                    drawn.label(s.series.name).legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
                }
                Style::Faint => {}
            }
        }
        if let (Some(points), Some(_)) = (self.lr, lr_max) {
            chart
                .configure_secondary_axes()
                .y_desc("learning rate")
                .draw()
                .map_err(e)?;
            let grey = RGBColor(120, 120, 120);
            chart
                .draw_secondary_series(LineSeries::new(points.iter().copied(), grey))
                .map_err(e)?
                .label("learning rate")
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], grey));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(e)?;
        root.present().map_err(e)
    }
}

/// A run's curves in `out`: `loss.svg` (each step's training loss, faint, its smoothed curve,
/// the validation losses as markers, the learning rate `lr` on the second axis) and, for a
/// classifier, `accuracy.svg`; each with its PNG.
pub fn draw_run_curves(
    out: &Path,
    losses: &[f64],
    val_losses: &[(usize, f64)],
    val_accuracy: &[(f64, f64)],
    lr: &[(f64, f64)],
) -> Result<(), ModelError> {
    let train_pts: Vec<(f64, f64)> = losses
        .iter()
        .enumerate()
        .map(|(i, &l)| ((i + 1) as f64, l))
        .collect();
    let val_pts: Vec<(f64, f64)> = val_losses.iter().map(|&(s, l)| (s as f64, l)).collect();
    let smooth = smoothed(&train_pts, 0.9);
    let mut series = vec![
        Styled {
            series: Series {
                name: "train loss",
                points: &train_pts,
            },
            style: Style::Faint,
        },
        Styled {
            series: Series {
                name: "train loss (smoothed)",
                points: &smooth,
            },
            style: Style::Line,
        },
    ];
    if !val_pts.is_empty() {
        series.push(Styled {
            series: Series {
                name: "validation loss",
                points: &val_pts,
            },
            style: Style::Markers,
        });
    }
    draw_styled(
        &out.join("loss.svg"),
        "QLoRA training",
        "loss",
        &series,
        Some(lr),
    )?;
    if !val_accuracy.is_empty() {
        draw_styled(
            &out.join("accuracy.svg"),
            "validation accuracy",
            "accuracy",
            &[Styled {
                series: Series {
                    name: "validation accuracy",
                    points: val_accuracy,
                },
                style: Style::Markers,
            }],
            None,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_is_bias_corrected() {
        let pts: Vec<(f64, f64)> = (1..=4).map(|i| (i as f64, 2.0)).collect();
        // A constant stays itself from the first step on.
        for (_, y) in smoothed(&pts, 0.9) {
            assert!((y - 2.0).abs() < 1e-12);
        }
        let s = smoothed(&[(1.0, 1.0), (2.0, 3.0)], 0.5);
        assert!((s[1].1 - (0.5 * 0.5 * 1.0 + 0.5 * 3.0) / 0.75).abs() < 1e-12);
    }

    #[test]
    fn validation_is_drawn_as_markers_and_the_learning_rate_on_a_second_axis() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.svg");
        let train: Vec<(f64, f64)> = (1..=20)
            .map(|i| (i as f64, 3.0 - 0.05 * i as f64))
            .collect();
        let val = [(0.0, 3.1), (10.0, 2.6), (20.0, 2.2)];
        let lr: Vec<(f64, f64)> = (1..=20).map(|i| (i as f64, 1e-3)).collect();
        let smooth = smoothed(&train, 0.9);
        let series = [
            Styled {
                series: Series {
                    name: "train loss",
                    points: &train,
                },
                style: Style::Faint,
            },
            Styled {
                series: Series {
                    name: "smoothed",
                    points: &smooth,
                },
                style: Style::Line,
            },
            Styled {
                series: Series {
                    name: "validation loss",
                    points: &val,
                },
                style: Style::Markers,
            },
        ];
        draw_styled(&path, "t", "loss", &series, Some(&lr)).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        // Three validation points and the legend's marker.
        assert_eq!(svg.matches("<circle").count(), 4, "{svg}");
        assert!(svg.contains("learning rate"));
        assert!(svg.contains("validation loss") && svg.contains("smoothed"));
        // The PNG beside it: a real image of the same size, with more than a blank page in it.
        let png = std::fs::read(dir.path().join("loss.png")).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 800);
        assert_eq!(u32::from_be_bytes(png[20..24].try_into().unwrap()), 480);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "no temp file is left: {names:?}");
    }
}
